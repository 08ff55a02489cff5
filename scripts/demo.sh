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
"$BIN" gateway --config config.toml >"$work/gateway.out" 2>"$work/gateway.log" &
pids+=($!)
until grep -q "listening on" "$work/gateway.out" 2>/dev/null; do sleep 0.1; done
cat "$work/gateway.out"
"$BIN" receiver --config config.toml >"$work/receiver.out" 2>"$work/receiver.log" &
pids+=($!)
until grep -q "connected" "$work/receiver.out" 2>/dev/null; do sleep 0.1; done
head -n 1 "$work/receiver.out"
echo
echo '$ curl -i http://127.0.0.1:8089/demo/hello.txt'
curl -sS -i http://127.0.0.1:8089/demo/hello.txt
echo
echo '$ curl -i http://127.0.0.1:8089/elsewhere   # no route owns it'
curl -sS -i http://127.0.0.1:8089/elsewhere
echo
