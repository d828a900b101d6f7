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
# - Runs ONE worker process at a time: Hypercorn's trio worker inside `nullworker serve`
#   (the reservation slot is in-process state, so there must never be two), as a child of
#   this script, which stays to supervise it:
#   - SIGTERM or SIGINT to this script is passed on to the worker as SIGTERM; the worker
#     shuts down gracefully, is not restarted, and the script exits with its status.
#   - A worker that dies on its own (a non-zero status, or a signal this script did not
#     send) is restarted after a backoff: NULLWORKER_RESTART_BACKOFF_S (default 1 s),
#     doubling up to NULLWORKER_RESTART_MAX_S (default 30 s), back to the start once a
#     worker stayed up NULLWORKER_RESTART_RESET_S (default 60 s). Each restart is logged.
#   - Not restarted: status 2 (a configuration error; the script exits 2), status 0 (the
#     worker was stopped by a signal from someone else; the script exits 0), and a
#     nullworker that meanwhile answers on WORKER_PORT (another copy took over; exit 0).
# - Logs go to stdout and are appended to NULLWORKER_LOG (default nullworker.log beside
#   this script).
# - TLS, as the official start script: on a Vast instance (CONTAINER_ID set) USE_SSL defaults
#   to true, standalone to false; USE_SSL=false opts out. With TLS on and no usable
#   certificate (NULLWORKER_SSL_CERTFILE/_KEYFILE, default /etc/instance.crt and .key), it
#   makes a key and a request (with the official SAN config) and has Vast sign it
#   (NULLWORKER_SIGN_CERT_URL), 5 tries with a pause of NULLWORKER_CERT_RETRY_S (default
#   2 s) doubling between them. If all fail, the worker is not started (exit 1, below).
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
PYTHON_GIVEN="${PYTHON:-}"
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

# "1.5" -> 1500 (milliseconds); fails on anything but a plain number of seconds.
to_ms() {
    [[ $1 =~ ^([0-9]{1,7})(\.([0-9]{1,3}))?$ ]] || return 1
    local frac="${BASH_REMATCH[3]}000"
    echo $((10#${BASH_REMATCH[1]} * 1000 + 10#${frac:0:3}))
}

# 1500 -> "1.5", 2000 -> "2" (seconds, for sleep and the log).
seconds() {
    local text
    text="$(($1 / 1000)).$(printf '%03d' $(($1 % 1000)))"
    while [[ $text == *0 ]]; do text="${text%0}"; done
    echo "${text%.}"
}

BACKOFF_MS="$(to_ms "${NULLWORKER_RESTART_BACKOFF_S:-1}")" ||
    fail "NULLWORKER_RESTART_BACKOFF_S must be a number of seconds, got '${NULLWORKER_RESTART_BACKOFF_S:-}'"
MAX_MS="$(to_ms "${NULLWORKER_RESTART_MAX_S:-30}")" ||
    fail "NULLWORKER_RESTART_MAX_S must be a number of seconds, got '${NULLWORKER_RESTART_MAX_S:-}'"
RESET_MS="$(to_ms "${NULLWORKER_RESTART_RESET_S:-60}")" ||
    fail "NULLWORKER_RESTART_RESET_S must be a number of seconds, got '${NULLWORKER_RESTART_RESET_S:-}'"
CERT_RETRY_MS="$(to_ms "${NULLWORKER_CERT_RETRY_S:-2}")" ||
    fail "NULLWORKER_CERT_RETRY_S must be a number of seconds, got '${NULLWORKER_CERT_RETRY_S:-}'"

# TLS on a Vast instance unless USE_SSL=false, as in the official start script. Exported as
# exactly "true" or "false": the worker serves TLS (and advertises https) for exactly "true".
case "${USE_SSL:-}" in
"") if [ -n "${CONTAINER_ID:-}" ]; then USE_SSL=true; else USE_SSL=false; fi ;;
true | false) ;;
*) fail "USE_SSL must be true or false, got '$USE_SSL'" ;;
esac
export USE_SSL
CERT="${NULLWORKER_SSL_CERTFILE:-/etc/instance.crt}"
KEY="${NULLWORKER_SSL_KEYFILE:-/etc/instance.key}"
SIGN_CERT_URL="${NULLWORKER_SIGN_CERT_URL:-https://console.vast.ai/api/v0/sign_cert/}"
SIGN_CERT_TRIES=5

