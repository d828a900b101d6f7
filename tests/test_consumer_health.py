"""Consumer health (``BACKEND_HEALTH_URL`` / ``NULLWORKER_BACKEND_HEALTH_COMMAND``).

The probe loop (:func:`nullworker.worker.consumer_health.watch`) is pure Trio and is
driven here by ``MockClock(autojump_threshold=0)`` with probes written in the test; the
two real probes run against a real HTTP server on a loopback port and real shell
processes; and a real worker in Vast mode, reporting to the real local engine, is
watched from the engine's recorded ``/worker_status/`` reports while its consumer's
health server answers, stops and comes back.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from nullworker.engine import Engine
from nullworker.errors import ConfigError
from nullworker.worker.config import WorkerConfig
from nullworker.worker.consumer_health import (
    MAX_BODY_BYTES,
    command_probe,
    http_probe,
    watch,
)
from nullworker.worker.server import ServeInfo, serve

from . import helpers
from .conftest import envelope, runtime, vast_settings
from .test_dev import WAIT_S, DevProcess, open_dev

# -- the probe loop, on the mock clock ---------------------------------------------------


class Script:
    """A probe whose answers the test sets; records each change ``watch`` reports."""

    def __init__(self) -> None:
        self.answer: str | None = "connection refused"
        self.hang = False
        self.probes = 0
        self.changes: list[tuple[float, str | None]] = []

    async def probe(self) -> str | None:
        self.probes += 1
        if self.hang:
            await trio.sleep_forever()
        return self.answer

    def on_change(self, message: str | None) -> None:
        self.changes.append((trio.current_time(), message))


def start_watch(nursery: trio.Nursery, script: Script, **overrides: float) -> None:
    settings: dict[str, Any] = {
        "target": "GET http://127.0.0.1:9000/health",
        "interval_s": 5.0,
        "probe_timeout_s": 5.0,
        "timeout_s": 30.0,
        "startup_s": 300.0,
    }
    settings.update(overrides)
    nursery.start_soon(
        lambda: watch(script.probe, on_change=script.on_change, **settings)  # type: ignore[arg-type]
    )


async def test_never_healthy_is_an_error_only_after_the_startup_bound_and_then_recovers(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    script = Script()
    start = trio.current_time()
    start_watch(nursery, script)
    await trio.sleep(299.0)
    assert script.changes == []  # not ready, but not an error before the bound
    assert script.probes == 60  # one every 5 s
    await trio.sleep(2.0)
    [(at, message)] = script.changes
    assert at - start == 300.0
    assert message == (
        "consumer unhealthy: GET http://127.0.0.1:9000/health: connection refused; "
        "not healthy within 300 s of start"
    )
    await trio.sleep(60.0)
    assert len(script.changes) == 1  # said once

    script.answer = None
    await trio.sleep(5.0)
    assert [m for _, m in script.changes] == [message, None]


async def test_a_consumer_that_stops_answering_errors_after_the_timeout_once_and_comes_back(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    script = Script()
    script.answer = None
    start_watch(nursery, script)
    await trio.sleep(1.0)
    assert script.changes == [(0.0, None)]  # healthy at the first probe: ready

    await trio.sleep(11.0)  # probes at 0, 5, 10 answer; from 15 on they fail
    script.answer = "connection refused"
    await trio.sleep(27.0)
    assert len(script.changes) == 1  # 10 + 30 = 40: at the first probe past it
    await trio.sleep(3.0)
    assert script.changes[1] == (
        40.0,
        "consumer unhealthy: GET http://127.0.0.1:9000/health: connection refused for 30 s",
    )
    await trio.sleep(100.0)
    assert len(script.changes) == 2

    script.answer = None
    await trio.sleep(5.0)
    assert [m for _, m in script.changes[2:]] == [None]
    # A short failure (under the timeout) changes nothing.
    script.answer = "HTTP 500"
    await trio.sleep(20.0)
    script.answer = None
    await trio.sleep(20.0)
    assert len(script.changes) == 3


async def test_a_hung_probe_is_cut_at_its_bound_and_counts_as_unhealthy(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    script = Script()
    script.answer = None
    start_watch(nursery, script, interval_s=2.0, probe_timeout_s=3.0, timeout_s=10.0)
    await trio.sleep(1.0)
    script.hang = True
    await trio.sleep(30.0)
    # Probes at 0 (healthy), 2-5, 5-8, 8-11: unhealthy at 11, 11 s after the last answer.
    assert script.changes == [
        (0.0, None),
        (
            11.0,
            "consumer unhealthy: GET http://127.0.0.1:9000/health: no answer in 3 s for 10 s",
        ),
    ]


# -- settings ------------------------------------------------------------------------------


def test_the_settings_are_read_from_the_environment() -> None:
    config = WorkerConfig.from_env(
        {
            "BACKEND_HEALTH_URL": "http://127.0.0.1:9000/health",
            "NULLWORKER_BACKEND_HEALTH_INTERVAL_SECONDS": "2",
            "NULLWORKER_BACKEND_HEALTH_PROBE_TIMEOUT_SECONDS": "1.5",
            "NULLWORKER_BACKEND_HEALTH_TIMEOUT_SECONDS": "20",
            "NULLWORKER_BACKEND_HEALTH_STARTUP_SECONDS": "60",
        }
    )
    assert config.backend_health_url == "http://127.0.0.1:9000/health"
    assert config.backend_health_target == "GET http://127.0.0.1:9000/health"
    assert (
        config.backend_health_interval_s,
        config.backend_health_probe_timeout_s,
        config.backend_health_timeout_s,
        config.backend_health_startup_s,
    ) == (2.0, 1.5, 20.0, 60.0)
    # The names in logs and error_msg hold no secret: no user info, query or arguments.
    config = WorkerConfig.from_env({"BACKEND_HEALTH_URL": "http://u:secret@127.0.0.1:9/h?t=s3"})
    assert config.backend_health_target == "GET http://127.0.0.1:9/h"
    config = WorkerConfig.from_env(
        {"NULLWORKER_BACKEND_HEALTH_COMMAND": "/usr/bin/curl -fH 'Authorization: secret' x"}
    )
    assert config.backend_health_target == "health command curl"
    default = WorkerConfig.from_env({})
    assert default.backend_health_target is None
    assert (default.backend_health_timeout_s, default.backend_health_startup_s) == (30.0, 300.0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {
                "BACKEND_HEALTH_URL": "http://127.0.0.1:1/",
                "NULLWORKER_BACKEND_HEALTH_COMMAND": "true",
            },
            "BACKEND_HEALTH_URL and NULLWORKER_BACKEND_HEALTH_COMMAND are both set",
        ),
        ({"BACKEND_HEALTH_URL": "127.0.0.1:9000/health"}, "BACKEND_HEALTH_URL must be an http"),
        (
            {"NULLWORKER_BACKEND_HEALTH_TIMEOUT_SECONDS": "soon"},
            "NULLWORKER_BACKEND_HEALTH_TIMEOUT_SECONDS must be a number",
        ),
        (
            {"NULLWORKER_BACKEND_HEALTH_INTERVAL_SECONDS": "0"},
            "NULLWORKER_BACKEND_HEALTH_INTERVAL_SECONDS must be a finite number",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WorkerConfig.from_env(env)


# -- the real probes ---------------------------------------------------------------------


class HealthServer:
    """The consumer's ``/health``: a real HTTP/1.1 server on a loopback port."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b'{"ok": true}'
        self.port = 0
        self.scope: trio.CancelScope | None = None
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(5):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                self.requests += 1
                head = (
                    f"HTTP/1.1 {self.status} X\r\ncontent-length: {len(self.body)}\r\n"
                    "connection: close\r\n\r\n"
                ).encode()
                try:
                    await stream.send_all(head + self.body)
                except trio.BrokenResourceError:
                    pass

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self.scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await trio.serve_listeners(self._handle, listeners)

    def stop(self) -> None:
        """Close the port: probes get "connection refused" (the port is kept to reopen)."""
        assert self.scope is not None
        self.scope.cancel()


