r"""A job consumer for NATS JetStream, to run beside nullworker on a Vast instance.

It pulls one message at a time from a durable JetStream pull consumer, does the work
inside a local hold on the worker, acknowledges it, and once no message has come for
``--idle-release`` seconds it calls the worker's loopback control listener,
``POST /release``: the reservation that brought this machine up ends, and the autoscaler
decides again.

Jobs
----
A job is a message on the stream's subject whose payload is a JSON object::

    nats pub jobs '{"id": 1, "seconds": 0.5}'

``id`` is anything JSON (it is only printed); ``seconds`` is how long the stand-in work
sleeps (a number >= 0, default 0). Replace :func:`work` with your own. A message that is
not such an object is printed and acknowledged (dropped), so that it is not redelivered
for ever.

The loop
--------
0. ``GET <control-url>/reservation?wait=S``: a job is taken only while the worker holds a
   reservation, so each reservation brings one machine for one job (a job taken before
   the engine routed the reservation here would make the worker busy, and the engine
   would start another machine for it). Not reserved within the idle spell counts as
   idle (step 5); a worker that cannot be asked (not up yet) is said once and asked
   again a second later. ``--any-time`` skips this step, for dispatchers that send no
   reservations.
   A message fetched after the reservation ended (while the fetch waited) is handed
   back at once (``nak``) for the worker the autoscaler reserves next.
1. ``fetch(1, timeout)`` on the durable consumer ``--consumer`` of ``--stream`` (every
   instance binds the same durable consumer: JetStream hands each message to one of
   them).
2. ``POST <control-url>/hold`` with ``{"label": "job <id>"}``: a local hold, kept open
   (see below).
3. work (prints ``job <id> done in <s> s (local hold <n>)``), telling the server
   ``in_progress`` every half ``ack_wait`` so that a long job is not redelivered
   elsewhere meanwhile.
4. ``ack`` (waiting for the server's confirmation); then the hold's connection is
   closed, and the worker ends the hold at once.
5. When no message came for ``--idle-release`` seconds: ``POST <control-url>/release``
   with ``{"started_before": <now>}``, once per idle spell, and the worker's answer is
   printed. Naming the moment of the decision means a reservation that started after
   it (the autoscaler brought the next one meanwhile) is left alone (``409``). Then it
   goes on waiting for jobs, or exits 0 with ``--exit-when-idle`` (1 if the release
   failed).

A running job is never scaled away
----------------------------------
The reservation brought this machine, but whoever holds it (``nullworker autoscale``,
your dispatcher) cannot know which instance is mid-job: when the demand drops it may
close the very reservation this consumer is working under. The worker would then report
idle and Vast could stop the instance under the job. So each job is worked inside a
**local hold**: ``POST /hold`` on the control listener keeps the worker busy for as long
as the request stays open, whatever happens to the reservation. The worker answers
``200`` and its headers (``nullworker-hold-id``) at once, and its body only when the hold
ends: this consumer writes a plain HTTP/1.1 request on an ``asyncio.open_connection``,
reads the status line and headers (200: held), leaves the connection open while it
works, and closes it after the ack. A consumer that dies mid-job closes it too (the
kernel does), so a crash never leaves the worker busy for ever. The standard library is
enough, so the consumer's environment needs nothing but ``nats-py``. A hold without a
duration has no cap: one hold covers a job of any length, however far past
``MAX_RESERVATION_SECONDS``.

When the worker cannot be reached, or refuses the hold, the job is worked anyway,
unprotected: the job matters more than the hold. That is said once (``local hold
unavailable: ...; working without it``) and again only after a hold succeeded in
between, not for every job.

With ``--create`` it first creates what is missing: the stream ``--stream`` capturing
``--subject``, and the durable pull consumer ``--consumer`` (explicit acks, filtered on
``--subject``). Without it, a missing stream or consumer is an error (exit 2).

Demand, as ``nullworker autoscale`` counts it
---------------------------------------------
``nullworker autoscale --nats-consumer URL STREAM CONSUMER`` (the
``nullworker.client.demand.NatsConsumer`` source) counts the consumer's ``num_pending +
num_ack_pending``: messages not yet delivered plus messages delivered and not yet
acknowledged. Give the autoscaler the same stream and consumer as this consumer: a job
keeps its reservation while it waits *and* while it runs (until ``ack``), and only when
both are 0 does the demand drop. The release here makes that take effect at once for
this machine instead of when the reservation's duration elapses: a released reservation
is replaced only if the demand still asks for it.

Running it on the instance
--------------------------
Add this command to the Vast on-start script, before the line that runs
``start_server.sh`` (the consumer gets its own virtual environment with ``nats-py``; it
does not need the worker to be up yet: it takes a job once the worker is up and reserved,
and a failed release is retried after the next idle spell)::

    (python3 -m venv /workspace/consumer && /workspace/consumer/bin/pip install -q nats-py \
      && exec /workspace/consumer/bin/python /workspace/nullworker/examples/nats_consumer.py \
      --nats-url "$NATS_URL" --stream JOBS --consumer workers) >> /workspace/consumer.log 2>&1 &

Options: ``--nats-url`` (default ``nats://127.0.0.1:4222``), ``--stream`` (``JOBS``),
``--consumer`` (``workers``), ``--subject`` (``jobs``, used by ``--create``),
``--control-url`` (default :func:`control_url`: ``$NULLWORKER_CONTROL_URL``, else
``http://127.0.0.1:$NULLWORKER_CONTROL_PORT``, else ``http://127.0.0.1:18999``, as the
worker finds its port), ``--idle-release`` (5 s), ``--exit-when-idle``, ``--create``,
``--any-time``.

Crashes: a consumer that dies mid-job never acknowledges its message; JetStream
redelivers it (to this or another instance) once the consumer's ``ack_wait`` has passed,
and it counts as demand (``num_ack_pending``) until then.

Exit status: 0 (``--exit-when-idle``), 1 (NATS unreachable at start, or the release
failed with ``--exit-when-idle``), 2 (the stream or consumer is missing), 130/143
(SIGINT/SIGTERM; a job in progress is redelivered after ``ack_wait``). Errors later on
(a lost connection, which nats-py reconnects) are printed and retried every second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext

DEFAULT_CONTROL_URL = "http://127.0.0.1:18999"
#: Longest single fetch; an idle consumer re-checks its idle clock this often.
FETCH_S = 1.0
#: Longest wait for a reservation in one GET /reservation (the worker takes up to 300).
RESERVED_POLL_S = 30.0
#: How long the first connection may take before the consumer gives up (exit 1).
CONNECT_S = 10.0
#: Bound on the POST /release round trip (the listener is on loopback).
RELEASE_TIMEOUT_S = 5.0
#: Bound on connecting to the control listener and getting /hold's headers.
HOLD_TIMEOUT_S = 5.0
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
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", default="JOBS", help="the JetStream stream (default JOBS)")
    parser.add_argument(
        "--consumer", default="workers", help="the durable pull consumer (default workers)"
    )
    parser.add_argument(
        "--subject", default="jobs", help="the jobs' subject, for --create (default jobs)"
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
        help="POST /release after no job came for this long (default 5)",
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
        "--create", action="store_true", help="create the stream and the consumer if missing"
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


async def work(job: dict[str, Any]) -> None:
    """The job itself: here, sleep for ``job["seconds"]``."""
    await asyncio.sleep(job["seconds"])


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


class HoldUnavailable(Exception):
    """The control listener could not be reached, or it did not answer 200."""


async def open_hold(control_url: str, label: str) -> tuple[asyncio.StreamWriter, str]:
    """``POST /hold``; returns the open connection and the hold's id once the worker holds.

    The worker sends its status line and headers as soon as the hold is registered and
    the body only when the hold ends: this reads up to the blank line after the headers
    and leaves the rest. Closing the connection ends the hold.
    """
    parts = urllib.parse.urlsplit(control_url)
    if parts.scheme != "http" or not parts.hostname:
        raise HoldUnavailable(f"not an http:// URL: {control_url!r}")
    host, port = parts.hostname, parts.port or 80
    body = json.dumps({"label": label}).encode()
    request = (
        f"POST {parts.path.rstrip('/')}/hold HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode() + body
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(HOLD_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        if writer is not None:
            writer.close()
        why = str(exc) or type(exc).__name__
        raise HoldUnavailable(
            f"cannot reach the worker's control listener at {control_url} ({why}); {WHERE}"
        ) from None
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    if status_line.split(" ")[1:2] != ["200"]:
        writer.close()
        raise HoldUnavailable(status_line.strip() or "no status line")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return writer, headers.get("nullworker-hold-id", "?")


class LocalHolds:
    """One local hold per job, warning once while the worker cannot be reached."""

    def __init__(self, control_url: str) -> None:
        self.control_url = control_url
        self.warned = False

    @contextlib.asynccontextmanager
    async def hold(self, label: str) -> AsyncIterator[str | None]:
        """Hold the worker while the block runs; yields the hold's id, None if unheld."""
        try:
            writer, hold_id = await open_hold(self.control_url, label)
        except HoldUnavailable as exc:
            if not self.warned:
                say(f"local hold unavailable: {exc}; working without it")
                self.warned = True
            yield None
            return
        self.warned = False
        try:
            yield hold_id
        finally:
            writer.close()  # the worker sees the disconnect and ends the hold at once


