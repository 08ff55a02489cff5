#!/usr/bin/env bash
# Creates (once) the virtualenv the DID-WBA interop tests run the real ANP
# SDKs from (agent-connect 0.3.7 and anp 1.0.7), and the WebSocket pass-through
# tests their app and client (websockets 17.4): pinned, from PyPI.
# Usage: setup_venv.sh VENV_DIR   (idempotent; quiet unless it fails)
set -euo pipefail
venv="${1:?usage: setup_venv.sh VENV_DIR}"
want="agent-connect==0.3.7 anp==1.0.7 websockets==17.4"
stamp="$venv/.anp-proxy-interop"
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
python3 -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check $want
echo "$want" > "$stamp"