already_running() {
    # A nullworker answers GET /health with JSON that has a "ready" key (200 or 503). With
    # TLS its certificate names the public address, not 127.0.0.1: this local probe only
    # asks whether a nullworker is there, so it does not check it.
    "$PYTHON" - "$PORT" "$USE_SSL" <<'EOF'
import json, ssl, sys, urllib.request, urllib.error
port, tls = sys.argv[1], sys.argv[2] == "true"
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
try:
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
    with urllib.request.urlopen(url, timeout=2, context=context) as r:
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

# Only one start at a time per port. This script holds the lock (fd 9) for as long as it
# supervises the worker, and the worker inherits it too (so it stays held even if this
# script is killed outright): a second start during or after start-up backs off. The
# worker's own per-port lock is its own open file, released by the kernel when it dies,
# so a restarted worker can take it again.
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
    # Common CUDA images are Ubuntu 22.04, whose python3 is 3.10: say what to do about it.
    found="$({ command -v "$PYTHON" >/dev/null 2>&1 && "$PYTHON" --version 2>&1; } || echo none)"
    if [ -n "$PYTHON_GIVEN" ]; then
        what="PYTHON=$PYTHON is not 3.11+: point it at one that is"
    else
        what="none of python3, python3.13, python3.12, python3.11 on PATH is 3.11+: set PYTHON to one that is"
    fi
    fail "Python 3.11 or newer is required (found: $found). $what" \
        "(on vastai/base-image with a -py311 or -py312 tag: PYTHON=/venv/main/bin/python;" \
        "on Ubuntu 22.04: install python3.12 and python3.12-venv from the deadsnakes PPA, then PYTHON=python3.12;" \
        "or: uv python install 3.12, then PYTHON=\$(uv python find 3.12))," \
        "or use an image with Python 3.11+ (one based on Ubuntu 24.04, which has 3.12, such as" \
        "vastai/base-image:cuda-12.8.1-cudnn-devel-ubuntu24.04; or python:3.12)." \
        "See docs/deploying.md."
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

# The certificate and key pair up and stay valid for another hour.
cert_usable() {
    [ -s "$1" ] && [ -s "$2" ] &&
        openssl x509 -in "$1" -noout -checkend 3600 >/dev/null 2>&1 &&
        [ "$(openssl x509 -in "$1" -noout -pubkey 2>/dev/null)" = \
            "$(openssl pkey -in "$2" -pubout 2>/dev/null)" ]
}

# A new key and request, signed by Vast for this instance as in the official start script
# (same subject and SAN config); installed only once a signed certificate for that key came
# back, so a failed try leaves nothing half-made behind.
request_certificate() {
    local dir url attempt code problem delay_ms=$CERT_RETRY_MS
    dir="$(mktemp -d)"
    cat >"$dir/san.cnf" <<'EOF'
[req]
default_bits       = 2048
distinguished_name = req_distinguished_name
req_extensions     = v3_req

[req_distinguished_name]
countryName         = US
stateOrProvinceName = CA
organizationName    = Vast.ai Inc.
commonName          = vast.ai

[v3_req]
basicConstraints = CA:FALSE
keyUsage         = nonRepudiation, digitalSignature, keyEncipherment
subjectAltName   = @alt_names

[alt_names]
IP.1   = 0.0.0.0
EOF
    if ! openssl req -newkey rsa:2048 -subj "/C=US/ST=CA/CN=pyworker.vast.ai/" -nodes -sha256 \
        -keyout "$dir/instance.key" -out "$dir/instance.csr" -config "$dir/san.cnf" \
        >/dev/null 2>"$dir/openssl.err"; then
        problem="$(tail -n 1 "$dir/openssl.err")"
        rm -rf "$dir"
        fail "USE_SSL=true: openssl could not make a key and certificate request ($problem)"
    fi
    url="$SIGN_CERT_URL?instance_id=$CONTAINER_ID"
    for attempt in $(seq 1 "$SIGN_CERT_TRIES"); do
        code="$(curl --silent --show-error --max-time 30 --output "$dir/instance.crt" \
            --write-out '%{http_code}' --header 'Content-Type: application/octet-stream' \
            --data-binary @"$dir/instance.csr" "$url" 2>"$dir/curl.err")" || true
        if [[ $code == 2[0-9][0-9] ]] && cert_usable "$dir/instance.crt" "$dir/instance.key"; then
            if ! { mkdir -p "$(dirname "$CERT")" "$(dirname "$KEY")" &&
                chmod 600 "$dir/instance.key" && mv -f "$dir/instance.key" "$KEY" &&
                mv -f "$dir/instance.crt" "$CERT"; }; then
                rm -rf "$dir"
                fail "USE_SSL=true: could not write the signed certificate to $CERT and $KEY"
            fi
            rm -rf "$dir"
            say "TLS certificate for instance $CONTAINER_ID signed (try $attempt/$SIGN_CERT_TRIES)"
            return 0
        fi
        if [[ $code == 2[0-9][0-9] ]]; then
            problem="HTTP $code, but not a valid certificate for the key sent"
        elif [ "${code:-000}" != 000 ]; then
            problem="HTTP $code"
        else
            problem="$(tail -n 1 "$dir/curl.err")"
        fi
        if [ "$attempt" -lt "$SIGN_CERT_TRIES" ]; then
            say "signing the TLS certificate failed ($problem); try $attempt/$SIGN_CERT_TRIES, next in $(seconds "$delay_ms") s"
            sleep "$(seconds "$delay_ms")"
            delay_ms=$((delay_ms * 2))
        fi
    done
    rm -rf "$dir"
    fail "USE_SSL=true: Vast did not sign the TLS certificate for instance $CONTAINER_ID" \
        "after $SIGN_CERT_TRIES tries (last: $problem; $SIGN_CERT_URL);" \
        "not serving plain HTTP instead: set USE_SSL=false for that"
}

if [ "$USE_SSL" = true ] && ! cert_usable "$CERT" "$KEY"; then
    if [ -z "${CONTAINER_ID:-}" ]; then
        fail "USE_SSL=true needs a certificate and key at $CERT and $KEY" \
            "(NULLWORKER_SSL_CERTFILE, NULLWORKER_SSL_KEYFILE), or CONTAINER_ID to have Vast sign one"
    fi
    for tool in openssl curl; do
        command -v "$tool" >/dev/null 2>&1 ||
            fail "USE_SSL=true needs $tool to have the certificate signed (apt-get install -y $tool), or set USE_SSL=false"
    done
    say "requesting a TLS certificate for instance $CONTAINER_ID"
    request_certificate
fi

mkdir -p "$(dirname "$LOG")"
say "starting nullworker on port $PORT (log: $LOG)"
# tee ignores SIGINT/SIGTERM, so a signal to the whole process group (Ctrl-C, kill -- -PGID)
# still logs the worker's shutdown; it ends once the script and the worker are gone.
exec > >(
    trap '' INT TERM
    exec tee -a "$LOG"
) 2>&1

# Supervise the worker. `wait` returns early when a trapped signal arrives, so the signal
# is passed on at once; the worker is then waited for again.
child=""       # pid of the running worker, if any
stop_signal="" # the signal that told this script to stop
signals=0      # how many such signals arrived
on_signal() {
    stop_signal="$1"
    signals=$((signals + 1))
    if [ -n "$child" ]; then
        say "received $1: stopping the worker (pid $child)"
        kill -TERM "$child" 2>/dev/null || true
    fi
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT

restarts=0
delay_ms=$((BACKOFF_MS < MAX_MS ? BACKOFF_MS : MAX_MS))
while :; do
    if [ -n "$stop_signal" ]; then # it arrived while no worker ran (e.g. during a probe)
        say "received $stop_signal; not starting the worker"
        exit 0
    fi
    started_ms="$(date +%s%3N)"
    "$VENV/bin/nullworker" serve "$@" &
    child=$!
    if [ -n "$stop_signal" ]; then # it arrived before $child was known
        kill -TERM "$child" 2>/dev/null || true
    fi
    while :; do
        seen=$signals
        status=0
        wait "$child" 2>/dev/null || status=$? # (bash's own "Killed" notice: ours follows)
        if [ "$signals" = "$seen" ]; then
            break # the worker exited (and this was not a trap cutting the wait short)
        fi
    done
    pid=$child
    child=""
    up_ms=$(($(date +%s%3N) - started_ms))
    if [ -n "$stop_signal" ]; then
        say "worker (pid $pid) stopped with status $status after $stop_signal; not restarting"
        exit "$status"
    fi
    how="status $status"
    if [ "$status" -gt 128 ]; then
        how="$how (killed by SIG$(kill -l $((status - 128)) 2>/dev/null || echo "$((status - 128))"))"
    fi
    how="$how after $(seconds "$up_ms") s"
    case "$status" in
    0)
        say "worker (pid $pid) exited with $how: it was stopped by someone else; not restarting"
        exit 0
        ;;
    2)
        say "worker (pid $pid) exited with $how: a configuration error, which a restart cannot fix; not restarting"
        exit 2
        ;;
    esac
    if [ "$up_ms" -ge "$RESET_MS" ]; then
        delay_ms=$((BACKOFF_MS < MAX_MS ? BACKOFF_MS : MAX_MS))
    fi
    restarts=$((restarts + 1))
    say "worker (pid $pid) exited with $how; restarting in $(seconds "$delay_ms") s (restart $restarts)"
    sleep "$(seconds "$delay_ms")" &
    sleeper=$!
    wait "$sleeper" 2>/dev/null || true # cut short by SIGTERM/SIGINT
    kill "$sleeper" 2>/dev/null || true
    wait "$sleeper" 2>/dev/null || true
    if [ -n "$stop_signal" ]; then
        say "received $stop_signal while waiting to restart the worker; not restarting"
        exit 0
    fi
    if already_running; then
        say "a nullworker already serves port $PORT (another copy took over); not restarting"
        exit 0
    fi
    delay_ms=$((delay_ms * 2 < MAX_MS ? delay_ms * 2 : MAX_MS))
done
