#!/usr/bin/env bash
# Usage: perf/stat.sh [gateway|receiver] [BODY_BYTES] [CONNECTIONS] [SECONDS]
#   (defaults: gateway 1024 64 5; `make perf-stat` runs the defaults)
# Starts anp-bench-app + gateway + receiver, drives anp-loadgen at them
# and counts, for the chosen process, software events with
# `perf stat -e task-clock,context-switches,cpu-migrations,page-faults,
# raw_syscalls:sys_enter` (no hardware counters on this kind of VM), then
# prints them per request. Falls back to `strace -c -f` (much slower: it
# stops at every syscall) when perf is missing. Installs linux-perf if
# needed (`apt-get install -y linux-perf`).
set -euo pipefail
WHICH=${1:-gateway}
BODY=${2:-1024}
CONNS=${3:-64}
SECS=${4:-5}
case $WHICH in gateway|receiver) ;; *) echo "usage: $0 [gateway|receiver] [body] [conns] [secs]" >&2; exit 2;; esac
command -v perf >/dev/null || apt-get install -y linux-perf || true

source "$(dirname "$0")/common.sh"
start_stack
PID=$GW_PID; [ "$WHICH" = receiver ] && PID=$RX_PID

"$BIN/anp-loadgen" --json --url "http://127.0.0.1:$GW_PORT/bytes/$BODY" -c "$CONNS" -d "$SECS" --warmup 0 \
    >"$WORK/loadgen.json" 2>"$WORK/loadgen.txt" &
LG=$!
PIDS+=($LG)
sleep 0.2
if command -v perf >/dev/null; then
    EVENTS=task-clock,context-switches,cpu-migrations,page-faults
    perf list 2>/dev/null | grep -q 'raw_syscalls:sys_enter' && EVENTS=$EVENTS,raw_syscalls:sys_enter
    perf stat -x, -e "$EVENTS" -p "$PID" -o "$WORK/stat.csv" -- sleep "$((SECS - 1))" >/dev/null 2>&1 || true
    wait "$LG" || true
    cat "$WORK/loadgen.txt"
    REQS=$(python3 -c "import json;d=json.load(open('$WORK/loadgen.json'));print(d['rps']*$((SECS - 1)))")
    echo
    echo "$WHICH, ${BODY} B, $CONNS connections, ~$(printf %.0f "$REQS") requests in the $((SECS - 1)) s window:"
    awk -F, -v r="$REQS" '!/^#/ && NF>2 && $1 ~ /^[0-9.]+$/ {printf "  %-26s %14.0f  %10.3f per request\n", $3, $1, $1/r}' "$WORK/stat.csv"
else
    echo "perf not available; using strace -c -f for $((SECS - 1)) s (slows the process down a lot)"
    timeout -s INT "$((SECS - 1))" strace -c -f -p "$PID" -o "$WORK/strace.txt" || true
    wait "$LG" || true
    cat "$WORK/loadgen.txt"
    REQS=$(python3 -c "import json;d=json.load(open('$WORK/loadgen.json'));print(d['requests'])")
    echo "requests: $REQS"
    head -25 "$WORK/strace.txt"
fi
