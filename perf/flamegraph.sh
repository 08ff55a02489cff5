#!/usr/bin/env bash
# Usage: perf/flamegraph.sh [gateway|receiver] [BODY_BYTES] [CONNECTIONS] [SECONDS]
#   (defaults: gateway 1024 64 10; `make flamegraph` runs the defaults)
# Starts anp-bench-app + gateway + receiver, drives anp-loadgen at them
# (closed loop), records the chosen process with
# `perf record -e cpu-clock -g` (this kind of VM has no hardware counters)
# and renders bench-results/flamegraph-<which>.svg with inferno, plus
# bench-results/flamegraph-<which>.folded (collapsed stacks) and a top-15
# of the hottest leaf functions on stdout.
# Environment: ANP_BIN=PATH profiles another anp-proxy binary (a baseline;
# see perf/README.md "Before and after"), TAG=NAME names the output
# flamegraph-<which>-NAME.svg, CALLGRAPH=fp|dwarf|lbr picks perf's unwinder.
# Installs what is missing: `apt-get install -y linux-perf` for perf,
# `cargo install inferno` for inferno-collapse-perf / inferno-flamegraph.
set -euo pipefail
WHICH=${1:-gateway}
BODY=${2:-1024}
CONNS=${3:-64}
SECS=${4:-10}
CALLGRAPH=${CALLGRAPH:-dwarf}
case $WHICH in gateway|receiver) ;; *) echo "usage: $0 [gateway|receiver] [body] [conns] [secs]" >&2; exit 2;; esac

command -v perf >/dev/null || apt-get install -y linux-perf
export PATH=$HOME/.cargo/bin:$PATH
command -v inferno-flamegraph >/dev/null || cargo install inferno
# Symbols of other processes' kernels frames need this; harmless if refused.
echo -1 > /proc/sys/kernel/perf_event_paranoid 2>/dev/null || true

source "$(dirname "$0")/common.sh"
start_stack
PID=$GW_PID; [ "$WHICH" = receiver ] && PID=$RX_PID
OUT=$ROOT/bench-results
NAME=flamegraph-$WHICH${TAG:+-$TAG}
mkdir -p "$OUT"

"$BIN/anp-loadgen" --mark-window --url "http://127.0.0.1:$GW_PORT/bytes/$BODY" -c "$CONNS" -d "$((SECS + 1))" \
    --warmup 1 >"$WORK/loadgen.json" 2>"$WORK/loadgen.txt" &
LG=$!
PIDS+=($LG)
# Record from the end of the warm-up (the load generator says when).
wait_line "$WORK/loadgen.txt" WINDOW_START
perf record -e cpu-clock -F 999 --call-graph "$CALLGRAPH" -p "$PID" -o "$WORK/perf.data" -- sleep "$SECS" \
    2>"$WORK/perf.err" >/dev/null
wait "$LG" || true
grep -v WINDOW_ "$WORK/loadgen.txt" || true

perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf >"$OUT/$NAME.folded"
inferno-flamegraph --title "$(basename "$ANP_BIN") $WHICH${TAG:+ ($TAG)}, ${BODY} B, $CONNS connections (cpu-clock)" \
    <"$OUT/$NAME.folded" >"$OUT/$NAME.svg"
echo "wrote $OUT/$NAME.svg and .folded"

# The summaries below end pipes early (head): no pipefail from here on.
set +o pipefail
TOTAL=$(awk '{s+=$NF} END {print s}' "$OUT/$NAME.folded")
echo
echo "top 15 leaf functions (self time; weights are cpu-clock ns, total $TOTAL):"
awk '{n=$NF; $NF=""; sub(/ $/,""); k=split($0,f,";"); leaf[f[k]]+=n} END {for (l in leaf) print leaf[l], l}' \
    "$OUT/$NAME.folded" | sort -rn | head -15 |
    awk -v t="$TOTAL" '{c=$1; $1=""; printf "%6d %5.1f%% %s\n", c, 100*c/t, $0}'
echo
echo "top 15 stacks (collapsed, by count):"
sort -t' ' -k2 -rn "$OUT/$NAME.folded" 2>/dev/null | awk '{print $NF, $0}' | sort -rn | head -15 |
    cut -d' ' -f2- | awk '{n=$NF; $NF=""; s=$0; if (length(s) > 220) s="…" substr(s, length(s)-219); print n, s}'
