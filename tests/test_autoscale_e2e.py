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

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import redis
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from nats.js.api import AckPolicy, ConsumerConfig

from nullworker.client._aio import open_asyncio_loop, run_aio
from nullworker.client.autoscaler import (
    AutoscaleEvent,
    Autoscaler,
    AutoscalerStatistics,
    autoscale,
)
from nullworker.client.demand import NatsConsumer, RedisList
from nullworker.engine import Engine
from nullworker.worker.config import WorkerConfig
from nullworker.worker.local_holds import LocalHoldEvent
from nullworker.worker.server import ServeInfo, serve

from .conftest import envelope, runtime, vast_settings
from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    nats_server_binary_fixture,
    nats_server_fixture,
    rdb_fixture,
    redis_notify_server_fixture,
    redis_server_binary_fixture,
    redis_server_fixture,
)
from .test_autoscale_cli import (
    Autoscale,
    RunAutoscale,
    run_autoscale_fixture,  # noqa: F401  (a fixture, used by name)
    write_demand,
)
from .test_dev import DevProcess, open_dev

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
        dev = await open_dev(nursery, Dev, *args)
        started.append(dev)
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
        assert took < 8.0  # the outage backoff (0.2 s doubling), one reservation, slack
        stats = run.stats()
        assert (stats.demand, stats.target, stats.waiting) == (3, 3, 0), run.describe()
        assert len(run.of_kind("source_recovered")) == 1
        assert urls < run.held_urls()
        await wait_engine(http, lambda ws: len(in_state(ws, "busy")) == 3)
        # Not one reservation was dropped over the outage.
        assert not run.of_kind("reservation_ended"), run.describe()
        print(f"recovered and held 3 within {trio.current_time() - back:.2f} s of the restart")
        nursery.cancel_scope.cancel()


async def test_a_pushed_job_is_held_long_before_the_poll_interval(
    start_dev: StartDev, redis_notify_server: ServerProcess
) -> None:
    # The server sends keyspace notifications; the autoscaler polls once a minute, so only
    # the wake-up of the job's LPUSH can explain a read within this test's bounds.
    dev = await start_dev("--min-workers", "1", "--max-workers", "1", "--idle-timeout", "60")
    rdb = redis.Redis.from_url(redis_notify_server.url, decode_responses=True)
    async with (
        httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http,
        open_asyncio_loop(),
        RedisList(redis_notify_server.url, QUEUE) as source,
        trio.open_nursery() as nursery,
    ):
        await wait_engine(http, lambda ws: len(in_state(ws, "idle")) == 1)
        run = await start_autoscaler(nursery, dev, source.read, poll_s=60.0)
        await run.wait(lambda s: s.demand == 0)
        # The subscription's own first wake-up reads once more; then the queue is quiet.
        await trio.sleep(0.5)
        before = len(run.of_kind("state"))
        pushed = trio.current_time()
        rdb.lpush(QUEUE, "job-1")
        took = await run.wait(lambda s: s.held == 1)
        read = next(e for e in run.of_kind("state")[before:] if e.demand == 1)
        assert read.at >= pushed, run.describe()
        assert read.at - pushed < 60.0 / 2
        print(f"a job pushed -> read in {read.at - pushed:.3f} s, held in {took:.3f} s (poll 60 s)")
        nursery.cancel_scope.cancel()
    rdb.close()


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


# -- a job is never unprotected ----------------------------------------------------------------
#
# Here the engine runs in this process (the ``vast_engine`` fixture), so that every
# ``/worker_status/`` it accepted can be read back (``Engine.worker_status_reports``); the
# three workers are real servers in this process too, whose local holds are observed as
# they open and close; the consumers (``examples/redis_list_consumer.py``) and the
# autoscalers (``nullworker autoscale --lease``) are real processes, on a real Redis.

CAP_S = 1.0  # MAX_RESERVATION_SECONDS: every job outlasts many reservations
JOB_S = 8.0
LEASE_KEY = "autoscale:ep"


class Instance:
    """One "machine": a worker in this process and its consumer beside it."""

    def __init__(self, number: int, tmp_path: Path) -> None:
        self.number = number
        self.pid_file = tmp_path / f"consumer-{number}.pid"
        self.info: ServeInfo | None = None
        self.consumer: trio.Process | None = None
        #: (time.time(), "started" | "ended", hold id), as the worker saw them.
        self.holds: list[tuple[float, str, int]] = []

    def observe(self, event: LocalHoldEvent) -> None:
        self.holds.append((time.time(), event.kind, event.hold.id))

    def hold_spans(self) -> list[tuple[float, float]]:
        opened = {i: at for at, kind, i in self.holds if kind == "started"}
        return [(opened[i], at) for at, kind, i in self.holds if kind == "ended"]

    def open_holds(self) -> int:
        return sum(1 if kind == "started" else -1 for _, kind, _ in self.holds)


