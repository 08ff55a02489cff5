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

# --- Benchmarks and profiling (issue #4; benches/README.md, perf/README.md) ---
.PHONY: bench bench-quick bench-deps bench-micro bench-tunnels flamegraph perf-stat

# direct vs nginx vs anp-proxy, interleaved; writes bench-results/latest.{json,svg};
# then the tunnels section (bench-tunnels).
bench:
	$(CARGO) build --release --bin anp-proxy --bin anp-loadgen --bin anp-bench-app
	python3 benches/bench.py
	python3 benches/tunnels.py

# KiB per idle tunnel (gateway and receiver) and handshakes per second, at
# 1,000 and 10,000 tunnels; writes bench-results/tunnels.json (issue 17).
bench-tunnels:
	$(CARGO) build --release --bin anp-proxy --bin anp-loadgen --bin anp-bench-app
	python3 benches/tunnels.py

# The same in under 2 minutes (fewer cells, shorter runs).
bench-quick:
	$(CARGO) build --release --bin anp-proxy --bin anp-loadgen --bin anp-bench-app
	python3 benches/bench.py --quick

# nginx (comparison target) and wrk from Debian packages; run as root.
bench-deps:
	apt-get update && (apt-get install -y nginx-light wrk || apt-get install -y nginx wrk)

# Criterion micro-benches: ANPX codec, WebSocket framing, route lookup.
bench-micro:
	$(CARGO) bench --bench anpx --bench ws --bench routes

# Flamegraph of the gateway under load: perf/flamegraph.sh [gateway|receiver].
flamegraph:
	$(CARGO) build --release --bin anp-proxy --bin anp-loadgen --bin anp-bench-app
	./perf/flamegraph.sh gateway

# Context switches and syscalls per request: perf/stat.sh.
perf-stat:
	$(CARGO) build --release --bin anp-proxy --bin anp-loadgen --bin anp-bench-app
	./perf/stat.sh gateway

# --- Fuzzing (issue #6; fuzz/README.md) ---
.PHONY: fuzz-smoke fuzz

# Every cargo-fuzz target for FUZZ_SECONDS (default 30) from its seeds;
# fails if any crashes. Stable toolchain + RUSTC_BOOTSTRAP=1; installs cargo-fuzz.
fuzz-smoke:
	./scripts/fuzz-smoke.sh

# The same, 10 minutes per target unless FUZZ_SECONDS says otherwise.
fuzz:
	FUZZ_SECONDS=$${FUZZ_SECONDS:-600} ./scripts/fuzz-smoke.sh
