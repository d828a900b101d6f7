#!/usr/bin/env bash
# A job loop in shell, to run beside nullworker on a Vast instance: every job runs under
# `nullworker hold`, so the worker stays busy until the job is done, even when the
# reservation that brought this machine is closed meanwhile (`nullworker autoscale`
# scaling down cannot know which instance is mid-job).
#
#   examples/hold_job.sh CMD [ARGS...]      # runs CMD ARGS... ID for each job
#   examples/hold_job.sh ./do-the-work.sh
#
# Jobs are the entries of a Redis list, one job id each (a word: printable, no spaces):
#
#   redis-cli LPUSH jobs 41 42
#
# The loop, the reliable-queue pattern of redis_list_consumer.py with redis-cli:
#   0. nullworker wait-reserved --timeout $IDLE_RELEASE: a job is taken only while the
#      worker holds a reservation, so the reservation that brought this machine is the
#      one its job uses and the engine starts no second machine for it (a job taken
#      before the engine routed the reservation here would make the worker busy, and
#      the reservation would go elsewhere). No reservation within IDLE_RELEASE seconds
#      counts as an idle spell (step 4); a worker that cannot be asked (not up yet) is
#      asked again a second later. ANY_TIME=1 skips this step, for dispatchers that
#      send no reservations.
#      An id taken after the reservation ended (while BLMOVE waited) goes back to the
#      head of the queue (LREM + RPUSH in one EVAL) and the loop starts over.
#   1. BLMOVE $QUEUE $PROCESSING RIGHT LEFT $IDLE_RELEASE: the oldest id moves onto the
#      processing list (so `nullworker autoscale --redis-list URL jobs --processing
#      jobs:processing` still counts it while it runs).
#   2. nullworker hold --best-effort --label "job $ID" -- CMD ARGS... "$ID": the hold
#      (POST /hold on the worker's control listener, "job ID" in its /status) is taken
#      before CMD starts and dropped when it exits, or when the hold process dies however
#      it dies. Prints
#      "job ID done", or "job ID failed with status N" (the job is dropped all the same,
#      so that it cannot block the queue; keep it somewhere else if it matters).
#   3. LREM $PROCESSING 1 $ID: the acknowledgement.
#   4. A BLMOVE that waited IDLE_RELEASE seconds for nothing: POST /release on the control
#      listener with {"started_before": <now>} (the reservation ends, the autoscaler
#      decides again; one that started after this decision is left alone, 409), once per
#      idle spell, printing the worker's answer. Local holds are separate: a job still running
#      elsewhere on this worker keeps it busy. With EXIT_WHEN_IDLE=1 the loop then exits
#      (0, or 1 when the release failed).
#
# --best-effort: when the worker cannot be reached (not up yet, restarting) or refuses,
# the job runs anyway, without a hold, and `nullworker hold` warns: the job matters more
# than the hold. Without it `nullworker hold` would not run CMD (status 3).
#
# Settings (environment):
#   REDIS_URL               redis://127.0.0.1:6379/0 (the password: REDISCLI_AUTH)
#   QUEUE, PROCESSING       jobs, jobs:processing
#   NULLWORKER_CONTROL_URL  else http://127.0.0.1:$NULLWORKER_CONTROL_PORT (or
#                           $NULL_CONTROL_PORT), else http://127.0.0.1:18999: found as
#                           the worker finds its port (`nullworker hold` is given it)
#   IDLE_RELEASE            5 (seconds, > 0)
#   EXIT_WHEN_IDLE          unset: keep waiting for jobs after a release
#   ANY_TIME                unset: take a job only while the worker is reserved
#   NULLWORKER              nullworker (start_server.sh installs it in the checkout's
#                           .venv: /workspace/nullworker/.venv/bin/nullworker)
#
# On the instance, in the on-start script after start_server.sh has installed nullworker
# (redis-cli 7.0 or later, and curl: apt-get install -y redis-tools curl):
#
#   NULLWORKER=/workspace/nullworker/.venv/bin/nullworker \
#     /workspace/nullworker/examples/hold_job.sh /workspace/do-the-work.sh \
#     >> /workspace/consumer.log 2>&1 &
#
# Stop it with SIGTERM to its process group: `nullworker hold` passes the signal on to CMD,
# and the job stays on the processing list.
set -uo pipefail

