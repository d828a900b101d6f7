"""`start_server.sh` supervising the worker: real processes, found through /proc.

The script runs `nullworker serve` as its child and restarts it when it dies on its own;
SIGTERM to the script stops the worker gracefully and nothing is restarted. On a Vast
instance it first has the instance certificate signed, by a stand-in for Vast's endpoint
on 127.0.0.1 here.
"""

from __future__ import annotations

import hashlib
import http.server
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from .conftest import envelope
from .helpers import read_log, release_port, wait_for_log
from .test_startup import REPO, _locked_by_another, worker_env
from .test_tls import vast_shaped_leaf, vast_shaped_root, write_pem

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


async def wait_until_serving(port: str, *, tls: ssl.SSLContext | None = None) -> None:
    """Until the worker answers ``/health`` with 200 (over TLS trusting ``tls``, if given)."""
    url = f"{'http' if tls is None else 'https'}://127.0.0.1:{port}/health"
    async with httpx.AsyncClient(timeout=5, verify=tls or True) as http:
        with trio.fail_after(120):  # the first run may install the package
            while True:
                try:
                    if (await http.get(url)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


async def wait_until_gone(tmp_path: Path) -> None:
    with trio.fail_after(10):
        while processes_of(tmp_path):
            await trio.sleep(0.05)


@asynccontextmanager
async def started_script(
    env: dict[str, str], *, stderr: IO[bytes] | None = None
) -> AsyncIterator[trio.Process]:
    """start_server.sh in its own session; whatever is left of it is killed at the end."""
    proc = await trio.lowlevel.open_process(
        [SCRIPT],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if stderr is None else stderr,
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


def recording_venv(venv: Path) -> Path:
    """A virtual environment whose ``python`` only records its arguments (one line per
    call, in the returned file) and whose ``nullworker`` is this checkout's, installed
    as far as the script's stamp can tell."""
    calls = venv / "python-calls"
    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >>"{calls}"\n')
    (bin_dir / "nullworker").write_text(
        f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m nullworker "$@"\n'
    )
    for name in ("python", "nullworker"):
        (bin_dir / name).chmod(0o755)
    stamp = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".nullworker-installed").write_text(stamp + "\n")
    return calls


async def test_the_engine_s_update_request_reinstalls_before_the_next_start(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    calls = recording_venv(tmp_path / "venv")
    marker = tmp_path / "force_update"
    env = script_env(
        tmp_path,
        NULLWORKER_VENV=str(tmp_path / "venv"),
        NULLWORKER_FORCE_UPDATE_PATH=str(marker),
        MASTER_TOKEN="s3cret",
    )
    port, log = env["WORKER_PORT"], tmp_path / "w.log"
    update = ["-m pip install", "--upgrade --upgrade-strategy eager", f"-e {REPO}"]

    # Installed and no update asked for: nothing is installed.
    async with started_script(env) as script:
        await wait_until_serving(port)
        assert not calls.exists()

        # The engine asks for an update; the worker dies: the restart upgrades first.
        answer = await http.post(
            f"http://127.0.0.1:{port}/pyworker/update",
            headers={"Authorization": "Bearer s3cret"},
        )
        assert answer.status_code == 200 and marker.exists()
        first = await wait_for_worker(script.pid)
        os.kill(first, signal.SIGKILL)
        await wait_for_worker(script.pid, not_pid=first)
        await wait_until_serving(port)
        (line,) = calls.read_text().splitlines()
        assert all(part in line for part in update), line
        assert not marker.exists()
        assert f"update requested by the engine ({marker})" in log.read_text()
        script.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await script.wait() == 0
    await wait_until_gone(tmp_path)

    # A marker found at start: the update runs before the first worker, once.
    marker.touch()
    async with started_script(env) as script:
        await wait_until_serving(port)
        assert len(calls.read_text().splitlines()) == 2 and not marker.exists()
        script.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await script.wait() == 0
    await wait_until_gone(tmp_path)
    assert len(calls.read_text().splitlines()) == 2


async def test_ctrl_c_stops_the_worker_gracefully_and_the_script_exits_0(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    # Ctrl-C on a terminal: SIGINT to the whole foreground process group, so the worker
    # gets it from the terminal and SIGTERM from the script. A held reservation is told
    # "shutdown", the worker exits 0 and so does the script, with no traceback.
    env = script_env(tmp_path)
    port, log = env["WORKER_PORT"], tmp_path / "w.log"
    answers: list[httpx.Response] = []
    async with started_script(env) as script:
        await wait_until_serving(port)
        worker = await wait_for_worker(script.pid)
        url = f"http://127.0.0.1:{port}"

        async def hold() -> None:
            signed = envelope(url, payload={"duration": 60})
            answers.append(await http.post(f"{url}/reserve", json=signed))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            with trio.fail_after(10):
                while not (await http.get(f"{url}/health")).json()["busy"]:
                    await trio.sleep(0.05)
            os.killpg(script.pid, signal.SIGINT)
            with trio.fail_after(15):
                code = await script.wait()
        assert code == 0, read_log(log)
        await wait_until_gone(tmp_path)
    text = read_log(log)
    assert [(a.status_code, a.json()["released"]) for a in answers] == [(503, "shutdown")]
    assert "received SIGINT: shutting down" in text  # the worker's own graceful stop
    # The worker's own SIGINT and the script's trap race: on a busy machine the script may
    # see the worker gone before its trap runs. Either way nothing is restarted.
    assert f"worker (pid {worker}) stopped with status 0 after SIGINT; not restarting" in text or (
        f"worker (pid {worker}) exited with status 0 after" in text
        and "it was stopped by someone else; not restarting" in text
    ), text
    assert "restarting in" not in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


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
    release_port(int(port))  # the test's own hold on the port, which lets a worker bind
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", int(port)))
    async with started_script(env) as script:
        try:
            await wait_for_log(log, r"\(restart 4\)")
        finally:
            blocker.close()
        text = log.read_text()
        assert "cannot listen" in text
        runs = re.findall(
            r"exited with status 1 after ([0-9.]+) s; restarting in ([0-9.]+) s", text
        )
        # The rule, run by run: doubling from 0.1 s up to the 0.3 s cap, back to 0.1 s
        # after a run of 2 s or more (a failed start can take that long on a loaded
        # machine; the uptime is in the same line, so the expectation follows it).
        expected, next_delay = [], 0.1
        for up, _ in runs[:4]:
            if float(up) >= 2.0:
                next_delay = 0.1
            expected.append(f"{next_delay:g}")
            next_delay = min(next_delay * 2, 0.3)
        assert [delay for _, delay in runs[:4]] == expected, text
        assert "0.2" in expected, text  # the backoff did grow

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


class Signer:
    """A stand-in for Vast's certificate endpoint (``POST /sign_cert/?instance_id=N`` with
    a CSR, answered with the certificate) on 127.0.0.1. It answers 503 to the first
    ``failures`` requests, then signs for 127.0.0.1 with a root shaped like Vast's."""

    def __init__(self, directory: Path) -> None:
        self.root, self._root_key = vast_shaped_root()
        self.root_file = write_pem(directory / "signer-root.pem", self.root)
        self.failures = 0
        #: (path, Content-Type, CSR) of every request, in order.
        self.requests: list[tuple[str, str, x509.CertificateSigningRequest | None]] = []
        signer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    csr: x509.CertificateSigningRequest | None = x509.load_pem_x509_csr(data)
                except ValueError:
                    csr = None
                signer.requests.append((self.path, self.headers.get("Content-Type", ""), csr))
                if len(signer.requests) <= signer.failures or csr is None:
                    self._answer(503, b"try again later\n")
                    return
                leaf = vast_shaped_leaf(signer.root, signer._root_key, csr.public_key())  # type: ignore[arg-type]
                self._answer(200, write_pem_bytes(leaf))

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/sign_cert/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def write_pem_bytes(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def signer(tmp_path: Path) -> Iterator[Signer]:
    stand_in = Signer(tmp_path)
    try:
        yield stand_in
    finally:
        stand_in.close()


def vast_env(tmp_path: Path, engine: Any, signer: Signer, **extra: str) -> dict[str, str]:
    """The script on a Vast instance (CONTAINER_ID 11) with USE_SSL left unset."""
    env = script_env(
        tmp_path,
        REPORT_ADDR=engine.url,
        CONTAINER_ID="11",
        MASTER_TOKEN="tok",
        NULLWORKER_SSL_CERTFILE=str(tmp_path / "tls" / "instance.crt"),
        NULLWORKER_SSL_KEYFILE=str(tmp_path / "tls" / "instance.key"),
        NULLWORKER_SIGN_CERT_URL=signer.url,
        NULLWORKER_CERT_RETRY_S="0.01",
        # The advertised host (no PUBLIC_IPADDR here); the scheme follows USE_SSL.
        NULLWORKER_PUBLIC_HOST="127.0.0.1",
    )
    env.pop("USE_SSL", None)
    return env | extra


async def test_on_vast_tls_is_on_by_default_with_a_certificate_vast_signed(
    tmp_path: Path, vast_engine: Any, signer: Signer
) -> None:
    signer.failures = 2
    env = vast_env(tmp_path, vast_engine, signer)
    port, err = env["WORKER_PORT"], tmp_path / "script.err"
    trusted = ssl.create_default_context(cafile=str(signer.root_file))
    trusted.verify_flags &= ~ssl.VERIFY_X509_STRICT  # as for Vast's root (tests/test_tls.py)
    async with await trio.open_file(err, "wb") as stderr:
        async with started_script(env, stderr=stderr.wrapped):
            await vast_engine.wait_for(
                lambda e: 11 in e.workers and e.workers[11].ready, timeout=120
            )
            # The advertised URL is https, and the worker serves the signed certificate.
            assert vast_engine.workers[11].url == f"https://127.0.0.1:{port}"
            await wait_until_serving(port, tls=trusted)
            # A second start finds it over TLS and leaves it alone.
            with trio.fail_after(60):
                again = await trio.run_process([SCRIPT], env=env, capture_stderr=True, check=False)
            assert again.returncode == 0
            assert f"a nullworker already serves port {port}; not starting another" in (
                again.stderr.decode()
            )

    # Signed on the third try, after two pauses, each twice as long as the one before.
    text = err.read_text()
    assert "signing the TLS certificate failed (HTTP 503); try 1/5, next in 0.01 s" in text
    assert "signing the TLS certificate failed (HTTP 503); try 2/5, next in 0.02 s" in text
    assert "TLS certificate for instance 11 signed (try 3/5)" in text
    assert len(signer.requests) == 3
    for path, content_type, csr in signer.requests:
        assert path == "/sign_cert/?instance_id=11"
        assert content_type == "application/octet-stream"
        # The request the official script makes: its subject and its SAN config.
        assert csr is not None and csr.is_signature_valid
        common_name = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert common_name == "pyworker.vast.ai"
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("0.0.0.0")]
        assert csr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        usage = csr.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and usage.key_encipherment and usage.content_commitment
    assert (tmp_path / "tls" / "instance.key").stat().st_mode & 0o077 == 0
    await wait_until_gone(tmp_path)

    # The next start finds a usable certificate and key: nothing is requested.
    async with await trio.open_file(err, "wb") as stderr:
        async with started_script(env, stderr=stderr.wrapped):
            await wait_until_serving(port, tls=trusted)
    assert len(signer.requests) == 3
    assert "requesting a TLS certificate" not in err.read_text()


async def test_a_certificate_vast_does_not_sign_stops_the_start(
    tmp_path: Path, vast_engine: Any, signer: Signer
) -> None:
    """No worker that serves plain HTTP while the engine expects https: one line, exit 1."""
    signer.failures = 100
    env = vast_env(tmp_path, vast_engine, signer)
    with trio.fail_after(120):
        result = await trio.run_process(
            [SCRIPT], env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(signer.requests) == 5
    pauses = [re.search(r"next in ([0-9.]+) s", line) for line in lines]
    assert [m.group(1) for m in pauses if m] == ["0.01", "0.02", "0.04", "0.08"]
    last = lines[-1]
    assert last.startswith("start_server.sh: USE_SSL=true: Vast did not sign the TLS certificate")
    assert "after 5 tries (last: HTTP 503;" in last and "set USE_SSL=false" in last
    await vast_engine.wait_for(lambda e: 11 in e.workers and e.workers[11].error_msg)
    assert "Vast did not sign the TLS certificate" in vast_engine.workers[11].error_msg
    assert "starting nullworker" not in result.stderr.decode()
    assert not (tmp_path / "tls").exists()  # nothing half-made left behind
    await wait_until_gone(tmp_path)


async def test_use_ssl_false_opts_out_on_vast_and_other_values_are_refused(
    tmp_path: Path, vast_engine: Any, signer: Signer
) -> None:
    env = vast_env(tmp_path, vast_engine, signer, USE_SSL="True")
    with trio.fail_after(60):
        result = await trio.run_process([SCRIPT], env=env, capture_stderr=True, check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "start_server.sh: USE_SSL must be true or false, got 'True'\n"
    )

    env = vast_env(tmp_path, vast_engine, signer, USE_SSL="false")
    async with started_script(env):
        await vast_engine.wait_for(lambda e: 11 in e.workers and e.workers[11].ready, timeout=120)
        assert vast_engine.workers[11].url == f"http://127.0.0.1:{env['WORKER_PORT']}"
        await wait_until_serving(env["WORKER_PORT"])
    assert signer.requests == []
