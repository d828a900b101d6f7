"""Real Redis and NATS servers for the tests: subprocesses on free loopback ports.

Fixtures (function scope, so every test gets a fresh, empty server):

* ``redis_server`` -> :class:`ServerProcess` running
  ``redis-server --port P --bind 127.0.0.1 --save '' --appendonly no``;
  ``redis_server.url`` is ``redis://127.0.0.1:P``.
* ``nats_server`` -> :class:`ServerProcess` running
  ``nats-server -js -p P -a 127.0.0.1 --store_dir <tmp>``; ``nats_server.url`` is
  ``nats://127.0.0.1:P``. JetStream keeps its file store across a restart.
* ``prometheus_server`` -> :class:`ServerProcess` running Debian's ``prometheus`` with a
  temporary config and data directory, scraping ``prometheus_exporter`` (a
  prometheus_client registry served on a free port); ``url`` is ``http://127.0.0.1:P``.
* ``silent_server`` -> the port of a loopback listener that accepts connections and
  never says a word (a hung server), served in pytest-trio's ``nursery``.

A server can be stopped and started again on the same port inside a test
(``await server.stop()``, ``await server.start()``, or ``await server.restart()``), and
frozen with ``pause()``/``resume()`` (SIGSTOP/SIGCONT: connections are still accepted
by the kernel, nothing is answered). ``start()`` returns only once the server answers
on its port; teardown stops it whatever the test left it in.

When a server binary is missing the fixture skips the test, except in CI (``CI`` set
to a true value), where a missing binary is a broken CI image and the test fails.

These fixtures live here, not in conftest.py. A test module imports the ones it uses;
the functions are named ``*_fixture`` so that a test's ``redis_server`` parameter does
not shadow an imported name::

    from .servers import (  # noqa: F401
        nats_server_binary_fixture,
        nats_server_fixture,
        redis_server_binary_fixture,
        redis_server_fixture,
    )
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import redis
import trio

from .helpers import PortTaken, port_in_use, start_on_free_port

__all__ = [
    "PrometheusExporter",
    "ServerProcess",
    "nats_server_binary_fixture",
    "nats_server_fixture",
    "prometheus_binary_fixture",
    "prometheus_exporter_fixture",
    "prometheus_server_fixture",
    "redis_notify_server_fixture",
    "redis_server_binary_fixture",
    "redis_server_fixture",
    "silent_server_fixture",
]

#: Bound on a server's start (most start in well under 0.2 s).
START_TIMEOUT_S = 10.0
#: Bound on a graceful stop before SIGKILL.
STOP_TIMEOUT_S = 5.0
#: How often a starting server is probed.
PROBE_INTERVAL_S = 0.02

#: Where Debian puts server binaries that a non-root PATH may not list.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

Probe = Callable[[int], Awaitable[bool]]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def find_binary(name: str, package: str) -> str:
    """The path of ``name``; skip the test off CI, fail it in CI, when it is missing."""
    path = shutil.which(name)
    if path is None:
        path = shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
    if path is not None:
        return path
    if in_ci():
        pytest.fail(
            f"{name} is not installed, and CI must run the tests that need it: "
            f"install the Debian package {package} (.ci/run does)",
            pytrace=False,
        )
    pytest.skip(f"{name} is not installed (apt-get install {package})")


class ServerProcess:
    """A server subprocess on one loopback port, which can be stopped and restarted.

    ``argv_for(port)`` builds the command line; ``probe(port)`` says whether the server
    answers yet. Output goes to ``log_path``, whose tail is shown when a start fails.
    """

    def __init__(
        self,
        name: str,
        argv_for: Callable[[int], list[str]],
        probe: Probe,
        *,
        scheme: str,
        log_path: Path,
    ) -> None:
        self.name = name
        self.port = 0
        self.scheme = scheme
        self.log_path = log_path
        self._argv_for = argv_for
        self._probe = probe
        self._process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start the server (on a free port the first time, on the same port after).

        The server must be given a number, so the first start is the fallback of
        :func:`tests.helpers.start_on_free_port`: a port that was free a moment ago,
        and a fresh one (up to ``PORT_ATTEMPTS`` in all) when the server exits saying
        the port is in use (another process took it between the pick and the bind).
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        if self.port:
            await self._start_on(self.port)
            return

        async def start_on(port: int) -> None:
            self.port = port
            await self._start_on(port)

        await start_on_free_port(start_on)

    async def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (SIGKILL with ``kill=True`` or after a bound)."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            if kill:
                process.kill()
            else:
                process.terminate()
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections and answers nothing.

        Returns once the kernel shows every thread of the process stopped: a signal is
        delivered asynchronously, and a server still running for a moment after
        ``kill()`` would answer the request a test sends next.
        """
        assert self._process is not None, f"{self.name} is not running"
        self._process.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self._process.pid}/task")
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            states = []
            for stat in tasks.glob("*/stat"):
                try:
                    states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
                except (OSError, IndexError):
                    continue  # a thread that just ended
            if states and all(state in ("T", "t") for state in states):
                return
            time.sleep(0.001)
        raise AssertionError(f"{self.name} did not stop within 5 s of SIGSTOP")

    def resume(self) -> None:
        assert self._process is not None, f"{self.name} is not running"
        self._process.send_signal(signal.SIGCONT)

    async def _start_on(self, port: int) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- starting on port {port}\n".encode())
            log.flush()
            process = await trio.lowlevel.open_process(
                self._argv_for(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._process = process
        try:
            with trio.fail_after(START_TIMEOUT_S):
                while not await self._probe(port):
                    if process.returncode is not None:
                        message = (
                            f"{self.name} exited with status {process.returncode} "
                            f"before answering on port {port}:\n{self._log_tail()}"
                        )
                        if port_in_use(self._log_tail()):
                            raise PortTaken(message)
                        raise RuntimeError(message)
                    await trio.sleep(PROBE_INTERVAL_S)
        except trio.TooSlowError:
            await self.stop(kill=True)
            raise RuntimeError(
                f"{self.name} did not answer on port {port} within {START_TIMEOUT_S:g} s:\n"
                f"{self._log_tail()}"
            ) from None
        except BaseException:
            await self.stop(kill=True)
            raise

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


async def _first_line(port: int, send: bytes = b"") -> bytes:
    """Connect, send ``send``, return the first line answered (b"" if none in time)."""
    try:
        with trio.move_on_after(1.0):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                if send:
                    await stream.send_all(send)
                data = b""
                while b"\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    data += chunk
                return data.split(b"\r\n", 1)[0]
    except OSError:
        pass
    return b""


async def _redis_ready(port: int) -> bool:
    return await _first_line(port, b"PING\r\n") == b"+PONG"


async def _nats_ready(port: int) -> bool:
    line = await _first_line(port)
    if not line.startswith(b"INFO "):
        return False
    # The client port can open before JetStream is enabled: wait for both.
    return bool(json.loads(line[5:]).get("jetstream"))


# The binaries are looked up by plain (sync) fixtures: a skip raised from inside the
# Trio run would reach pytest wrapped in an exception group, without its reason.


@pytest.fixture(name="redis_server_binary")
def redis_server_binary_fixture() -> str:
    return find_binary("redis-server", "redis-server")


@pytest.fixture(name="nats_server_binary")
def nats_server_binary_fixture() -> str:
    return find_binary("nats-server", "nats-server")


def _redis_process(tmp_path: Path, binary: str, *options: str) -> ServerProcess:
    def argv_for(port: int) -> list[str]:
        # The config is given on the command line only ("-" would read stdin); an empty
        # --dir keeps any stray dump away from the work tree.
        return [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            *options,
        ]

    return ServerProcess(
        "redis-server", argv_for, _redis_ready, scheme="redis", log_path=tmp_path / "redis.log"
    )


@pytest.fixture(name="redis_server")
async def redis_server_fixture(
    tmp_path: Path, redis_server_binary: str
) -> AsyncIterator[ServerProcess]:
    """A fresh ``redis-server`` on a free loopback port, no persistence."""
    server = _redis_process(tmp_path, redis_server_binary)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(kill=True)


@contextlib.contextmanager
def redis_client(server: ServerProcess) -> Iterator[redis.Redis]:
    """A synchronous client of ``server`` with decoded replies, for a test's own keys."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(name="rdb")
def rdb_fixture(redis_server: ServerProcess) -> Iterator[redis.Redis]:
    """:func:`redis_client` of ``redis_server``."""
    with redis_client(redis_server) as client:
        yield client


@pytest.fixture(name="redis_notify_server")
async def redis_notify_server_fixture(
    tmp_path: Path, redis_server_binary: str
) -> AsyncIterator[ServerProcess]:
    """As ``redis_server``, with keyspace notifications for lists and streams on (``Klt``),
    from the command line, so that they survive a restart."""
    server = _redis_process(tmp_path, redis_server_binary, "--notify-keyspace-events", "Klt")
    await server.start()
    try:
        yield server
    finally:
        await server.stop(kill=True)


@pytest.fixture(name="nats_server")
async def nats_server_fixture(
    tmp_path: Path, nats_server_binary: str
) -> AsyncIterator[ServerProcess]:
    """A fresh ``nats-server`` with JetStream on a free loopback port."""
    binary = nats_server_binary
    store_dir = tmp_path / "jetstream"
    store_dir.mkdir()

    def argv_for(port: int) -> list[str]:
        return [binary, "-js", "-p", str(port), "-a", "127.0.0.1", "--store_dir", str(store_dir)]

    server = ServerProcess(
        "nats-server", argv_for, _nats_ready, scheme="nats", log_path=tmp_path / "nats.log"
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(name="silent_server")
async def silent_server_fixture(nursery: trio.Nursery) -> int:
    """The port of a loopback listener that accepts every connection and never answers."""

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, hold, 0, host="127.0.0.1")
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


# -- Prometheus (for the --prometheus demand source) ------------------------------------
#
# ``prometheus_exporter`` serves a registry of its own with prometheus_client (a thread
# on a free loopback port); ``prometheus_server`` is Debian's ``prometheus`` scraping it
# every PROMETHEUS_SCRAPE_S, with a temporary config and data directory. A test sets the
# exporter's metrics, then waits for Prometheus to have scraped them.

#: How often the test Prometheus scrapes the exporter.
PROMETHEUS_SCRAPE_S = 0.5


class PrometheusExporter:
    """A ``/metrics`` endpoint on ``127.0.0.1:port`` serving ``registry``."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry()
        self._server, self._thread = start_http_server(0, "127.0.0.1", registry=self.registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


@pytest.fixture(name="prometheus_exporter")
def prometheus_exporter_fixture() -> Iterator[PrometheusExporter]:
    exporter = PrometheusExporter()
    try:
        yield exporter
    finally:
        exporter.close()


@pytest.fixture(name="prometheus_binary")
def prometheus_binary_fixture() -> str:
    return find_binary("prometheus", "prometheus")


async def _prometheus_ready(port: int) -> bool:
    line = await _first_line(port, b"GET /-/ready HTTP/1.0\r\n\r\n")
    return line.startswith(b"HTTP/1.") and line[8:13] == b" 200 "


@pytest.fixture(name="prometheus_server")
async def prometheus_server_fixture(
    tmp_path: Path, prometheus_binary: str, prometheus_exporter: PrometheusExporter
) -> AsyncIterator[ServerProcess]:
    """Debian's ``prometheus`` on a free loopback port, scraping ``prometheus_exporter``."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {int(PROMETHEUS_SCRAPE_S * 1000)}ms\n"
        f"  scrape_timeout: {int(PROMETHEUS_SCRAPE_S * 1000)}ms\n"
        "scrape_configs:\n"
        "  - job_name: test\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{prometheus_exporter.port}']\n"
    )
    data = tmp_path / "prometheus-data"
    data.mkdir()

    def argv_for(port: int) -> list[str]:
        return [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]

    server = ServerProcess(
        "prometheus", argv_for, _prometheus_ready, scheme="http", log_path=tmp_path / "prom.log"
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
