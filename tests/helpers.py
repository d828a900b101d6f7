"""Helpers shared by the test modules (fixtures that use them live in conftest.py).

* **In-memory connections** to a real worker: :class:`MemoryListener` hands
  ``trio.testing.memory_stream_pair()`` ends to the real HTTP server
  (``serve_http(..., listeners=[listener])``), :class:`MemoryBackend` lets httpx
  connect through it. The bytes go through the same protocol class, app and
  connection rules as on a socket, without a socket: for the cases that test how a
  request is parsed and answered, not how a socket behaves (timeouts, disconnects,
  TLS, floods and descriptors keep their real sockets).
* **Child-process output**: :class:`Output` reads a child's stdout and stderr as they
  come, and waits for what a test expects to see there.
* **Loopback ports**: servers of ours bind port 0 and say which port they got; only
  a third-party server that must be given a number gets one from
  :func:`free_port`, through :func:`start_on_free_port`, which retries on a port
  taken meanwhile. :func:`closed_port` keeps a port on which nothing listens
  (connections are refused) and nothing else can listen while it is held.
* **Waiting**: :func:`wait_until` polls a condition under a bound.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
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
    "closed_port",
    "free_port",
    "memory_http",
    "start_on_free_port",
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
        async for chunk in stream:
            setattr(self, name, getattr(self, name) + chunk.decode(errors="replace"))
            self.changed()

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


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port where connections are refused, for as long as the block runs.

    The port is bound (so no other process can listen on it meanwhile) but not
    listening: a connection to it is refused at once.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


# -- waiting ----------------------------------------------------------------------------


async def wait_until(
    predicate: Callable[[], object], *, within_s: float = 5.0, poll_s: float = 0.005
) -> None:
    """Return once ``predicate()`` is true, polling every ``poll_s``; fail after ``within_s``."""
    with trio.fail_after(within_s):
        while not predicate():
            await trio.sleep(poll_s)
