#!/usr/bin/env bash
# manage.sh start|stop|status|restart|reload|logs [gateway|receiver] — run
# anp-proxy as a background service from this directory. The pid file and
# the log live under ./run/ (override with ANP_RUN_DIR); the config is
# ./config.toml (override with ANP_CONFIG; without either, no file: the
# defaults and ANP_PROXY_<TABLE>__<KEY> variables, which the process
# inherits in any case and which override the file).
#   start    runs `anp-proxy check` first: a configuration it refuses is
#            never launched (the reason is printed, exit 2).
#   stop     SIGTERM: the gateway drains (finishes requests in flight within
#            shutdown_grace, closes tunnels with 1001), then exits; a
#            receiver tells the gateway it is draining, finishes its
#            requests in flight within its shutdown_grace, closes its
#            tunnels with 1001 and exits 0.
#   restart  gateway: starts the new process on the same ports first
#            (`--takeover`: SO_REUSEPORT, the public and the admin port),
#            then drains the old one: no refused connection.
#            receiver: starts the new receiver first and waits for its
#            tunnels, then SIGTERMs the old one, which drains (the gateway
#            sends it nothing new, its requests in flight finish): no gap.
#            Under the gateway's `duplicate_tunnels = "refuse"` the new one
#            is refused while the old one holds tunnels: stop, then start.
#   reload   gateway: SIGHUP: routes, tokens, certificates and limits, no
#            connection dropped. receiver: a restart (above), which applies
#            the whole new configuration without a gap (a receiver does
#            not reload in place; sent SIGHUP, it keeps running and says so).
set -euo pipefail
cd "$(dirname "$0")"
cmd=${1:-status}
role=${2:-gateway}
RUN_DIR=${ANP_RUN_DIR:-./run}
CONFIG=${ANP_CONFIG:-./config.toml}
# No file at the default place and none asked for: run on the defaults and
# the environment (anp-proxy's own rule without --config).
if [ -z "${ANP_CONFIG:-}" ] && [ ! -e "$CONFIG" ]; then CONFIG_ARGS=(); else CONFIG_ARGS=(--config "$CONFIG"); fi
BIN=${ANP_BIN:-./target/release/anp-proxy}
PID="$RUN_DIR/anp-proxy-$role.pid"
LOG="$RUN_DIR/anp-proxy-$role.log"
mkdir -p "$RUN_DIR"

# A process that exited is not alive even while nobody has reaped it (a
# zombie: in a container whose init does not reap, kill -0 still succeeds).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ "$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

running() { [ -f "$PID" ] && alive "$(cat "$PID")"; }

# Seconds `stop` waits for a drain before SIGKILL (shutdown_grace is 30 on
# either side).
STOP_WAIT=${ANP_STOP_WAIT:-40}

# Seconds `start` and `restart` wait for the new process's ready line.
START_WAIT=${ANP_START_WAIT:-30}

# Whether the log, from byte $1 on, holds a ready line. `|| true`: grep -q
# stops at the first match, tail may then die of SIGPIPE (likely when the
# access log is busy), and under pipefail that would read as "not ready".
ready_since() {
  { tail -c "+$(($1 + 1))" "$LOG" 2>/dev/null || true; } | grep -q "listening on\|connected to"
}

# The last log lines from byte $1 on, access-log (JSON) lines left out.
log_tail() {
  { tail -c "+$(($1 + 1))" "$LOG" 2>/dev/null || true; } | grep -v '^{' | tail -n 20 || true
}

# Starts a process and waits for its ready line; prints its pid. Extra
# arguments go to the subcommand (restart: --takeover). A process that
# exits, or prints no ready line within START_WAIT, fails the launch (the
# latter is stopped: a restart then leaves the old gateway serving).
launch() {
  [ -x "$BIN" ] || cargo build --release >&2
  touch "$LOG"
  local from; from=$(wc -c <"$LOG")
  nohup "$BIN" "$role" ${CONFIG_ARGS[@]+"${CONFIG_ARGS[@]}"} "$@" >>"$LOG" 2>&1 &
  local p=$! waited=0
  until ready_since "$from"; do
    if ! alive "$p"; then
      echo "$role failed to start; see $LOG" >&2; log_tail "$from" >&2; return 1
    fi
    if [ "$waited" -ge $((START_WAIT * 10)) ]; then
      echo "$role (pid $p) printed no ready line within ${START_WAIT}s: stopping it; see $LOG" >&2
      kill -TERM "$p" 2>/dev/null || true
      log_tail "$from" >&2; return 1
    fi
    sleep 0.1; waited=$((waited + 1))
  done
  echo "$p"
}

