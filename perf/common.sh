# Shared by perf/flamegraph.sh and perf/stat.sh (sourced, not run): starts
# anp-bench-app, the gateway and a receiver on free loopback ports, and
# stops them on exit. Sets APP_PORT, GW_PORT, GW_PID, RX_PID, WORK.
# ANP_BIN=PATH runs another anp-proxy binary (a baseline) as gateway and
# receiver; the load generator and the app stay this tree's.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release
ANP_BIN=${ANP_BIN:-$BIN/anp-proxy}
for b in "$ANP_BIN" "$BIN/anp-loadgen" "$BIN/anp-bench-app"; do
    [ -x "$b" ] || { echo "missing $b: cargo build --release --bins" >&2; exit 1; }
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
WORK=$(mktemp -d /tmp/anp-perf.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# wait_line FILE REGEX [COUNT]: until FILE has COUNT lines matching REGEX.
wait_line() {
    local n=${3:-1}
    for _ in $(seq 200); do
        [ "$(grep -cE "$2" "$1" 2>/dev/null)" -ge "$n" ] && return 0
        sleep 0.05
    done
    echo "timed out waiting for /$2/ in $1" >&2; cat "${1%.out}.err" >&2; exit 1
}

start_stack() {
    local workers=${WORKERS:-2}
    "$BIN/anp-bench-app" --threads "${APP_THREADS:-2}" >"$WORK/app.out" 2>"$WORK/app.err" &
    PIDS+=($!)
    wait_line "$WORK/app.out" "listening on"
    APP_PORT=$(sed -n 's/.*127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/app.out")
    # No access log: one JSON line per request would be profiled too
    # (nginx in benches/bench.py has its access log off as well).
    cat >"$WORK/gateway.toml" <<TOML
[logging]
level = "error"
access_log = false
[gateway]
host = "127.0.0.1"
port = 0
workers = $workers
[[gateway.auth.tokens]]
name = "bench"
token = "bench-token-123"
paths = ["/"]
TOML
    "$ANP_BIN" gateway --config "$WORK/gateway.toml" >"$WORK/gateway.out" 2>"$WORK/gateway.err" &
    GW_PID=$!
    PIDS+=($GW_PID)
    wait_line "$WORK/gateway.out" "listening on"
    GW_PORT=$(sed -n 's/.*127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$WORK/gateway.out")
    cat >"$WORK/receiver.toml" <<TOML
[logging]
level = "error"
[receiver]
gateway_url = "ws://127.0.0.1:$GW_PORT/ws"
upstream = "http://127.0.0.1:$APP_PORT"
token = "bench-token-123"
tunnels = 0
max_concurrent = 1024
TOML
    "$ANP_BIN" receiver --config "$WORK/receiver.toml" >"$WORK/receiver.out" 2>"$WORK/receiver.err" &
    RX_PID=$!
    PIDS+=($RX_PID)
    wait_line "$WORK/receiver.out" "connected" 1
    # tunnels = 0: one tunnel to start with, and one per gateway worker once
    # its cores hand requests off (`scale`, docs/PROTOCOL.md 7.8): load it
    # until they are all up, so the profile sees the steady state.
    for _ in $(seq 15); do
        [ "$(grep -c connected "$WORK/receiver.out")" -ge "$workers" ] && break
        "$BIN/anp-loadgen" --url "http://127.0.0.1:$GW_PORT/bytes/16" -c 16 -d 1 --warmup 0 -t 1 \
            >/dev/null 2>&1 || true
    done
}