async def start_instance(
    nursery: trio.Nursery, engine: Engine, tmp_path: Path, redis_url: str, number: int
) -> Instance:
    instance = Instance(number, tmp_path)
    config = WorkerConfig(
        **vast_settings(engine, container_id=number),
        port=0,
        control_port=0,
        graceful_timeout_s=1.0,
        lock_dir=str(tmp_path),
        max_reservation_s=CAP_S,
        # The consumer is alive while the pid it wrote at start is.
        backend_health_command=f'kill -0 "$(cat {instance.pid_file})"',
        backend_health_interval_s=0.2,
        backend_health_timeout_s=1.5,
    )
    info: ServeInfo = await nursery.start(serve, config)
    runtime(info).local_holds.add_observer(instance.observe)
    instance.info = info
    script = REPO / "examples" / "redis_list_consumer.py"
    command = (
        f"echo $$ > {instance.pid_file} && exec {sys.executable} {script} "
        f"--redis-url {redis_url} --queue {QUEUE} --processing {QUEUE}:processing "
        f"--control-url {info.control_url} --idle-release 60 --any-time"
    )  # --any-time: job 4 below is pushed while the operator's demand says 0
    instance.consumer = await trio.lowlevel.open_process(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return instance


def reports_of(engine: Engine, number: int) -> list[tuple[float, dict[str, Any]]]:
    return [(r.received_at, r.body) for r in engine.worker_status_reports if r.body["id"] == number]


def busy(report: dict[str, Any]) -> bool:
    return bool(report["num_requests_working"] >= 1 and report["cur_load"] > 0)


async def test_a_job_is_never_unprotected_and_a_dead_consumer_errors_its_worker(
    nursery: trio.Nursery,
    vast_engine: Engine,
    redis_server: ServerProcess,
    rdb: redis.Redis,
    tmp_path: Path,
    run_autoscale: RunAutoscale,
    http: httpx.AsyncClient,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    engine = vast_engine
    instances = [
        await start_instance(nursery, engine, tmp_path, redis_server.url, n) for n in (1, 2, 3)
    ]
    try:
        # Each worker is ready only once its consumer answers the health check.
        await engine.wait_for(
            lambda e: all(e.worker_state(n) == "idle" for n in (1, 2, 3)), timeout=WAIT_S
        )
        # The autoscaler follows a demand its operator sets (a file, read by a command),
        # so that its reservations can be dropped while the jobs run; it leads by a lease.
        demand = tmp_path / "demand"
        write_demand(demand, "3")
        argv = [
            "--demand-command", f"cat {demand}", "--max", "3", "--poll", "0.2",
            "--scale-down-delay", "0.5", "--engine-url", str(engine.url),
            "--lease", f"{redis_server.url}/0", LEASE_KEY,
            "--lease-ttl", "2", "--lease-renew", "0.5",
        ]  # fmt: skip
        first = await run_autoscale(*argv)
        await first.wait_events("reservation_started", 3)

        # Three jobs, each eight reservation caps long: one per consumer, each in a local hold.
        rdb.lpush(QUEUE, *[json.dumps({"id": n, "seconds": JOB_S}) for n in (1, 2, 3)])
        with trio.fail_after(WAIT_S):
            while not all(i.open_holds() == 1 for i in instances):
                await trio.sleep(SAMPLE_S)

        # Meanwhile: the reservations elapse at their cap, the demand drops and the
        # autoscaler scales down, it is restarted, then loses its lease and takes it again.
        write_demand(demand, "0")
        dropped = len(first.of_kind("state"))
        await first.wait_until(
            lambda: any(
                (e["target"], e["held"], e["waiting"]) == (0, 0, 0)
                for e in first.of_kind("state")[dropped:]
            )
        )
        assert await first.stop(signal.SIGTERM, within_s=WAIT_S) == 143, first.err
        second = await run_autoscale(*argv)
        await second.wait_events("lease_acquired")
        rdb.delete(LEASE_KEY)
        await second.wait_events("lease_lost")
        await second.wait_events("lease_acquired", 2)
        assert all(i.open_holds() == 1 for i in instances)  # all this while the jobs ran
        outcomes = [e["outcome"] for e in first.of_kind("reservation_ended")]
        assert len(outcomes) >= 3, first.out
        print(f"reservations ended while the jobs ran: {outcomes}")

        # The jobs end; the queue is empty; the autoscaler scales down; all idle.
        with trio.fail_after(JOB_S + WAIT_S):
            while not all(len(i.hold_spans()) == 1 for i in instances):
                await trio.sleep(SAMPLE_S)
        await engine.wait_for(
            lambda e: all(e.worker_state(n) == "idle" for n in (1, 2, 3)), timeout=WAIT_S
        )
        assert rdb.llen(QUEUE) == 0 and rdb.llen(f"{QUEUE}:processing") == 0

        # What the engine saw: while a job ran, each report of its worker was busy (after
        # the one that may have been on the wire when the hold opened), and it saw it.
        for instance in instances:
            [(opened, ended)] = instance.hold_spans()
            during = [
                body for at, body in reports_of(engine, instance.number) if opened < at < ended
            ]
            first_busy = next((n for n, body in enumerate(during) if busy(body)), None)
            assert first_busy is not None and first_busy <= 1, during
            assert all(busy(body) for body in during[first_busy:]), during
            assert all(body["error_msg"] == "" for body in during)
            print(
                f"worker {instance.number}: job held {ended - opened:.2f} s, "
                f"{len(during)} reports meanwhile, {len(during) - first_busy} busy"
            )

        # A consumer killed mid-job: its hold ends with it, and its worker is errored
        # and refuses reservations; the others stay as they were.
        rdb.lpush(QUEUE, json.dumps({"id": 4, "seconds": 60}))
        with trio.fail_after(WAIT_S):
            while not any(i.open_holds() == 1 for i in instances):
                await trio.sleep(SAMPLE_S)
        [victim] = [i for i in instances if i.open_holds() == 1]
        assert victim.consumer is not None and victim.info is not None
        victim.consumer.kill()
        await victim.consumer.wait()
        n = victim.number
        await engine.wait_for(lambda e: e.worker_state(n) == "error", timeout=WAIT_S)
        assert victim.open_holds() == 0
        error = reports_of(engine, n)[-1][1]["error_msg"]
        assert error == "consumer unhealthy: health command kill: exit code 1 for 1.5 s"
        url = victim.info.url
        answer = await http.post(f"{url}/reserve", json=envelope(url, key=rsa_key, request_idx=99))
        assert answer.status_code == 503
        assert answer.json() == {"error": error, "reason": "consumer_unhealthy"}
        others = [i.number for i in instances if i is not victim]
        assert {engine.worker_state(o) for o in others} == {"idle"}
        assert await second.stop(signal.SIGTERM, within_s=WAIT_S) == 143, second.err
    finally:
        for instance in instances:
            if instance.consumer is not None and instance.consumer.returncode is None:
                instance.consumer.kill()
                with trio.move_on_after(5):
                    await instance.consumer.wait()


# -- one worker per job ------------------------------------------------------------------
#
# ``nullworker dev`` starts the workers (and beside each, ``examples/redis_list_consumer.py``
# as its --consumer); ``nullworker autoscale --redis-list`` holds one reservation per job. A
# consumer takes a job only while its worker is reserved, so the reservation that brought
# a machine is the one its job uses: no second machine is started for it.

BURST_JOB_S = 2.0


def _drained(scaler: Autoscale, seen: int) -> bool:
    """Since its ``seen``-th state line, the autoscaler read no demand and holds nothing."""
    return any(
        (e["demand"], e["target"], e["held"], e["waiting"]) == (0, 0, 0, 0)
        for e in scaler.of_kind("state")[seen:]
    )


async def test_a_burst_of_jobs_starts_one_worker_per_job(
    start_dev: StartDev,
    redis_server: ServerProcess,
    rdb: redis.Redis,
    run_autoscale: RunAutoscale,
) -> None:
    """Two bursts of three jobs: the first on no worker at all (the consumers start with
    the workers), the second on the three workers idle by then, their consumers waiting
    for jobs. Each burst is done by the three workers: no fourth is started."""
    script = REPO / "examples" / "redis_list_consumer.py"
    processing = f"{QUEUE}:processing"
    consumer = (
        f"exec {sys.executable} {script} --redis-url {redis_server.url} --queue {QUEUE} "
        f"--processing {processing} --idle-release 3"
    )
    dev = await start_dev(
        "--min-workers", "0", "--max-workers", "6", "--idle-timeout", "60", "--consumer", consumer
    )  # fmt: skip
    scaler: Autoscale | None = None
    for burst in (1, 2):
        ids = [10 * burst + n for n in (1, 2, 3)]
        rdb.lpush(QUEUE, *[json.dumps({"id": i, "seconds": BURST_JOB_S}) for i in ids])
        if scaler is None:
            scaler = await run_autoscale(
                "--redis-list", redis_server.url, QUEUE, "--processing", processing,
                "--max", "6", "--poll", "0.2", "--scale-down-delay", "1",
                "--engine-url", dev.url, endpoint=ENDPOINT,
            )  # fmt: skip
        seen = len(scaler.of_kind("state"))
        # Every job done, each by one consumer, inside a local hold.
        for i in ids:
            await dev.wait_line(rf"\[consumer \d+\] job {i} done in \S+ s \(local hold \d+\)")
        assert rdb.llen(QUEUE) == 0 and rdb.llen(processing) == 0
        # The queue drained: the autoscaler lets go of every reservation, and the workers
        # hear it (before then a consumer may take the next burst's job under the ending
        # reservation, as any job taken a moment before its reservation ends).
        await scaler.wait_until(partial(_drained, scaler, seen))
        async with httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http:
            await wait_engine(http, lambda ws: len(in_state(ws, "idle")) == len(ws))
        # ... having asked for one per job, and the engine started one worker for each.
        assert len(scaler.of_kind("reservation_started")) == 3 * burst, scaler.out
        started = dev.worker_pids()
        print(f"workers started after burst {burst} of 3 jobs: {len(started)}")
        assert len(started) == 3, dev.output
    assert scaler is not None
    assert await scaler.stop(signal.SIGTERM, within_s=WAIT_S) == 143, scaler.err
