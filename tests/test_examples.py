"""The consumers in examples/, run as subprocesses against real servers and a real worker.

Each test starts a real redis-server or nats-server (tests/servers.py) and a standalone
worker in-process (the ``start_worker`` fixture), holds a reservation on the worker as a
client does (``POST /reserve``, left open), queues jobs, and runs the example with
``sys.executable``. The consumer must do every job, acknowledge it, and then end the
reservation through the worker's control listener: the holder's answer is
``{"released": "explicit"}``, and it comes only once the queue (and the processing list,
or the consumer's pending acks) is empty.

Every consumer works each job inside a local hold (``POST /hold`` on the control listener;
``nullworker.local_hold`` in ``trio_consumer.py``, ``nullworker hold -- CMD`` in
``hold_job.sh``). The "protects" tests run a Vast-mode worker reporting to the local
engine with ``MAX_RESERVATION_SECONDS`` a third of the job, on a control port the
consumer finds from the worker's environment alone (``NULLWORKER_CONTROL_PORT`` or
``NULL_CONTROL_PORT``). The reservation ends mid-job, and the worker's ``/health`` and
every report the engine receives stay busy until the job is done, then go idle.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import nats
import pytest
import redis
import trio
from nats.js.api import AckPolicy, ConsumerConfig

import nullworker
from nullworker import ServeInfo

from .conftest import StartWorker, envelope, runtime, vast_settings
from .helpers import closed_url
from .servers import (  # noqa: F401
    ServerProcess,
    nats_server_binary_fixture,
    nats_server_fixture,
    redis_server_binary_fixture,
    redis_server_fixture,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REDIS_EXAMPLE = EXAMPLES / "redis_list_consumer.py"
NATS_EXAMPLE = EXAMPLES / "nats_consumer.py"
TRIO_EXAMPLE = EXAMPLES / "trio_consumer.py"
SHELL_EXAMPLE = EXAMPLES / "hold_job.sh"

URL = "http://127.0.0.1:1"  # any url: unsecured workers do not check it
QUEUE = "jobs"
PROCESSING = "jobs:processing"
STREAM = "JOBS"
CONSUMER = "workers"
SUBJECT = "jobs.work"
IDLE_S = 0.5
#: Longer than one BLMOVE block or NATS fetch of the examples (1 s).
LONG_IDLE_S = 1.5
JOB_S = 0.1
#: MAX_RESERVATION_SECONDS in the "protects" tests: the reservation ends mid-job.
CAP_S = 1.0
#: Three times the cap: a hold that the cap ended would leave the job unprotected.
LONG_JOB_S = 3 * CAP_S
#: The idle spell of the consumers in the tests of a protected job: how long a consumer
#: waits for the test's reservation before it counts as idle (and exits).
PROTECT_IDLE_S = 3.0
#: The Vast-mode worker's id (vast_settings' container_id).
WORKER_ID = 7

#: A fresh request_idx for each reservation.
_REQUEST_IDX = itertools.count(50_000)

T = TypeVar("T")


def job(job_id: int, seconds: float = JOB_S) -> bytes:
    return json.dumps({"id": job_id, "seconds": seconds}).encode()


#: Where the consumers look for the control listener; set only by the tests.
CONTROL_VARIABLES = ("NULLWORKER_CONTROL_URL", "NULLWORKER_CONTROL_PORT", "NULL_CONTROL_PORT")


def consumer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONTROL_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def run_example(
    script: Path, *args: str, env: dict[str, str] | None = None, limit_s: float = 15.0
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(limit_s):
        return await trio.run_process(
            [sys.executable, str(script), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env if env is not None else consumer_env(),
        )


def output(result: subprocess.CompletedProcess[bytes]) -> str:
    return f"stdout:\n{result.stdout.decode()}\nstderr:\n{result.stderr.decode()}"


def done_ids(stdout: str) -> list[int]:
    """The ids of the ``job <id> done in <s> s`` lines, in order."""
    return [int(line.split()[1]) for line in stdout.splitlines() if " done in " in line]


def release_answers(stdout: str) -> list[dict[str, Any]]:
    """The worker's answers to the consumer's POST /release, in order."""
    return [
        json.loads(line.split(" -> ", 1)[1])
        for line in stdout.splitlines()
        if line.startswith("POST ") and " -> " in line
    ]


async def eventually(check: Callable[[], Awaitable[bool]], *, limit_s: float = 5.0) -> None:
    with trio.fail_after(limit_s):
        while not await check():
            await trio.sleep(0.01)


class Holder:
    """A client holding one reservation on the worker (``POST /reserve``, left open).

    When the worker answers, ``demand`` is read at once (what the queue held when the
    reservation ended) and ``ended`` is set. ``engine``: sign the envelope with the local
    engine's key, for a Vast-mode worker.
    """

    def __init__(self, engine: Any = None) -> None:
        self.request_idx = next(_REQUEST_IDX)
        self.engine = engine
        self.response: httpx.Response | None = None
        self.demand_at_end: int | None = None
        self.ended = trio.Event()

    async def hold(
        self, http: httpx.AsyncClient, info: ServeInfo, demand: Callable[[], Awaitable[int]]
    ) -> None:
        url, key = URL, None
        if self.engine is not None:
            url, key = info.public_url or "", self.engine.private_key
        body = envelope(url, key=key, payload={"duration": 60}, request_idx=self.request_idx)
        self.response = await http.post(f"{info.url}/reserve", json=body)
        self.demand_at_end = await demand()
        self.ended.set()

    def answer(self) -> dict[str, Any]:
        assert self.response is not None, "the reservation has not ended"
        assert self.response.status_code == 200, self.response.text
        answer: dict[str, Any] = self.response.json()
        return answer


async def hold_reservation(
    nursery: trio.Nursery,
    http: httpx.AsyncClient,
    info: ServeInfo,
    demand: Callable[[], Awaitable[int]],
    engine: Any = None,
) -> Holder:
    """Start holding a reservation in the background; return once the worker is busy."""
    holder = Holder(engine)
    nursery.start_soon(holder.hold, http, info, demand)
    with trio.fail_after(5):
        while not runtime(info).slot.statistics().busy:
            await trio.sleep(0.005)
    return holder


async def reserve_once_waited_for(
    nursery: trio.Nursery,
    http: httpx.AsyncClient,
    info: ServeInfo,
    demand: Callable[[], Awaitable[int]],
    engine: Any = None,
) -> Holder:
    """Hold a reservation once a consumer waits for one (``GET /reservation`` parked):
    with a short cap, a reservation made before a slow start would elapse unseen."""
    assert info.control_url is not None
    with trio.fail_after(30):
        while (await http.get(f"{info.control_url}/status")).json()["reservation_waiters"] < 1:
            await trio.sleep(0.02)
    return await hold_reservation(nursery, http, info, demand, engine)


# -- a running job is never scaled away ---------------------------------------------------


async def start_vast_worker(start_worker: StartWorker, engine: Any) -> ServeInfo:
    """A worker in Vast mode reporting to the local engine, once the engine sees it ready.

    MAX_RESERVATION_SECONDS is CAP_S, a heartbeat report goes out every 0.1 s, and the
    control listener is on a port of its own (not 18999): read it from ``control_url``.
    """
    settings = vast_settings(
        engine, max_reservation_s=CAP_S, heartbeat_s=0.1, report_interval_s=0.05
    )
    info = await start_worker(**settings)  # control_port 0: a port of its own
    await engine.wait_for(lambda e: WORKER_ID in e.workers and e.workers[WORKER_ID].ready)
    assert info.control_url is not None
    return info


async def start_consumer(
    nursery: trio.Nursery, command: list[str], log_path: Path, env: dict[str, str]
) -> trio.Process:
    """Run ``command`` in the background, its stdout and stderr to ``log_path``."""
    with log_path.open("wb") as log:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
                env=env,
            )
        )
    return process


async def check_the_job_is_protected(
    http: httpx.AsyncClient,
    info: ServeInfo,
    engine: Any,
    holder: Holder,
    process: trio.Process,
    log_path: Path,
    job_id: int,
    *,
    done: str | None = None,
) -> None:
    """The consumer works job ``job_id`` (LONG_JOB_S, three times the cap) under
    ``holder``'s reservation.

    During the job the worker lists one local hold named after it; the reservation ends
    at the cap (before the job is done: it started first, and the job lasts three caps),
    and the worker (``/health``) and every report the engine receives stay busy until the
    job is done, then both go idle. The consumer
    (``--exit-when-idle``) then exits 0. ``done``: what the log says once the job is
    done, before the hold is dropped (default ``job <id> done``).
    """
    assert info.control_url is not None
    done = done or f"job {job_id} done"

    def log() -> str:
        return log_path.read_text(errors="replace")

    async def status() -> dict[str, Any]:
        answer: dict[str, Any] = (await http.get(f"{info.control_url}/status")).json()
        return answer

    async def held() -> bool:
        return bool((await status())["local_holds"]["count"] == 1)

    await eventually(held, limit_s=10)
    # The engine hears of the hold within a report (the reservation may have elapsed
    # already while the consumer started): from then on it must never hear "idle".
    await engine.wait_for(lambda e: e.workers[WORKER_ID].busy, timeout=5.0)
    held_since = time.time()
    [hold] = (await status())["local_holds"]["holds"]
    assert hold["label"] == f"job {job_id}" and hold["duration"] is None
    assert done not in log(), log()

    # The reservation that brought the machine ends (its duration, capped at CAP_S)
    # before the job is done: it started before the job, which lasts three times as long.
    with trio.fail_after(5):
        await holder.ended.wait()
    assert holder.answer()["released"] == "duration_elapsed"
    assert not runtime(info).slot.statistics().busy  # no reservation any more

    # Busy for the worker and the engine until the job is done. Polled in this order,
    # since the job is logged done before the hold is dropped: whenever either says
    # idle, ``done`` must already be in the log.
    busy_polls = 0
    running_at = held_since  # the last moment the log said the job was still running
    with trio.fail_after(10):
        while True:
            now = time.time()
            worker_busy = (await http.get(f"{info.control_url}/health")).json()["busy"]
            engine_busy = engine.workers[WORKER_ID].busy
            job_done = done in log()
            if not (worker_busy and engine_busy):
                assert job_done, f"idle mid-job (worker {worker_busy}, engine {engine_busy})"
            elif not job_done:
                busy_polls += 1
                running_at = now
            if not (worker_busy or engine_busy):
                break
            await trio.sleep(0.02)
    assert busy_polls >= 10, busy_polls  # the rest of the job, after the reservation
    # Every report of the job's span said busy: one request working (the local hold).
    during = [
        r.body for r in engine.worker_status_reports if held_since <= r.received_at <= running_at
    ]
    assert len(during) >= 2, during
    for body in during:
        assert body["cur_load"] == 100.0 and body["num_requests_working"] == 1, body
    assert engine.workers[WORKER_ID].cur_load == 0.0
    final = await status()
    assert final["busy"] is False and final["local_holds"]["count"] == 0
    counts = final["local_holds"]["counts"]
    assert counts["disconnected"] == 1  # the consumer let go
    assert counts["duration_elapsed"] == 0 and counts["started"] == 1  # one hold, no cap

    with trio.fail_after(10):
        await process.wait()
    assert process.returncode == 0, log()
    assert f"local hold {hold['id']}" in log(), log()
    # Its own idle release found nothing to end: the reservation was already gone.
    assert '"no active reservation"' in log(), log()


def control_port_env(info: ServeInfo, variable: str = "NULLWORKER_CONTROL_PORT") -> dict[str, str]:
    """The consumer's environment with the worker's control port, as the worker has it."""
    assert info.control_url is not None
    port = urlsplit(info.control_url).port
    assert port is not None and port != 18999
    return consumer_env(**{variable: str(port)})


def load_example(script: Path) -> Any:
    spec = importlib.util.spec_from_file_location(script.stem, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", [REDIS_EXAMPLE, NATS_EXAMPLE], ids=["redis", "nats"])
def test_the_examples_find_the_control_listener_as_the_library_does(script: Path) -> None:
    """The stdlib consumers carry a copy of ``nullworker.control_url``: it must agree."""
    copy = load_example(script).control_url
    for env in [
        {},
        {"NULLWORKER_CONTROL_PORT": "19001"},
        {"NULL_CONTROL_PORT": "19002"},
        {"NULLWORKER_CONTROL_PORT": "19001", "NULL_CONTROL_PORT": "19002"},
        {"NULLWORKER_CONTROL_PORT": "", "NULL_CONTROL_PORT": "19002"},
        {"NULLWORKER_CONTROL_URL": "http://127.0.0.1:7/", "NULLWORKER_CONTROL_PORT": "1"},
        {"NULLWORKER_CONTROL_PORT": "off"},
        {"NULL_CONTROL_PORT": "0"},
        {"NULLWORKER_CONTROL_PORT": "70000"},
        {"NULLWORKER_CONTROL_URL": "127.0.0.1:7"},
    ]:
        try:
            expected = nullworker.control_url(env)
        except ValueError:
            with pytest.raises(ValueError):
                copy(env)
            continue
        assert copy(env) == expected, env


# -- Redis -------------------------------------------------------------------------------


class RedisLists:
    """The queue and processing lists, through a sync client run in a thread."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(partial(fn, *args))

    async def push(self, *jobs: bytes) -> None:
        await self.call(self.client.lpush, QUEUE, *jobs)

    async def lists(self) -> tuple[list[bytes], list[bytes]]:
        queue = await self.call(self.client.lrange, QUEUE, 0, -1)
        processing = await self.call(self.client.lrange, PROCESSING, 0, -1)
        return queue, processing

    async def demand(self) -> int:
        """What ``nullworker autoscale --redis-list URL jobs --processing jobs:processing``
        counts: LLEN queue + LLEN processing."""
        queue = await self.call(self.client.llen, QUEUE)
        processing = await self.call(self.client.llen, PROCESSING)
        return int(queue) + int(processing)


