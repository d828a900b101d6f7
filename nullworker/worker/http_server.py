"""Serving an ASGI app with Hypercorn's HTTP/1.1 machinery, hardened for a public port.

Hypercorn's ``worker_serve`` is the model for :func:`serve_http`: a lifespan nursery, a
server nursery, ``started(binds)``, a shutdown trigger, then a graceful deadline. What
differs is the connection handling, because the worker port is open to the internet:

* **Sends are serialised.** Hypercorn's ``TCPServer`` sends response bytes under a lock
  but half-closes the socket (``send_eof``) without it. When a request's body is cut
  short and the client closes its side, the reader task answers ``400`` while the app's
  task closes the connection after its own response; the two send on one stream at once
  and trio raises ``BusyResourceError``, which Hypercorn lets escape and which ended the
  process. :class:`_Connection` closes under the same lock as every send.
* **Every connection ends once it stops making progress.** Headers must arrive within
  ``keep_alive_timeout`` (the reader keeps this deadline; it also ends idle keep-alive
  connections); a request body must be complete ``body_timeout_s`` after its headers;
  a send that the peer does not read is abandoned after ``send_timeout_s``. A request
  that is complete waits for its answer without a read deadline: that is a held
  reservation, ended by the client's disconnect.
* **A response is one write.** Hypercorn writes a response's head when the app starts
  the response and its body when the app sends it; a head with a Content-Length waits
  for its body, so the client gets one segment, and nothing is written for the empty
  end of such a body (fewer system calls and scheduler trips per request).
* **A close does not destroy the answer.** An answer sent before the request's body is
  all in (413, 404, 405) says ``connection: close``, and the server then half-closes
  and reads and drops what the client still sends for up to ``_LINGER_S`` before it
  closes (RFC 9112 §9.6): closing at once would answer those bytes with a RST, which
  can destroy the response the client has not read yet.
* **One connection cannot end the server.** An unexpected exception from one
  connection is logged with its traceback and closes that connection only.
* **Running out of file descriptors is a condition, not a crash loop.** ``accept``
  failing with ``EMFILE`` (and kin) is logged once per episode; the listener backs off
  and accepts again as soon as descriptors come back, while open connections (a held
  reservation) keep working. :func:`raise_nofile_limit` lifts the soft limit at start.

* **Only HTTP/1.1 is served** (no HTTP/2, no websockets): that is what the Vast engine
  and its clients speak, and what the progress rules above are written for. Hypercorn's
  HTTP/1.1 protocol switches to HTTP/2 on a prior-knowledge preface (``PRI * HTTP/2.0``)
  or an ``Upgrade: h2c`` request, and TLS offers ``h2`` by ALPN; HTTP/2's stream
  multiplexing escapes every rule above (a "rapid reset" flood kept the worker busy long
  after its client left). :class:`_H11Protocol` never switches: the preface gets a
  ``400`` and a close, an ``Upgrade`` header is ignored and the request answered as
  HTTP/1.1, and ALPN offers ``http/1.1`` only.
* **A body's length is never ambiguous.** A request with both ``Content-Length`` and
  ``Transfer-Encoding``, or ``Transfer-Encoding`` on HTTP/1.0, is how one request is
  smuggled inside another past a proxy that frames it differently (RFC 9112 §6.1,
  §6.3). h11 reads such a body as chunked and would serve what follows it as the next
  request; :class:`_H11Protocol` answers ``400`` and closes instead, as it does for
  every request h11 cannot frame (conflicting or non-numeric ``Content-Length``, a
  ``Transfer-Encoding`` other than ``chunked``), each with a JSON body naming the problem.

Concurrency invariants: each connection runs in its own task under the server nursery
(that task is its reader); the reader and the app's task share one ``send_lock``, and
only a holder of that lock writes to or half-closes the stream. At shutdown every live
connection's deadline is moved to now: idle ones close, held requests get their answer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import resource
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from math import inf
from typing import TYPE_CHECKING, Any

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, EndBody
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr, repr_socket_addr

if TYPE_CHECKING:
    from .config import WorkerConfig

__all__ = [
    "ConnectionLimits",
    "connection_limits",
    "listen",
    "raise_nofile_limit",
    "serve_http",
]

log = logging.getLogger("nullworker.http")

#: ``accept()`` errors that mean "out of descriptors or memory for now", not "broken".
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: How long the listener waits before accepting again while descriptors are exhausted.
_CAPACITY_BACKOFF_S = 0.1
#: The most one read takes off a connection (Hypercorn's figure).
_MAX_RECV = 2**16
#: After the server half-closes a connection whose client may still be sending (a
#: request body nobody read), how long its bytes are read and dropped before the close.
#: Closing at once would answer them with a RST, which can destroy the response the
#: client has not read yet.
_LINGER_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a connection may go without progress (seconds)."""

    #: From the end of a request's headers to the end of its body.
    body_timeout_s: float = 10.0
    #: One send of response bytes that the peer does not read.
    send_timeout_s: float = 10.0
    #: Idle keep-alive, and from connection start (or a response's end) to complete headers.
    keep_alive_timeout_s: float = 5.0
    #: Requests served on one keep-alive connection before it is closed.
    keep_alive_max_requests: int = 1000


