"""Tests of ``nullworker autoscale`` (``nullworker.client.autoscale_cli``) and its metrics.

* In-process: usage errors (exit 2 and the reason), the metrics port taken (exit 1), the
  collector's metric names, the library name ``nullworker.autoscale``.
* As a subprocess (``python -m nullworker autoscale``) against the real local engine
  (``nullworker.engine``, in this process) and real workers (``nullworker.worker.serve``,
  Vast mode, signatures checked): the JSON and text lines, ``/metrics`` scraped with
  ``prometheus_client``'s own parser, what the engine sees, SIGINT/SIGTERM. One test
  reads a real ``redis-server``, through trio-asyncio in the command's process; two
  read a real PostgreSQL server (``--postgres``) the same way.

Every wait is bounded by ``WAIT_S``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import nullworker
from nullworker.client import autoscaler as autoscaler_module
from nullworker.client.autoscale_cli import main
from nullworker.client.autoscaler import AutoscalerStatistics
from nullworker.client.metrics import AutoscalerCollector
from nullworker.engine import Engine
from nullworker.worker.server import ServeInfo

from .conftest import StartWorker, vast_settings
from .helpers import Output, closed_port
from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    redis_server_binary_fixture,
    redis_server_fixture,
)
from .servers_cloud import (  # noqa: F401  (a pytest fixture, used by name)
    PG_PASSWORD,
    PostgresServer,
    postgres_server_fixture,
)

REPO = Path(__file__).resolve().parent.parent
KEY = "autoscale-test-key-5e1f0c"
WAIT_S = 10.0
#: The autoscaler's timing in these tests.
FAST = ("--poll", "0.2", "--scale-down-delay", "1")


# -- in-process: usage -------------------------------------------------------------------

DEMAND = ["--endpoint", "ep", "--demand-command", "echo 1"]
PG_LISTEN = ["--postgres-listen", ""]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--demand-command", "echo 1"], "--endpoint"),
        (["--endpoint", "ep"], "one of the arguments --redis-list"),
        ([*DEMAND, "--redis-list", "redis://h", "jobs"], "not allowed with argument"),
        (["--endpoint", "ep", "--redis-list", "redis://h"], "expected 2 arguments"),
        (["--endpoint", "ep", "--redis-list", "http://h", "jobs"], "URL scheme must be one of"),
        (["--endpoint", "ep", "--redis-list", "redis:/h:6379", "jobs"], "--redis-list: 'redis:/"),
        (["--endpoint", "ep", "--redis-stream", "redis://:1", "s", "g"], "--redis-stream: "),
        (["--endpoint", "ep", "--nats-consumer", "nats://h:x", "S", "c"], "--nats-consumer: "),
        (["--endpoint", "ep", "--redis-queue", "rq", "redis://h:0", "q"], "--redis-queue: "),
        (["--endpoint", "ep", "--redis-queue", "resque", "redis://h", "q"], "sidekiq"),
        ([*DEMAND, "--redis-queue-prefix", "p"], "--redis-queue-prefix goes with --redis-queue"),
        (["--endpoint", "ep", "--http-json", "http:/h/x", "a"], "--http-json: "),
        (["--endpoint", "ep", "--http-json", "http://h/x", "a..b"], "--http-json: JSON path"),
        (["--endpoint", "ep", "--prometheus", "ftp://h", "up"], "--prometheus: "),
        (["--endpoint", "ep", "--prometheus", "http://h:9090", " "], "needs a query"),
        (["--endpoint", "ep", "--nats-consumer", "nats://h", "S.1", "c"], "invalid NATS stream"),
        (["--endpoint", "ep", "--lease", "redis:/h", "k", *DEMAND[2:]], "--lease: 'redis:/h'"),
        ([*DEMAND, "--processing", "p"], "--processing goes with --redis-list"),
        ([*DEMAND, "--postgres-listen", "jobs"], "--postgres-listen goes with --postgres"),
        (
            [*DEMAND, "--redis-configure-notifications"],
            "--redis-configure-notifications goes with --redis-list or --redis-stream",
        ),
        (
            ["--endpoint", "ep", "--postgres", "postgresql://h/db", "SELECT 1", *PG_LISTEN],
            "--postgres: listen must be a channel name",
        ),
        ([*DEMAND, "--min", "-1"], "--min must be an integer >= 0"),
        ([*DEMAND, "--max", "0"], "--max must be an integer >= 1"),
        ([*DEMAND, "--min", "3", "--max", "2"], "--min (3) must not be greater than --max (2)"),
        ([*DEMAND, "--jobs-per-worker", "0"], "--jobs-per-worker"),
        ([*DEMAND, "--poll", "0"], "--poll"),
        ([*DEMAND, "--poll", "nan"], "--poll"),
        ([*DEMAND, "--scale-down-delay", "-1"], "--scale-down-delay"),
        ([*DEMAND, "--duration", "inf"], "--duration"),
        ([*DEMAND, "--demand-timeout", "0"], "--demand-timeout"),
        ([*DEMAND, "--metrics-port", "70000"], "--metrics-port"),
        ([*DEMAND, "--metrics-host", "0.0.0.0"], "--metrics-host goes with --metrics-port"),
        ([*DEMAND, "--engine-url", "ftp://x"], "--engine-url must be an http(s) URL"),
        ([*DEMAND, "--max", "many"], "--max: invalid int value"),
    ],
)
def test_usage_errors_exit_2_with_the_reason(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert message in usage_error(argv, capsys, monkeypatch)


def usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> str:
    """The one ``error:`` line of ``nullworker autoscale ARGV`` (with an API key set),
    which must exit 2 having printed nothing on stdout."""
    monkeypatch.setenv("VAST_API_KEY", KEY)
    assert main(argv) == 2
    captured = capsys.readouterr()
    error_lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, captured.err
    assert error_lines[0].startswith("nullworker autoscale: error: ")
    assert captured.out == ""
    return error_lines[0]


def test_an_api_key_is_required_and_a_password_is_not_shown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    assert main(["--endpoint", "ep", "--redis-list", "redis://:hunter2@h", "jobs"]) == 2
    assert "pass --api-key or set VAST_API_KEY" in capsys.readouterr().err

    argv = ["--endpoint", "ep", "--api-key", KEY, "--redis-list", "ftp://:hunter2@h", "jobs"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ftp://:***@h" in err and "hunter2" not in err


def test_metrics_port_in_use_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [*DEMAND, "--api-key", KEY, "--metrics-port", str(port)]
        assert main(argv) == 1
    captured = capsys.readouterr()
    assert f"cannot serve metrics on 127.0.0.1:{port}" in captured.err
    assert captured.out == ""


def test_the_collector_names_every_metric() -> None:
    stats = AutoscalerStatistics(
        demand=7,
        target=4,
        held=3,
        waiting=1,
        stopping=0,
        ended_by_outcome={"explicit": 2, "client_released": 5},
        reservations_failed=1,
        source_errors=6,
        source_ok=False,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AutoscalerCollector(lambda: {"ep": stats}))
    assert parse_metrics(generate_latest(registry).decode()) == {
        'nullworker_autoscale_demand{endpoint="ep"}': 7,
        'nullworker_autoscale_target{endpoint="ep"}': 4,
        'nullworker_autoscale_reservations_held{endpoint="ep"}': 3,
        'nullworker_autoscale_reservations_waiting{endpoint="ep"}': 1,
        'nullworker_autoscale_reservations_ended_total{endpoint="ep",outcome="client_released"}': 5,
        'nullworker_autoscale_reservations_ended_total{endpoint="ep",outcome="explicit"}': 2,
        'nullworker_autoscale_reservations_failed_total{endpoint="ep"}': 1,
        'nullworker_autoscale_source_errors_total{endpoint="ep"}': 6,
        'nullworker_autoscale_source_up{endpoint="ep"}': 0,
    }
    # Before the first read the demand has no sample; before the autoscaler runs, nothing.
    unknown = AutoscalerStatistics(None, 0, 0, 0, 0, {}, 0, 0, False)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AutoscalerCollector(lambda: {"ep": unknown}))
    samples = parse_metrics(generate_latest(registry).decode())
    assert not [name for name in samples if name.startswith("nullworker_autoscale_demand")]
    assert samples['nullworker_autoscale_target{endpoint="ep"}'] == 0
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AutoscalerCollector(dict))
    assert generate_latest(registry) == b""


def test_nullworker_autoscale_is_the_library_function() -> None:
    assert nullworker.autoscale is autoscaler_module.autoscale
    assert nullworker.client.autoscale is autoscaler_module.autoscale
    assert "autoscale" in nullworker.__all__


# -- the command as a subprocess -------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample, keyed ``name`` or ``name{label="value",...}``."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


class Autoscale(Output):
    """A running ``nullworker autoscale`` and what it printed so far."""

    def __init__(self, process: trio.Process, *, json_lines: bool) -> None:
        super().__init__(process)
        self.json_lines = json_lines

    @property
    def events(self) -> list[dict[str, Any]]:
        assert self.json_lines
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["kind"] == kind]

    async def wait_until(self, check: Callable[[], bool], *, within_s: float = WAIT_S) -> None:
        await super().wait_until(check, within_s=within_s)

    async def wait_events(self, kind: str, count: int = 1) -> list[dict[str, Any]]:
        await self.wait_until(lambda: len(self.of_kind(kind)) >= count)
        return self.of_kind(kind)

    @property
    def metrics_url(self) -> str:
        (event,) = self.of_kind("metrics")
        url: str = event["url"]
        return url

    async def metrics(self) -> dict[str, float]:
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.get(self.metrics_url)
        assert response.status_code == 200
        return parse_metrics(response.text)

    async def stop(self, signum: int, *, within_s: float = 2.0) -> int:
        self.process.send_signal(signum)
        with trio.fail_after(within_s):
            return await self.process.wait()


RunAutoscale = Callable[..., Awaitable[Autoscale]]


@pytest.fixture(name="run_autoscale")
async def run_autoscale_fixture(nursery: trio.Nursery) -> AsyncIterator[RunAutoscale]:
    """Start ``nullworker autoscale --endpoint ep ARGS [--json]``; killed at the end if still up.

    ``endpoint=None`` leaves ``--endpoint`` out (for ``--config``).
    """
    started: list[trio.Process] = []

    async def run(*args: str, json_lines: bool = True, endpoint: str | None = "ep") -> Autoscale:
        named = [] if endpoint is None else ["--endpoint", endpoint]
        argv = [sys.executable, "-m", "nullworker", "autoscale", *named, *args]
        if json_lines:
            argv.append("--json")
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "VAST_API_KEY": KEY, "PYTHONUNBUFFERED": "1"},
        )
        started.append(process)
        cli = Autoscale(process, json_lines=json_lines)
        assert process.stdout is not None and process.stderr is not None
        nursery.start_soon(cli.pump, process.stdout, "out")
        nursery.start_soon(cli.pump, process.stderr, "err")
        return cli

    yield run
    for process in started:  # a failed test must not leave a child behind
        if process.returncode is None:
            process.kill()


async def start_vast_worker(start_worker: StartWorker, engine: Engine, worker_id: int) -> ServeInfo:
    info = await start_worker(**vast_settings(engine, container_id=worker_id))
    await engine.wait_for(lambda e: e.worker_state(worker_id) == "idle", timeout=5)
    return info


async def engine_view(engine: Engine) -> dict[int, str]:
    """Worker id -> state, from the engine's ``GET /workers``."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        view = (await http.get(f"{engine.url}/workers")).json()
    return {worker["id"]: worker["state"] for worker in view["workers"]}