def redis_args(server: ServerProcess, *extra: str, idle_s: float = IDLE_S) -> list[str]:
    return [
        "--redis-url",
        server.url,
        "--queue",
        QUEUE,
        "--processing",
        PROCESSING,
        "--idle-release",
        str(idle_s),
        *extra,
    ]


async def test_redis_consumer_does_the_jobs_then_releases_the_reservation(
    redis_server: ServerProcess,
    start_worker: StartWorker,
    http: httpx.AsyncClient,
    nursery: trio.Nursery,
) -> None:
    info = await start_worker()
    assert info.control_url is not None
    lists = RedisLists(redis_server.url)
    holder = await hold_reservation(nursery, http, info, lists.demand)
    await lists.push(job(1), job(2), job(3))

    # An idle spell longer than one BLMOVE block (1 s): the consumer must wait out several.
    result = await run_example(
        REDIS_EXAMPLE,
        *redis_args(
            redis_server,
            "--control-url",
            info.control_url,
            "--exit-when-idle",
            idle_s=LONG_IDLE_S,
        ),
    )

    assert result.returncode == 0, output(result)
    stdout = result.stdout.decode()
    assert done_ids(stdout) == [1, 2, 3], output(result)  # oldest first
    assert await lists.lists() == ([], [])  # all done and acknowledged
    # It released once, after the last job, and the release ended our reservation.
    [answer] = release_answers(stdout)
    assert answer["released"] is True
    assert answer["request_idx"] == holder.request_idx
    assert stdout.index("POST ") > stdout.index("job 3 done")
    with trio.fail_after(5):
        await holder.ended.wait()
    assert holder.answer()["released"] == "explicit"
    assert holder.answer()["held"] >= 3 * JOB_S + LONG_IDLE_S  # the jobs, then the idle spell
    assert holder.demand_at_end == 0  # the queue had emptied when the reservation ended
    assert runtime(info).slot.statistics().counts["explicit"] == 1


