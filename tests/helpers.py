"""Helpers shared by the test modules (fixtures that use them live in conftest.py).

* **In-memory connections** to a real worker: :class:`MemoryListener` hands
  ``trio.testing.memory_stream_pair()`` ends to the real HTTP server
  (``serve_http(..., listeners=[listener])``), :class:`MemoryBackend` lets httpx
  connect through it. The bytes go through the same protocol class, app and
  connection rules as on a socket, without a socket: for the cases that test how a
  request is parsed and answered, not how a socket behaves (timeouts, disconnects,
  TLS, floods and descriptors keep their real sockets).
* **Child-process output**: :class:`Output` reads a child's stdout and stderr as they
  come, :class:`OutputLines` its stdout as lines, and each waits for what a test
  expects to see there.
* **Worker processes**: :func:`open_serve` starts ``nullworker serve`` with its log in
  a file, :func:`stop_process` stops a child within a bound.
* **Loopback ports**: servers of ours bind port 0 and say which port they got, or,
  where a test needs the number first (a restart on the same port), bind a
  :func:`reserved_port`. Only a third-party server that must be given a number gets
  one from :func:`free_port`, the fallback, whose start is retried on a fresh port when
  the first was taken meanwhile (``start_on_free_port``). :func:`closed_port` is a
  port on which nothing listens (connections are refused) and nothing else can
  listen until the process ends.
* **Waiting**: :func:`wait_until` polls a condition under a bound, :func:`wait_for_log`
  a log file for a pattern.
"""

from __future__ import annotations

import codecs
import contextlib
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpcore
import httpx
import trio
import trio.testing

__all__ = [
    "PORT_ATTEMPTS",
    "MemoryBackend",
    "MemoryListener",
    "Output",
    "OutputLines",
    "PortTaken",
    "closed_port",
    "closed_url",
    "free_port",
    "memory_http",
    "open_serve",
    "port_in_use",
    "read_log",
    "release_port",
    "reserved_port",
    "start_on_free_port",
    "start_on_free_port_sync",
    "stop_process",
    "wait_for_log",
    "wait_until",
]

T = TypeVar("T")

#: Fresh ports tried when the first pick was taken meanwhile by another process.
PORT_ATTEMPTS = 5