async def wait_engine(engine: Engine, states: dict[int, str]) -> None:
    await engine.wait_for(
        lambda e: all(e.worker_state(i) == state for i, state in states.items()), timeout=WAIT_S
    )
    assert await engine_view(engine) == states


def write_demand(path: Path, text: str) -> None:
    # Whole or not at all: `cat` must never read a half-written file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def seconds_between(earlier: dict[str, Any], later: dict[str, Any]) -> float:
    def parse(event: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(event["time"].replace("Z", "+00:00"))

    return (parse(later) - parse(earlier)).total_seconds()


async def test_demand_command_holds_releases_and_survives_bad_output(
    vast_engine: Engine, start_worker: StartWorker, run_autoscale: RunAutoscale, tmp_path: Path
) -> None:
    one = await start_vast_worker(start_worker, vast_engine, 1)
    two = await start_vast_worker(start_worker, vast_engine, 2)
    demand = tmp_path / "demand"
    write_demand(demand, "2")
    assert vast_engine.url is not None
    cli = await run_autoscale(
        "--demand-command",
        f"cat {demand}",
        *FAST,
        "--engine-url",
        vast_engine.url,
        "--metrics-port",
        "0",
    )

    # 2 jobs -> 2 reservations, one on each worker.
    started = await cli.wait_events("reservation_started", 2)
    assert {e["worker_url"] for e in started} == {one.public_url, two.public_url}
    assert all(e["time"].endswith("Z") and e["waited_s"] >= 0 for e in started)
    await wait_engine(vast_engine, {1: "busy", 2: "busy"})
    (first,) = cli.of_kind("started")
    assert first["endpoint"] == "ep" and first["max"] == 10
    assert cli.metrics_url.startswith("http://127.0.0.1:")
    await cli.wait_until(lambda: cli.events[-1]["held"] == 2)
    metrics = await cli.metrics()
    assert metrics['nullworker_autoscale_reservations_held{endpoint="ep"}'] == 2
    assert metrics['nullworker_autoscale_demand{endpoint="ep"}'] == 2
    assert metrics['nullworker_autoscale_target{endpoint="ep"}'] == 2
    assert metrics['nullworker_autoscale_reservations_waiting{endpoint="ep"}'] == 0
    assert metrics['nullworker_autoscale_source_up{endpoint="ep"}'] == 1

    # Output that is no count: one source_error line, the capacity kept, no crash.
    write_demand(demand, "lots")
    (error,) = await cli.wait_events("source_error")
    assert "printed 'lots', not a non-negative integer" in error["error"]
    assert error["held"] == 2 and error["target"] == 2
    await trio.sleep(0.6)  # several more failed reads: still one line, still held
    assert len(cli.of_kind("source_error")) == 1
    metrics = await cli.metrics()
    assert metrics['nullworker_autoscale_source_up{endpoint="ep"}'] == 0
    assert metrics['nullworker_autoscale_source_errors_total{endpoint="ep"}'] >= 2
    assert metrics['nullworker_autoscale_reservations_held{endpoint="ep"}'] == 2
    assert await engine_view(vast_engine) == {1: "busy", 2: "busy"}

    # 0 jobs -> both released after the scale-down delay (counted from the recovery).
    write_demand(demand, "0")
    (recovered,) = await cli.wait_events("source_recovered")
    assert recovered["failures"] >= 2
    ended = await cli.wait_events("reservation_ended", 2)
    assert {e["worker_url"] for e in ended} == {one.public_url, two.public_url}
    assert {(e["cause"], e["outcome"]) for e in ended} == {("scale_down", "client_released")}
    assert 0.8 <= seconds_between(recovered, ended[0]) <= 1.0 + 5.0  # the delay + slack
    await wait_engine(vast_engine, {1: "idle", 2: "idle"})
    metrics = await cli.metrics()
    assert metrics['nullworker_autoscale_demand{endpoint="ep"}'] == 0
    assert metrics['nullworker_autoscale_target{endpoint="ep"}'] == 0
    assert metrics['nullworker_autoscale_reservations_held{endpoint="ep"}'] == 0
    assert (
        metrics[
            'nullworker_autoscale_reservations_ended_total{endpoint="ep",outcome="client_released"}'
        ]
        == 2
    )

    # SIGINT with one held: exit 130 at once, the worker idle.
    write_demand(demand, "1")
    third = (await cli.wait_events("reservation_started", 3))[2]
    workers = {1: one, 2: two}
    await wait_engine(
        vast_engine,
        {i: "busy" if w.public_url == third["worker_url"] else "idle" for i, w in workers.items()},
    )
    assert await cli.stop(signal.SIGINT) == 130, cli.err
    last = cli.events[-1]
    assert last["kind"] == "stopped" and last["signal"] == "SIGINT"
    assert last["released"] == 1 and last["exit_status"] == 130
    assert cli.events[-2]["kind"] == "reservation_ended" and cli.events[-2]["cause"] == "shutdown"
    await wait_engine(vast_engine, {1: "idle", 2: "idle"})
    # Every line of the endpoint names it; the process's own lines do not.
    process_kinds = {"metrics", "stopped"}
    assert {e.get("endpoint") for e in cli.events if e["kind"] not in process_kinds} == {"ep"}
    assert all("endpoint" not in e for e in cli.events if e["kind"] in process_kinds)
    assert KEY not in cli.out + cli.err
    assert cli.err == ""


async def test_sigterm_exits_143_and_text_output(
    vast_engine: Engine, start_worker: StartWorker, run_autoscale: RunAutoscale
) -> None:
    one = await start_vast_worker(start_worker, vast_engine, 1)
    assert vast_engine.url is not None
    cli = await run_autoscale(
        "--demand-command",
        "echo 3",
        "--max",
        "1",
        *FAST,
        "--engine-url",
        vast_engine.url,
        json_lines=False,
    )
    await cli.wait_until(lambda: f"held: {one.public_url}" in cli.out)
    await wait_engine(vast_engine, {1: "busy"})
    assert await cli.stop(signal.SIGTERM) == 143, cli.err
    lines = [line.split(" ", 1)[1] for line in cli.out.splitlines()]  # without the time
    assert lines[0].startswith("autoscaling endpoint 'ep' on command 'echo 3': min 0, max 1,")
    assert "demand 3, target 1: 1 held, 0 waiting" in lines
    assert lines[-2].startswith(f"released: {one.public_url} (client_released) after ")
    assert lines[-1] == "interrupted: released 1 worker(s)"
    await wait_engine(vast_engine, {1: "idle"})
    assert KEY not in cli.out + cli.err


async def test_redis_list_through_trio_asyncio(
    redis_server: ServerProcess,
    vast_engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
) -> None:
    one = await start_vast_worker(start_worker, vast_engine, 1)
    assert vast_engine.url is not None
    cli = await run_autoscale(
        "--redis-list",
        redis_server.url,
        "jobs",
        "--processing",
        "jobs:processing",
        *FAST,
        "--engine-url",
        vast_engine.url,
    )
    await cli.wait_until(lambda: any(e.get("demand") == 0 for e in cli.events))
    client = redis.Redis.from_url(redis_server.url)
    try:
        await trio.to_thread.run_sync(client.lpush, "jobs", '{"id": 1}')
    finally:
        client.close()
    (started,) = await cli.wait_events("reservation_started")
    assert started["worker_url"] == one.public_url and started["demand"] == 1
    await wait_engine(vast_engine, {1: "busy"})
    assert cli.of_kind("source_error") == []
    assert await cli.stop(signal.SIGINT) == 130, cli.err
    await wait_engine(vast_engine, {1: "idle"})


async def test_source_outage_is_one_line_without_the_password(
    run_autoscale: RunAutoscale,
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}"
    cli = await run_autoscale(
        "--redis-list", url, "jobs", *FAST, "--engine-url", f"http://127.0.0.1:{closed_port()}"
    )
    (error,) = await cli.wait_events("source_error")
    assert "redis://:***@127.0.0.1:" in error["error"]
    assert "keeping 0 reservation(s)" in error["message"]
    await trio.sleep(0.5)
    assert len(cli.of_kind("source_error")) == 1
    assert await cli.stop(signal.SIGTERM) == 143, cli.err
    assert "hunter2" not in cli.out + cli.err
    assert cli.of_kind("started")[0]["source"].endswith(f"{url.replace('hunter2', '***')}")


# -- --postgres, end to end (tests/servers_cloud.py) ------------------------------------------


async def test_postgres_query_through_trio_asyncio(
    postgres_server: PostgresServer,
    vast_engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
) -> None:
    one = await start_vast_worker(start_worker, vast_engine, 1)
    assert vast_engine.url is not None
    table = f"autoscale_jobs_{os.getpid()}"
    postgres_server.psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (status text)")
    cli = await run_autoscale(
        "--postgres",
        postgres_server.dsn,
        f"SELECT count(*) FROM {table} WHERE status IN ('queued', 'running')",
        *FAST,
        "--engine-url",
        vast_engine.url,
    )
    await cli.wait_until(lambda: any(e.get("demand") == 0 for e in cli.events))
    await trio.to_thread.run_sync(
        postgres_server.psql, f"INSERT INTO {table} VALUES ('queued'), ('done')"
    )
    (started,) = await cli.wait_events("reservation_started")
    assert started["worker_url"] == one.public_url and started["demand"] == 1
    await wait_engine(vast_engine, {1: "busy"})
    assert cli.of_kind("source_error") == []
    assert await cli.stop(signal.SIGINT) == 130, cli.err
    await wait_engine(vast_engine, {1: "idle"})
    assert PG_PASSWORD not in cli.out + cli.err
    assert "postgresql://postgres:***@127.0.0.1:" in cli.of_kind("started")[0]["source"]


async def test_postgres_refused_password_is_a_source_error_without_it(
    postgres_server: PostgresServer, run_autoscale: RunAutoscale
) -> None:
    dsn = postgres_server.dsn.replace(PG_PASSWORD, "hunter2")
    cli = await run_autoscale(
        "--postgres", dsn, "SELECT 1", *FAST, "--engine-url", f"http://127.0.0.1:{closed_port()}"
    )
    (error,) = await cli.wait_events("source_error")
    assert "InvalidPasswordError" in error["error"]
    assert await cli.stop(signal.SIGTERM) == 143, cli.err
    assert "hunter2" not in cli.out + cli.err


# -- job frameworks on Redis, HTTP JSON ----------------------------------------------------


async def test_redis_queue_counts_a_running_job_and_keeps_its_worker(
    redis_server: ServerProcess,
    vast_engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
) -> None:
    """``--redis-queue bullmq``: a job moved from ``wait`` to ``active`` still holds."""
    one = await start_vast_worker(start_worker, vast_engine, 1)
    assert vast_engine.url is not None
    client = redis.Redis.from_url(redis_server.url)
    cli = await run_autoscale(
        "--redis-queue",
        "bullmq",
        redis_server.url,
        "emails",
        "--poll",
        "0.2",
        "--scale-down-delay",
        "0",
        "--engine-url",
        vast_engine.url,
    )
    try:
        (started,) = cli.of_kind("started") or await cli.wait_events("started")
        assert started["source"] == f"bullmq queue 'emails' at {redis_server.url}"
        await trio.to_thread.run_sync(client.lpush, "bull:emails:wait", "1")
        (held,) = await cli.wait_events("reservation_started")
        assert held["worker_url"] == one.public_url
        await trio.to_thread.run_sync(client.lmove, "bull:emails:wait", "bull:emails:active")

        def reads() -> int:
            stats = client.info("commandstats")
            return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("eval", "evalsha"))

        # Several polls later, with a 0 s scale-down delay, the running job still holds.
        after_move = reads()
        with trio.fail_after(WAIT_S):
            while reads() < after_move + 3:
                await trio.sleep(0.05)
        assert cli.of_kind("reservation_ended") == []
        await trio.to_thread.run_sync(client.delete, "bull:emails:active")
        (ended,) = await cli.wait_events("reservation_ended")
        assert ended["cause"] == "scale_down"
        assert cli.of_kind("source_error") == []
    finally:
        client.close()
    assert await cli.stop(signal.SIGINT) == 130, cli.err


