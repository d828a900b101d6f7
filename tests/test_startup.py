"""Start-up as a user sees it: `nullworker serve` and `start_server.sh` as real processes."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .helpers import closed_url, reserved_port

REPO = Path(__file__).resolve().parent.parent


def worker_env(tmp_path: Path, engine: Any | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPORT_ADDR", "CONTAINER_ID"))}
    env.update(
        {
            # Numbers given ahead (restarts and second copies use the same port).
            "WORKER_PORT": str(reserved_port()),
            "NULLWORKER_CONTROL_PORT": str(reserved_port()),
            "NULLWORKER_HOST": "127.0.0.1",
            "NULLWORKER_LOCK_DIR": str(tmp_path),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if engine is not None:
        env.update(
            {
                "REPORT_ADDR": engine.url,
                "CONTAINER_ID": "11",
                "MASTER_TOKEN": "tok",
                "NULLWORKER_PUBLIC_URL": f"http://127.0.0.1:{env['WORKER_PORT']}",
            }
        )
    env.update(extra)
    return env


async def serve_to_the_end(env: dict[str, str]) -> tuple[int, str]:
    """Run `nullworker serve` that is expected to fail; its exit code and its one stderr line."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "nullworker", "serve"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return result.returncode, lines[0]


async def test_serve_becomes_ready_reports_and_stops_on_sigterm(
    vast_engine: Any, tmp_path: Path
) -> None:
    env = worker_env(tmp_path, vast_engine)
    started = time.monotonic()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "nullworker", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await vast_engine.wait_for(lambda e: 11 in e.workers and e.workers[11].ready, timeout=20)
        ready_after = time.monotonic() - started
        port = env["WORKER_PORT"]
        assert vast_engine.workers[11].url == f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{port}/health")
        assert health.status_code == 200
        print(f"process start to ready (engine saw it): {ready_after:.3f} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            code = await proc.wait()
    assert code == 0
    assert proc.stdout is not None
    output = (await proc.stdout.receive_some(1 << 20)).decode()
    assert "ready after" in output
    assert "received SIGTERM" in output


async def test_second_copy_on_the_same_port_fails_clearly_and_reports_the_error(
    vast_engine: Any, tmp_path: Path
) -> None:
    env = worker_env(tmp_path, vast_engine)
    first = await trio.lowlevel.open_process(
        [sys.executable, "-m", "nullworker", "serve"], env=env, stdout=subprocess.DEVNULL
    )
    try:
        await vast_engine.wait_for(lambda e: 11 in e.workers and e.workers[11].ready, timeout=20)
        env2 = env | {"CONTAINER_ID": "12", "NULLWORKER_CONTROL_PORT": str(reserved_port())}
        code, line = await serve_to_the_end(env2)
        assert code == 1
        assert "cannot listen" in line and env["WORKER_PORT"] in line
        await vast_engine.wait_for(lambda e: 12 in e.workers and e.workers[12].error_msg)
        assert "failed to launch" in vast_engine.workers[12].error_msg
        assert vast_engine.workers[11].ready  # the first one is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await first.wait()


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("MAX_RESERVATION_SECONDS", "abc", "MAX_RESERVATION_SECONDS"),
        ("MAX_QUEUE_TIME", "-1", "MAX_QUEUE_TIME"),
        ("WORKER_PORT", "70000", "WORKER_PORT"),
        ("UNSECURED", "maybe", "UNSECURED"),
    ],
)
async def test_bad_configuration_exits_2_with_one_line(
    tmp_path: Path, variable: str, value: str, needle: str
) -> None:
    env = worker_env(tmp_path, **{variable: value})
    code, line = await serve_to_the_end(env)
    assert code == 2
    assert needle in line


async def test_help_lists_the_commands() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "nullworker", "--help"], capture_stdout=True
    )
    out = result.stdout.decode()
    for command in ("serve", "reserve", "engine", "dev"):
        assert command in out
    result = await trio.run_process(
        [sys.executable, "-m", "nullworker", "serve", "--help"], capture_stdout=True
    )
    assert "MAX_RESERVATION_SECONDS" in result.stdout.decode()