if [ $# -eq 0 ]; then
    echo "usage: $0 CMD [ARGS...]   (runs CMD ARGS... ID for each job)" >&2
    exit 2
fi

REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
QUEUE="${QUEUE:-jobs}"
PROCESSING="${PROCESSING:-jobs:processing}"
CONTROL_PORT="${NULLWORKER_CONTROL_PORT-${NULL_CONTROL_PORT:-}}"
CONTROL_URL="${NULLWORKER_CONTROL_URL:-http://127.0.0.1:${CONTROL_PORT:-18999}}"
CONTROL_URL="${CONTROL_URL%/}"
IDLE_RELEASE="${IDLE_RELEASE:-5}"
NULLWORKER="${NULLWORKER:-nullworker}"
export NULLWORKER_CONTROL_URL="$CONTROL_URL"

# -e: an error reply exits 1 (without it, its text would be read as a job id).
redis() { redis-cli -e --no-auth-warning -u "$REDIS_URL" "$@" 2>&1; }

echo "consuming '$QUEUE'; each job under nullworker hold on $CONTROL_URL"
released=0 # already released during this idle spell
unreached=0 # said that the worker cannot be asked, since it last answered
while true; do
    id=""
    reserved=1
    if [ -z "${ANY_TIME:-}" ]; then # 0. a job only while the worker is reserved
        wait_s="$IDLE_RELEASE"
        [ "$released" = 1 ] && wait_s=30 # nothing is timed while released: wait longer
        said=$("$NULLWORKER" wait-reserved --timeout "$wait_s" 2>&1 > /dev/null)
        case $? in
        0) unreached=0 ;;
        1) unreached=0 reserved=0 ;; # none within wait_s: idle, as an empty queue is
        *)
            [ "$unreached" = 0 ] && echo "$said; asking again every second"
            unreached=1
            sleep 1
            continue
            ;;
        esac
    fi
    if [ "$reserved" = 1 ] && ! id=$(redis BLMOVE "$QUEUE" "$PROCESSING" RIGHT LEFT "$IDLE_RELEASE"); then
        echo "redis: $id; retrying in 1 s"
        sleep 1
        continue
    fi
    # (curl, not `nullworker wait-reserved`: one quick question, no interpreter to start)
    if [ -n "$id" ] && [ -z "${ANY_TIME:-}" ] &&
        ! curl -sS --noproxy '*' --max-time 5 "$CONTROL_URL/reservation" 2>/dev/null |
        grep -q '"reserved": *true'; then
        # The reservation ended while BLMOVE waited: back to the head of the queue (one
        # atomic script), for the worker the autoscaler reserves for it.
        redis EVAL "redis.call('LREM', KEYS[1], 1, ARGV[1]); redis.call('RPUSH', KEYS[2], ARGV[1])" \
            2 "$PROCESSING" "$QUEUE" "$id" >/dev/null
        echo "not reserved any more: job $id put back"
        continue
    fi
    if [ -z "$id" ]; then # nothing for IDLE_RELEASE seconds
        [ "$released" = 1 ] && continue
        echo "queue '$QUEUE' empty for $IDLE_RELEASE s: releasing"
        # --noproxy: the listener is on loopback, never through an http_proxy.
        decided_at=$(date +%s.%N)
        if answer=$(curl -sS --noproxy '*' --max-time 5 -X POST \
            -H 'Content-Type: application/json' -d "{\"started_before\": $decided_at}" \
            "$CONTROL_URL/release"); then
            echo "POST $CONTROL_URL/release -> $answer"
            released=1
            [ -n "${EXIT_WHEN_IDLE:-}" ] && exit 0
        else
            echo "POST $CONTROL_URL/release failed"
            [ -n "${EXIT_WHEN_IDLE:-}" ] && exit 1
        fi
        continue
    fi
    "$NULLWORKER" hold --best-effort --label "job $id" -- "$@" "$id"
    status=$?
    if [ "$status" -eq 0 ]; then
        echo "job $id done"
    else
        echo "job $id failed with status $status"
    fi
    if ! answer=$(redis LREM "$PROCESSING" 1 "$id"); then # acknowledge
        echo "redis: $answer; job $id stays on '$PROCESSING'"
    fi
    released=0
done