def job_label(job: dict[str, Any]) -> str:
    """``job <id>``, made acceptable to the worker (printable, at most 200 characters)."""
    label = "".join(ch if ch.isprintable() else "?" for ch in f"job {job.get('id')}")
    return label[:MAX_LABEL_CHARS]


async def ensure_created(js: JetStreamContext, args: argparse.Namespace) -> None:
    """--create: the stream and the durable pull consumer, when they do not exist."""
    try:
        await js.stream_info(args.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(name=args.stream, subjects=[args.subject])
        say(f"created stream {args.stream!r} on subject {args.subject!r}")
    try:
        await js.consumer_info(args.stream, args.consumer)
    except nats.js.errors.NotFoundError:
        config = ConsumerConfig(
            durable_name=args.consumer,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=args.subject,
        )
        await js.add_consumer(args.stream, config)
        say(f"created durable consumer {args.consumer!r}")


async def keep_in_progress(msg: Msg, every_s: float) -> None:
    """Tell the server the job is still being worked on, so it is not redelivered."""
    while True:
        await asyncio.sleep(every_s)
        await msg.in_progress()


async def handle(msg: Msg, ack_wait_s: float, holds: LocalHolds) -> None:
    job = parse_job(msg.data)
    if job is None:
        say(f"dropping a malformed job: {msg.data[:200]!r}")
        await msg.ack_sync()
        return
    # Held from before the work until after the acknowledgement.
    async with holds.hold(job_label(job)) as hold_id:
        started = time.monotonic()
        heartbeat = asyncio.create_task(keep_in_progress(msg, ack_wait_s / 2))
        try:
            await work(job)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        held = f"local hold {hold_id}" if hold_id is not None else "not held"
        say(f"job {job.get('id')} done in {time.monotonic() - started:.2f} s ({held})")
        await msg.ack_sync()  # acknowledge, and wait until the server has it


def ask_reserved(control_url: str, wait_s: float) -> bool:
    """``GET /reservation?wait=S``: True once the worker holds a reservation (at once, or
    the moment one starts); False after ``wait_s`` without one. Raises OSError or
    ValueError when the worker cannot be asked (not up yet, restarting, shutting down)."""
    query = urllib.parse.urlencode({"wait": f"{wait_s:.3f}"})
    url = f"{control_url.rstrip('/')}/reservation?{query}"
    # Loopback: never through an http_proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=wait_s + HOLD_TIMEOUT_S) as response:
        answer = json.loads(response.read())
    return isinstance(answer, dict) and answer.get("reserved") is True


async def reserved(control_url: str, wait_s: float, said: set[str]) -> bool:
    """:func:`ask_reserved` in a thread; an error counts as not reserved, is said once
    (until the worker answers again) and is followed by a second's pause."""
    try:
        answer = await asyncio.to_thread(ask_reserved, control_url, min(wait_s, RESERVED_POLL_S))
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        if "unreached" not in said:
            say(f"cannot ask the worker whether it is reserved ({exc}); {WHERE}")
            said.add("unreached")
        await asyncio.sleep(1.0)
        return False
    said.discard("unreached")
    return answer


async def consume(
    nc: Client, sub: JetStreamContext.PullSubscription, args: argparse.Namespace, ack_wait_s: float
) -> int:
    """The consumer loop; returns the exit status (with ``--exit-when-idle``)."""
    idle_since = time.monotonic()  # when the last job was acknowledged (or the start)
    released = False  # already released during this idle spell
    holds = LocalHolds(args.control_url)
    said: set[str] = set()
    while True:
        try:
            if released:
                timeout = FETCH_S
            else:
                # Wake up when the idle spell is long enough.
                timeout = min(FETCH_S, max(0.05, idle_since + args.idle_release - time.monotonic()))
            msgs: list[Msg] = []
            # A job only while the worker is reserved: the reservation that brought this
            # machine is then the one its job uses, and no other is started for it.
            if args.any_time or await reserved(
                args.control_url, RESERVED_POLL_S if released else timeout, said
            ):
                try:
                    msgs = await sub.fetch(1, timeout=timeout)
                except nats.errors.TimeoutError:
                    if not nc.is_connected:
                        continue  # reconnecting: an empty fetch says nothing about the queue
            if not msgs:
                if not released and time.monotonic() - idle_since >= args.idle_release:
                    say(f"no job for {args.idle_release:g} s: releasing")
                    ok = await asyncio.to_thread(release, args.control_url, time.time())
                    if args.exit_when_idle:
                        return 0 if ok else 1
                    if ok:
                        released = True
                    else:
                        idle_since = time.monotonic()  # try again after another spell
                continue
            if not args.any_time and not await reserved(args.control_url, 0, said):
                # The reservation ended while the fetch waited: handed back at once
                # (nak), for the worker the autoscaler reserves for it.
                for msg in msgs:
                    await msg.nak()
                say("not reserved any more: the job was handed back")
                continue
            for msg in msgs:
                await handle(msg, ack_wait_s, holds)
            idle_since = time.monotonic()
            released = False
        except nats.errors.Error as exc:
            say(f"nats: {exc!r}; retrying in 1 s")
            await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> int:
    where = args.nats_url.rpartition("@")[2]  # no credentials in the output

    async def on_error(exc: Exception) -> None:
        say(f"nats at {where}: {exc!r}")

    try:
        # Reconnect for ever once connected (the consumer outlives a NATS restart), but
        # give up at start after CONNECT_S: a wrong URL should not hang silently.
        nc = await asyncio.wait_for(
            nats.connect(
                args.nats_url,
                name="nullworker-example-consumer",
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=on_error,
            ),
            timeout=CONNECT_S,
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        say(f"nats at {where}: could not connect: {exc!r}")
        return 1
    try:
        js = nc.jetstream()
        if args.create:
            await ensure_created(js, args)
        try:
            info = await js.consumer_info(args.stream, args.consumer)
        except nats.js.errors.NotFoundError as exc:
            say(
                f"no consumer {args.consumer!r} on stream {args.stream!r} ({exc.description}); "
                "--create makes them"
            )
            return 2
        ack_wait_s = info.config.ack_wait or 30.0
        sub = await js.pull_subscribe_bind(durable=args.consumer, stream=args.stream)
        say(
            f"consuming {args.consumer!r} on stream {args.stream!r}; "
            f"release via {args.control_url} after {args.idle_release:g} s idle"
        )
        return await consume(nc, sub, args, ack_wait_s)
    finally:
        await nc.close()


async def run_until_terminated(args: argparse.Namespace) -> int:
    """run(), with SIGTERM cancelling it (SIGINT is asyncio.run's: KeyboardInterrupt)."""
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await run(args)
    except asyncio.CancelledError:
        if not terminated:
            raise
        say("terminated")
        return 128 + signal.SIGTERM


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run_until_terminated(args))
    except KeyboardInterrupt:
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
