#!/usr/bin/env bash
# manage.sh start|stop|status|restart|logs [gateway|receiver] — run anp-proxy
# as a background service from this directory. The pid file and the log
# live under ./run/ (override with ANP_RUN_DIR); the config is ./config.toml
# (override with ANP_CONFIG).
set -euo pipefail
cd "$(dirname "$0")"
cmd=${1:-status}
role=${2:-gateway}
RUN_DIR=${ANP_RUN_DIR:-./run}
CONFIG=${ANP_CONFIG:-./config.toml}
BIN=${ANP_BIN:-./target/release/anp-proxy}
PID="$RUN_DIR/anp-proxy-$role.pid"
LOG="$RUN_DIR/anp-proxy-$role.log"
mkdir -p "$RUN_DIR"

running() { [ -f "$PID" ] && kill -0 "$(cat "$PID")" 2>/dev/null; }

start() {
  if running; then echo "$role already running (pid $(cat "$PID"))"; return 0; fi
  [ -x "$BIN" ] || cargo build --release
  "$BIN" check --config "$CONFIG" >/dev/null
  nohup "$BIN" "$role" --config "$CONFIG" >>"$LOG" 2>&1 &
  echo $! >"$PID"
  for _ in $(seq 1 50); do
    if grep -q "listening on\|connected to" "$LOG" 2>/dev/null || ! running; then break; fi
    sleep 0.1
  done
  if running; then echo "$role started (pid $(cat "$PID")), log: $LOG"; else echo "$role failed to start; see $LOG" >&2; tail -n 20 "$LOG" >&2; exit 1; fi
}

stop() {
  if ! running; then echo "$role not running"; rm -f "$PID"; return 0; fi
  local p; p=$(cat "$PID")
  kill -TERM "$p"
  for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$p" 2>/dev/null && kill -KILL "$p"
  rm -f "$PID"
  echo "$role stopped"
}

status() {
  if ! running; then echo "$role: not running"; return 3; fi
  local p; p=$(cat "$PID")
  echo "$role: running, pid $p, up $(ps -o etime= -p "$p" | tr -d ' ')"
  if command -v ss >/dev/null; then
    echo "listening:"; ss -ltnp 2>/dev/null | grep "pid=$p," | awk '{print "  " $4}' | sort -u
  fi
  if [ "$role" = gateway ] && command -v curl >/dev/null; then
    # The ready lines the gateway printed last (the log is appended to).
    local addr admin
    addr=$(grep -o 'gateway listening on https\?://[^ ]*' "$LOG" | tail -n 1 | sed 's/.*listening on //')
    admin=$(grep -o 'admin listening on http://[^ ]*' "$LOG" | tail -n 1 | sed 's/.*listening on //')
    [ -n "$addr" ] && echo "health: $(curl -sk --max-time 5 "$addr/health" || echo unreachable)"
    if [ -n "$admin" ]; then
      local stats; stats=$(curl -s --max-time 5 "$admin/stats" || true)
      if [ -z "$stats" ]; then echo "admin: $admin unreachable"; else show_stats "$stats"; fi
    fi
  fi
}

# Tunnels per identity (and a few totals) from the admin /stats JSON.
show_stats() {
  if command -v python3 >/dev/null; then
    python3 -c '
import json, sys
s = json.loads(sys.argv[1])
print("tunnels: %d" % s.get("tunnels", 0))
for ident, cores in sorted(s.get("tunnels_by_identity", {}).items()):
    print("  %s: %d (per core: %s)" % (ident, sum(cores), " ".join(map(str, cores))))
lat = s.get("latency_ms", {})
print("requests: %s, in flight: %s, p50/p90/p99: %s/%s/%s ms" % (s.get("requests_total"), s.get("in_flight"), lat.get("p50"), lat.get("p90"), lat.get("p99")))
fails = s.get("auth_failures") or {}
if fails:
    print("refused tunnel upgrades: " + ", ".join("%s %d" % kv for kv in sorted(fails.items())))
' "$1" 2>/dev/null || echo "stats: $1"
  else
    echo "stats: $1"
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  logs) tail -n 100 -f "$LOG" ;;
  *) echo "usage: $0 start|stop|status|restart|logs [gateway|receiver]" >&2; exit 2 ;;
esac