async def test_the_http_probe_takes_any_2xx_and_names_what_failed(nursery: trio.Nursery) -> None:
    server = HealthServer()
    await nursery.start(server.serve)
    async with httpx.AsyncClient(timeout=2.0, follow_redirects=False, trust_env=False) as client:
        probe = http_probe(server.url, client=client)
        assert await probe() is None
        server.status = 204
        server.body = b""
        assert await probe() is None
        server.status, server.body = 200, b"x" * (MAX_BODY_BYTES * 100)  # read bounded
        assert await probe() is None
        server.status = 302
        assert await probe() == "HTTP 302"
        server.status = 503
        assert await probe() == "HTTP 503"
        server.stop()
        await trio.sleep(0.1)
        assert await probe() == "connection refused"


async def test_the_command_probe_takes_exit_0_and_kills_its_group_when_cut(
    tmp_path: Path,
) -> None:
    assert await command_probe("true")() is None
    assert await command_probe("exit 3")() == "exit code 3"
    assert await command_probe("kill -9 $$")() == "killed by signal 9"
    # A hung check and a child it started are both gone once the probe is cut.
    pid_file = tmp_path / "child.pid"
    hung = command_probe(f"sleep 60 & echo $! > {pid_file}; wait")
    with trio.move_on_after(1.0) as bound:
        await hung()
    assert bound.cancelled_caught
    child = int(pid_file.read_text())
    with trio.fail_after(5):
        while _alive(child):
            await trio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill -0: it is not running, just not reaped (by init).
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# -- a real worker, its consumer's health server and the local engine --------------------