def connection_limits(config: WorkerConfig) -> ConnectionLimits:
    """The connection deadlines for ``config``'s listeners (the worker's and the control
    listener): here, beside :class:`ConnectionLimits`, so the composition root and the
    routes both take them from the server layer.

    The body deadline is a second past the app's own (``BODY_TIMEOUT``), so a route
    that reads its body answers ``408`` first and the socket is closed after.
    """
    return ConnectionLimits(
        body_timeout_s=config.body_timeout_s + 1.0,
        send_timeout_s=config.send_timeout_s,
        keep_alive_timeout_s=config.keep_alive_timeout_s,
        keep_alive_max_requests=config.keep_alive_max_requests,
    )


def listen(host: str, port: int, *, keepalive: tuple[int, int, int] | None = None) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: ephemeral).

    ``keepalive`` is ``(idle_s, interval_s, count)`` for kernel TCP keepalive, which
    accepted connections inherit: a client that vanished without a FIN is then seen
    as gone in seconds rather than Linux's default two hours.

    Raises:
      OSError: with the address in its message (port in use, permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            names = ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")
            for name, value in zip(names, keepalive, strict=True):
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def raise_nofile_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit we have; the caller logs what is in force
    return soft


def _refusal(request: h11.Request) -> tuple[int, str] | None:
    """Why ``request`` is not served (status, message), or None: what h11 lets through.

    h11 itself refuses differing or non-numeric ``Content-Length`` values and any
    ``Transfer-Encoding`` but a lone ``chunked``; these are the rest.
    """
    if request.method == b"PRI" and request.target == b"*" and request.http_version == b"2.0":
        return 400, "HTTP/2 is not served on this port: speak HTTP/1.1"
    if request.http_version not in (b"1.0", b"1.1"):
        return 505, f"HTTP/{request.http_version.decode()} is not served: speak HTTP/1.1"
    names = {name for name, _ in request.headers}
    if b"transfer-encoding" in names:
        if b"content-length" in names:
            return 400, (
                "both Content-Length and Transfer-Encoding: the body's length is ambiguous"
            )
        if request.http_version == b"1.0":
            return 400, "Transfer-Encoding is not allowed in an HTTP/1.0 request"
    return None


def _has_upgrade(request: h11.Request) -> bool:
    return any(name == b"upgrade" for name, _ in request.headers)


def _without_upgrade(request: h11.Request) -> h11.Request:
    """``request`` without its ``Upgrade`` header, which no answer of this server accepts."""
    headers = [
        (name, value) for name, value in request.headers.raw_items() if name.lower() != b"upgrade"
    ]
    return h11.Request(
        method=request.method,
        target=request.target,
        headers=headers,
        http_version=request.http_version,
    )


class _H11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol that stays HTTP/1.1 and refuses ambiguous framing.

    ``_handle_events`` is Hypercorn's (0.18) with three changes: a request is checked by
    :func:`_refusal` where Hypercorn checked for a switch to HTTP/2 (``_check_protocol``,
    never called here); an ``Upgrade`` proposal is withdrawn before the request is served;
    and a request h11 cannot parse gets a JSON body naming the problem. Every refusal says
    ``connection: close`` and closes, so whatever follows the refused request on the
    connection (a smuggled second request, HTTP/2 frames) is read and dropped, never served.
    """

    async def _handle_events(self) -> None:
        while True:
            if self.connection.they_are_waiting_for_100_continue:
                await self._send_h11_event(
                    h11.InformationalResponse(
                        status_code=100, headers=self.config.response_headers("h11")
                    )
                )
            try:
                event = self.connection.next_event()
            except h11.RemoteProtocolError as error:
                # h11's hint is 501 for a Transfer-Encoding it does not implement; a
                # body whose framing is not understood is a 400 (RFC 9112 §6.3).
                status = 400 if error.error_status_hint == 501 else error.error_status_hint
                await self._refuse(status, f"malformed request: {str(error)[:200]}")
                break
            if isinstance(event, h11.Request):
                await self.send(Updated(idle=False))
                refusal = _refusal(event)
                if refusal is not None:
                    await self._refuse(*refusal)
                    break
                if _has_upgrade(event):
                    event = self._decline_upgrade(event)
                await self._create_stream(event)
            elif event is h11.PAUSED:
                await self.can_read.clear()
                await self.can_read.wait()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
                break
            elif self.stream is None:
                break
            elif isinstance(event, h11.Data):
                await self.stream.handle(Body(stream_id=STREAM_ID, data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self.stream.handle(EndBody(stream_id=STREAM_ID))

    def _decline_upgrade(self, request: h11.Request) -> h11.Request:
        """Withdraw ``request``'s ``Upgrade`` proposal; return it without the header.

        With a proposal pending, h11 pauses the connection from the end of the request
        until its answer (the switch might be accepted), so the reader would stop reading
        and a client that leaves during a held reservation would go unnoticed. The
        answer is never a ``101``, so the proposal is dropped at once (h11 keeps it in its
        private state machine; ``tests/test_versions.py`` pins the h11 this is written
        for). Without the header the app does not see a websocket handshake either.
        """
        connection: Any = self.connection
        connection._cstate.pending_switch_proposals.discard(h11._state._SWITCH_UPGRADE)
        return _without_upgrade(request)

    async def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``{"error": message}`` if nothing was answered yet; close."""
        if self.connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
            body = json.dumps({"error": message, "status": status}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *self.config.response_headers("h11"),
            ]
            await self._send_h11_event(h11.Response(status_code=status, headers=headers))
            await self._send_h11_event(h11.Data(data=body))
            await self._send_h11_event(h11.EndOfMessage())
        await self.send(Closed())


class _Connection(TCPServer):
    """Hypercorn's per-connection server with serialised sends and progress deadlines.

    The reader task holds the deadline: it waits for bytes under a cancel scope whose
    deadline is the connection's, so a connection costs one task besides the app's.
    (Hypercorn starts a second, its idle timer, and restarts it from whichever task
    reports a state change; after a response that is the app's task, already cancelled
    by Quart-Trio, so the timer never restarted and an idle keep-alive connection stayed
    open for good.) Here a state change only moves the deadline, a plain assignment that
    no cancellation can undo.
    """

    def __init__(self, limits: ConnectionLimits, *args: Any) -> None:
        super().__init__(*args)
        self._limits = limits
        self._deadline = trio.current_time() + limits.keep_alive_timeout_s
        self._watch: trio.CancelScope | None = None
        #: A response head waiting for its body (see :meth:`_is_response_head`).
        self._head = b""
        #: The stream is closed (or being closed): every later close is a no-op.
        self._closed = False
        #: The reader loop runs (it closes the stream when it ends).
        self._reading = False
        #: Half-closed by the server: the reader drops what comes until EOF or the
        #: linger deadline, then closes (see ``_LINGER_S``).
        self._lingering = False

    async def run(self) -> None:
        """Hypercorn's ``TCPServer.run`` without its idle-timer task (the reader keeps the
        deadline) and without a handshake timeout around a plain socket."""
        stream: Any = self.stream
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return  # the handshake failed; the caller closes the stream
            sock = stream.transport_stream.socket
            ssl = True
        else:
            sock, ssl = getattr(stream, "socket", None), False
        try:
            # A stream without a socket (the tests' in-memory ones) has no addresses.
            client = None if sock is None else parse_socket_addr(sock.family, sock.getpeername())
            server = None if sock is None else parse_socket_addr(sock.family, sock.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                # HTTP/1.1 whatever ALPN said: Hypercorn's ``ProtocolWrapper`` would serve
                # HTTP/2 for ``h2`` and switch to it on a preface or an h2c upgrade.
                self.protocol: Any = _H11Protocol(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    ssl,
                    client,
                    server,
                    self.protocol_send,
                )
                await self.protocol.initiate()
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    def terminate(self) -> None:
        """The server is shutting down: close now unless a complete request awaits its answer."""
        self._set_deadline(-inf)

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if self._watch is not None:
            self._watch.deadline = deadline

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            data = event.data
            if self._head:
                # The response's head, held back for this: one write, one segment.
                data, self._head = self._head + data, b""
            elif not data:
                return  # the end of a Content-Length body writes nothing
            elif self._is_response_head(data):
                data = self._close_if_body_unread(data)
                if b"\r\ncontent-length:" in data.lower():
                    self._head = data  # see _is_response_head
                    return
            if not await self._send(data):
                await self.protocol.handle(Closed())
        elif isinstance(event, Closed):
            self._head = b""  # a head without its body: the response is cut off anyway
            await self._close()
            await self.protocol.handle(Closed())
        elif isinstance(event, Updated) and not self._lingering:
            # idle: the next request's headers are due; busy: this request's body is.
            timeout = (
                self._limits.keep_alive_timeout_s if event.idle else self._limits.body_timeout_s
            )
            self._set_deadline(trio.current_time() + timeout)

    def _h11(self) -> h11.Connection | None:
        h11_connection = getattr(getattr(self, "protocol", None), "connection", None)
        return h11_connection if isinstance(h11_connection, h11.Connection) else None

    def _is_response_head(self, data: bytes) -> bool:
        """True when ``data`` is the head of the response being sent.

        Hypercorn writes a response's head as soon as the app starts the response and
        its body when the app sends it, a moment later. A head with a Content-Length
        (every response of the app but the streaming ``/hold``) waits for its body, so
        the client gets one write (one segment, one wake-up) instead of two; whatever
        the connection writes next sends the head first.
        """
        h11_connection = self._h11()
        return (
            h11_connection is not None
            and h11_connection.our_state is h11.SEND_BODY
            and data.startswith(b"HTTP/1.1 ")
            and data.endswith(b"\r\n\r\n")
        )

    def _close_if_body_unread(self, head: bytes) -> bytes:
        """``head`` with ``connection: close`` when the request's body is not all in.

        An early answer (413 for a body over the limit, 404, 405) leaves the rest of the
        body unread, and Hypercorn then closes the connection after the response.
        Without the header the client would keep the connection for its next request
        and could send it just as the server closes (RFC 9112 §9.6: a server that
        closes says so).
        """
        h11_connection = self._h11()
        if h11_connection is None or h11_connection.their_state is not h11.SEND_BODY:
            return head
        if b"\r\nconnection: close\r\n" in head.lower():
            return head
        return head[:-2] + b"connection: close\r\n\r\n"

    async def _send(self, data: bytes) -> bool:
        """Write ``data`` under the send lock, within ``send_timeout_s``; False if it failed.

        A failed write (the peer is gone, or it did not read within the bound) closes the
        stream.
        """
        # A cancelled task sends nothing (the server is stopping, or the app's request
        # was cancelled), as when the lock's acquire was the first checkpoint.
        await trio.lowlevel.checkpoint_if_cancelled()
        lock = self.send_lock
        try:
            lock.acquire_nowait()  # the usual case, without a trip through the scheduler
        except trio.WouldBlock:
            await lock.acquire()
        try:
            with trio.move_on_after(self._limits.send_timeout_s, shield=True) as scope:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                else:
                    return True
            if scope.cancelled_caught:
                log.info("closing a connection that did not read its response")
            await self._abort()
            return False
        finally:
            lock.release()

    async def _read_data(self) -> None:
        # Hypercorn's reader, with the deadline: only the wait for bytes is cancelled
        # (trio's receive_some loses nothing then), never the protocol's handling of them.
        self._reading = True
        try:
            await self._read_loop()
        finally:
            self._reading = False
        self._watch = None
        await self.protocol.handle(Closed())

    async def _read_loop(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._deadline) as watch:
                self._watch = watch
                try:
                    data = await self._receive()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
            self._watch = None
            if watch.cancelled_caught:
                if self._lingering:
                    break  # the linger time is up: the stream closes now
                if trio.current_time() < self._deadline or self._keep_reading():
                    continue  # moved while the old one fired, or a complete request
                log.debug("closing a connection that made no progress in time")
                await self._abort()
                break
            if self._lingering:
                if not data:
                    break
                continue  # the answer is out: the rest of the request is not wanted
            await self.protocol.handle(RawData(data=bytes(data)))
            if not data:
                break
            del data  # the next bytes may be an hour away (a held request): keep none

    async def _receive(self) -> bytes | bytearray:
        stream: trio.abc.ReceiveStream = self.stream
        # Wait for readability first, then read what is there: the same as
        # ``receive_some`` alone, but the task that waits (every open connection's
        # reader, all the time) keeps a few small objects alive instead of the receive
        # path's stack of coroutines and its caught ``BlockingIOError``, and the empty
        # read before each wait is saved. Not for TLS (its stream may hold decrypted
        # bytes with nothing to read), nor for a closed socket (descriptor -1, which
        # trio must never be asked to watch): ``receive_some`` says it is closed.
        if isinstance(stream, trio.SocketStream) and stream.socket.fileno() >= 0:
            with contextlib.suppress(trio.ClosedResourceError):
                await trio.lowlevel.wait_readable(stream.socket)
        return await stream.receive_some(_MAX_RECV)

    def _keep_reading(self) -> bool:
        """The deadline passed: whether the connection lives on (reading for a disconnect)."""
        if self._awaiting_answer():
            # A complete request: a hold ends by its answer or the client's disconnect,
            # also while shutting down (the app answers held requests, then the stream
            # closes).
            self._deadline = inf
            return True
        return False

    def _awaiting_answer(self) -> bool:
        h11_connection = self._h11()
        if h11_connection is None:
            return False
        return h11_connection.their_state in (h11.DONE, h11.MUST_CLOSE) and (
            h11_connection.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY)
        )

    async def _close(self) -> None:
        # The root of the crash this module exists for: half-close only while no other
        # task is sending. The lock is not re-entrant, so a holder closes directly.
        if self._closed:
            return
        lock = self.send_lock
        if lock.statistics().owner is trio.lowlevel.current_task():
            await self._half_close_and_close()
            return
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self._limits.send_timeout_s, shield=True):
                await lock.acquire()
            if lock.statistics().owner is not trio.lowlevel.current_task():
                await self._abort()  # a send stuck past its own bound: cut it off
                return
        try:
            await self._half_close_and_close()
        finally:
            lock.release()

    async def _half_close_and_close(self) -> None:
        stream: trio.abc.Stream = self.stream
        if isinstance(stream, trio.SocketStream):
            if not self._lingering:
                # What ``send_eof`` does, without its checkpoint: no other task sends now.
                with contextlib.suppress(OSError):
                    stream.socket.shutdown(socket.SHUT_WR)
            if self._reading:
                # The client may still be sending: the reader drops its bytes until it
                # closes too or the linger time passes, then closes (``_LINGER_S``).
                if not self._lingering:
                    self._lingering = True
                    self._set_deadline(trio.current_time() + _LINGER_S)
                return
        # A TLS stream has no half-close.
        await self._abort()

    async def _abort(self) -> None:
        # Closing the stream wakes the reader, which tells the app the client is gone.
        if self._closed:
            return
        self._closed = True
        stream: trio.abc.Stream = self.stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()  # what ``aclose`` does, without its checkpoint
            return
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def serve_http(
    app: Any,
    config: HypercornConfig,
    sockets: Sockets,
    *,
    limits: ConnectionLimits = ConnectionLimits(),
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] = (),
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` (wrapped by ``hypercorn.utils.wrap_app``) on already-bound sockets.

    Args:
      app: the wrapped ASGI app.
      config: Hypercorn's settings (log, graceful timeout, TLS files).
      sockets: bound, listening sockets; secure ones get TLS.
      limits: the per-connection progress deadlines.
      shutdown_trigger: when it returns, stop accepting and give open connections
        ``config.graceful_timeout`` seconds before they are cancelled.
      listeners: more listeners, served like the sockets but with no URL in the binds:
        the tests serve in-memory streams through one, so that how a connection's
        bytes are parsed and answered is tested without a socket in the way.

    ``task_status.started()`` receives the bound URLs. The app's lifespan startup runs
    before that and its shutdown after the connections end, as under Hypercorn.
    """
    config.set_statsd_logger_class(StatsdLogger)
    config.keep_alive_timeout = limits.keep_alive_timeout_s
    config.keep_alive_max_requests = limits.keep_alive_max_requests
    config.alpn_protocols = ["http/1.1"]
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)

    serving: list[trio.abc.Listener[Any]] = [*listeners]
    binds: list[str] = []
    if sockets.secure_sockets:
        ssl_context = config.create_ssl_context()
        assert ssl_context is not None, "secure sockets need certfile and keyfile"
        for sock in sockets.secure_sockets:
            serving.append(
                trio.SSLListener(
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                    ssl_context,
                    https_compatible=True,
                )
            )
            binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
    for sock in sockets.insecure_sockets:
        serving.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            live: set[_Connection] = set()
            handler = partial(
                _serve_connection,
                partial(_Connection, limits, app, config, context, ConnectionState(lifespan_state)),
                live,
            )
            async with trio.open_nursery() as accepting:
                for listener in serving:
                    accepting.start_soon(_accept_loop, listener, handler, server_nursery)
                task_status.started(binds)
                if shutdown_trigger is not None:
                    await shutdown_trigger()
                else:
                    await trio.sleep_forever()
                accepting.cancel_scope.cancel()
            await context.terminated.set()
            for connection in list(live):
                connection.terminate()
            server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


class _DescriptorAlarm:
    """Says once per episode that ``accept`` is out of descriptors, and once that it is over.

    Descriptors are a per-process resource, so every listener of the process shares
    one alarm. An episode ends at the first successful ``accept`` after ``calm_s``
    seconds without a failed one, so a table that hovers at its limit is one episode,
    not a line per connection.
    """

    def __init__(self, calm_s: float = 1.0) -> None:
        self._calm_s = calm_s
        self._since: float | None = None
        self._last_failure = -inf
        self._failures = 0

    def failed(self, exc: OSError) -> None:
        now = trio.current_time()
        self._last_failure = now
        self._failures += 1
        if self._since is None:
            self._since = now
            log.warning(
                "cannot accept connections: %s (file descriptor limit %d); "
                "open connections keep working, new ones wait until some close",
                exc.strerror,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )

    def accepted(self) -> None:
        if self._since is None:
            return
        now = trio.current_time()
        if now - self._last_failure < self._calm_s:
            return
        log.warning(
            "accepting connections again after %.1f s short of descriptors (%d accepts deferred)",
            self._last_failure - self._since,
            self._failures,
        )
        self._since, self._failures = None, 0


_ALARM = _DescriptorAlarm()


async def _accept_loop(
    listener: trio.abc.Listener[Any],
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                _ALARM.failed(exc)
                await trio.sleep(_CAPACITY_BACKOFF_S)
                continue
            _ALARM.accepted()
            nursery.start_soon(handler, stream)


async def _serve_connection(
    make: Callable[[trio.abc.Stream], _Connection],
    live: set[_Connection],
    stream: trio.abc.Stream,
) -> None:
    connection: _Connection | None = None
    try:
        connection = make(stream)
        live.add(connection)
        await connection.run()
    except Exception:
        # A bug in the HTTP stack must cost one connection, never the process.
        log.exception("a connection failed and was closed")
    finally:
        if connection is None:
            await trio.aclose_forcefully(stream)
        else:
            live.discard(connection)
            await connection._abort()
            # The protocol objects refer back to the connection (their ``send``): drop
            # them now, so that its memory is freed at once, not at a later collection.
            connection.__dict__.pop("protocol", None)
            connection.__dict__.pop("_task_group", None)
