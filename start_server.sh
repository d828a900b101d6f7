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
# - On a Vast instance (CONTAINER_ID set) REPORT_ADDR defaults to https://run.vast.ai, and
#   a failure here (no suitable Python, install, certificate) is reported to the engine
#   as error_msg before exiting 1.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${NULLWORKER_VENV:-$REPO_DIR/.venv}"
LOG="${NULLWORKER_LOG:-$REPO_DIR/nullworker.log}"
PORT="${WORKER_PORT:-3000}"
LOCK="${NULLWORKER_LOCK_DIR:-${TMPDIR:-/tmp}}/nullworker-start-$PORT.lock"

# On a Vast instance (CONTAINER_ID set) the engine is run.vast.ai unless told otherwise,
# as in the official start script.
if [ -n "${CONTAINER_ID:-}" ] && [ -z "${REPORT_ADDR:-}" ]; then
    export REPORT_ADDR="https://run.vast.ai"
fi

# The first Python >= 3.11 on PATH (images often carry several), unless PYTHON is set.
if [ -z "${PYTHON:-}" ]; then
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PYTHON="$candidate"
            break
        fi
    done
fi
PYTHON="${PYTHON:-python3}"

say() { printf 'start_server.sh: %s\n' "$*" >&2; }

# Tell the engine why this instance will not serve (every REPORT_ADDR entry, bounded),
# then exit 1: an instance that fails silently just looks slow to start.
fail() {
    say "$*"
    if [ -n "${CONTAINER_ID:-}" ] && [ -n "${REPORT_ADDR:-}" ]; then
        # Any python3 can send this, even one too old to run the worker.
        local beacon_python=python3
        command -v python3 >/dev/null 2>&1 || beacon_python="$PYTHON"
        "$beacon_python" - "$*" <<'EOF' || true
import json, os, sys, urllib.request
body = json.dumps({
    "id": int(os.environ["CONTAINER_ID"]), "mtoken": os.environ.get("MASTER_TOKEN", ""),
    "version": "0", "error_msg": "start_server.sh: " + sys.argv[1], "url": "",
}).encode()
for addr in os.environ["REPORT_ADDR"].split(","):
    if addr.strip():
        request = urllib.request.Request(
            addr.strip().rstrip("/") + "/worker_status/", data=body,
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except Exception as exc:
            print(f"start_server.sh: could not report to {addr.strip()}: {exc}", file=sys.stderr)
EOF
    fi
    exit 1
}

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
    fail "Python 3.11 or newer is required (found: $("$PYTHON" --version 2>&1 || echo none))"
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating a virtual environment in $VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        fail "$PYTHON -m venv failed (on Debian/Ubuntu: apt-get install -y python3-venv)"
    fi
fi

STAMP="$VENV/.nullworker-installed"
WANT="$(sha256sum "$REPO_DIR/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/nullworker" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    say "installing nullworker into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO_DIR" ||
        fail "installing nullworker into $VENV failed"
    echo "$WANT" >"$STAMP"
fi

if [ "${USE_SSL:-false}" = "true" ] && [ ! -s /etc/instance.crt ]; then
    : "${CONTAINER_ID:?USE_SSL=true needs CONTAINER_ID to have the certificate signed}"
    say "requesting a TLS certificate for instance $CONTAINER_ID"
    openssl req -newkey rsa:2048 -subj "/C=US/ST=CA/CN=pyworker.vast.ai/" -nodes -sha256 \
        -keyout /etc/instance.key -out /etc/instance.csr ||
        fail "USE_SSL=true: making a key and CSR with openssl failed"
    curl --fail --silent --show-error --header 'Content-Type: application/octet-stream' \
        --data-binary @/etc/instance.csr -X POST \
        "https://console.vast.ai/api/v0/sign_cert/?instance_id=$CONTAINER_ID" >/etc/instance.crt ||
        { rm -f /etc/instance.crt; fail "USE_SSL=true: Vast did not sign the certificate"; }
fi

mkdir -p "$(dirname "$LOG")"
say "starting nullworker on port $PORT (log: $LOG)"
exec > >(tee -a "$LOG") 2>&1
exec "$VENV/bin/nullworker" serve "$@"