async def start_checked_worker(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine, **overrides: Any
) -> ServeInfo:
    settings: dict[str, Any] = {
        "port": 0,
        "control_port": 0,
        "graceful_timeout_s": 1.0,
        "lock_dir": str(tmp_path),
        "backend_health_interval_s": 0.1,
        "backend_health_probe_timeout_s": 2.0,
        "backend_health_timeout_s": 0.5,
        **vast_settings(engine),
    }
    settings.update(overrides)
    info: ServeInfo = await nursery.start(serve, WorkerConfig(**settings))
    return info


def reports(engine: Engine) -> list[dict[str, Any]]:
    return [r.body for r in engine.worker_status_reports if r.body["id"] == 7]


async def reserve(
    http: httpx.AsyncClient, info: ServeInfo, key: rsa.RSAPrivateKey, idx: int, **payload: Any
) -> httpx.Response:
    data = envelope(info.url, key=key, request_idx=idx, payload=payload)
    return await http.post(f"{info.url}/reserve", json=data)


async def wait_until(predicate: Callable[[], bool]) -> None:
    await helpers.wait_until(predicate, within_s=15, poll_s=0.02)


async def test_a_worker_is_ready_only_with_a_healthy_consumer_and_errored_while_it_is_gone(
    nursery: trio.Nursery,
    tmp_path: Path,
    vast_engine: Engine,
    rsa_key: rsa.RSAPrivateKey,
    http: httpx.AsyncClient,
) -> None:
    server = HealthServer()
    await nursery.start(server.serve)
    server.status = 503  # the consumer is up but not healthy yet
    info = await start_checked_worker(nursery, tmp_path, vast_engine, backend_health_url=server.url)
    worker = runtime(info)

    # Several probes, and reports, go by: the engine never hears "ready".
    await wait_until(lambda: server.requests >= 5 and len(reports(vast_engine)) >= 1)
    assert not worker.ready.is_set()
    assert all(r["loadtime"] == 0 for r in reports(vast_engine))
    answer = await reserve(http, info, rsa_key, 1)
    assert answer.status_code == 503 and answer.json()["error"] == "not ready yet"

    server.status = 200
    await vast_engine.wait_for(lambda e: e.worker_state(7) == "idle", timeout=15)
    assert worker.ready.is_set()

    # A held reservation, then the consumer goes away.
    async with trio.open_nursery() as holders:
        held: list[httpx.Response] = []

        async def hold() -> None:
            held.append(await reserve(http, info, rsa_key, 2, duration=60))

        holders.start_soon(hold)
        await vast_engine.wait_for(lambda e: e.worker_state(7) == "busy", timeout=15)
        server.stop()
        await vast_engine.wait_for(lambda e: e.worker_state(7) == "error", timeout=15)
        error = reports(vast_engine)[-1]["error_msg"]
        assert error == f"consumer unhealthy: GET {server.url}: connection refused for 0.5 s"
        refused = await reserve(http, info, rsa_key, 3)
        assert refused.status_code == 503
        assert refused.json() == {"error": error, "reason": "consumer_unhealthy"}
        health = await http.get(f"{info.url}/health")
        assert (health.status_code, health.json()["reason"]) == (503, error)
        metrics = (await http.get(f"{info.control_url}/metrics")).text
        assert "\nnullworker_ready 0.0\n" in metrics
        # The held reservation is not cut by it.
        assert worker.slot.busy and not held
        assert reports(vast_engine)[-1]["num_requests_working"] == 1

        # The consumer comes back (same port): the error clears, reservations are taken.
        await nursery.start(server.serve)
        await vast_engine.wait_for(lambda e: e.worker_state(7) == "busy", timeout=15)
        assert reports(vast_engine)[-1]["error_msg"] == ""
        assert worker.consumer_error is None
        assert worker.slot.release(id=None, started_before=None) is not None
    assert held[0].status_code == 200 and held[0].json()["released"] == "explicit"
    answer = await reserve(http, info, rsa_key, 4, duration=0.05)
    assert answer.status_code == 200, answer.text
    errors = [r["error_msg"] for r in reports(vast_engine)]
    assert errors.count(error) >= 1
    assert [e for i, e in enumerate(errors) if e and (i == 0 or errors[i - 1] != e)] == [error]


