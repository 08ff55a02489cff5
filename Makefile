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
.PHONY: bench bench-slowread bench-quick bench-overload bench-counts bench-bins bench-allocs-bin bench-deps bench-micro bench-storm bench-tunnels bench-fleet bench-wrk flamegraph perf-stat

ALLOC_BIN := target/release/anp-proxy-count-allocs

# Issue 11's own method: wrk as the client, nginx serving static files as
# the app, nginx beside anp-proxy, interleaved by round; req/s, p99 and CPU
# per request of each proxy process at 1 KiB, 64 KiB and 1 MiB (~3 minutes).
# Writes bench-results/wrk-nginx.json. WRK_ARGS=--baseline-bin PATH adds an
# A/B build; WRK_ARGS="--tls front" (or all) measures HTTPS.
bench-wrk:
	$(CARGO) build --release --bin anp-proxy
	python3 benches/wrk_nginx.py $(WRK_ARGS)

# Memory per slow reader (issue 12): slowhttptest -X against fresh
# processes of each target, RSS growth per connection (~3 minutes).
# Writes bench-results/slowread.json; SLOWREAD_ARGS=--baseline-bin PATH
# adds an A/B build.
bench-slowread: bench-bins
	python3 benches/slowread.py $(SLOWREAD_ARGS)

# KiB per idle tunnel (gateway and receiver) and handshakes per second, at
# 1,000 and 10,000 tunnels; writes bench-results/tunnels.json (issue 17).
bench-tunnels:
	$(CARGO) build --release --bin anp-proxy --bin anp-loadgen --bin anp-bench-app
	python3 benches/tunnels.py

# What one more gateway costs an idle receiver (a fleet, issue 13): RSS and
# idle CPU with one gateway and with three.
bench-fleet:
	$(CARGO) build --release --bin anp-proxy
	python3 benches/fleet.py

bench-bins:
	$(CARGO) build --release --bin anp-proxy --bin anp-loadgen --bin anp-bench-app --bin anp-storm

# A gateway restart with 10,000 tunnels of distinct identities, before/after
# the issue-17 pacing; writes bench-results/storm.json (STORM_ARGS=--quick: 2,000).
bench-storm:
	$(CARGO) build --release --bin anp-proxy --bin anp-storm
	python3 benches/storm.py $(STORM_ARGS)

# The count-allocs build for `bench.py --allocs`, in the same target dir
# (only anp-proxy itself compiles again), copied aside; then the normal
# binary is put back in its place.
bench-allocs-bin:
	$(CARGO) build --release --features count-allocs --bin anp-proxy
	cp target/release/anp-proxy $(ALLOC_BIN)
	$(CARGO) build --release --bin anp-proxy

# direct vs nginx vs anp-proxy, interleaved, CPU per request of each proxy
# process; then counting runs: syscalls, io_uring calls and allocations per
# request; then the overload rows (issue 12: open loop at 2x and 5x each
# proxy's closed-loop max, and fairness across two identities). Writes
# bench-results/latest.{json,svg}.
bench: bench-bins bench-allocs-bin
	python3 benches/bench.py --syscalls --allocs --overload
	python3 benches/wrk_nginx.py
	python3 benches/tunnels.py
	python3 benches/storm.py
	python3 benches/fleet.py

# The same in under 2 minutes (fewer cells, shorter runs; no allocation
# counts: they need the second build).
bench-quick: bench-bins
	python3 benches/bench.py --quick --syscalls

# Only the overload rows (issue 12), ~3 minutes on 2 cores: closed-loop max of nginx
# and anp-proxy at 1 KiB / 64 connections, open loop at 2x and 5x it
# (offered, goodput, errors by kind, p99), identity B's p99 alone and while
# identity A is flooded at 5x. Writes bench-results/latest.{json,svg}.
bench-overload: bench-bins
	python3 benches/bench.py --quick --no-matrix --idle-conns 0 --overload

# Only the per-request counts (CPU, syscalls, io_uring, allocations) at
# 1 KiB / 64 connections: no matrix, no idle-connection test (~1 minute).
bench-counts: bench-bins bench-allocs-bin
	python3 benches/bench.py --quick --no-matrix --idle-conns 0 --syscalls --allocs

# nginx (comparison target), wrk and perf (syscall counts, flame graphs)
# from Debian packages; run as root.
bench-deps:
	apt-get update && (apt-get install -y nginx-light wrk linux-perf slowhttptest || apt-get install -y nginx wrk linux-perf slowhttptest)

# Criterion micro-benches: ANPX codec, WebSocket framing, route lookup and
# registry polls at 100k rows, DID-WBA handshake verification.
bench-micro:
	$(CARGO) bench --bench anpx --bench ws --bench routes --bench didwba

# Flame graphs of the gateway and the receiver under load (1 KiB, 64
# connections): bench-results/flamegraph-{gateway,receiver}[-TAG].svg.
# FLAME_BIN=PATH profiles another anp-proxy build (a baseline), FLAME_TAG
# names the files (perf/README.md, "Before and after").
flamegraph: bench-bins
	ANP_BIN=$(FLAME_BIN) TAG=$(FLAME_TAG) ./perf/flamegraph.sh gateway
	ANP_BIN=$(FLAME_BIN) TAG=$(FLAME_TAG) ./perf/flamegraph.sh receiver

# Context switches and syscalls per request: perf/stat.sh.
perf-stat: bench-bins
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
