"""End to end: the autoscaler against the local engine, real workers and real queues.

Every test runs ``nullworker dev`` as a subprocess (the local engine, which starts real
``python -m nullworker serve`` workers on demand, signatures checked), a real
``redis-server`` or ``nats-server -js`` (``tests/servers.py``), and the autoscaler
in-process through the library, ``nullworker.client.autoscaler.autoscale()``, reading
the queue through a demand source inside ``open_asyncio_loop()``.

The autoscaler polls every ``POLL_S`` (0.2 s) and scales down after ``DELAY_S`` (2 s).
What it holds is read from its own statistics and events; what the engine sees, from
the dev engine's ``GET /workers`` view. A worker's control listener (for a consumer's
``POST /release``) is found in the dev output, where each worker logs it at start.

Timing: a worker started on demand takes about a second to start; a reservation that
found no free worker is held at the client's next poll of the engine (about 1 s, then
1.3 s, ... later), so "jobs pushed -> held" takes 1-3 s when the workers must start and
about 0.4 s when they are idle already (the client's 0.3 s accept window included).
Every wait is bounded by ``WAIT_S``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import redis
import trio
from nats.js.api import AckPolicy, ConsumerConfig

from nullworker.client._aio import open_asyncio_loop, run_aio
from nullworker.client.autoscaler import (
    AutoscaleEvent,
    Autoscaler,
    AutoscalerStatistics,
    autoscale,
)
from nullworker.client.demand import NatsConsumer, RedisList

from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    nats_server_binary_fixture,
    nats_server_fixture,
    redis_server_binary_fixture,
    redis_server_fixture,
)
from .test_dev import DevProcess

REPO = Path(__file__).resolve().parent.parent
ENDPOINT = "dev"
API_KEY = "dev"  # nullworker dev without --api-key takes any key
POLL_S = 0.2
DELAY_S = 2.0
#: Bound on every wait (worker start-up plus the client's engine polls fit well inside).
WAIT_S = 15.0
#: How often the tests sample the autoscaler's statistics and the engine's view.
SAMPLE_S = 0.05
QUEUE = "jobs"

Workers = list[dict[str, Any]]


# -- nullworker dev as a subprocess ------------------------------------------------------


class Dev(DevProcess):
    """``nullworker dev`` as in tests/test_dev.py, plus what these tests read from its log."""

    wait_s = WAIT_S

    def control_url(self, worker_url: str) -> str:
        """The control listener of the worker serving ``worker_url``, from its log lines."""
        number = None
        for line in self.lines:
            if match := re.match(r"\[worker (\d+)\] .*Vast mode: .*, url (\S+),", line):
                if match.group(2) == worker_url:
                    number = match.group(1)
        assert number is not None, f"no worker logged the url {worker_url}:\n{self.output}"
        for line in self.lines:
            if match := re.match(rf"\[worker {number}\] .*control listener on (\S+) ", line):
                return match.group(1)
        raise AssertionError(f"worker {number} logged no control listener:\n{self.output}")


StartDev = Callable[..., Awaitable[Dev]]


@pytest.fixture
async def start_dev(nursery: trio.Nursery) -> AsyncIterator[StartDev]:
    started: list[Dev] = []

    async def start(*args: str) -> Dev:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "nullworker.engine.dev", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        dev = Dev(process)
        started.append(dev)
        nursery.start_soon(dev.pump)
        dev.url = (await dev.wait_line(r"engine on (http://127\.0\.0\.1:\d+)")).group(1)
        return dev

    yield start

    for dev in started:
        if dev.process.returncode is None:
            dev.process.send_signal(signal.SIGINT)  # stops and reaps its workers
            with trio.move_on_after(WAIT_S):
                await dev.process.wait()
        if dev.process.returncode is None:
            dev.process.kill()
            with trio.move_on_after(5):
                await dev.process.wait()
        for pid in dev.worker_pids().values():  # only after a failed stop
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def engine_workers(http: httpx.AsyncClient) -> Workers:
    workers: Workers = (await http.get("/workers")).json()["workers"]
    return workers


def in_state(workers: Workers, state: str) -> list[dict[str, Any]]:
    return [w for w in workers if w["state"] == state]


async def wait_engine(http: httpx.AsyncClient, predicate: Callable[[Workers], bool]) -> Workers:
    with trio.fail_after(WAIT_S):
        while not predicate(workers := await engine_workers(http)):
            await trio.sleep(SAMPLE_S)
    return workers


# -- the autoscaler, in-process ------------------------------------------------------------


class Run:
    """One ``autoscale()`` call: its events, and the most reservations it ever had."""

    def __init__(self) -> None:
        self.scaler: Autoscaler | None = None
        self.events: list[AutoscaleEvent] = []
        #: The most reservations (held + waiting) any event reported.
        self.most = 0

    def on_event(self, event: AutoscaleEvent) -> None:
        self.events.append(event)
        self.most = max(self.most, event.held + event.waiting)

    def stats(self) -> AutoscalerStatistics:
        assert self.scaler is not None
        return self.scaler.statistics()

    def of_kind(self, kind: str) -> list[AutoscaleEvent]:
        return [event for event in self.events if event.kind == kind]

    def held_urls(self) -> set[str]:
        """The workers of the reservations held now (started and not yet ended)."""
        held: dict[str, int] = {}
        for event in self.events:
            if event.worker_url is None:
                continue
            if event.kind == "reservation_started":
                held[event.worker_url] = held.get(event.worker_url, 0) + 1
            elif event.kind == "reservation_ended":
                held[event.worker_url] -= 1
        return {url for url, count in held.items() if count > 0}

    async def wait(self, predicate: Callable[[AutoscalerStatistics], bool]) -> float:
        """Wait until ``predicate(statistics)``; the seconds it took."""
        started = trio.current_time()
        with trio.fail_after(WAIT_S):
            while not predicate(self.stats()):
                await trio.sleep(SAMPLE_S / 2)
        return trio.current_time() - started

    def describe(self) -> str:
        return "\n".join(f"{event.at:10.3f} {event.kind}: {event.message}" for event in self.events)


async def start_autoscaler(
    nursery: trio.Nursery, dev: Dev, demand: Callable[[], Awaitable[int]], **settings: Any
) -> Run:
    run = Run()
    options: dict[str, Any] = {
        "engine_url": dev.url,
        "api_key": API_KEY,
        "poll_s": POLL_S,
        "scale_down_delay_s": DELAY_S,
        "max_workers": 10,
    }
    options.update(settings)
    run.scaler = await nursery.start(
        partial(autoscale, ENDPOINT, demand=demand, on_event=run.on_event, **options)
    )
    return run


@pytest.fixture
def rdb(redis_server: ServerProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


# -- the scenarios -----------------------------------------------------------------------------


async def test_jobs_hold_one_worker_each_and_a_drained_queue_frees_them_after_the_delay(
    start_dev: StartDev, redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    dev = await start_dev("--max-workers", "3", "--idle-timeout", "60")
    async with (
        httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http,
        open_asyncio_loop(),
        RedisList(redis_server.url, QUEUE) as source,
        trio.open_nursery() as nursery,
    ):
        run = await start_autoscaler(nursery, dev, source.read)
        await run.wait(lambda s: s.demand == 0)
        assert run.stats().held == 0

        # Three jobs: three workers start on demand and each holds one reservation.
        rdb.lpush(QUEUE, "job-1", "job-2", "job-3")
        took = await run.wait(lambda s: s.held == 3)
        print(f"3 jobs pushed -> 3 held in {took:.2f} s (3 workers started)")
        stats = run.stats()
        assert (stats.demand, stats.target, stats.waiting) == (3, 3, 0), run.describe()
        urls = run.held_urls()
        assert len(urls) == 3, run.describe()
        workers = await wait_engine(http, lambda ws: len(in_state(ws, "busy")) == 3)
        assert {w["url"] for w in in_state(workers, "busy")} == urls
        assert all(w["num_requests_working"] == 1 for w in in_state(workers, "busy"))

        # The queue drains: nothing is released before the scale-down delay ...
        rdb.delete(QUEUE)
        drained = trio.current_time()
        await run.wait(lambda s: s.demand == 0)
        await trio.sleep_until(drained + DELAY_S / 2)
        stats = run.stats()
        assert (stats.demand, stats.target, stats.held) == (0, 3, 3), run.describe()
        assert len(in_state(await engine_workers(http), "busy")) == 3
        assert not run.of_kind("reservation_ended")

        # ... and everything at its end. The delay counts from the last reading that
        # still saw the jobs, up to one poll before the queue was drained.
        await run.wait(lambda s: s.held == 0 and s.stopping == 0)
        released_after = trio.current_time() - drained
        assert DELAY_S - POLL_S - 0.05 <= released_after <= DELAY_S + 1.0, released_after
        print(f"queue drained -> all released in {released_after:.2f} s (delay {DELAY_S:g} s)")
        ended = run.of_kind("reservation_ended")
        assert len(ended) == 3, run.describe()
        assert {e.worker_url for e in ended} == urls
        assert {(e.cause, e.outcome) for e in ended} == {("scale_down", "client_released")}
        assert run.stats().ended_by_outcome == {"client_released": 3}

        # The engine hears that all three workers are free (and keeps them: idle-timeout).
        workers = await wait_engine(http, lambda ws: len(in_state(ws, "idle")) == 3)
        assert {w["url"] for w in workers} == urls
        nursery.cancel_scope.cancel()
    assert "starting worker 4" not in dev.output


async def test_max_workers_caps_the_reservations(
    start_dev: StartDev, redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    # Three idle workers are there for the taking: only the autoscaler's cap stops a third.
    dev = await start_dev("--min-workers", "3", "--max-workers", "3", "--idle-timeout", "60")
    rdb.lpush(QUEUE, *[f"job-{i}" for i in range(5)])
    async with (
        httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http,
        open_asyncio_loop(),
        RedisList(redis_server.url, QUEUE) as source,
        trio.open_nursery() as nursery,
    ):
        await wait_engine(http, lambda ws: len(in_state(ws, "idle")) == 3)
        run = await start_autoscaler(nursery, dev, source.read, max_workers=2)
        most_in_stats = 0
        most_busy = 0

        async def sample() -> None:
            nonlocal most_in_stats, most_busy
            while True:
                s = run.stats()
                most_in_stats = max(most_in_stats, s.held + s.waiting + s.stopping)
                workers = await engine_workers(http)
                most_busy = max(most_busy, sum(1 for w in workers if w["busy"]))
                await trio.sleep(SAMPLE_S)

        nursery.start_soon(sample)
        await run.wait(lambda s: s.held == 2)
        # Several polls at demand 5 change nothing.
        await trio.sleep(10 * POLL_S)
        stats = run.stats()
        assert (stats.demand, stats.target, stats.held, stats.waiting) == (5, 2, 2, 0)
        assert len(run.held_urls()) == 2
        assert len(in_state(await engine_workers(http), "busy")) == 2
        assert len(in_state(await engine_workers(http), "idle")) == 1
        nursery.cancel_scope.cancel()
    assert run.most == 2, run.describe()
    assert most_in_stats == 2
    assert most_busy == 2
    assert len(run.of_kind("reservation_started")) == 2, run.describe()
    assert "starting worker 4" not in dev.output


async def test_a_redis_restart_keeps_the_capacity_and_the_new_demand_is_followed(
    start_dev: StartDev, redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    dev = await start_dev("--min-workers", "3", "--max-workers", "3", "--idle-timeout", "60")
    rdb.lpush(QUEUE, "job-1", "job-2")
    async with (
        httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http,
        open_asyncio_loop(),
        RedisList(redis_server.url, QUEUE) as source,
        trio.open_nursery() as nursery,
    ):
        run = await start_autoscaler(nursery, dev, source.read)
        await run.wait(lambda s: s.held == 2)
        await wait_engine(http, lambda ws: len(in_state(ws, "busy")) == 2)
        urls = run.held_urls()

        # Redis goes away for about 1 s, longer than the scale-down delay's half and
        # several polls: the reservations stay, and the outage is reported once.
        await redis_server.stop()
        down = trio.current_time()
        await run.wait(lambda s: not s.source_ok)
        while trio.current_time() < down + 1.0:
            stats = run.stats()
            assert (stats.held, stats.target, stats.stopping) == (2, 2, 0), run.describe()
            await trio.sleep(SAMPLE_S)
        assert run.stats().source_errors >= 2
        assert len(in_state(await engine_workers(http), "busy")) == 2
        assert len(run.of_kind("source_error")) == 1

        # It comes back empty (no persistence); meanwhile the queue grew to 3 jobs.
        await redis_server.start()
        rdb.lpush(QUEUE, "job-3", "job-4", "job-5")
        back = trio.current_time()
        took = await run.wait(lambda s: s.source_ok and s.held == 3)
        assert took < 5.0  # the outage backoff (0.2 s doubling) plus one reservation
        stats = run.stats()
        assert (stats.demand, stats.target, stats.waiting) == (3, 3, 0), run.describe()
        assert len(run.of_kind("source_recovered")) == 1
        assert urls < run.held_urls()
        await wait_engine(http, lambda ws: len(in_state(ws, "busy")) == 3)
        # Not one reservation was dropped over the outage.
        assert not run.of_kind("reservation_ended"), run.describe()
        print(f"recovered and held 3 within {trio.current_time() - back:.2f} s of the restart")
        nursery.cancel_scope.cancel()


async def _aio_nats_jobs(url: str, jobs: int) -> None:
    """Stream JOBS (jobs.>) with the durable pull consumer ``workers``; publish ``jobs``."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name="JOBS", subjects=["jobs.>"])
        await js.add_consumer(
            "JOBS", ConsumerConfig(durable_name="workers", ack_policy=AckPolicy.EXPLICIT)
        )
        for i in range(jobs):
            await js.publish("jobs.new", f"job-{i}".encode())
    finally:
        await nc.close()


