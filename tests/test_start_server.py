"""`start_server.sh` supervising the worker: real processes, found through /proc.

The script runs `nullworker serve` as its child and restarts it when it dies on its own;
SIGTERM to the script stops the worker gracefully and nothing is restarted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from .test_startup import REPO, _locked_by_another, worker_env

pytestmark = [
    pytest.mark.skipif(shutil.which("flock") is None, reason="start_server.sh needs flock(1)"),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc"),
]

SCRIPT = str(REPO / "start_server.sh")


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The script's settings: this test's virtual environment and quick restarts."""
    venv = Path(sys.executable).parent.parent
    settings = {
        "NULLWORKER_VENV": str(venv),
        "NULLWORKER_LOG": str(tmp_path / "w.log"),
        "NULLWORKER_RESTART_BACKOFF_S": "0.1",
        "NULLWORKER_RESTART_MAX_S": "0.4",
    }
    return worker_env(tmp_path, **(settings | extra))


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def worker_children(script_pid: int) -> list[int]:
    """The live `nullworker serve` processes whose parent is the script."""
    return [
        pid
        for pid in _pids()
        if (stat := _stat(pid)) is not None
        and stat[1] == script_pid
        and stat[0] != "Z"
        and "serve" in _cmdline(pid)
    ]


def processes_of(tmp_path: Path) -> list[int]:
    """Live processes started for this test (the script, tee, the worker, a sleep)."""
    marker = f"NULLWORKER_LOCK_DIR={tmp_path}".encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and alive(pid):
            found.append(pid)
    return found


async def wait_for_worker(script_pid: int, not_pid: int | None = None) -> int:
    """The script's worker child (another one than ``not_pid``)."""
    with trio.fail_after(30):
        while True:
            children = [pid for pid in worker_children(script_pid) if pid != not_pid]
            if children:
                assert len(children) == 1, children
                return children[0]
            await trio.sleep(0.02)


async def wait_until_serving(port: str) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        with trio.fail_after(120):  # the first run may install the package
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


def read_log(log: Path) -> str:
    return log.read_text() if log.exists() else ""


async def wait_for_log(log: Path, pattern: str) -> re.Match[str]:
    with trio.fail_after(30):
        while True:
            if match := re.search(pattern, read_log(log)):
                return match
            await trio.sleep(0.02)


async def wait_until_gone(tmp_path: Path) -> None:
    with trio.fail_after(10):
        while processes_of(tmp_path):
            await trio.sleep(0.05)


