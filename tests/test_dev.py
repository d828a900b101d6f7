"""Tests of ``nullworker dev``: a real subprocess running the engine and real worker
children (``python -m nullworker serve``), driven over loopback HTTP.

The engine runs in another process here, so these tests poll its ``/workers`` view
(bounded, every 0.1 s) instead of using ``Engine.wait_for``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio

from nullworker.engine.dev import DevOptions, _Console, _run_dev, main
from nullworker.vast.signing import load_public_key, verify_url

from .helpers import OutputLines

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.1
#: Bound on every wait for the subprocesses (generous: they start in ~1 s).
WAIT_S = 10.0


class DevProcess(OutputLines):
    """A running ``python -m nullworker.engine.dev`` and the lines it printed so far."""

    #: Bound on each wait for a line.
    wait_s = WAIT_S

    def __init__(self, process: trio.Process) -> None:
        super().__init__(process)
        self.url = ""

    async def wait_line(self, pattern: str, *, within_s: float | None = None) -> re.Match[str]:
        return await super().wait_line(pattern, within_s=within_s or self.wait_s)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def consumer_pids(self) -> dict[int, list[int]]:
        """Each worker's consumers (the ``/bin/sh`` running the command), oldest first."""
        pids: dict[int, list[int]] = {}
        for line in self.lines:
            match = re.search(r"\[dev\] consumer (\d+) started: pid (\d+)", line)
            if match:
                pids.setdefault(int(match.group(1)), []).append(int(match.group(2)))
        return pids

    def worker_pids(self) -> dict[int, int]:
        pids: dict[int, int] = {}
        for line in self.lines:
            match = re.search(r"\[dev\] worker (\d+) started: pid (\d+)", line)
            if match:
                pids[int(match.group(1))] = int(match.group(2))
        return pids

    async def stop(self, sig: int = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        with trio.fail_after(WAIT_S):
            return await self.process.wait()


StartDev = Callable[..., Awaitable[DevProcess]]
D = TypeVar("D", bound=DevProcess)


async def open_dev(
    nursery: trio.Nursery,
    kind: type[D],
    *args: str,
    env: Mapping[str, str] | None = None,
    wait_s: float | None = None,
) -> D:
    """Start ``nullworker dev --port 0 ARGS`` as ``kind``, its output read in ``nursery``;
    its engine's URL is read back from the line it prints once bound.

    ``env`` is the whole environment (default: this one), ``wait_s`` the bound on each
    wait for a line. A start that fails kills the process.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "nullworker.engine.dev", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
    )
    dev = kind(process)
    if wait_s is not None:
        dev.wait_s = wait_s
    nursery.start_soon(dev.pump_lines)
    try:
        dev.url = (await dev.wait_line(r"engine on (http://127\.0\.0\.1:\d+)")).group(1)
    except BaseException:
        process.kill()
        raise
    return dev


#: A consumer for ``--consumer``: it records its pid and the control listener it was
#: given (a JSON line in argv[1]), takes a local hold labelled argv[2] for argv[3]
#: seconds (only the first consumer to create the file argv[4], if given), then idles.
CONSUMER_SCRIPT = """\
import http.client, json, os, sys, time, urllib.parse
record, label, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
url = os.environ["NULLWORKER_CONTROL_URL"]
with open(record, "a") as file:
    port = os.environ["NULLWORKER_CONTROL_PORT"]
    file.write(json.dumps({"pid": os.getpid(), "url": url, "port": port}) + "\\n")
if len(sys.argv) > 4:
    try:
        os.close(os.open(sys.argv[4], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        seconds = 0
if seconds:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    body = json.dumps({"label": label, "duration": seconds})
    conn.request("POST", "/hold", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    print("held", response.status, flush=True)
    conn.sock.settimeout(None)
    response.read()  # the body comes when the hold ends
    print("hold over", flush=True)
time.sleep(3600)
"""


def consumer_command(tmp_path: Path, label: str, seconds: float, *, once: bool = False) -> str:
    """A ``--consumer`` command running :data:`CONSUMER_SCRIPT`; it records to
    ``tmp_path / "consumers.jsonl"``."""
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER_SCRIPT)
    args = [sys.executable, str(script), str(tmp_path / "consumers.jsonl"), label, str(seconds)]
    if once:
        args.append(str(tmp_path / "held-once"))
    return shlex.join(args)


def recorded_consumers(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "consumers.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: an orphan waits for its reaper)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def _children_of(pid: int) -> set[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    children: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        # The command name may hold spaces; the fields after its ")" are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry))
    return children


@pytest.fixture
async def start_dev(nursery: trio.Nursery) -> AsyncIterator[StartDev]:
    started: list[DevProcess] = []

    async def start(*args: str) -> DevProcess:
        dev = await open_dev(nursery, DevProcess, *args)
        started.append(dev)
        return dev

    yield start

    # A failed test must not leave processes behind either.
    for dev in started:
        for pid in dev.worker_pids().values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for group in [pid for pids in dev.consumer_pids().values() for pid in pids]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        if dev.process.returncode is None:
            dev.process.kill()
            with trio.move_on_after(5):
                await dev.process.wait()


async def wait_workers(
    http: httpx.AsyncClient,
    predicate: Callable[[list[dict[str, Any]]], bool],
) -> list[dict[str, Any]]:
    with trio.fail_after(WAIT_S):
        while True:
            workers: list[dict[str, Any]] = (await http.get("/workers")).json()["workers"]
            if predicate(workers):
                return workers
            await trio.sleep(POLL_S)


async def route(http: httpx.AsyncClient, request_idx: int = 0) -> dict[str, Any]:
    response = await http.post(
        "/route/",
        json={"endpoint": "dev", "api_key": "dev", "cost": 100, "request_idx": request_idx},
    )
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


async def route_until_ready(http: httpx.AsyncClient, request_idx: int) -> dict[str, Any]:
    with trio.fail_after(WAIT_S):
        while "url" not in (reply := await route(http, request_idx)):
            await trio.sleep(POLL_S)
    return reply


async def assert_stops_cleanly(dev: DevProcess) -> None:
    pids = set(dev.worker_pids().values())
    assert await dev.stop(signal.SIGINT) == 0, dev.output
    assert not [pid for pid in pids if _alive(pid)], dev.output
    # The last word is that everything stopped, not a view of workers now gone.
    await dev.wait_line(r"^\[dev\] stopped$")
    assert dev.lines[-1] == "[dev] stopped", dev.output


def idle(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [w for w in workers if w["state"] == "idle"]


async def test_dev_starts_min_workers_and_sigint_leaves_no_children(start_dev: StartDev) -> None:
    dev = await start_dev("--min-workers", "1", "--max-workers", "2")
    assert f"--engine-url {dev.url} --endpoint dev --duration 60" in dev.output
    async with httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http:
        workers = await wait_workers(http, lambda ws: len(idle(ws)) == 1)
    assert len(workers) == 1 and workers[0]["ready"]
    assert workers[0]["url"].startswith("http://127.0.0.1:")

    pids = dev.worker_pids()
    assert list(pids) == [1]
    assert set(pids.values()) <= _children_of(dev.process.pid)
    await assert_stops_cleanly(dev)
    assert not _children_of(dev.process.pid)


async def test_route_with_no_free_worker_starts_another_up_to_max(start_dev: StartDev) -> None:
    dev = await start_dev("--min-workers", "1", "--max-workers", "2")
    async with httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http:
        await wait_workers(http, lambda ws: len(idle(ws)) == 1)
        first = await route(http)
        assert "url" in first

        waiting = await route(http)  # worker 1 is leased: no free worker
        assert "url" not in waiting
        second = await route_until_ready(http, waiting["request_idx"])
        assert second["url"] != first["url"]
        assert second["request_idx"] == waiting["request_idx"]

        # The worker trusts this engine's key: the reservation is accepted.
        key = load_public_key((await http.get("/pubkey/")).text)
        assert verify_url(key, second["url"], second["signature"])
        held = await http.post(
            second["url"] + "/reserve", json={"auth_data": second, "payload": {"duration": 0.2}}
        )
        assert held.status_code == 200, held.text
        assert held.json()["released"] == "duration_elapsed"

        # At the maximum: more demand starts nothing. Each READY leases its worker,
        # so of three quick routes at least one waits. The hook decides synchronously
        # while answering, so the view right after the answers is final.
        replies = [await route(http) for _ in range(3)]
        assert sum("url" not in r for r in replies) >= 1
        workers = (await http.get("/workers")).json()["workers"]
        assert sorted(w["id"] for w in workers) == [1, 2]
    assert "starting worker 3" not in dev.output
    await assert_stops_cleanly(dev)


async def test_idle_workers_above_the_minimum_are_stopped(start_dev: StartDev) -> None:
    dev = await start_dev("--min-workers", "0", "--max-workers", "1", "--idle-timeout", "0.5")
    async with httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http:
        assert (await http.get("/workers")).json()["workers"] == []
        waiting = await route(http)
        assert "url" not in waiting
        ready = await route_until_ready(http, waiting["request_idx"])
        held = await http.post(
            ready["url"] + "/reserve", json={"auth_data": ready, "payload": {"duration": 0.2}}
        )
        assert held.status_code == 200, held.text
        await wait_workers(http, lambda ws: ws == [])
        # The page keeps it among the recent workers, with how long it lived and why it went.
        (stopped,) = (await http.get("/workers")).json()["stopped"]
        assert stopped["id"] == 1 and stopped["reason"] == "stopped by dev: idle for 0.5 s"
        assert stopped["lived_s"] > 0.5 and stopped["routed_count"] == 1
        assert stopped["pid"] in dev.worker_pids().values()
    await dev.wait_line(r"stopping worker 1 \(idle")
    (pid,) = dev.worker_pids().values()
    with trio.fail_after(WAIT_S):
        while pid in _children_of(dev.process.pid) or _alive(pid):
            await trio.sleep(POLL_S)
    await assert_stops_cleanly(dev)


async def test_the_printed_client_command_works_as_pasted(
    start_dev: StartDev, tmp_path: Path
) -> None:
    """The banner's command runs in a shell with no virtualenv on its PATH, elsewhere."""
    dev = await start_dev("--max-workers", "1")
    (line,) = [line.strip() for line in dev.lines if "-m nullworker.client" in line]
    assert line == (
        f"VAST_API_KEY=dev {shlex.quote(sys.executable)} -m nullworker.client "
        f"--engine-url {dev.url} --endpoint dev --duration 60"
    )
    bash = shutil.which("bash")
    assert bash is not None
    with trio.fail_after(2 * WAIT_S):
        result = await trio.run_process(
            [bash, "-c", line.removesuffix("--duration 60") + "--duration 1"],
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    assert "held: http://127.0.0.1:" in output and "elapsed" in output
    await assert_stops_cleanly(dev)


async def test_a_taken_port_is_named_with_a_way_out() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(WAIT_S):
            result = await trio.run_process(
                [sys.executable, "-m", "nullworker.engine.dev", "--port", str(port)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=REPO,
            )
    error = result.stderr.decode()
    assert result.returncode == 1, error
    assert error.startswith(f"nullworker dev: port {port} on 127.0.0.1 is already in use")
    assert "choose another port with --port" in error
    assert "Traceback" not in error and b"[dev] stopped" not in result.stdout


def test_invalid_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--min-workers", "3", "--max-workers", "2"]) == 2
    assert "--min-workers" in capsys.readouterr().err
    assert main(["--max-workers", "0"]) == 2
    with pytest.raises(ValueError):
        DevOptions(idle_timeout_s=float("nan"))


# -- the supervisor in-process, with stand-in worker commands ---------------------------


async def wait_text(buffer: io.StringIO, pattern: str) -> re.Match[str]:
    with trio.fail_after(WAIT_S):
        while not (match := re.search(pattern, buffer.getvalue())):
            await trio.sleep(POLL_S / 2)
    return match


async def test_stop_escalates_to_sigkill_for_a_child_ignoring_sigterm() -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    out = io.StringIO()
    options = DevOptions(
        port=0,
        min_workers=1,
        max_workers=1,
        stop_timeout_s=0.5,
        worker_command=(sys.executable, "-c", stubborn),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_dev, options, _Console(out, tty=False))
        pid = int((await wait_text(out, r"worker 1 started: pid (\d+)")).group(1))
        await wait_text(out, r"\[worker 1\] up")
        assert pid in _children_of(os.getpid())
        nursery.cancel_scope.cancel()
    # _run_dev returns only after the child was killed and reaped.
    assert not _alive(pid)


#: A stand-in worker that says ``up`` and sleeps, binding nothing.
SLEEPER = (sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)")


def _bindable(port: int) -> bool:
    """Whether a plain socket (no ``SO_REUSEADDR``) can bind 127.0.0.1:``port`` now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE, exc
            return False
    return True


async def test_a_workers_ports_are_held_for_it_until_it_ends() -> None:
    """Dev gives a worker its port numbers before it starts; nothing else on the machine
    can take them in between (nor while this worker, which never binds, runs), and they
    are let go when the worker ends."""
    out = io.StringIO()
    options = DevOptions(
        port=0,
        min_workers=1,
        max_workers=1,
        worker_command=SLEEPER,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_dev, options, _Console(out, tty=False))
        started = await wait_text(
            out, r"worker 1 started: pid \d+, url http://127\.0\.0\.1:(\d+), control \S+:(\d+)"
        )
        await wait_text(out, r"\[worker 1\] up")
        ports = [int(started.group(1)), int(started.group(2))]
        assert ports[0] != ports[1]
        assert [_bindable(port) for port in ports] == [False, False]
        nursery.cancel_scope.cancel()
    assert [_bindable(port) for port in ports] == [True, True]


async def test_after_stopping_the_status_line_is_wiped_not_redrawn() -> None:
    """On a terminal the one-line view is redrawn below every line; once stopping it
    would only be stale, so it is wiped and the last line says everything stopped."""
    out = io.StringIO()
    options = DevOptions(
        port=0,
        min_workers=1,
        max_workers=1,
        verbose=True,  # one more line while stopping: "worker 1 exited"
        worker_command=SLEEPER,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_dev, options, _Console(out, tty=True))
        await wait_text(out, r"\[worker 1\] up")
        await wait_text(out, r"\[dev\] waiting 0 \| w1 starting")
        nursery.cancel_scope.cancel()
    text = out.getvalue()
    assert text.endswith("\n[dev] stopped\n")
    # After the last drawing of the view comes the wipe, before any line ends.
    after = text[text.rindex("[dev] waiting") :]
    assert after.index("\r\x1b[K") < after.index("\n"), repr(after)
    assert "[dev] worker 1 exited" in after


async def test_a_crashing_worker_is_replaced_after_a_backoff() -> None:
    out = io.StringIO()
    options = DevOptions(
        port=0,
        min_workers=1,
        max_workers=1,
        worker_command=(sys.executable, "-c", "import sys; sys.exit(3)"),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_dev, options, _Console(out, tty=False))
        await wait_text(out, r"worker 1 exited on its own with code 3; no new worker for 2 s")
        await wait_text(out, r"starting worker 2 on port \d+ \(--min-workers\)")
        # The backoff doubles while workers keep failing.
        await wait_text(out, r"worker 2 exited on its own with code 3; no new worker for 4 s")
        nursery.cancel_scope.cancel()
    assert "starting worker 3" not in out.getvalue()


async def _client(dev: DevProcess, *args: str) -> trio.Process:
    return await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "nullworker.client",
            "--engine-url",
            dev.url,
            "--endpoint",
            "dev",
            *args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VAST_API_KEY": "dev", "PYTHONUNBUFFERED": "1"},
    )


async def test_the_whole_loop_two_clients_scale_out_and_ctrl_c_releases(
    start_dev: StartDev,
) -> None:
    """docs/getting-started.md's walk-through: dev with two workers at most, two clients,
    Ctrl-C one."""
    dev = await start_dev("--max-workers", "2", "--min-workers", "0", "--idle-timeout", "60")
    clients: list[trio.Process] = []
    try:
        async with httpx.AsyncClient(base_url=dev.url, timeout=5) as http:
            for _ in range(2):
                clients.append(await _client(dev, "--duration", "60"))
            # Demand from two clients starts two workers, and both end up held.
            workers = await wait_workers(
                http, lambda ws: len(ws) == 2 and all(w["state"] == "busy" for w in ws)
            )
            assert {w["num_requests_working"] for w in workers} == {1}
            # dev asks each busy worker about its hold: the page shows the time left.
            workers = await wait_workers(http, lambda ws: all(w["hold"] for w in ws))
            for worker in workers:
                assert worker["hold"]["duration_s"] == 60.0
                assert 0 < worker["hold"]["remaining_s"] <= 60.0
                assert worker["hold"]["request_idx"] == worker["working_request_idxs"][0]
                assert worker["pid"] in dev.worker_pids().values()
            page = (await http.get("/")).text
            assert re.search(r"held, \d+ s left \(request \d+\)", page), page
            # Ctrl-C on one client: exit 130, and its worker is idle again promptly.
            clients[0].send_signal(signal.SIGINT)
            with trio.fail_after(WAIT_S):
                assert await clients[0].wait() == 130
            freed = await wait_workers(http, lambda ws: len(idle(ws)) == 1)
            freed_id = idle(freed)[0]["id"]
            # The next client gets the freed worker; no third worker is started.
            third = await _client(dev, "--duration", "2")
            clients.append(third)
            with trio.fail_after(WAIT_S):
                assert await third.wait() == 0
            assert third.stdout is not None
            out = (await third.stdout.receive_some(65536)).decode()
            assert "elapsed" in out
            workers = (await http.get("/workers")).json()["workers"]
            assert len(workers) == 2
            routed = {w["id"]: w["routed_count"] for w in workers}
            assert routed[freed_id] == 2  # the freed worker served the third client
            # How each hold ended, in the page's words.
            with trio.fail_after(WAIT_S):
                while len(finished := (await http.get("/workers")).json()["finished"]) < 2:
                    await trio.sleep(POLL_S)
            # Ctrl-C on a client is how it lets go: a release, not a failure.
            assert [(f["status"], f["ended"]) for f in finished] == [
                ("Success", "elapsed"),
                ("Cancelled", "released by client"),
            ]
    finally:
        for proc in clients:
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5):
                    await proc.wait()
    await assert_stops_cleanly(dev)


# -- --consumer: a consumer beside each worker ------------------------------------------


async def test_a_consumer_runs_beside_each_worker_and_goes_with_it(
    start_dev: StartDev, tmp_path: Path
) -> None:
    """Each worker gets its own consumer with its own control listener; the consumer
    goes when its worker is scaled down, the next worker's consumer gets the new
    listener, and Ctrl-C on dev leaves no consumer behind."""
    command = consumer_command(tmp_path, "job 5", 1.0)
    dev = await start_dev(
        "--min-workers", "0", "--max-workers", "1", "--idle-timeout", "5", "--consumer", command
    )
    async with httpx.AsyncClient(base_url=dev.url, timeout=5.0) as http:
        await route(http)  # demand: dev starts worker 1, then its consumer
        (first,) = await wait_workers(http, lambda ws: any(w["consumer"] for w in ws))
        await dev.wait_line(r"\[consumer 1\] held 200")
        (record,) = recorded_consumers(tmp_path)
        # The consumer was given the worker's control listener, which /workers shows.
        assert record["url"] == first["control_url"] == f"http://127.0.0.1:{record['port']}"
        assert (await http.get(record["url"] + "/health")).status_code == 200
        (shell,) = dev.consumer_pids()[1]
        consumer_pids = {shell, record["pid"]}
        assert all(_alive(pid) for pid in consumer_pids)
        # The hold is over, the worker idles and is scaled down: its consumer goes too.
        await dev.wait_line(r"\[consumer 1\] hold over")
        await dev.wait_line(r"stopping worker 1 \(idle for 5 s\)")
        with trio.fail_after(WAIT_S):
            while any(_alive(pid) for pid in consumer_pids):
                await trio.sleep(POLL_S)
        (stopped,) = (await http.get("/workers")).json()["stopped"]
        assert stopped["consumer"]["state"] == "stopped"

        # Demand again: a new worker, and beside it a consumer with its new listener.
        await route(http)
        (second,) = await wait_workers(
            http, lambda ws: any(w["consumer"] and w["consumer"]["state"] == "running" for w in ws)
        )
        await dev.wait_line(r"\[consumer 2\] held 200")
        first_record, second_record = recorded_consumers(tmp_path)
        assert second["id"] == 2 and second_record["url"] == second["control_url"]
        assert second_record["url"] != first_record["url"]
        (shell,) = dev.consumer_pids()[2]
        consumer_pids = {shell, second_record["pid"]}
        assert all(_alive(pid) for pid in consumer_pids)
    await assert_stops_cleanly(dev)
    assert not [pid for pid in consumer_pids if _alive(pid)], dev.output
    assert not _children_of(dev.process.pid)


async def test_a_consumer_that_exits_is_restarted_with_a_backoff_while_its_worker_lives(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    options = DevOptions(
        port=0,
        min_workers=1,
        max_workers=1,
        consumer='echo "up on $NULLWORKER_CONTROL_PORT"; exit 3',
        log_dir=str(tmp_path),
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(_run_dev, options, _Console(out, tty=False))
        await wait_text(
            out, r"consumer 1 exited with code 3 while worker 1 lives; restarting in 1 s"
        )
        await wait_text(
            out, r"consumer 1 exited with code 3 while worker 1 lives; restarting in 2 s"
        )
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
            (worker,) = (await http.get("/workers")).json()["workers"]
            page = (await http.get("/")).text
        consumer = worker["consumer"]
        assert consumer["exit_code"] == 3 and consumer["restarts"] >= 1
        # Its output goes to its own log beside the worker's, each run's after the last.
        assert consumer["log"] == str(tmp_path / "consumer-1.log")
        runs = (tmp_path / "consumer-1.log").read_text().splitlines()
        port = worker["control_url"].rsplit(":", 1)[1]
        assert runs[:2] == [f"up on {port}"] * 2, runs
        assert consumer["state"] in ("restarting", "running"), consumer
        assert re.search(r"exited with code 3, restarting in [\d.]+ s|running \(pid", page)
        worker_pid = int((await wait_text(out, r"worker 1 started: pid (\d+)")).group(1))
        nursery.cancel_scope.cancel()
    assert not _alive(worker_pid)
    assert "starting worker 2" not in out.getvalue()


async def test_stopping_a_consumer_reaches_its_whole_process_group() -> None:
    """A consumer whose shell and child ignore SIGTERM is killed, children included."""
    out = io.StringIO()
    options = DevOptions(
        port=0,
        min_workers=1,
        max_workers=1,
        stop_timeout_s=0.5,
        consumer="trap '' TERM; sleep 60 & echo \"child $!\"; wait",
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_dev, options, _Console(out, tty=False))
        shell = int((await wait_text(out, r"consumer 1 started: pid (\d+)")).group(1))
        child = int((await wait_text(out, r"\[consumer 1\] child (\d+)")).group(1))
        assert _alive(shell) and _alive(child)
        assert os.getpgid(child) == shell  # its own process group, led by the shell
        nursery.cancel_scope.cancel()
    assert not _alive(shell) and not _alive(child)


def test_an_empty_consumer_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--consumer", " "]) == 2
    assert (
        capsys.readouterr().err.strip() == "nullworker dev: --consumer must be a command, not empty"
    )