async def test_nats_jetstream_messages_hold_workers_and_cancelling_frees_them(
    start_dev: StartDev, nats_server: ServerProcess
) -> None:
    dev = await start_dev("--max-workers", "3", "--idle-timeout", "60")
    async with (
        httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http,
        open_asyncio_loop(),
    ):
        with trio.fail_after(WAIT_S):
            await run_aio(_aio_nats_jobs, nats_server.url, 2)
        async with (
            NatsConsumer(nats_server.url, "JOBS", "workers") as source,
            trio.open_nursery() as nursery,
        ):
            run = await start_autoscaler(nursery, dev, source.read)
            took = await run.wait(lambda s: s.held == 2)
            print(f"2 messages -> 2 held in {took:.2f} s (2 workers started)")
            stats = run.stats()
            assert (stats.demand, stats.target, stats.waiting) == (2, 2, 0), run.describe()
            urls = run.held_urls()
            assert len(urls) == 2
            workers = await wait_engine(http, lambda ws: len(in_state(ws, "busy")) == 2)
            assert {w["url"] for w in in_state(workers, "busy")} == urls
            nursery.cancel_scope.cancel()
        # Cancelling the autoscaler let go of both at once.
        workers = await wait_engine(http, lambda ws: len(in_state(ws, "idle")) == 2)
        assert {w["url"] for w in workers} == urls
    assert {e.cause for e in run.of_kind("reservation_ended")} == {"shutdown"}


