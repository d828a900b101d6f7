r"""A job consumer for a Redis list, to run beside nullworker on a Vast instance.

It takes one job at a time from a Redis list with the reliable-queue pattern, only
while the worker holds a reservation, does the work inside a local hold on the worker,
acknowledges it, and once the queue has stayed
empty for ``--idle-release`` seconds it calls the worker's loopback control listener,
``POST /release``: the reservation that brought this machine up ends, and the
autoscaler decides again.

Jobs
----
A job is a JSON object pushed onto the left of the queue list::

    redis-cli LPUSH jobs '{"id": 1, "seconds": 0.5}'

``id`` is anything JSON (it is only printed); ``seconds`` is how long the stand-in work
sleeps (a number >= 0, default 0). Replace :func:`work` with your own. A job that is not
such an object is printed and dropped, so that it cannot block the queue.

The loop
--------
0. ``GET <control-url>/reservation?wait=S``: wait until the worker holds a reservation
   (see below). Not reserved within the idle spell counts as idle (step 5).
1. ``BLMOVE queue processing RIGHT LEFT <block>``: the oldest job moves atomically onto
   the processing list, so a job is never only in this process's memory. If the
   reservation ended while BLMOVE waited (``GET /reservation`` again, ``wait=0``), the job
   goes back to the head of the queue (``LREM`` + ``RPUSH`` in one transaction) for the
   worker the autoscaler reserves next, and the loop starts over.
2. ``POST <control-url>/hold`` with ``{"label": "job <id>"}``: a local hold, kept open
   (see below).
3. work (prints ``job <id> done in <s> s (local hold <n>)``).
4. ``LREM processing 1 <job>``: the acknowledgement; then the hold's connection is
   closed, and the worker ends the hold at once.
5. When no job arrived for ``--idle-release`` seconds: ``POST <control-url>/release``
   with ``{"started_before": <now>}``, once per idle spell, and the worker's answer is
   printed. Naming the moment of the decision means a reservation that started after
   it (the autoscaler brought the next one meanwhile) is left alone (``409``). Then it
   goes on waiting for jobs, or exits 0 with ``--exit-when-idle`` (1 if the release
   failed).

One machine per job: a job only while reserved
----------------------------------------------
``nullworker autoscale`` asks one reservation per waiting job; each brings a machine.
This consumer starts with its worker, and a job it took before the engine had routed
the waiting reservation to its worker would be worked under a local hold (below), which
makes the worker busy: the engine would then start another machine for that
reservation, whose consumer finds no job. So a job is taken only while the worker holds
a reservation: the worker answers ``GET /reservation?wait=S`` at once when one is held,
the moment one starts, or after ``S`` seconds without one. Reservation and job pair up
one to one, and the local hold keeps the machine past the reservation if it ends
mid-job. While the worker cannot be asked (not up yet, restarting) no job is taken;
that is said once. ``--any-time`` takes jobs whether or not the worker is reserved, for
teams whose dispatcher sends no reservations.

A running job is never scaled away
----------------------------------
The reservation brought this machine, but whoever holds it (``nullworker autoscale``,
your dispatcher) cannot know which instance is mid-job: when the demand drops it may
close the very reservation this consumer is working under. The worker would then report
idle and Vast could stop the instance under the job. So each job is worked inside a
**local hold**: ``POST /hold`` on the control listener keeps the worker busy for as long
as the request stays open, whatever happens to the reservation. The worker answers
``200`` and its headers (``nullworker-hold-id``) at once, and its body only when the hold
ends: this consumer waits for the headers (200: held), leaves the connection open while
it works, and closes it after the acknowledgement. A consumer that dies mid-job closes
it too (the kernel does), so a crash never leaves the worker busy for ever. It uses only
the standard library (``http.client``). A hold without a duration has no cap: one hold
covers a job of any length, however far past ``MAX_RESERVATION_SECONDS``.

When the worker cannot hold a job it took (it went away since the job was taken, or it
refuses the hold; with ``--any-time``, when it cannot be reached), the job is worked anyway,
unprotected: the job matters more than the hold. That is said once (``local hold
unavailable: ...; working without it``) and again only after a hold succeeded in
between, not for every job. (``nullworker hold -- CMD`` chooses the other way by default:
it does not run CMD without a hold unless ``--best-effort``.)

Demand, as ``nullworker autoscale`` counts it
---------------------------------------------
``nullworker autoscale --redis-list URL KEY --processing PROCESSING`` (the
``nullworker.client.demand.RedisList`` source) counts ``LLEN KEY + LLEN PROCESSING``: jobs
waiting plus jobs being worked on. Run every consumer with the same ``--queue`` and
``--processing`` as the autoscaler's ``KEY`` and ``PROCESSING``: a job keeps its
reservation while it waits *and* while it runs, and only when both lists are empty does
the demand drop. The release here makes that take effect at once for this machine
instead of when the reservation's duration elapses: a released reservation is replaced
only if the demand still asks for it.

Running it on the instance
--------------------------
Add this command to the Vast on-start script, before the line that runs
``start_server.sh`` (the consumer gets its own virtual environment with ``redis``; it
does not need the worker to be up yet: it takes a job once the worker is up and
reserved, and a failed release is retried after the next idle spell)::

    (python3 -m venv /workspace/consumer && /workspace/consumer/bin/pip install -q redis \
      && exec /workspace/consumer/bin/python /workspace/nullworker/examples/redis_list_consumer.py \
      --redis-url "$REDIS_URL" --queue jobs --processing jobs:processing) \
      >> /workspace/consumer.log 2>&1 &

Options: ``--redis-url`` (default ``redis://127.0.0.1:6379/0``), ``--queue`` (``jobs``),
``--processing`` (``jobs:processing``), ``--control-url`` (default :func:`control_url`:
``$NULLWORKER_CONTROL_URL``, else ``http://127.0.0.1:$NULLWORKER_CONTROL_PORT``, else
``http://127.0.0.1:18999``, as the worker finds its port), ``--idle-release`` (5 s),
``--exit-when-idle``, ``--requeue-leftovers``, ``--any-time``.

Crashes and leftovers
---------------------
A consumer that dies mid-job (SIGKILL, the instance lost) leaves its job on the
processing list: nothing is lost, but nothing redoes it either, and the autoscaler keeps
counting it. ``--requeue-leftovers`` moves every job on the processing list back to the
head of the queue at start, to be done first. The processing list is shared by all
consumers, so use it only where no other consumer can be working at that moment (a
single instance, or a restart after everything stopped): otherwise it requeues jobs that
are in progress elsewhere and they run twice. A production queue would instead give
each job a lease (a timestamp) and have a reaper requeue the expired ones.

Exit status: 0 (``--exit-when-idle``), 1 (Redis unreachable at start, or the release
failed with ``--exit-when-idle``), 130/143 (SIGINT/SIGTERM; a job in progress stays on
the processing list). A connection lost later is printed and retried every second.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import redis

DEFAULT_CONTROL_URL = "http://127.0.0.1:18999"
#: Longest single BLMOVE wait; an idle consumer re-checks its idle clock this often.
BLOCK_S = 1.0
#: Bound on the POST /release round trip (the listener is on loopback).
RELEASE_TIMEOUT_S = 5.0
#: Bound on connecting to the control listener and getting /hold's headers.
HOLD_TIMEOUT_S = 5.0
#: Longest wait for a reservation in one GET /reservation (the worker takes up to 300).
RESERVED_POLL_S = 30.0
#: The worker refuses longer labels.
MAX_LABEL_CHARS = 200
#: Said when the control listener cannot be reached: where its URL comes from.
WHERE = (
    "the URL is $NULLWORKER_CONTROL_URL, else http://127.0.0.1:$NULLWORKER_CONTROL_PORT; "
    "set them as the worker runs"
)


def control_url(environ: Mapping[str, str] = os.environ) -> str:
    """The worker's control listener, found from the environment the worker runs with.

    A copy of ``nullworker.control_url`` (this consumer needs nothing but the standard
    library and its queue's client): ``NULLWORKER_CONTROL_URL``, else
    ``http://127.0.0.1:$NULLWORKER_CONTROL_PORT`` (or the official ``NULL_CONTROL_PORT``,
    which the worker accepts too), else port 18999. Raises ValueError naming the variable
    when it names no listener (``off``, ``0``: a port picked at start, not a port).
    """
    url = environ.get("NULLWORKER_CONTROL_URL", "").strip()
    if url:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"NULLWORKER_CONTROL_URL must be an http(s) URL, got {url!r}")
        return url.rstrip("/")
    name = "NULLWORKER_CONTROL_PORT"
    if name not in environ:
        name = "NULL_CONTROL_PORT"
    raw = environ.get(name, "").strip()
    if not raw:
        return DEFAULT_CONTROL_URL
    if not (raw.isdigit() and 0 < int(raw) <= 65535):
        raise ValueError(f"{name}={raw} names no control listener: set NULLWORKER_CONTROL_URL")
    return f"http://127.0.0.1:{int(raw)}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--queue", default="jobs", help="list of waiting jobs (default jobs)")
    parser.add_argument(
        "--processing",
        default="jobs:processing",
        help="list of jobs being worked on (default jobs:processing)",
    )
    parser.add_argument(
        "--control-url",
        help="the worker's control listener (default $NULLWORKER_CONTROL_URL, else "
        f"http://127.0.0.1:$NULLWORKER_CONTROL_PORT, else {DEFAULT_CONTROL_URL})",
    )
    parser.add_argument(
        "--idle-release",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="POST /release after the queue stayed empty this long (default 5)",
    )
    parser.add_argument(
        "--exit-when-idle", action="store_true", help="exit after that release instead of waiting"
    )
    parser.add_argument(
        "--any-time",
        action="store_true",
        help="take jobs whether or not the worker holds a reservation (default: only "
        "while it does; for dispatchers that send no reservations)",
    )
    parser.add_argument(
        "--requeue-leftovers",
        action="store_true",
        help="at start, move the processing list back onto the queue (only when no other "
        "consumer is running)",
    )
    args = parser.parse_args(argv)
    if not (math.isfinite(args.idle_release) and args.idle_release >= 0):
        parser.error("--idle-release must be a number of seconds >= 0")
    if args.control_url is None:
        try:
            args.control_url = control_url()
        except ValueError as exc:
            parser.error(str(exc))
    return args


def say(text: str) -> None:
    print(text, flush=True)


def work(job: dict[str, Any]) -> None:
    """The job itself: here, sleep for ``job["seconds"]``."""
    time.sleep(job["seconds"])


def parse_job(raw: bytes) -> dict[str, Any] | None:
    """The job as a dict, or None when it is not a usable job."""
    try:
        job = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(job, dict):
        return None
    seconds = job.setdefault("seconds", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    if not (math.isfinite(seconds) and seconds >= 0):
        return None
    return job


def release(control_url: str, decided_at: float) -> bool:
    """POST /release to the worker and print its answer; False if it could not be asked.

    It names what it ends: a reservation that started before ``decided_at`` (epoch
    seconds, when the idle spell was judged long enough). A reservation that started
    after that, because the one this consumer meant ended meanwhile and the autoscaler
    brought the next, is left alone: the worker answers 409, and that counts as done.
    """
    url = control_url.rstrip("/") + "/release"
    # The listener is on loopback: never send this through an http_proxy from the env.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    body = json.dumps({"started_before": decided_at}).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with opener.open(request, timeout=RELEASE_TIMEOUT_S) as response:
            answer = response.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        answer = exc.read().decode(errors="replace").strip()
        if exc.code != 409:
            say(f"POST {url} failed: HTTP {exc.code}: {answer}")
            return False
    except (OSError, ValueError) as exc:  # URLError is an OSError
        say(f"POST {url} failed: {exc}")
        return False
    say(f"POST {url} -> {answer}")
    return True


class ReservationGate:
    """Asks the worker whether it holds a reservation: ``GET /reservation?wait=S``.

    The worker answers at once when one is held, the moment one starts, or after ``S``
    seconds without one. Unreachable (not up yet, restarting) or shutting down counts as
    not reserved: said once, asked again after a second.
    """

    def __init__(self, control_url: str) -> None:
        self.url = control_url.rstrip("/") + "/reservation"
        self.warned = False
        # The listener is on loopback: never through an http_proxy from the environment.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def wait(self, wait_s: float) -> bool:
        """Whether the worker holds a reservation, waiting up to ``wait_s`` for one."""
        wait_s = min(max(wait_s, 0.0), RESERVED_POLL_S)
        try:
            with self.opener.open(
                f"{self.url}?wait={wait_s:.3f}", timeout=wait_s + HOLD_TIMEOUT_S
            ) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
            if not self.warned:
                say(f"cannot ask the worker at {self.url} whether it is reserved ({exc}); {WHERE}")
                self.warned = True
            time.sleep(1.0)
            return False
        self.warned = False
        return isinstance(answer, dict) and answer.get("reserved") is True


class HoldUnavailable(Exception):
    """The control listener could not be reached, or it did not answer 200."""


def open_hold(
    control_url: str, label: str
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """``POST /hold``; returns the connection and the response (its body unread) once
    the worker holds.

    The worker sends its status line and headers as soon as the hold is registered and
    the body only when the hold ends, so ``getresponse()`` (which reads the headers, not
    the body) returns at once. Closing both closes the socket, and that ends the hold.
    """
    parts = urllib.parse.urlsplit(control_url)
    if parts.scheme != "http" or not parts.hostname:
        raise HoldUnavailable(f"not an http:// URL: {control_url!r}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=HOLD_TIMEOUT_S)
    try:
        conn.request(
            "POST",
            parts.path.rstrip("/") + "/hold",
            body=json.dumps({"label": label}),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        if response.status != 200:
            answer = response.read(500).decode(errors="replace").strip()
            raise HoldUnavailable(f"HTTP {response.status}: {answer}")
    except (OSError, http.client.HTTPException) as exc:  # timeouts are OSErrors
        conn.close()
        why = str(exc) or type(exc).__name__
        raise HoldUnavailable(
            f"cannot reach the worker's control listener at {control_url} ({why}); {WHERE}"
        ) from None
    except BaseException:
        conn.close()
        raise
    return conn, response


class LocalHolds:
    """One local hold per job, warning once while the worker cannot be reached."""

    def __init__(self, control_url: str) -> None:
        self.control_url = control_url
        self.warned = False

    @contextlib.contextmanager
    def hold(self, label: str) -> Iterator[str | None]:
        """Hold the worker while the block runs; yields the hold's id, None if unheld."""
        try:
            conn, response = open_hold(self.control_url, label)
        except HoldUnavailable as exc:
            if not self.warned:
                say(f"local hold unavailable: {exc}; working without it")
                self.warned = True
            yield None
            return
        self.warned = False
        try:
            yield response.getheader("nullworker-hold-id") or "?"
        finally:
            # Both: the response may hold the socket alone (after a "Connection: close").
            # The worker sees the disconnect and ends the hold at once.
            response.close()
            conn.close()


