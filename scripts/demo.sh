#!/usr/bin/env bash
# A request through the whole chain in one command: a small local app
# (python3's http.server), the gateway (shipped config.toml) and a
# receiver, then curl through the gateway. Everything stops on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release/anp-proxy
[ -x "$BIN" ] || cargo build --release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/app/demo"
echo "hello from the private app" > "$work/app/demo/hello.txt"
python3 -m http.server 8000 --bind 127.0.0.1 --directory "$work/app" >"$work/app.log" 2>&1 &
pids+=($!)
# Waits up to WAIT seconds for PATTERN in OUT (the process's stdout); on
# timeout, or if the process exits first, says why and shows its log.
WAIT=${DEMO_WAIT:-30}
await_line() {
  local what=$1 pid=$2 pattern=$3 out=$4 log=$5
  for _ in $(seq 1 $((WAIT * 10))); do
    grep -q "$pattern" "$out" 2>/dev/null && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "demo: the $what exited before printing '$pattern'; its log:" >&2
      tail -n 20 "$log" "$out" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "demo: the $what did not print '$pattern' within ${WAIT}s; its log:" >&2
  tail -n 20 "$log" "$out" >&2
  exit 1
}

"$BIN" gateway --config config.toml >"$work/gateway.out" 2>"$work/gateway.log" &
pids+=($!)
await_line gateway "$!" "listening on" "$work/gateway.out" "$work/gateway.log"
cat "$work/gateway.out"
"$BIN" receiver --config config.toml >"$work/receiver.out" 2>"$work/receiver.log" &
pids+=($!)
await_line receiver "$!" "connected" "$work/receiver.out" "$work/receiver.log"
head -n 1 "$work/receiver.out"
echo
echo '$ curl -i http://127.0.0.1:8089/demo/hello.txt'
curl -sS -i http://127.0.0.1:8089/demo/hello.txt
echo
echo '$ curl -i http://127.0.0.1:8089/elsewhere   # no route owns it'
curl -sS -i http://127.0.0.1:8089/elsewhere
echo