@asynccontextmanager
async def started_script(env: dict[str, str]) -> AsyncIterator[trio.Process]:
    """start_server.sh in its own session; whatever is left of it is killed at the end."""
    proc = await trio.lowlevel.open_process(
        [SCRIPT],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with trio.move_on_after(10):
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
        for pid in processes_of(Path(env["NULLWORKER_LOCK_DIR"])):
            os.kill(pid, signal.SIGKILL)
        await proc.wait()


async def test_a_killed_worker_is_restarted_on_the_same_port_and_sigterm_stops_it(
    tmp_path: Path,
) -> None:
    env = script_env(tmp_path)
    port, log = env["WORKER_PORT"], tmp_path / "w.log"
    start_lock = tmp_path / f"nullworker-start-{port}.lock"
    worker_lock = tmp_path / f"nullworker-{port}.lock"
    async with started_script(env) as script:
        await wait_until_serving(port)
        first = await wait_for_worker(script.pid)
        os.kill(first, signal.SIGKILL)

        # Restarted on the same port: the killed worker's own lock went with it.
        second = await wait_for_worker(script.pid, not_pid=first)
        await wait_until_serving(port)
        assert not alive(first)
        text = log.read_text()
        assert (
            f"start_server.sh: worker (pid {first}) exited with status 137 (killed by SIGKILL)"
            in text
        )
        assert re.search(r"after [0-9.]+ s; restarting in 0\.1 s \(restart 1\)", text), text
        assert "Killed" not in text  # bash's own notice is not logged beside ours
        assert _locked_by_another(worker_lock)  # by the new worker
        assert _locked_by_another(start_lock)  # still by the script: a 2nd start backs off

        # The next restart waits twice as long.
        os.kill(second, signal.SIGKILL)
        third = await wait_for_worker(script.pid, not_pid=second)
        await wait_until_serving(port)
        assert re.search(
            rf"worker \(pid {second}\) exited with status 137 \(killed by SIGKILL\) after "
            r"[0-9.]+ s; restarting in 0\.2 s \(restart 2\)",
            log.read_text(),
        )

        # SIGTERM to the script alone: the worker shuts down gracefully, nothing restarts.
        script.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            code = await script.wait()
        assert code == 0
        await wait_until_gone(tmp_path)
        assert not alive(third)
        text = log.read_text()
        assert f"start_server.sh: received SIGTERM: stopping the worker (pid {third})" in text
        assert "received SIGTERM: shutting down" in text  # the worker's own graceful stop
        assert f"worker (pid {third}) stopped with status 0 after SIGTERM; not restarting" in text
        assert "(restart 3)" not in text
        assert not _locked_by_another(start_lock) and not _locked_by_another(worker_lock)


async def test_sigterm_during_the_backoff_stops_without_a_restart(tmp_path: Path) -> None:
    env = script_env(tmp_path, NULLWORKER_RESTART_BACKOFF_S="30", NULLWORKER_RESTART_MAX_S="60")
    log = tmp_path / "w.log"
    async with started_script(env) as script:
        await wait_until_serving(env["WORKER_PORT"])
        os.kill(await wait_for_worker(script.pid), signal.SIGKILL)
        await wait_for_log(log, r"restarting in 30 s \(restart 1\)")
        script.send_signal(signal.SIGTERM)
        with trio.fail_after(5):  # not after the 30 s sleep
            code = await script.wait()
        assert code == 0
        await wait_until_gone(tmp_path)
        assert "received SIGTERM while waiting to restart the worker; not restarting" in (
            log.read_text()
        )


async def test_a_worker_stopped_by_someone_else_is_not_restarted(tmp_path: Path) -> None:
    env = script_env(tmp_path)
    log = tmp_path / "w.log"
    async with started_script(env) as script:
        await wait_until_serving(env["WORKER_PORT"])
        worker = await wait_for_worker(script.pid)
        os.kill(worker, signal.SIGTERM)  # to the worker, not to the script
        with trio.fail_after(15):
            code = await script.wait()
        assert code == 0
        await wait_until_gone(tmp_path)
        assert f"worker (pid {worker}) exited with status 0 after" in (text := log.read_text())
        assert "it was stopped by someone else; not restarting" in text
        assert "restart 1" not in text


async def test_a_configuration_error_is_not_restarted(tmp_path: Path) -> None:
    env = script_env(tmp_path, MAX_QUEUE_TIME="-1")
    with trio.fail_after(120):
        result = await trio.run_process(
            [SCRIPT], env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 2
    output = (result.stdout + result.stderr).decode()
    assert "nullworker: configuration error" in output and "MAX_QUEUE_TIME" in output
    assert output.count("nullworker: configuration error") == 1  # started once
    assert "a configuration error, which a restart cannot fix; not restarting" in output
    assert "restarting in" not in output
    await wait_until_gone(tmp_path)  # (tee may take a moment)


async def test_failed_starts_back_off_up_to_the_cap_and_a_long_run_resets_it(
    tmp_path: Path,
) -> None:
    env = script_env(
        tmp_path,
        NULLWORKER_RESTART_BACKOFF_S="0.1",
        NULLWORKER_RESTART_MAX_S="0.3",
        NULLWORKER_RESTART_RESET_S="2",
    )
    port, log = env["WORKER_PORT"], tmp_path / "w.log"
    # A socket bound to the port (not listening: nothing answers the health probe) makes
    # every start fail with "cannot listen" and exit 1.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", int(port)))
    async with started_script(env) as script:
        try:
            await wait_for_log(log, r"\(restart 4\)")
        finally:
            blocker.close()
        text = log.read_text()
        assert "cannot listen" in text
        delays = re.findall(
            r"exited with status 1 after [0-9.]+ s; restarting in ([0-9.]+) s", text
        )
        assert delays[:4] == ["0.1", "0.2", "0.3", "0.3"], text

        # Once the port is free, a restart serves; a worker that stayed up longer than
        # NULLWORKER_RESTART_RESET_S is restarted after the initial backoff again.
        await wait_until_serving(port)
        worker = await wait_for_worker(script.pid)
        await trio.sleep(2.2)
        restarts = len(re.findall(r"\(restart \d+\)", log.read_text()))
        os.kill(worker, signal.SIGKILL)
        await wait_for_log(
            log,
            rf"worker \(pid {worker}\) exited with status 137 \(killed by SIGKILL\) after "
            rf"[0-9.]+ s; restarting in 0\.1 s \(restart {restarts + 1}\)",
        )
        await wait_until_serving(port)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NULLWORKER_RESTART_BACKOFF_S", "soon"),
        ("NULLWORKER_RESTART_MAX_S", "-1"),
        ("NULLWORKER_RESTART_RESET_S", "1e3"),
    ],
)
async def test_a_bad_backoff_setting_stops_the_script(
    tmp_path: Path, variable: str, value: str
) -> None:
    env = script_env(tmp_path, **{variable: value})
    with trio.fail_after(60):
        result = await trio.run_process([SCRIPT], env=env, capture_stderr=True, check=False)
    assert result.returncode == 1
    assert f"{variable} must be a number of seconds, got '{value}'".encode() in result.stderr
    assert not processes_of(tmp_path)