# -- in-memory connections --------------------------------------------------------------


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are in-memory stream pairs (as in trio's own tests).

    :meth:`connect` makes a pair, queues the server's end for :meth:`accept` and
    returns the client's end.
    """

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](64)

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("the listener is closed") from None

    async def aclose(self) -> None:
        self._receive.close()
        await trio.lowlevel.checkpoint()


class _MemoryNetworkStream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109  (httpcore's interface)
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            try:
                return bytes(await self._stream.receive_some(max_bytes))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            try:
                await self._stream.send_all(buffer)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        raise NotImplementedError("in-memory connections are plain HTTP")

    def get_extra_info(self, info: str) -> Any:
        return None


class MemoryBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network for httpx: every TCP connection is one to ``listener``."""

    def __init__(self, listener: MemoryListener) -> None:
        self._listener = listener

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _MemoryNetworkStream(await self._listener.connect())

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


@contextlib.asynccontextmanager
async def memory_http(
    listener: MemoryListener, **client_options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client whose connections, whatever the URL's host, go to ``listener``."""
    transport = httpx.AsyncHTTPTransport()
    # httpx builds its connection pool without a way to pass the network backend.
    transport._pool = httpcore.AsyncConnectionPool(network_backend=MemoryBackend(listener))
    async with httpx.AsyncClient(transport=transport, **client_options) as client:
        yield client


# -- child-process output ---------------------------------------------------------------


class Output:
    """What a child process printed so far on stdout (``out``) and stderr (``err``).

    Start :meth:`pump` for each stream in a nursery; :meth:`wait_until` then wakes up
    whenever new output arrives.
    """

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.out = ""
        self.err = ""
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream, name: str) -> None:
        """Read ``stream`` to its end into ``self.out`` or ``self.err`` (``name``)."""
        # Incremental: a character split between two reads is decoded whole.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for chunk in stream:
            setattr(self, name, getattr(self, name) + decoder.decode(chunk))
            self.changed()
        setattr(self, name, getattr(self, name) + decoder.decode(b"", final=True))

    def changed(self) -> None:
        """Wake up every waiter (new output arrived)."""
        self._changed.set()
        self._changed = trio.Event()

    async def next_change(self) -> None:
        """Return once new output arrives."""
        await self._changed.wait()

    async def wait_until(self, check: Callable[[], bool], *, within_s: float) -> None:
        with trio.fail_after(within_s):
            while not check():
                await self._changed.wait()


class OutputLines(Output):
    """A child's combined output read as lines (``lines``), for one stream (stdout)."""

    def __init__(self, process: trio.Process) -> None:
        super().__init__(process)
        self.lines: list[str] = []

    async def pump_lines(self) -> None:
        """Read the child's stdout to its end, line by line, into ``self.lines``."""
        assert self.process.stdout is not None
        buffer = b""
        async with self.process.stdout:
            while chunk := await self.process.stdout.receive_some(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                self.lines.extend(line.decode("utf-8", "replace") for line in lines)
                self.changed()

    async def wait_line(self, pattern: str, *, within_s: float) -> re.Match[str]:
        """The first line, seen so far or coming, that matches ``pattern``."""
        with trio.fail_after(within_s):
            seen = 0
            while True:
                changed = self._changed
                for line in self.lines[seen:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                seen = len(self.lines)
                await changed.wait()


# -- worker processes --------------------------------------------------------------------


async def open_serve(env: dict[str, str], log_path: Path, *args: str) -> trio.Process:
    """Start ``python -m nullworker serve ARGS`` with ``env``; its output appended to
    ``log_path``. Stop it with :func:`stop_process`."""
    with log_path.open("ab") as log:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "nullworker", "serve", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def stop_process(process: trio.Process, *, within_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if ``process`` is still running after ``within_s``; waits
    for it either way (also when the calling task is being cancelled)."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(within_s):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- loopback ports ---------------------------------------------------------------------


def free_port() -> int:
    """A loopback port that was free a moment ago: only for a third-party server that
    must be given a number, through :func:`start_on_free_port` (another process may
    take the port before the server binds it). Servers of ours bind port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_on_free_port(
    start: Callable[[int], Awaitable[T]], *, attempts: int = PORT_ATTEMPTS
) -> T:
    """``await start(port)`` on a fresh :func:`free_port` until it does not raise
    :class:`PortTaken` (at most ``attempts`` times)."""
    for attempt in range(attempts):
        try:
            return await start(free_port())
        except PortTaken:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def start_on_free_port_sync(start: Callable[[int], T], *, attempts: int = PORT_ATTEMPTS) -> T:
    """:func:`start_on_free_port` for a synchronous ``start`` (session fixtures)."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except PortTaken:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    """A server could not bind the port it was given: try another."""


def port_in_use(output: str) -> bool:
    """Whether a server's ``output`` says that its port was taken (each words it its own
    way, but all quote the system's message)."""
    return "address already in use" in output.lower() or "eaddrinuse" in output.lower()


#: The sockets behind :func:`closed_port`, held (bound, never listening) until the end.
_HELD: list[socket.socket] = []


def closed_port() -> int:
    """A loopback port where connections are refused, for the rest of this process.

    The port stays bound by a socket that never listens: a connection to it is refused
    at once, and no other process can listen on it meanwhile (a port merely closed
    again could be taken, and then answer, before the test is done with it).
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    port: int = sock.getsockname()[1]
    return port


def reserved_port() -> int:
    """A loopback port kept for a server of ours that must be given a number, for the
    rest of this process: one restarted on the same port (the per-port lock, the
    journal, ``start_server.sh``), or started as a child process by port number.

    The port stays bound by a socket with ``SO_REUSEADDR`` that never listens. Our
    servers bind with ``SO_REUSEADDR`` too (``nullworker.worker.http_server.listen``),
    which Linux allows beside a socket that does not listen; the kernel never hands
    the port out as an ephemeral one (``bind`` to port 0) while it is held, so no other
    test can take it between the pick and the server's bind. Until the server listens,
    connections to it are refused. Prefer port 0 and the bound address read back
    wherever the server can say it.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    port: int = sock.getsockname()[1]
    return port


def release_port(port: int) -> None:
    """Give up the hold on ``port`` (a :func:`reserved_port`), for a test that binds it
    itself without ``SO_REUSEADDR`` (to make a start fail)."""
    for sock in _HELD:
        if sock.getsockname()[1] == port:
            _HELD.remove(sock)
            sock.close()
            return
    raise AssertionError(f"port {port} is not held")


def closed_url() -> str:
    """``http://127.0.0.1:P`` on a :func:`closed_port`: nothing answers there."""
    return f"http://127.0.0.1:{closed_port()}"


# -- waiting ----------------------------------------------------------------------------


async def wait_until(
    predicate: Callable[[], object], *, within_s: float = 5.0, poll_s: float = 0.005
) -> None:
    """Return once ``predicate()`` is true, polling every ``poll_s``; fail after ``within_s``."""
    with trio.fail_after(within_s):
        while not predicate():
            await trio.sleep(poll_s)


def read_log(path: Path) -> str:
    """The text of the log file ``path`` so far ("" before it exists)."""
    return path.read_text(errors="replace") if path.exists() else ""


async def wait_for_log(path: Path, pattern: str, *, within_s: float = 30.0) -> re.Match[str]:
    """The first match of ``pattern`` in the log file ``path``, once it is written."""
    with trio.fail_after(within_s):
        while True:
            if match := re.search(pattern, read_log(path)):
                return match
            await trio.sleep(0.02)
