#!/usr/bin/env bash
# Start the nullworker on this machine (a Vast instance, or any Debian/Ubuntu box).
#
#   ./start_server.sh [nullworker serve flags...]
#
# - Creates a virtual environment the first time (NULLWORKER_VENV, default .venv beside
#   this script) and installs the package into it; later runs reinstall only when
#   pyproject.toml changed.
# - Idempotent: if a nullworker already serves WORKER_PORT (default 3000), it says so and
#   exits 0 instead of starting a second copy that would fight over the port.
# - Runs ONE process: Hypercorn's trio worker inside `nullworker serve` (the reservation
#   slot is in-process state, so there must never be two).
# - Logs go to stdout and are appended to NULLWORKER_LOG (default nullworker.log beside
#   this script).
# - With USE_SSL=true and no /etc/instance.crt, asks Vast to sign a certificate for the
#   instance first, as the official start script does.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${NULLWORKER_VENV:-$REPO_DIR/.venv}"
LOG="${NULLWORKER_LOG:-$REPO_DIR/nullworker.log}"
PORT="${WORKER_PORT:-3000}"
PYTHON="${PYTHON:-python3}"
LOCK="${NULLWORKER_LOCK_DIR:-${TMPDIR:-/tmp}}/nullworker-start-$PORT.lock"

say() { printf 'start_server.sh: %s\n' "$*" >&2; }

already_running() {
    # A nullworker answers GET /health with JSON that has a "ready" key (200 or 503).
    "$PYTHON" - "$PORT" <<'EOF'
import json, sys, urllib.request, urllib.error
port = sys.argv[1]
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
        body = r.read()
except urllib.error.HTTPError as e:
    body = e.read()
except Exception:
    sys.exit(1)
try:
    sys.exit(0 if "ready" in json.loads(body) else 1)
except Exception:
    sys.exit(1)
EOF
}

# Only one start at a time per port; the lock is inherited by the worker (fd 9) and
# held for its whole life, so a second start during or after start-up backs off.
mkdir -p "$(dirname "$LOCK")"
exec 9>>"$LOCK"
if ! flock -n 9; then
    # Another start_server.sh is installing or running the worker for this port.
    if already_running; then
        say "a nullworker already serves port $PORT; not starting another"
    else
        say "another start_server.sh for port $PORT is still starting (lock $LOCK); not starting another"
    fi
    exit 0
fi
if already_running; then
    say "a nullworker already serves port $PORT; not starting another"
    exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "Python 3.11 or newer is required (PYTHON=$PYTHON)"
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating a virtual environment in $VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        say "python3 -m venv failed; on Debian/Ubuntu: apt-get install -y python3-venv"
        exit 1
    fi
fi

STAMP="$VENV/.nullworker-installed"
WANT="$(sha256sum "$REPO_DIR/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/nullworker" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    say "installing nullworker into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO_DIR"
    echo "$WANT" >"$STAMP"
fi

if [ "${USE_SSL:-false}" = "true" ] && [ ! -s /etc/instance.crt ]; then
    : "${CONTAINER_ID:?USE_SSL=true needs CONTAINER_ID to have the certificate signed}"
    say "requesting a TLS certificate for instance $CONTAINER_ID"
    openssl req -newkey rsa:2048 -subj "/C=US/ST=CA/CN=pyworker.vast.ai/" -nodes -sha256 \
        -keyout /etc/instance.key -out /etc/instance.csr
    curl --fail --silent --show-error --header 'Content-Type: application/octet-stream' \
        --data-binary @/etc/instance.csr -X POST \
        "https://console.vast.ai/api/v0/sign_cert/?instance_id=$CONTAINER_ID" >/etc/instance.crt
fi

mkdir -p "$(dirname "$LOG")"
say "starting nullworker on port $PORT (log: $LOG)"
exec > >(tee -a "$LOG") 2>&1
exec "$VENV/bin/nullworker" serve "$@"