def job_label(job: dict[str, Any]) -> str:
    """``job <id>``, made acceptable to the worker (printable, at most 200 characters)."""
    label = "".join(ch if ch.isprintable() else "?" for ch in f"job {job.get('id')}")
    return label[:MAX_LABEL_CHARS]


def requeue_leftovers(client: redis.Redis, processing: str, queue: str) -> int:
    """Move the processing list back to the head of the queue, oldest job nearest it.

    A previous run that crashed mid-job left its job on the processing list. Moving
    from the processing list's left (its newest) to the queue's right (where BLMOVE takes
    from) one by one leaves the oldest leftover at the very head.
    """
    moved = 0
    while client.lmove(processing, queue, "LEFT", "RIGHT") is not None:
        moved += 1
    return moved


def put_back(client: redis.Redis, processing: str, queue: str, raw: bytes) -> None:
    """Move a job taken from ``queue`` back to its head, in one transaction."""
    with client.pipeline(transaction=True) as pipe:
        pipe.lrem(processing, 1, raw)
        pipe.rpush(queue, raw)
        pipe.execute()


def consume(client: redis.Redis, args: argparse.Namespace) -> int:
    """The consumer loop; returns the exit status (with ``--exit-when-idle``)."""
    idle_since = time.monotonic()  # when the last job was acknowledged (or the start)
    released = False  # already released during this idle spell
    holds = LocalHolds(args.control_url)
    gate = None if args.any_time else ReservationGate(args.control_url)
    while True:
        try:
            now = time.monotonic()
            if released:
                block = BLOCK_S
            else:
                # Wake up when the idle spell is long enough (BLMOVE's 0 means forever).
                block = min(BLOCK_S, max(0.01, idle_since + args.idle_release - now))
            raw = None
            # A job only while the worker is reserved: then the reservation that brought
            # this machine is the one its job uses, and no other machine is started for it.
            if gate is None or gate.wait(RESERVED_POLL_S if released else block):
                raw = client.blmove(args.queue, args.processing, block, "RIGHT", "LEFT")
            if raw is None:
                if not released and time.monotonic() - idle_since >= args.idle_release:
                    say(f"queue {args.queue!r} empty for {args.idle_release:g} s: releasing")
                    ok = release(args.control_url, time.time())
                    if args.exit_when_idle:
                        return 0 if ok else 1
                    if ok:
                        released = True
                    else:
                        idle_since = time.monotonic()  # try again after another spell
                continue
            job = parse_job(raw)
            if gate is not None and not gate.wait(0):
                # The reservation ended while BLMOVE waited: this worker is no longer
                # the one the job asked for. Back to the head of the queue, for the
                # worker the autoscaler reserves for it.
                put_back(client, args.processing, args.queue, raw)
                say("not reserved any more: the job was put back")
                continue
            if job is None:
                say(f"dropping a malformed job: {raw[:200]!r}")
                client.lrem(args.processing, 1, raw)
            else:
                # Held from before the work until after the acknowledgement.
                with holds.hold(job_label(job)) as hold_id:
                    started = time.monotonic()
                    work(job)
                    took = time.monotonic() - started
                    held = f"local hold {hold_id}" if hold_id is not None else "not held"
                    say(f"job {job.get('id')} done in {took:.2f} s ({held})")
                    client.lrem(args.processing, 1, raw)  # acknowledge
            idle_since = time.monotonic()
            released = False
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            say(f"redis: {exc}; retrying in 1 s")
            time.sleep(1.0)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # The socket timeout must outlast the longest BLMOVE wait.
    client = redis.Redis.from_url(
        args.redis_url, socket_connect_timeout=5.0, socket_timeout=BLOCK_S + 10.0
    )
    try:
        try:
            client.ping()
            if args.requeue_leftovers:
                moved = requeue_leftovers(client, args.processing, args.queue)
                say(f"requeued {moved} leftover job(s) from {args.processing!r}")
        except redis.RedisError as exc:
            say(f"redis at {args.redis_url.rpartition('@')[2]}: {exc}")
            return 1
        say(
            f"consuming {args.queue!r} (processing list {args.processing!r}); "
            f"release via {args.control_url} after {args.idle_release:g} s idle"
        )
        return consume(client, args)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
