#!/usr/bin/env bash
# A private MariaDB server for the MySQL registry tests (tests/registry.rs).
#
# Idempotent and safe to run from several test binaries at once (flock):
# installs Debian's mariadb-server when no server binary exists (needs root
# and the package registry), then starts one server with its own datadir and
# socket under target/mariadb, on a free TCP port of 127.0.0.1, and creates a
# user with a password. Facts go to target/mariadb/facts (key=value lines:
# host, port, user, password, database, version) and to stdout.
# A running server from an earlier call is reused.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN="${ANP_MARIADB_DIR:-$ROOT/target/mariadb}"
mkdir -p "$RUN"
exec 9>"$RUN/lock"
flock 9

FACTS="$RUN/facts"
DATA="$RUN/data"
SOCK="$RUN/mysqld.sock"
# A unix socket path must fit in 108 bytes.
if [ "${#SOCK}" -gt 100 ]; then
  SOCK="/tmp/anp-mariadb-$(printf %s "$RUN" | sha256sum | cut -c1-12).sock"
fi
USER_NAME=anp
DB_NAME=anp_test

find_bin() {
  local b
  for b in "$@"; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
    if [ -x "/usr/sbin/$b" ]; then echo "/usr/sbin/$b"; return 0; fi
  done
  return 1
}

if ! find_bin mariadbd mysqld >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup_mariadb: no mariadbd/mysqld and not root: cannot install mariadb-server" >&2
    exit 1
  fi
  echo "setup_mariadb: installing mariadb-server (Debian package)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq mariadb-server >&2
fi
MYSQLD="$(find_bin mariadbd mysqld)"
INSTALL_DB="$(find_bin mariadb-install-db mysql_install_db)"
CLIENT="$(find_bin mariadb mysql)"
ADMIN="$(find_bin mariadb-admin mysqladmin)"

alive() {
  "$ADMIN" --no-defaults --socket="$SOCK" -uroot --connect-timeout=2 ping >/dev/null 2>&1
}

if [ -f "$FACTS" ] && alive; then
  cat "$FACTS"
  exit 0
fi

if [ ! -d "$DATA/mysql" ]; then
  rm -rf "$DATA"
  "$INSTALL_DB" --no-defaults --datadir="$DATA" --user=root --skip-test-db \
    --auth-root-authentication-method=socket >"$RUN/install.log" 2>&1 || {
    cat "$RUN/install.log" >&2
    echo "setup_mariadb: mariadb-install-db failed" >&2
    exit 1
  }
fi

# A free port: one nothing answers on (the server refuses to start on a
# taken one, and then we try the next).
start_on() {
  local port=$1
  rm -f "$SOCK"
  setsid "$MYSQLD" --no-defaults --datadir="$DATA" --socket="$SOCK" \
    --port="$port" --bind-address=127.0.0.1 --user=root \
    --pid-file="$RUN/mysqld.pid" --log-error="$RUN/error.log" \
    --skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=64M \
    </dev/null >/dev/null 2>&1 9>&- &
  local pid=$!
  for _ in $(seq 1 300); do
    if alive; then echo "$pid" >"$RUN/server.pid"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.2
  done
  kill "$pid" 2>/dev/null || true
  return 1
}

PORT=""
for _ in $(seq 1 20); do
  p=$((20000 + RANDOM % 30000))
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then continue; fi
  if start_on "$p"; then PORT=$p; break; fi
done
if [ -z "$PORT" ]; then
  tail -n 30 "$RUN/error.log" >&2 || true
  echo "setup_mariadb: the server did not start" >&2
  exit 1
fi

PASSWORD="anp-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
"$CLIENT" --no-defaults --socket="$SOCK" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME CHARACTER SET utf8mb4;
CREATE USER IF NOT EXISTS '$USER_NAME'@'127.0.0.1' IDENTIFIED BY '$PASSWORD';
CREATE USER IF NOT EXISTS '$USER_NAME'@'localhost' IDENTIFIED BY '$PASSWORD';
ALTER USER '$USER_NAME'@'127.0.0.1' IDENTIFIED BY '$PASSWORD';
ALTER USER '$USER_NAME'@'localhost' IDENTIFIED BY '$PASSWORD';
-- Tests make one database per test (anp_t_*).
GRANT ALL PRIVILEGES ON *.* TO '$USER_NAME'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO '$USER_NAME'@'localhost';
FLUSH PRIVILEGES;
SQL
VERSION="$("$CLIENT" --no-defaults --socket="$SOCK" -uroot -N -e 'SELECT VERSION()')"

cat >"$FACTS.tmp" <<FACTS
host=127.0.0.1
port=$PORT
user=$USER_NAME
password=$PASSWORD
database=$DB_NAME
version=$VERSION
FACTS
mv "$FACTS.tmp" "$FACTS"
cat "$FACTS"
