"""Hostile clients against a real worker: truncated, stalled and flooding connections.

Each test talks raw TCP to a real Hypercorn server on 127.0.0.1, then checks that the
worker still holds a reservation and that nothing was logged with a traceback. The
cases about how a request's bytes are parsed and answered (an ``Upgrade``, ambiguous
framing) send them over in-memory streams to the same server and app instead
(``start_memory_worker``): no socket is involved in what they test. The
timeouts are shortened through ``WorkerConfig`` so the progress deadlines are reached
in a fraction of a second; the code paths are the ones the defaults take.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio.lowlevel

from nullworker.worker.server import ServeInfo

from .conftest import StartMemoryWorker, StartWorker, envelope, runtime
from .helpers import reserved_port
from .test_tls import make_cert

URL = "http://127.0.0.1:1"

#: Requests whose body is cut short; the routes answer without reading the body.
TRUNCATED = {
    "health": b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
    "unknown path": b"GET /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
    "pyworker update": (
        b"POST /pyworker/update HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
    ),
    "chunked": (b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n40\r\nabc"),
    "reserve": b'POST /reserve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"auth',
}


def _addr(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def _read_to_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def _assert_reserves(info: ServeInfo, http: httpx.AsyncClient | None = None) -> None:
    """The worker holds a reservation (over ``http`` when given: an in-memory one)."""
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=5))
        response = await http.post(
            f"{info.url}/reserve", json=envelope(URL, payload={"duration": 0})
        )
    assert response.status_code == 200, response.text
    assert response.json()["released"] == "duration_elapsed"


@pytest.mark.parametrize("pattern", sorted(TRUNCATED))
@pytest.mark.parametrize("close", ["half-close", "close"])
async def test_truncated_request_then_fin_never_ends_the_worker(
    start_worker: StartWorker, caplog: pytest.LogCaptureFixture, pattern: str, close: str
) -> None:
    caplog.set_level(logging.INFO)
    info = await start_worker()
    host, port = _addr(info.url)
    for _ in range(50):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(TRUNCATED[pattern])
        if close == "half-close":
            await stream.send_eof()
            with trio.fail_after(5):
                await _read_to_eof(stream)  # the server closes its side too
        await stream.aclose()
    await trio.sleep(0.05)  # let the server finish with the last connections
    await _assert_reserves(info)
    assert _tracebacks(caplog) == []


async def test_keep_alive_limit_while_the_client_keeps_sending(
    start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    """Hypercorn closes a keep-alive connection after its Nth request; the client keeps
    pipelining requests into the closing connection."""
    caplog.set_level(logging.INFO)
    info = await start_worker(keep_alive_max_requests=20)
    host, port = _addr(info.url)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(50):
        stream = await trio.open_tcp_stream(host, port)
        answered = 0

        async def sender(stream: trio.SocketStream = stream) -> None:
            try:
                for _ in range(40):
                    await stream.send_all(request * 2)
                    await trio.lowlevel.checkpoint()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                try:
                    data = await _read_to_eof(stream)
                except trio.BrokenResourceError:
                    data = b""
                answered = data.count(b"HTTP/1.1 200")
                nursery.cancel_scope.cancel()
        await stream.aclose()
        assert answered <= 20
    await _assert_reserves(info)
    assert _tracebacks(caplog) == []


async def test_more_than_1000_requests_on_one_connection(
    start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    """The default limit (1,000): the 1,000th answer says ``connection: close``."""
    caplog.set_level(logging.INFO)
    info = await start_worker()
    host, port = _addr(info.url)
    stream = await trio.open_tcp_stream(host, port)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

    async def sender() -> None:
        try:
            for _ in range(105):
                await stream.send_all(request * 10)
                await trio.lowlevel.checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            try:
                data = await _read_to_eof(stream)
            except trio.BrokenResourceError:
                data = b""
            nursery.cancel_scope.cancel()
    await stream.aclose()
    assert 0 < data.count(b"HTTP/1.1 200") <= 1000
    await _assert_reserves(info)
    assert _tracebacks(caplog) == []


STALLED = {
    # headers never finished: the keep-alive/header deadline
    "headers": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ",
    # body never finished: the body deadline (the routes answer or wait first)
    "reserve body": b'POST /reserve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"a',
    "health body": TRUNCATED["health"],
    "update body": TRUNCATED["pyworker update"],
    # a complete request, then nothing: the idle keep-alive deadline
    "idle keep-alive": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
}


async def test_stalled_connections_are_closed_within_the_bound(
    start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body_s, idle_s = 0.5, 0.5
    info = await start_worker(body_timeout_s=body_s, keep_alive_timeout_s=idle_s)
    host, port = _addr(info.url)
    # the bound: the body deadline plus the connection layer's one-second grace, plus
    # slack for a loaded 2-core machine answering 750 connections at once (a connection
    # that is never closed fails by the fail_after below, far past this)
    bound_s = body_s + 1.0 + 3.0
    per_kind = 150
    closed_after: dict[str, list[float]] = {kind: [] for kind in STALLED}

    async def stall(kind: str) -> None:
        stream = await trio.open_tcp_stream(host, port)
        start = trio.current_time()
        await stream.send_all(STALLED[kind])
        try:
            with trio.fail_after(bound_s + 5):
                await _read_to_eof(stream)
        except trio.BrokenResourceError:
            pass  # a reset is a close too
        closed_after[kind].append(trio.current_time() - start)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for kind in STALLED:
            for _ in range(per_kind):
                nursery.start_soon(stall, kind)
        await trio.sleep(0.2)
        await _assert_reserves(info)  # served while hundreds of connections stall
    for kind, times in closed_after.items():
        assert len(times) == per_kind, kind
        assert max(times) < bound_s, (kind, max(times))
    await _assert_reserves(info)
    assert _tracebacks(caplog) == []


async def test_a_client_that_does_not_read_its_answers_is_cut_off(
    start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelined requests whose answers are never read fill the socket buffers; the
    stuck send is abandoned after ``send_timeout_s`` and the connection closed."""
    caplog.set_level(logging.INFO)
    info = await start_worker(send_timeout_s=0.5)
    host, port = _addr(info.url)
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    stream = trio.SocketStream(sock)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.move_on_after(20):
        try:
            while True:  # until the server stops reading and then closes
                with trio.fail_after(5):
                    await stream.send_all(request * 100)
        except (trio.BrokenResourceError, trio.TooSlowError):
            pass
    # drain: the server must have closed the connection (EOF or reset) by now
    with trio.fail_after(10):
        try:
            await _read_to_eof(stream)
        except trio.BrokenResourceError:
            pass
    await stream.aclose()
    await _assert_reserves(info)
    assert any("did not read its response" in r.getMessage() for r in caplog.records)
    assert _tracebacks(caplog) == []


