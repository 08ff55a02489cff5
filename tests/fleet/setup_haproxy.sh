#!/usr/bin/env bash
# HAProxy for the fleet end-to-end test (tests/fleet_e2e.rs), the way
# tests/db/setup_mariadb.sh gets MariaDB: Debian's package, installed only
# when no haproxy binary exists (needs root and the package registry).
# Idempotent and safe to run from several test binaries at once (flock).
# Prints `haproxy=PATH` and `version=X.Y.Z` on stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN="${ANP_HAPROXY_DIR:-$ROOT/target/haproxy}"
mkdir -p "$RUN"
exec 9>"$RUN/lock"
flock 9

find_bin() {
  if command -v haproxy >/dev/null 2>&1; then command -v haproxy; return 0; fi
  if [ -x /usr/sbin/haproxy ]; then echo /usr/sbin/haproxy; return 0; fi
  return 1
}

if ! find_bin >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup_haproxy: no haproxy and not root: cannot install it" >&2
    exit 1
  fi
  echo "setup_haproxy: installing haproxy (Debian package)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # The package's service is not started here: the test runs its own.
  apt-get install -y -qq --no-install-recommends haproxy >&2
fi
BIN="$(find_bin)"
VERSION="$("$BIN" -v | sed -n 's/^HAProxy version \([^ ]*\).*/\1/p' | head -n1)"
echo "haproxy=$BIN"
echo "version=$VERSION"