async def test_http_json_reads_with_a_token_from_the_environment_never_printed(
    nursery: trio.Nursery, run_autoscale: RunAutoscale, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads: list[bytes] = []

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            heads.append(data)
            body = b'{"queues": [{"name": "celery", "messages": 4}]}'
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )

    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, answer, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    monkeypatch.setenv("NULLWORKER_HTTP_TOKEN", "tok-7d1e9a")
    cli = await run_autoscale(
        "--http-json",
        f"http://127.0.0.1:{port}/api/queues/length",
        "queues.name=celery.messages",
        "--max",
        "1",
        *FAST,
        "--engine-url",
        f"http://127.0.0.1:{closed_port()}",
    )
    await cli.wait_until(lambda: any(e.get("demand") == 4 for e in cli.events))
    assert b"Authorization: Bearer tok-7d1e9a" in heads[0].replace(
        b"authorization", b"Authorization"
    )
    assert await cli.stop(signal.SIGTERM) == 143, cli.err
    assert "tok-7d1e9a" not in cli.out + cli.err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NULLWORKER_HTTP_TOKEN": "t", "NULLWORKER_HTTP_USER": "u"}, "not both"),
        ({"NULLWORKER_HTTP_PASSWORD": "p"}, "goes with $NULLWORKER_HTTP_USER"),
    ],
)
def test_http_credentials_in_the_environment_are_checked_at_start(
    env: dict[str, str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAST_API_KEY", KEY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["--endpoint", "ep", "--prometheus", "http://p:9090", "up"]) == 2
    err = capsys.readouterr().err
    assert "error: --prometheus: " in err and message in err