# --- running out of file descriptors, in a real process with a low limit ---------------


@pytest.fixture
def low_fd_worker(tmp_path: Any) -> Iterator[LowFdWorker]:
    """``nullworker serve`` with RLIMIT_NOFILE 64 (soft = hard), standalone."""
    import resource

    ports = [reserved_port(), reserved_port()]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    env = {
        **os.environ,
        "WORKER_PORT": str(ports[0]),
        "NULLWORKER_CONTROL_PORT": str(ports[1]),
        "NULLWORKER_LOCK_DIR": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nullworker", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
    try:
        yield LowFdWorker(proc, ports[0], ports[1], log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class LowFdWorker:
    proc: subprocess.Popen[bytes]
    port: int
    control_port: int
    log_path: Path


async def _wait_for(url: str) -> Any:
    async with httpx.AsyncClient(timeout=2) as http:
        with trio.fail_after(20):
            while True:
                try:
                    response = await http.get(url)
                    if response.status_code == 200:
                        return response.json()
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)


async def test_running_out_of_descriptors_keeps_the_hold_and_recovers(
    low_fd_worker: LowFdWorker,
) -> None:
    w = low_fd_worker
    await _wait_for(f"http://127.0.0.1:{w.port}/health")

    # a held reservation, on its own connection
    hold = await trio.open_tcp_stream("127.0.0.1", w.port)
    data = json.dumps(envelope(URL, payload={"duration": 60})).encode()
    await hold.send_all(
        b"POST /reserve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    status = await _wait_for(f"http://127.0.0.1:{w.control_port}/status")
    assert status["busy"] is True

    # fill the worker's descriptor table with connections that send nothing
    flood = [await trio.open_tcp_stream("127.0.0.1", w.port) for _ in range(120)]
    await trio.sleep(1.5)  # the listener hits EMFILE and backs off, many times over
    assert w.proc.poll() is None, "the worker died"
    with trio.move_on_after(0.2) as nothing:
        await hold.receive_some(1)
    assert nothing.cancelled_caught, "the held reservation was answered early"

    for stream in flood:
        await stream.aclose()
    # descriptors come back: the worker serves again, and the hold survived
    status = await _wait_for(f"http://127.0.0.1:{w.control_port}/status")
    assert status["busy"] is True, status
    await trio.sleep(1.2)  # calm: the next accept ends the episode
    await _wait_for(f"http://127.0.0.1:{w.port}/health")
    await hold.aclose()
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(10) == 0
    log = w.log_path.read_text()
    assert log.count("cannot accept connections") == 1, log
    assert log.count("accepting connections again") == 1, log
    assert "Traceback" not in log, log


# --- HTTP/1.1 only: HTTP/2 prefaces, h2c upgrades and h2 floods -------------------------

#: The HTTP/2 client connection preface (RFC 9113 §3.4), sent with prior knowledge.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _h2_rapid_reset(streams: int) -> bytes:
    """A client's preface, then ``streams`` requests each cancelled at once (CVE-2023-44487)."""
    import h2.config
    import h2.connection

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    for _ in range(streams):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            stream_id,
            [(":method", "GET"), (":path", "/health"), (":scheme", "http"), (":authority", "x")],
        )
        conn.reset_stream(stream_id)
    return conn.data_to_send()


def _h2_data_on_closed_streams(streams: int) -> bytes:
    """Complete requests, then DATA frames on each (already ended) stream."""
    import h2.config
    import h2.connection

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    ids = []
    for _ in range(streams):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            stream_id,
            [(":method", "GET"), (":path", "/health"), (":scheme", "http"), (":authority", "x")],
            end_stream=True,
        )
        ids.append(stream_id)
    data = conn.data_to_send()
    return data + b"".join(_h2_frame(0, 1, stream_id, b"x" * 16) for stream_id in ids)