def _locked_by_another(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


async def wait_until_locked(path: Path) -> None:
    """Wait until another process holds an exclusive flock on ``path``."""
    with trio.fail_after(30):
        while not _locked_by_another(path):
            await trio.sleep(0.01)


def _listeners(port: str) -> int:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.strip()])


@pytest.mark.skipif(shutil.which("flock") is None, reason="start_server.sh needs flock(1)")
async def test_start_server_twice_leaves_exactly_one_worker(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    env = worker_env(tmp_path, NULLWORKER_VENV=str(venv), NULLWORKER_LOG=str(tmp_path / "w.log"))
    port = env["WORKER_PORT"]
    script = str(REPO / "start_server.sh")
    first = await trio.lowlevel.open_process(
        [script],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # A second start while the first is still starting, and a third once it serves.
        # (The second must come after the first took the start lock, or it would be
        # the one that starts the worker.)
        await wait_until_locked(tmp_path / f"nullworker-start-{port}.lock")
        with trio.fail_after(60):
            second = await trio.run_process([script], env=env, capture_stderr=True, check=False)
        assert second.returncode == 0
        assert b"already serves" in second.stderr or b"not starting another" in second.stderr
        async with httpx.AsyncClient() as http:
            with trio.fail_after(120):
                while True:
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.1)
        with trio.fail_after(60):
            third = await trio.run_process([script], env=env, capture_stderr=True, check=False)
        assert third.returncode == 0
        assert b"already serves" in third.stderr
        assert first.returncode is None  # the first is still the one serving
        if shutil.which("ss"):
            assert _listeners(port) == 1
        assert "ready after" in (tmp_path / "w.log").read_text()
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        with trio.fail_after(10):
            await first.wait()


def hypercorn_cli(env: dict[str, str], *, workers: int = 1) -> list[str]:
    """Hypercorn's own CLI serving ``nullworker.app:create_app()`` on ``env``'s port: the
    adapter's path, where no ``serve()`` of ours owns the process."""
    return [
        str(Path(sys.executable).parent / "hypercorn"),
        "--worker-class",
        "trio",
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{env['WORKER_PORT']}",
        "nullworker.app:create_app()",
    ]


async def open_hypercorn(env: dict[str, str], log_path: Path) -> trio.Process:
    """Start :func:`hypercorn_cli` with one worker process; its output goes to ``log_path``."""
    with log_path.open("ab") as log:
        return await trio.lowlevel.open_process(
            hypercorn_cli(env),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_hypercorn_with_two_workers_is_refused(tmp_path: Path) -> None:
    env = worker_env(tmp_path)
    with trio.fail_after(60):  # it must stop by itself
        result = await trio.run_process(
            hypercorn_cli(env, workers=2),
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    # Hypercorn stops every worker when one fails to start (its own exit code is 0 in
    # that case, so the refusal shows as: it stopped by itself, and said why).
    output = (result.stdout + result.stderr).decode()
    assert "run exactly ONE worker process" in output


async def test_the_app_runs_under_hypercorns_own_cli(tmp_path: Path) -> None:
    """`hypercorn --worker-class trio 'nullworker.app:create_app()'` gets the same worker."""
    env = worker_env(tmp_path)
    port = env["WORKER_PORT"]
    proc = await open_hypercorn(env, tmp_path / "hypercorn.log")
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            with trio.fail_after(30):
                while True:
                    try:
                        health = await http.get(f"http://127.0.0.1:{port}/health")
                        if health.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)
            response = await http.post(
                f"http://127.0.0.1:{port}/reserve",
                json={
                    "auth_data": {
                        "signature": "",
                        "url": "",
                        "cost": 100,
                        "endpoint": "e",
                        "reqnum": 1,
                        "request_idx": 1,
                    },
                    "payload": {"duration": 0.1},
                },
            )
            assert response.status_code == 200
            assert response.json()["released"] == "duration_elapsed"
            # Its background work runs too: the control listener answers.
            control = env["NULLWORKER_CONTROL_PORT"]
            status = await http.get(f"http://127.0.0.1:{control}/status")
            assert status.json()["counts"]["duration_elapsed"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await proc.wait()


def test_serve_exits_1_when_the_background_work_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`nullworker serve` does not linger as a worker that can no longer report."""
    from nullworker import cli
    from nullworker.worker.reporter import EngineReporter

    async def broken_round(self: EngineReporter) -> bool:
        raise RuntimeError("reporting bug")

    monkeypatch.setattr(EngineReporter, "_round", broken_round)
    for name, value in worker_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("REPORT_ADDR", closed_url())  # nobody there
    monkeypatch.setenv("CONTAINER_ID", "5")
    monkeypatch.setenv("NULLWORKER_PUBLIC_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("UNSECURED", "true")
    assert cli.main(["serve", "--control-port", "off"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped" in err[0] and "reporting bug" in err[0], err


async def test_start_server_reports_a_failure_to_the_engine(
    vast_engine: Any, tmp_path: Path
) -> None:
    """An instance that cannot start says why to the engine, like the official script."""
    old_python = tmp_path / "python-too-old"
    old_python.write_text(
        '#!/bin/sh\nif [ "$1" = "--version" ]; then echo "Python 3.10.12"; exit 0; fi\nexit 1\n'
    )
    old_python.chmod(0o755)
    env = worker_env(
        tmp_path,
        vast_engine,
        PYTHON=str(old_python),
        NULLWORKER_VENV=str(tmp_path / "venv"),
        NULLWORKER_LOG=str(tmp_path / "w.log"),
    )
    with trio.fail_after(60):
        result = await trio.run_process(
            [str(REPO / "start_server.sh")], env=env, capture_stderr=True, check=False
        )
    assert result.returncode == 1
    assert b"Python 3.11 or newer is required (found: Python 3.10.12)" in result.stderr
    await vast_engine.wait_for(lambda e: 11 in e.workers and e.workers[11].error_msg)
    assert "Python 3.10.12" in vast_engine.workers[11].error_msg
    assert not (tmp_path / "venv").exists()


async def failed_start(env: dict[str, str]) -> tuple[int, str, str]:
    """Run `nullworker serve` that must fail: exit code, its one stderr line, its stdout."""
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "nullworker", "serve"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = result.stderr.decode()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return result.returncode, lines[0], result.stdout.decode()


async def engine_error(engine: Any, container_id: int = 11) -> str:
    """The ``error_msg`` the engine recorded for ``container_id``."""
    await engine.wait_for(
        lambda e: container_id in e.workers and e.workers[container_id].error_msg, timeout=20
    )
    message: str = engine.workers[container_id].error_msg
    return message


async def test_a_taken_control_port_is_one_line_and_the_engine_hears_it(
    vast_engine: Any, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = worker_env(tmp_path, vast_engine, NULLWORKER_CONTROL_PORT=str(port))
        code, line, out = await failed_start(env)
    assert code == 1  # may be free on the next start: start_server.sh restarts it
    reason = line.removeprefix("nullworker: failed to start: ")
    assert reason != line
    assert reason == (
        f"control port (NULLWORKER_CONTROL_PORT): cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    )
    assert "Traceback" not in out and "Lifespan" not in out + line
    assert reason in await engine_error(vast_engine)


@pytest.mark.parametrize("kind", ["missing", "a-file"])
async def test_an_unusable_lock_dir_is_one_line_and_the_engine_hears_it(
    vast_engine: Any, tmp_path: Path, kind: str
) -> None:
    lock_dir = tmp_path / "no" / "such" if kind == "missing" else tmp_path / "plain-file"
    if kind == "a-file":
        lock_dir.write_text("")
    env = worker_env(tmp_path, vast_engine, NULLWORKER_LOCK_DIR=str(lock_dir))
    code, line, out = await failed_start(env)
    assert code == 2  # a configuration error: not restarted
    assert line.startswith(
        f"nullworker: failed to start: configuration error: NULLWORKER_LOCK_DIR {lock_dir} "
        "is not usable"
    ), line
    assert "Traceback" not in out and "Lifespan" not in out + line
    reason = line.removeprefix("nullworker: failed to start: ")
    assert reason in await engine_error(vast_engine)


async def test_the_traceback_of_a_failed_start_is_logged_only_when_debugging(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        quiet = worker_env(tmp_path, NULLWORKER_CONTROL_PORT=port)
        code, line, out = await failed_start(quiet)
        assert code == 1 and port in line and "Traceback" not in out
        debug = quiet | {"NULLWORKER_LOG_LEVEL": "DEBUG"}
        code, line, out = await failed_start(debug)
    assert code == 1 and port in line
    assert "Traceback" in out  # on stdout, with the log; stderr keeps its one line


async def test_vast_mode_without_a_public_address_refuses_to_start_and_tells_the_engine(
    vast_engine: Any, tmp_path: Path
) -> None:
    env = worker_env(tmp_path, vast_engine)
    del env["NULLWORKER_PUBLIC_URL"]
    for name in [
        k for k in env if k.startswith(("PUBLIC_IPADDR", "VAST_TCP_PORT_", "NULLWORKER_PUBLIC"))
    ]:
        del env[name]
    env["PUBLIC_IPADDR"] = "203.0.113.7"  # the port mapping is what is missing
    code, line, _ = await failed_start(env)
    assert code == 2
    port = env["WORKER_PORT"]
    assert line.startswith(f"nullworker: configuration error: VAST_TCP_PORT_{port} not set"), line
    assert "PUBLIC_IPADDR" not in line.split(":")[2]  # only what is missing is named
    message = await engine_error(vast_engine)
    assert f"VAST_TCP_PORT_{port} not set" in message
    # The engine shows the instance as broken, never as ready (and idle).
    assert not vast_engine.workers[11].ready


async def test_unreadable_tls_files_are_a_configuration_error_the_engine_hears(
    vast_engine: Any, tmp_path: Path
) -> None:
    missing = tmp_path / "instance.crt"
    env = worker_env(tmp_path, vast_engine, USE_SSL="true", NULLWORKER_SSL_CERTFILE=str(missing))
    env["NULLWORKER_PUBLIC_URL"] = env["NULLWORKER_PUBLIC_URL"].replace("http:", "https:")
    code, line, out = await failed_start(env)
    assert code == 2  # a restart cannot fix it
    assert line.startswith("nullworker: failed to start: configuration error: USE_SSL=true")
    assert str(missing) in line and "Traceback" not in out
    reason = line.removeprefix("nullworker: failed to start: ")
    assert reason in await engine_error(vast_engine)


#: A reporting bug that fires once ``$FAIL_MARKER`` exists, as a ``sitecustomize`` module:
#: Hypercorn's ``--workers 1`` runs the app in a spawned process, which imports it too.
_LATE_REPORTING_BUG = """
import os
if os.environ.get("FAIL_MARKER"):
    from nullworker.worker.reporter import EngineReporter
    original = EngineReporter._round
    async def _round(self, *args, **kwargs):
        if os.path.exists(os.environ["FAIL_MARKER"]):
            raise RuntimeError("late reporting bug")
        return await original(self, *args, **kwargs)
    EngineReporter._round = _round
"""


async def test_under_hypercorns_own_cli_a_runtime_failure_stops_the_process(
    vast_engine: Any, tmp_path: Path
) -> None:
    """`create_app()` is the one path where the runtime's failure cannot reach a caller:
    there the process stops itself (SIGTERM to itself, then Hypercorn's graceful stop)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_LATE_REPORTING_BUG)
    marker = tmp_path / "fail-now"
    env = worker_env(tmp_path, vast_engine, FAIL_MARKER=str(marker))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    control = env["NULLWORKER_CONTROL_PORT"]
    log_path = tmp_path / "hypercorn.log"
    proc = await open_hypercorn(env, log_path)
    try:
        await vast_engine.wait_for(lambda e: 11 in e.workers and e.workers[11].ready, timeout=30)
        marker.touch()
        async with httpx.AsyncClient(timeout=30) as http:
            try:  # a local hold changes the state: the next report round fails
                await http.post(f"http://127.0.0.1:{control}/hold", json={"duration": 0.5})
            except httpx.TransportError:
                pass  # the failure may stop the control listener first: either is fine
        with trio.fail_after(60):  # it must stop by itself
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = log_path.read_text()
    assert "worker failed: RuntimeError: late reporting bug" in output, output
    await vast_engine.wait_for(lambda e: "late reporting bug" in e.workers[11].error_msg)
