r"""A Trio job consumer for a Redis list, each job worked inside ``nullworker.local_hold``.

The same queue and loop as ``redis_list_consumer.py`` (jobs are JSON objects such as
``{"id": 1, "seconds": 0.5}``; ``BLMOVE`` onto the processing list, work, ``LREM``; after
``--idle-release`` seconds without a job, ``POST /release``), written for a Trio program
with the nullworker package's own helper::

    async with nullworker.local_hold(label=f"job {job['id']}"):
        await work(job)
        ack(job)
    # leaving the block by any path closes the hold's connection: the hold ends at once

While the block runs the worker counts as busy, even if the reservation that brought
this machine is closed meanwhile (``nullworker autoscale`` scaling down cannot know
this instance is mid-job), so Vast does not stop the instance under the job. The helper
enters the block once the worker has accepted the hold (``/hold``'s ``200`` and headers
arrived); the hold has no cap, so it covers a job of any length, and it is taken again
if the worker restarts.

A job is taken only while the worker holds a reservation (``nullworker.wait_reserved()``,
a long-poll of ``GET /reservation``), so each reservation brings one machine for one job:
a consumer that took a job before the engine routed the reservation to its worker would
make the worker busy (its local hold), and the engine would start another machine for
that reservation. ``--any-time`` takes jobs whether or not, for dispatchers that send no
reservations. The order per job: wait until reserved, ``BLMOVE``, reserved still (else
the job goes back to the head of the queue: the reservation ended while ``BLMOVE``
waited), local hold, work, ``LREM``, close the hold.

``redis`` is a dependency of nullworker, so this runs with the Python of the checkout's
virtual environment (``start_server.sh`` makes it): its synchronous client runs in a
worker thread (``trio.to_thread.run_sync``), one command at a time. On the instance, in
the on-start script after ``start_server.sh`` has installed it::

    /workspace/nullworker/.venv/bin/python /workspace/nullworker/examples/trio_consumer.py \
        --redis-url "$REDIS_URL" >> /workspace/consumer.log 2>&1 &

When the worker cannot be reached or refuses the hold (``nullworker.LocalHoldFailed``,
raised before the block runs), the job is worked anyway, unprotected: the job matters
more than the hold. That is said once, and again only after a hold succeeded in between.

The idle release is ``nullworker.release_reservation()``: ``POST /release`` naming the
reservations that started before the decision, so one that started after it is left
alone (``409``). The control listener is ``nullworker.control_url()``, found as the
worker finds its port (``NULLWORKER_CONTROL_URL``, else ``NULLWORKER_CONTROL_PORT``).

Options: ``--redis-url``, ``--queue``, ``--processing``, ``--control-url``,
``--idle-release``, ``--exit-when-idle``, ``--any-time``, as for
``redis_list_consumer.py``. Exit status: 0 (``--exit-when-idle``), 1 (Redis unreachable
at start, or the release failed with ``--exit-when-idle``), 130 (Ctrl-C). SIGTERM's
default action stops it at once: the kernel closes the hold's connection, and the job
stays on the processing list.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
import trio

import nullworker

#: Longest single BLMOVE wait; an idle consumer re-checks its idle clock this often.
BLOCK_S = 1.0
#: Longest wait for a reservation in one go, once nothing else is timed.
RESERVED_POLL_S = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--queue", default="jobs")
    parser.add_argument("--processing", default="jobs:processing")
    parser.add_argument("--control-url")
    parser.add_argument("--idle-release", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--exit-when-idle", action="store_true")
    parser.add_argument(
        "--any-time",
        action="store_true",
        help="take jobs whether or not the worker holds a reservation",
    )
    args = parser.parse_args(argv)
    if not (math.isfinite(args.idle_release) and args.idle_release >= 0):
        parser.error("--idle-release must be a number of seconds >= 0")
    if args.control_url is None:
        try:
            args.control_url = nullworker.control_url()
        except ValueError as exc:
            parser.error(str(exc))
    return args


def say(text: str) -> None:
    print(text, flush=True)


async def work(job: dict[str, Any]) -> None:
    """The job itself: here, sleep for ``job["seconds"]``."""
    await trio.sleep(job["seconds"])


def parse_job(raw: bytes) -> dict[str, Any] | None:
    """The job as a dict, or None when it is not a usable job."""
    try:
        job = json.loads(raw)
    except ValueError:
        return None
    seconds = job.setdefault("seconds", 0) if isinstance(job, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    return job if math.isfinite(seconds) and seconds >= 0 else None


class Consumer:
    def __init__(self, client: redis.Redis, args: argparse.Namespace) -> None:
        self.client = client
        self.args = args
        self.warned = False  # said that the worker could not be held, since the last hold
        self.unreached = False  # said that the worker could not be asked, since it answered

    async def redis(self, command: Callable[..., Any], *args: Any) -> Any:
        """One Redis command, in a worker thread (the client is synchronous)."""
        return await trio.to_thread.run_sync(partial(command, *args))

    async def run_job(self, raw: bytes) -> None:
        job = parse_job(raw)
        if job is None:
            say(f"dropping a malformed job: {raw[:200]!r}")
            await self.redis(self.client.lrem, self.args.processing, 1, raw)
            return
        label = "".join(ch if ch.isprintable() else "?" for ch in f"job {job.get('id')}")[:200]
        try:
            async with nullworker.local_hold(
                label=label, control_url=self.args.control_url
            ) as hold:
                self.warned = False
                await self.work_and_ack(job, raw, f"local hold {hold.id}")
                return
        except nullworker.LocalHoldFailed as exc:  # raised before the block, never from it
            if not self.warned:
                say(f"local hold unavailable: {exc}; working without it")
                self.warned = True
        await self.work_and_ack(job, raw, "not held")

    async def work_and_ack(self, job: dict[str, Any], raw: bytes, held: str) -> None:
        started = trio.current_time()
        await work(job)
        say(f"job {job.get('id')} done in {trio.current_time() - started:.2f} s ({held})")
        await self.redis(self.client.lrem, self.args.processing, 1, raw)  # acknowledge

    def put_back(self, raw: bytes) -> None:
        """Move a job taken from the queue back to its head, in one transaction."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.lrem(self.args.processing, 1, raw)
            pipe.rpush(self.args.queue, raw)
            pipe.execute()

    async def reserved(self, wait_s: float) -> bool:
        """Whether the worker holds a reservation, waiting up to ``wait_s`` for one.

        Unreachable or shutting down counts as not reserved: said once, asked again
        after a second.
        """
        try:
            held = await nullworker.wait_reserved(wait_s, control_url=self.args.control_url)
        except nullworker.LocalHoldFailed as exc:
            if not self.unreached:
                say(f"cannot ask the worker whether it is reserved: {exc}")
                self.unreached = True
            await trio.sleep(1.0)
            return False
        self.unreached = False
        return held is not None

    async def release(self) -> bool:
        """POST /release to the worker and print its answer; False if it could not be asked.

        Only a reservation that started before this decision ends: one that started
        after it is left alone (the worker answers 409), and that counts as done.
        """
        url = self.args.control_url.rstrip("/") + "/release"
        try:
            answer = await nullworker.release_reservation(
                started_before=time.time(), control_url=self.args.control_url
            )
        except nullworker.ClientError as exc:  # ReleaseFailed
            say(f"POST {url} failed: {exc}")
            return False
        say(f"POST {url} -> {json.dumps(answer, separators=(',', ':'))}")
        return True

    async def consume(self) -> int:
        """The consumer loop; returns the exit status (with ``--exit-when-idle``)."""
        args = self.args
        idle_since = trio.current_time()  # when the last job was acknowledged (or the start)
        released = False  # already released during this idle spell
        while True:
            try:
                block = BLOCK_S
                if not released:  # wake up when the idle spell is long enough
                    block = min(
                        BLOCK_S, max(0.01, idle_since + args.idle_release - trio.current_time())
                    )
                raw = None
                # A job only while the worker is reserved: the reservation that brought
                # this machine is then the one its job uses, and no other is started for it.
                if args.any_time or await self.reserved(RESERVED_POLL_S if released else block):
                    raw = await self.redis(
                        self.client.blmove, args.queue, args.processing, block, "RIGHT", "LEFT"
                    )
                if raw is not None and not args.any_time and not await self.reserved(0):
                    # The reservation ended while BLMOVE waited: back to the head of the
                    # queue, for the worker the autoscaler reserves for it.
                    await trio.to_thread.run_sync(self.put_back, raw)
                    say("not reserved any more: the job was put back")
                elif raw is not None:
                    await self.run_job(raw)
                    idle_since, released = trio.current_time(), False
                elif not released and trio.current_time() - idle_since >= args.idle_release:
                    say(f"queue {args.queue!r} empty for {args.idle_release:g} s: releasing")
                    ok = await self.release()
                    if args.exit_when_idle:
                        return 0 if ok else 1
                    if ok:
                        released = True
                    else:
                        idle_since = trio.current_time()  # try again after another spell
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                say(f"redis: {exc}; retrying in 1 s")
                await trio.sleep(1.0)


async def main(args: argparse.Namespace) -> int:
    client = redis.Redis.from_url(
        args.redis_url, socket_connect_timeout=5.0, socket_timeout=BLOCK_S + 10.0
    )
    try:
        try:
            await trio.to_thread.run_sync(client.ping)
        except redis.RedisError as exc:
            say(f"redis at {args.redis_url.rpartition('@')[2]}: {exc}")
            return 1
        say(f"consuming {args.queue!r}; each job under a local hold on {args.control_url}")
        return await Consumer(client, args).consume()
    finally:
        client.close()


if __name__ == "__main__":
    try:
        sys.exit(trio.run(main, parse_args()))
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)