async def _exchange(host: str, port: int, data: bytes, *, then: bytes = b"") -> bytes:
    """Send ``data`` (and ``then``, after the first answer bytes), read to EOF or a reset."""
    stream = await trio.open_tcp_stream(host, port)
    received = b""
    try:
        with trio.fail_after(10):
            await stream.send_all(data)
            if then:
                received = await stream.receive_some(65536)
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(then)
            received += await _read_to_eof(stream)
    except trio.BrokenResourceError:
        pass  # a reset is a close too
    finally:
        await stream.aclose()
    return received


def _assert_http11_refusal(data: bytes, status: int) -> dict[str, Any]:
    """``data`` is exactly one HTTP/1.1 answer, ``status`` with a JSON error body."""
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:200]
    assert data.count(b"HTTP/1.1 ") == 1, data
    head, _, payload = data.partition(b"\r\n\r\n")
    assert b"\r\nconnection: close\r\n" in head.lower() + b"\r\n", head
    assert b"hypercorn-h2" not in data
    answer: dict[str, Any] = json.loads(payload)
    assert answer["error"]
    return answer


async def test_an_http2_preface_gets_an_http11_400_and_a_close(
    start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    info = await start_worker()
    assert info.control_url is not None
    for url in (info.url, info.control_url):  # the control listener has the same server
        host, port = _addr(url)
        for tail in (b"", _h2_rapid_reset(3)[len(H2_PREFACE) :]):
            data = await _exchange(host, port, H2_PREFACE + tail)
            assert "HTTP/2" in _assert_http11_refusal(data, 400)["error"]
        # any other version than HTTP/1.x: 505
        data = await _exchange(host, port, b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n")
        assert "HTTP/2.0" in _assert_http11_refusal(data, 505)["error"]
    await _assert_reserves(info)
    assert _tracebacks(caplog) == []


async def test_an_h2c_upgrade_is_ignored_and_answered_as_http11(
    start_memory_worker: StartMemoryWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    served = await start_memory_worker()
    upgrade = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    # twice on one connection, then a plain request: the connection stays HTTP/1.1
    closing = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = await served.exchange(upgrade * 2 + closing)
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    assert data.count(b"HTTP/1.1 200 ") == 3, data
    assert b" 101 " not in data and b"hypercorn-h2" not in data
    assert b"upgrade" not in data.lower()
    await _assert_reserves(served.info, served.http)
    assert _tracebacks(caplog) == []


async def test_a_reservation_held_with_an_upgrade_header_ends_at_the_disconnect(
    start_worker: StartWorker,
) -> None:
    """A pending upgrade would pause the reader until the answer: the client's leaving
    would go unseen and the reservation keep the slot for its whole duration."""
    info = await start_worker()
    host, port = _addr(info.url)
    slot = runtime(info).slot
    data = json.dumps(envelope(URL, payload={"duration": 600})).encode()
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(
        b"POST /reserve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    with trio.fail_after(10):
        while not slot.statistics().busy:
            await trio.sleep(0.01)
    await stream.aclose()
    with trio.fail_after(10):
        while slot.statistics().busy:
            await trio.sleep(0.01)
    assert slot.statistics().counts["cancelled"] == 1
    await _assert_reserves(info)


@pytest.mark.parametrize("pattern", ["rapid reset", "data on closed streams"])
async def test_h2_floods_are_refused_without_an_error_and_the_worker_serves_on(
    start_worker: StartWorker, caplog: pytest.LogCaptureFixture, pattern: str
) -> None:
    caplog.set_level(logging.INFO)
    info = await start_worker()
    host, port = _addr(info.url)
    if pattern == "rapid reset":
        first, then = _h2_rapid_reset(200), b""
    else:
        # the requests first, the DATA frames once the answers are under way
        flood = _h2_data_on_closed_streams(50)
        frames_at = flood.index(_h2_frame(0, 1, 1, b"x" * 16))
        first, then = flood[:frames_at], flood[frames_at:] * 4
    results: list[bytes] = []

    async def one() -> None:
        results.append(await _exchange(host, port, first, then=then))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
        await _assert_reserves(info)  # served during the flood
    for data in results:
        assert data == b"" or data.startswith(b"HTTP/1.1 400 "), data[:200]
        assert b"hypercorn-h2" not in data
    await _assert_reserves(info)
    counts = runtime(info).slot.statistics().counts
    assert counts.get("cancelled", 0) == 0, counts
    assert _tracebacks(caplog) == []


# --- no request smuggling: every framing conflict is a 400 and a close ----------------

_SMUGGLED = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"

#: Request heads whose body length is ambiguous or unsupported (RFC 9112 §6.1, §6.3).
AMBIGUOUS = {
    "content-length and chunked": (
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "chunked and content-length": (
        b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 40\r\n\r\n0\r\n\r\n"
    ),
    "two content-lengths": (
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 2\r\n\r\nab"
    ),
    "a content-length list": b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 2\r\n\r\nab",
    "a signed content-length": b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\nab",
    "a hex content-length": b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\nab",
    "chunked not last": (
        b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
    ),
    "gzip then chunked": (
        b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    ),
    "two transfer-encodings": (
        b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "chunked on HTTP/1.0": (
        b"POST /health HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("pattern", sorted(AMBIGUOUS))
async def test_ambiguous_framing_gets_400_and_the_smuggled_request_is_never_served(
    start_memory_worker: StartMemoryWorker, caplog: pytest.LogCaptureFixture, pattern: str
) -> None:
    caplog.set_level(logging.INFO)
    served = await start_memory_worker()
    data = await served.exchange(AMBIGUOUS[pattern] + _SMUGGLED)
    _assert_http11_refusal(data, 400)  # one answer: the 404 for /nowhere never comes
    assert not runtime(served.info).slot.statistics().busy
    await _assert_reserves(served.info, served.http)
    assert _tracebacks(caplog) == []


@pytest.mark.parametrize("offered", [["h2", "http/1.1"], ["h2"]])
async def test_tls_alpn_never_selects_h2(
    start_worker: StartWorker, tmp_path: Path, offered: list[str]
) -> None:
    cert, key = make_cert(tmp_path)
    info = await start_worker(use_ssl=True, ssl_certfile=str(cert), ssl_keyfile=str(key))
    host, port = _addr(info.url)
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(offered)
    stream = trio.SSLStream(await trio.open_tcp_stream(host, port), context, server_hostname=host)
    with trio.fail_after(10):
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() == ("http/1.1" if "http/1.1" in offered else None)
        # a client that assumes h2 anyway gets an HTTP/1.1 refusal
        await stream.send_all(_h2_rapid_reset(2) if offered == ["h2"] else _SMUGGLED)
        data = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while b"\r\n\r\n" not in data and (chunk := await stream.receive_some(65536)):
                data += chunk
    await trio.aclose_forcefully(stream)
    assert data.startswith(b"HTTP/1.1 400 " if offered == ["h2"] else b"HTTP/1.1 404 "), data
    assert b"hypercorn-h2" not in data
