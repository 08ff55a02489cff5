# anp-proxy — common tasks. `make run` starts the gateway on the shipped
# config.toml; `make test` runs the whole test suite (what CI runs).

CARGO ?= cargo
BIN := target/release/anp-proxy

.PHONY: all build release run test test-unit fmt fmt-check lint demo check clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# Set up (build) and run the gateway on its embedded defaults.
run: release
	./$(BIN) gateway --config config.toml

# Validate config.toml without starting anything.
check: release
	./$(BIN) check --config config.toml

# The whole suite: unit, protocol vectors, property tests, end to end.
test:
	$(CARGO) test --all-targets --no-fail-fast

test-unit:
	$(CARGO) test --lib

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --all-targets -- -D warnings

# Gateway + receiver + a small local app, and a request through them.
demo: release
	./scripts/demo.sh

clean:
	$(CARGO) clean