async def test_a_consumers_release_ends_one_reservation_and_it_is_replaced(
    start_dev: StartDev, redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    dev = await start_dev("--min-workers", "3", "--max-workers", "3", "--idle-timeout", "60")
    rdb.lpush(QUEUE, "job-1", "job-2")
    async with (
        httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http,
        open_asyncio_loop(),
        RedisList(redis_server.url, QUEUE) as source,
        trio.open_nursery() as nursery,
    ):
        run = await start_autoscaler(nursery, dev, source.read)
        await run.wait(lambda s: s.held == 2)
        await wait_engine(http, lambda ws: len(in_state(ws, "busy")) == 2)
        released_url = sorted(run.held_urls())[0]
        kept_url = sorted(run.held_urls())[1]

        # The consumer on that instance is done: POST /release on its control listener.
        answer = await http.post(
            dev.control_url(released_url) + "/release", json={"started_before": time.time()}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["released"] is True
        released = trio.current_time()
        await run.wait(lambda s: s.ended_by_outcome.get("explicit") == 1)
        [ended] = run.of_kind("reservation_ended")
        assert (ended.worker_url, ended.cause) == (released_url, "worker")
        assert ended.outcome == "explicit"

        # Demand is still 2: a new reservation replaces it, on any free worker. (The hold
        # lasted under 5 s, which the autoscaler counts as a failure: about 1 s backoff.)
        took = await run.wait(lambda s: s.held == 2)
        stats = run.stats()
        assert (stats.demand, stats.target, stats.waiting) == (2, 2, 0), run.describe()
        assert len(run.of_kind("reservation_started")) == 3
        assert kept_url in run.held_urls() and len(run.held_urls()) == 2
        await wait_engine(http, lambda ws: len(in_state(ws, "busy")) == 2)
        assert run.most == 2, run.describe()
        print(f"replaced {trio.current_time() - released:.2f} s after the release ({took=:.2f})")
        nursery.cancel_scope.cancel()