async def test_a_worker_with_the_command_form_errors_when_its_consumer_is_killed(
    nursery: trio.Nursery, tmp_path: Path, vast_engine: Engine, http: httpx.AsyncClient
) -> None:
    consumer = await trio.lowlevel.open_process(["sleep", "60"])
    try:
        info = await start_checked_worker(
            nursery,
            tmp_path,
            vast_engine,
            backend_health_command=f"kill -0 {consumer.pid}",
        )
        await vast_engine.wait_for(lambda e: e.worker_state(7) == "idle", timeout=15)
        consumer.send_signal(signal.SIGKILL)
        await consumer.wait()
        await vast_engine.wait_for(lambda e: e.worker_state(7) == "error", timeout=15)
        assert reports(vast_engine)[-1]["error_msg"] == (
            "consumer unhealthy: health command kill: exit code 1 for 0.5 s"
        )
        assert runtime(info).consumer_error is not None
    finally:
        if consumer.returncode is None:
            consumer.kill()
            await consumer.wait()


async def test_without_a_check_the_worker_is_ready_as_before(
    nursery: trio.Nursery, tmp_path: Path, vast_engine: Engine
) -> None:
    info = await start_checked_worker(nursery, tmp_path, vast_engine)
    await vast_engine.wait_for(lambda e: e.worker_state(7) == "idle", timeout=15)
    assert runtime(info).consumer_error is None


# -- nullworker dev: the check reaches its workers, and their consumers start first ---------


async def test_dev_passes_the_check_on_and_starts_each_consumer_before_its_worker_is_ready(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Each consumer writes its pid where its worker's check looks: both know the worker's
    # control port ($NULLWORKER_CONTROL_PORT), so one setting serves every worker.
    pid_file = f"{tmp_path}/consumer-$NULLWORKER_CONTROL_PORT.pid"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "NULLWORKER_BACKEND_HEALTH_COMMAND": f'kill -0 "$(cat {pid_file})"',
        "NULLWORKER_BACKEND_HEALTH_INTERVAL_SECONDS": "0.2",
        "NULLWORKER_BACKEND_HEALTH_TIMEOUT_SECONDS": "1",
    }
    consumer = f"echo $$ > {pid_file}; exec sleep 3600"
    dev = await open_dev(
        nursery,
        DevProcess,
        "--min-workers",
        "1",
        "--consumer",
        consumer,
        env=env,
        wait_s=3 * WAIT_S,  # a worker's start on a busy machine
    )
    process = dev.process
    try:
        await dev.wait_line(r"\[dev\] worker 1 ready after")
        started = next(n for n, line in enumerate(dev.lines) if "consumer 1 started" in line)
        ready = next(n for n, line in enumerate(dev.lines) if "worker 1 ready after" in line)
        assert started < ready, dev.output
        async with httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http:
            # The consumer dies: the worker is errored; dev restarts the consumer (1 s
            # later) and the worker clears the error by itself.
            [pid] = dev.consumer_pids()[1]  # the shell, which became `sleep`
            os.kill(pid, signal.SIGKILL)
            states: list[tuple[str, str | None]] = []
            with trio.fail_after(3 * WAIT_S):
                while not states or states[-1][0] != "idle" or len(states) < 2:
                    [worker] = (await http.get("/workers")).json()["workers"]
                    if not states or states[-1] != (worker["state"], worker["error"]):
                        states.append((worker["state"], worker["error"]))
                    await trio.sleep(0.05)
        errors = [error for state, error in states if state == "error"]
        assert errors and all(
            e and e.startswith("consumer unhealthy: health command kill: ") for e in errors
        )
        assert ("idle", None) == states[-1] and states[0] == ("idle", None), states
        assert "consumer 1 exited with code -9" in dev.output or "code 137" in dev.output
        assert await dev.stop(signal.SIGINT) == 0, dev.output
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()
        for group in [pid for pids in dev.consumer_pids().values() for pid in pids]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