async def test_redis_consumer_keeps_waiting_after_a_release(
    redis_server: ServerProcess,
    start_worker: StartWorker,
    http: httpx.AsyncClient,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Without --exit-when-idle: one release per idle spell, and the next job is done."""
    info = await start_worker()
    assert info.control_url is not None
    lists = RedisLists(redis_server.url)
    first = await hold_reservation(nursery, http, info, lists.demand)
    await lists.push(job(1))
    log_path = tmp_path / "consumer.out"
    # The control URL from the environment this time.
    env = consumer_env(NULLWORKER_CONTROL_URL=info.control_url)
    with log_path.open("wb") as log:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, str(REDIS_EXAMPLE), *redis_args(redis_server)],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
                env=env,
            )
        )
    try:
        with trio.fail_after(10):
            await first.ended.wait()
        assert first.answer()["released"] == "explicit"
        assert first.demand_at_end == 0

        # Still idle: the consumer released once for this spell and must not end a new
        # reservation that nothing asked it to end.
        second = await hold_reservation(nursery, http, info, lists.demand)
        await trio.sleep(3 * IDLE_S)
        assert not second.ended.is_set()
        await lists.push(job(2))
        with trio.fail_after(10):
            await second.ended.wait()
        assert second.answer()["released"] == "explicit"
        assert second.answer()["held"] >= 3 * IDLE_S + JOB_S + IDLE_S
        assert second.demand_at_end == 0
        assert process.returncode is None  # still consuming
    finally:
        process.terminate()
        with trio.fail_after(5):
            await process.wait()
    assert process.returncode == 128 + signal.SIGTERM
    stdout = log_path.read_text()
    assert done_ids(stdout) == [1, 2], stdout
    answers = release_answers(stdout)
    assert [a["request_idx"] for a in answers] == [first.request_idx, second.request_idx]
    assert await lists.lists() == ([], [])


async def test_redis_consumer_requeues_a_crashed_runs_job(
    redis_server: ServerProcess,
    start_worker: StartWorker,
    nursery: trio.Nursery,
) -> None:
    info = await start_worker()
    assert info.control_url is not None
    lists = RedisLists(redis_server.url)
    crashed_job = job(0, seconds=1.0)
    await lists.push(crashed_job, job(1), job(2))
    # No reservation here: --any-time takes the jobs all the same.
    args = redis_args(
        redis_server, "--control-url", info.control_url, "--exit-when-idle", "--any-time"
    )

    # A consumer killed (SIGKILL) in the middle of job 0 leaves it on the processing list.
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [sys.executable, str(REDIS_EXAMPLE), *args],
            stdout=subprocess.DEVNULL,
            check=False,
            env=consumer_env(),
        )
    )

    async def job_0_taken_and_held() -> bool:
        held = runtime(info).local_holds.count == 1
        return held and (await lists.lists())[1] == [crashed_job]

    await eventually(job_0_taken_and_held)
    process.kill()
    with trio.fail_after(5):
        await process.wait()
    assert await lists.lists() == ([job(2), job(1)], [crashed_job])

    # The kernel closed the hold's connection: the worker is not left busy.
    async def unheld() -> bool:
        return runtime(info).local_holds.count == 0

    await eventually(unheld, limit_s=1.0)
    assert runtime(info).local_holds.statistics().counts["disconnected"] == 1
    assert not runtime(info).busy

    # By default a new run leaves the processing list alone (another consumer's jobs).
    result = await run_example(REDIS_EXAMPLE, *args)
    assert result.returncode == 0, output(result)
    assert done_ids(result.stdout.decode()) == [1, 2], output(result)
    assert await lists.lists() == ([], [crashed_job])

    # --requeue-leftovers puts it back at the head of the queue and does it.
    await lists.push(job(3))
    result = await run_example(REDIS_EXAMPLE, *args, "--requeue-leftovers")
    assert result.returncode == 0, output(result)
    stdout = result.stdout.decode()
    assert "requeued 1 leftover job(s)" in stdout, output(result)
    assert done_ids(stdout) == [0, 3], output(result)  # the leftover first
    assert await lists.lists() == ([], [])
    assert release_answers(stdout) == [{"released": False, "reason": "no active reservation"}]


@pytest.mark.parametrize(
    ("script", "variable"),
    [(REDIS_EXAMPLE, "NULLWORKER_CONTROL_PORT"), (TRIO_EXAMPLE, "NULL_CONTROL_PORT")],
    ids=["sync", "trio"],
)
async def test_redis_consumers_protect_the_running_job(
    script: Path,
    variable: str,
    redis_server: ServerProcess,
    start_worker: StartWorker,
    vast_engine: Any,
    http: httpx.AsyncClient,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    info = await start_vast_worker(start_worker, vast_engine)
    assert info.control_url is not None
    lists = RedisLists(redis_server.url)
    await lists.push(job(1, seconds=LONG_JOB_S))
    # The control URL from the environment.
    args = redis_args(redis_server, "--exit-when-idle", idle_s=PROTECT_IDLE_S)
    log_path = tmp_path / "consumer.out"
    env = control_port_env(info, variable)
    process = await start_consumer(nursery, [sys.executable, str(script), *args], log_path, env)
    holder = await reserve_once_waited_for(nursery, http, info, lists.demand, vast_engine)
    await check_the_job_is_protected(http, info, vast_engine, holder, process, log_path, 1)
    assert await lists.lists() == ([], [])  # done and acknowledged


@pytest.mark.parametrize("script", [REDIS_EXAMPLE, TRIO_EXAMPLE], ids=["sync", "trio"])
async def test_redis_consumers_work_without_a_hold_when_the_worker_is_unreachable(
    script: Path, redis_server: ServerProcess
) -> None:
    """With --any-time the job matters more than the hold: worked anyway, and said once,
    not per job."""
    lists = RedisLists(redis_server.url)
    await lists.push(job(1), job(2))
    args = redis_args(redis_server, "--control-url", closed_url(), "--exit-when-idle", "--any-time")
    result = await run_example(script, *args)
    assert result.returncode == 1, output(result)  # the idle release failed too
    stdout = result.stdout.decode()
    assert done_ids(stdout) == [1, 2], output(result)
    assert stdout.count("local hold unavailable") == 1, output(result)
    # It names the URL it tried and where that URL comes from.
    [said] = [line for line in stdout.splitlines() if "local hold unavailable" in line]
    assert args[args.index("--control-url") + 1] in said, said
    assert "NULLWORKER_CONTROL_URL" in said and "NULLWORKER_CONTROL_PORT" in said, said
    assert stdout.count("(not held)") == 2, output(result)
    assert await lists.lists() == ([], [])


@pytest.mark.parametrize("script", [REDIS_EXAMPLE, TRIO_EXAMPLE], ids=["sync", "trio"])
async def test_a_job_taken_after_the_reservation_ended_goes_back_to_the_queue(
    script: Path,
    redis_server: ServerProcess,
    start_worker: StartWorker,
    http: httpx.AsyncClient,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Reserved, the consumer blocks in BLMOVE; the reservation ends; then a job comes.
    The consumer must not work it here (that would keep this machine busy and make the
    engine start another one for the job's reservation): it goes back to the head of
    the queue, untouched."""
    info = await start_worker()
    assert info.control_url is not None
    lists = RedisLists(redis_server.url)
    args = redis_args(redis_server, "--control-url", info.control_url, idle_s=60.0)
    log_path = tmp_path / "consumer.out"
    await start_consumer(nursery, [sys.executable, str(script), *args], log_path, consumer_env())
    holder = await reserve_once_waited_for(nursery, http, info, lists.demand)

    def blocked_in_blmove() -> bool:
        return any(c.get("cmd") == "blmove" for c in lists.client.client_list())

    with trio.fail_after(30):
        while not await trio.to_thread.run_sync(blocked_in_blmove):
            await trio.sleep(0.005)
    answer = await http.post(f"{info.control_url}/release", json={"started_before": time.time()})
    assert answer.json()["released"] is True, answer.text
    await holder.ended.wait()
    await lists.push(job(1))

    def said() -> str:
        return log_path.read_text(errors="replace")

    # BLMOVE (blocked for up to a second) takes the job and puts it back; or, if its
    # block ended before the job came, the consumer is waiting for a reservation and
    # never takes it. Either way the job is never worked and ends up in the queue.
    with trio.fail_after(15):
        while "put back" not in said() and await trio.to_thread.run_sync(blocked_in_blmove):
            await trio.sleep(0.02)
    await trio.sleep(0.5)
    assert await lists.lists() == ([job(1)], []), said()
    assert " done in " not in said() and runtime(info).local_holds.count == 0, said()


@pytest.mark.parametrize("script", [REDIS_EXAMPLE, TRIO_EXAMPLE], ids=["sync", "trio"])
async def test_redis_consumers_take_no_job_while_the_worker_is_not_reserved(
    script: Path,
    redis_server: ServerProcess,
    start_worker: StartWorker,
    http: httpx.AsyncClient,
    nursery: trio.Nursery,
) -> None:
    """A job only while reserved: unreachable or idle, the worker gets none; reserved, it
    gets the job at once."""
    lists = RedisLists(redis_server.url)
    await lists.push(job(1))
    args = redis_args(redis_server, "--control-url", closed_url(), "--exit-when-idle")
    result = await run_example(script, *args)
    assert result.returncode == 1, output(result)  # the idle release failed too
    stdout = result.stdout.decode()
    assert done_ids(stdout) == [], output(result)
    assert stdout.count("whether it is reserved") == 1, output(result)
    assert await lists.lists() == ([job(1)], [])  # untouched

    info = await start_worker()
    assert info.control_url is not None
    args = redis_args(redis_server, "--control-url", info.control_url, "--exit-when-idle")
    result = await run_example(script, *args)  # up, but not reserved
    assert result.returncode == 0, output(result)
    assert done_ids(result.stdout.decode()) == [], output(result)
    assert release_answers(result.stdout.decode()) == [
        {"released": False, "reason": "no active reservation"}
    ]
    assert await lists.lists() == ([job(1)], [])
    holder = await hold_reservation(nursery, http, info, lists.demand)
    result = await run_example(script, *args)
    assert result.returncode == 0, output(result)
    assert done_ids(result.stdout.decode()) == [1], output(result)
    assert await lists.lists() == ([], [])
    with trio.fail_after(5):
        await holder.ended.wait()  # released once idle
    assert runtime(info).local_holds.statistics().counts["started"] == 1


async def test_shell_example_protects_the_running_job(
    redis_server: ServerProcess,
    start_worker: StartWorker,
    vast_engine: Any,
    http: httpx.AsyncClient,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    info = await start_vast_worker(start_worker, vast_engine)
    assert info.control_url is not None
    lists = RedisLists(redis_server.url)
    await lists.push(b"1")  # the shell example's jobs are ids
    env = consumer_env(
        REDIS_URL=redis_server.url,
        QUEUE=QUEUE,
        PROCESSING=PROCESSING,
        IDLE_RELEASE=str(PROTECT_IDLE_S),
        EXIT_WHEN_IDLE="1",
        NULLWORKER=str(Path(sys.executable).parent / "nullworker"),
    )
    # The example prints "job 1 done" once `nullworker hold` has exited, after the hold:
    # the command itself says when the work is done.
    env.update(control_port_env(info))
    work = f'sleep {LONG_JOB_S}; echo "finished job $1"'
    log_path = tmp_path / "consumer.out"
    command = [str(SHELL_EXAMPLE), "sh", "-c", work, "work"]
    process = await start_consumer(nursery, command, log_path, env)
    holder = await reserve_once_waited_for(nursery, http, info, lists.demand, vast_engine)
    await check_the_job_is_protected(
        http, info, vast_engine, holder, process, log_path, 1, done="finished job 1"
    )
    assert "job 1 done" in log_path.read_text()
    assert await lists.lists() == ([], [])


# -- NATS --------------------------------------------------------------------------------


def _with_jetstream(url: str, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(jetstream_context)`` on a fresh connection, in a private asyncio loop."""

    async def main() -> T:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


async def jetstream(url: str, fn: Callable[[Any], Awaitable[T]]) -> T:
    return await trio.to_thread.run_sync(_with_jetstream, url, fn)


async def consumer_counts(url: str) -> tuple[int, int]:
    async def read(js: Any) -> tuple[int, int]:
        info = await js.consumer_info(STREAM, CONSUMER)
        return info.num_pending, info.num_ack_pending

    return await jetstream(url, read)


def nats_args(server: ServerProcess, *extra: str, idle_s: float = IDLE_S) -> list[str]:
    return [
        "--nats-url",
        server.url,
        "--stream",
        STREAM,
        "--consumer",
        CONSUMER,
        "--subject",
        SUBJECT,
        "--idle-release",
        str(idle_s),
        "--exit-when-idle",
        *extra,
    ]


async def test_nats_consumer_does_the_jobs_then_releases_the_reservation(
    nats_server: ServerProcess,
    start_worker: StartWorker,
    http: httpx.AsyncClient,
    nursery: trio.Nursery,
) -> None:
    info = await start_worker()
    assert info.control_url is not None
    env = consumer_env(NULLWORKER_CONTROL_URL=info.control_url)

    # Without --create a missing consumer is an error; with it, the walkthrough's first
    # run makes the stream and the durable consumer (and, idle, releases nothing).
    result = await run_example(NATS_EXAMPLE, *nats_args(nats_server), env=env)
    assert result.returncode == 2, output(result)
    assert "--create" in result.stdout.decode(), output(result)
    result = await run_example(NATS_EXAMPLE, *nats_args(nats_server, "--create"), env=env)
    assert result.returncode == 0, output(result)
    stdout = result.stdout.decode()
    assert f"created stream {STREAM!r}" in stdout, output(result)
    assert f"created durable consumer {CONSUMER!r}" in stdout, output(result)
    assert release_answers(stdout) == [{"released": False, "reason": "no active reservation"}]

    async def demand() -> int:
        """What ``nullworker autoscale --nats-consumer URL JOBS workers`` counts."""
        return sum(await consumer_counts(nats_server.url))

    holder = await hold_reservation(nursery, http, info, demand)

    async def publish(js: Any) -> None:
        for job_id in (1, 2, 3):
            await js.publish(SUBJECT, job(job_id), stream=STREAM)

    await jetstream(nats_server.url, publish)
    assert await consumer_counts(nats_server.url) == (3, 0)

    # An idle spell longer than one fetch (1 s): the consumer must wait out several.
    result = await run_example(NATS_EXAMPLE, *nats_args(nats_server, idle_s=LONG_IDLE_S), env=env)

    assert result.returncode == 0, output(result)
    stdout = result.stdout.decode()
    assert done_ids(stdout) == [1, 2, 3], output(result)
    assert await consumer_counts(nats_server.url) == (0, 0)  # all delivered and acked
    [answer] = release_answers(stdout)
    assert answer["released"] is True
    assert answer["request_idx"] == holder.request_idx
    assert stdout.index("POST ") > stdout.index("job 3 done")
    with trio.fail_after(5):
        await holder.ended.wait()
    assert holder.answer()["released"] == "explicit"
    assert holder.answer()["held"] >= 3 * JOB_S + LONG_IDLE_S
    assert holder.demand_at_end == 0


async def test_nats_consumer_protects_the_running_job(
    nats_server: ServerProcess,
    start_worker: StartWorker,
    vast_engine: Any,
    http: httpx.AsyncClient,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    info = await start_vast_worker(start_worker, vast_engine)
    assert info.control_url is not None

    async def create(js: Any) -> None:
        await js.add_stream(name=STREAM, subjects=[SUBJECT])
        config = ConsumerConfig(
            durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, filter_subject=SUBJECT
        )
        await js.add_consumer(STREAM, config)

    async def publish(js: Any) -> None:
        await js.publish(SUBJECT, job(1, seconds=LONG_JOB_S), stream=STREAM)

    async def demand() -> int:
        return sum(await consumer_counts(nats_server.url))

    await jetstream(nats_server.url, create)
    await jetstream(nats_server.url, publish)
    env = control_port_env(info)
    log_path = tmp_path / "consumer.out"
    command = [sys.executable, str(NATS_EXAMPLE), *nats_args(nats_server, idle_s=PROTECT_IDLE_S)]
    process = await start_consumer(nursery, command, log_path, env)
    holder = await reserve_once_waited_for(nursery, http, info, demand, vast_engine)
    await check_the_job_is_protected(http, info, vast_engine, holder, process, log_path, 1)
    assert await consumer_counts(nats_server.url) == (0, 0)  # delivered and acked