# `anp-proxy check` of this side: what it refuses would not start. Its
# reason goes to stderr; nothing is launched and the log is not touched.
# (Called on its own, not inside launch's $(…): there `set -e` is off.)
checked() {
  [ -x "$BIN" ] || cargo build --release >&2
  if ! "$BIN" check "$role" ${CONFIG_ARGS[@]+"${CONFIG_ARGS[@]}"} >/dev/null; then
    echo "$role not started: the configuration does not check (above)" >&2
    exit 2
  fi
}

start() {
  if running; then echo "$role already running (pid $(cat "$PID"))"; return 0; fi
  checked
  local p; p=$(launch) || exit 1
  echo "$p" >"$PID"
  echo "$role started (pid $p), log: $LOG"
}

# SIGTERM and wait for the drain; SIGKILL after STOP_WAIT seconds.
term_and_wait() {
  local p=$1
  kill -TERM "$p" 2>/dev/null || return 0
  for _ in $(seq 1 $((STOP_WAIT * 10))); do alive "$p" || return 0; sleep 0.1; done
  echo "$role (pid $p) still running after ${STOP_WAIT}s: SIGKILL" >&2
  kill -KILL "$p" 2>/dev/null || true
}

stop() {
  if ! running; then echo "$role not running"; rm -f "$PID"; return 0; fi
  term_and_wait "$(cat "$PID")"
  rm -f "$PID"
  echo "$role stopped"
}

# Gateway: the successor joins the same ports (--takeover: SO_REUSEPORT)
# before the old process drains, so no connection is refused; the old one
# closes its admin listener as the drain starts; receivers follow on 1001.
restart() {
  if ! running; then stop; start; return; fi
  checked
  local old; old=$(cat "$PID")
  local new
  if [ "$role" = gateway ]; then
    new=$(launch --takeover) || exit 1
  else
    # A second receiver beside the old one (same instance id: the gateway
    # sees more tunnels of the same receiver), then the old one drains.
    new=$(launch) || exit 1
  fi
  echo "$new" >"$PID"
  term_and_wait "$old"
  echo "$role restarted (pid $old -> $new), log: $LOG"
}

# Gateway: SIGHUP, then waits (up to 10 s) for it to say how it went:
# `anp-proxy reloaded …` (exit 0) or `anp-proxy reload failed: …` (exit 1).
# Receiver: `restart`, the gapless replacement.
reload() {
  if ! running; then echo "$role not running" >&2; exit 3; fi
  if [ "$role" = receiver ]; then restart; return; fi
  local from; from=$(($(wc -l <"$LOG") + 1))
  kill -HUP "$(cat "$PID")"
  local line=""
  for _ in $(seq 1 100); do
    line=$(tail -n "+$from" "$LOG" | grep -m1 'anp-proxy reloaded\|anp-proxy reload failed' || true)
    [ -n "$line" ] && break
    sleep 0.1
  done
  if [ -z "$line" ]; then
    echo "$role: reload requested, no answer within 10 s (see $LOG)" >&2; exit 1
  fi
  echo "$role: $line"
  case "$line" in *"reload failed"*) exit 1 ;; esac
}

status() {
  if ! running; then echo "$role: not running"; return 3; fi
  local p; p=$(cat "$PID")
  echo "$role: running, pid $p, up $(ps -o etime= -p "$p" | tr -d ' ')"
  if command -v ss >/dev/null && [ "$role" = gateway ]; then
    echo "listening:"; { ss -ltnp 2>/dev/null | grep "pid=$p," || true; } | awk '{print "  " $4}' | sort -u
  elif command -v ss >/dev/null; then
    # A receiver's tunnels and app calls are outgoing (it listens only on
    # its admin port).
    echo "connections:"; { ss -tnp state established 2>/dev/null | grep "pid=$p," || true; } | awk '{print "  " $3 " -> " $4}' | sort -u
  fi
  if [ "$role" = receiver ] && command -v curl >/dev/null; then
    # Its admin /health: tunnels up per gateway (200 ok, 503 no_tunnel).
    local radmin
    radmin=$(grep -o 'receiver admin listening on http://[^ ]*' "$LOG" | tail -n 1 | sed 's/.*listening on //')
    [ -n "$radmin" ] && echo "health: $(curl -s --max-time 5 "$radmin/health" || echo unreachable)"
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
  restart) restart ;;
  reload) reload ;;
  status) status ;;
  logs) tail -n 100 -f "$LOG" ;;
  *) echo "usage: $0 start|stop|status|restart|reload|logs [gateway|receiver]" >&2; exit 2 ;;
esac
