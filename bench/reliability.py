"""Reliability benchmark: hostile clients, stalled connections, a reservation flood, SIGTERM
with held and queued reservations, and running out of file descriptors.

    .venv/bin/python bench/reliability.py [--quick]

Each phase starts its own `python -m nullworker serve` (standalone, free ports on 127.0.0.1,
control listener on, the default connection limits) and talks to it over raw TCP, as a hostile
or careless client would. It prints a markdown table (measurement, result, check) and exits 1
if a check failed; a time check allows 1 s of scheduling slack over the documented bound.
Every loop is bounded by a count and every wait by a deadline. A full run takes about 30 s on
2 cores (the http2 phase about 5 s of it); `--quick` shrinks the counts for a smoke run (about
25 s: the stalled-body phase still waits out the default 10 s body deadline).

Phases:
  hostile      truncated requests then FIN (or an abrupt close), 50 of each pattern; 1,100
               requests pipelined on one keep-alive connection (past the 1,000 limit)
  stalled      200 each of: unfinished headers, unfinished body to /reserve and to /health,
               a complete request then an idle keep-alive; time until the server closes each,
               and a normal reservation served meanwhile
  concurrency  1,000 concurrent POST /reserve (duration 2) with MAX_QUEUE_TIME=0: all answered,
               holds never overlap (the worker's log), then the slot is free
  signals      1 held and 3 queued reservations, then SIGTERM
  descriptors  RLIMIT_NOFILE 64: a held reservation while 120 idle connections exhaust the table
  http2        HTTP/2 on the HTTP/1.1 port, for 2 s each (loopback, bounded by a count): a
               "rapid reset" flood (HTTP/2 requests each cancelled at once, CVE-2023-44487)
               from 40 clients, then DATA frames on answered streams from 100; worker CPU
               seconds, log bytes, a reservation during and after, and the time until the
               worker is idle again

`--phases hostile,http2` runs only those phases (all by default).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import trio

HOST = "127.0.0.1"
STEP_LIMIT_S = 30.0
#: The documented bounds with the default limits (seconds).
HEADERS_IDLE_S = 5.0
BODY_408_S = 10.0
BODY_CLOSE_S = 11.0
#: Scheduling slack allowed on top of a documented bound before a check fails.
SLACK_S = 1.0

#: Requests whose body is cut short (the routes answer without reading it, except /reserve).
TRUNCATED = {
    "GET /health, Content-Length 100, 10 bytes": (
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
    ),
    "GET unknown path, Content-Length 100, 10 bytes": (
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
    ),
    "POST /pyworker/update, Content-Length 100, 10 bytes": (
        b"POST /pyworker/update HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
    ),
    "POST /health, incomplete chunked body": (
        b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n40\r\nabc"
    ),
    "POST /reserve, Content-Length 100, 7 bytes": (
        b'POST /reserve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"auth'
    ),
}

#: Connections that stop making progress: (bytes sent, documented bound, what it documents).
STALLED = {
    "unfinished headers": (
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        HEADERS_IDLE_S,
        "closed at 5 s",
    ),
    "unfinished body to /reserve": (
        b'POST /reserve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"a',
        BODY_CLOSE_S,
        f"408 at {BODY_408_S:.0f} s, closed by {BODY_CLOSE_S:.0f} s",
    ),
    "unfinished body to /health": (
        TRUNCATED["GET /health, Content-Length 100, 10 bytes"],
        BODY_CLOSE_S,
        f"closed by {BODY_CLOSE_S:.0f} s",
    ),
    "complete request, then idle keep-alive": (
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        HEADERS_IDLE_S,
        "closed 5 s after the answer",
    ),
}

#: Environment that would put the worker in Vast mode or change its settings.
_WORKER_ENV = {
    "REPORT_ADDR",
    "CONTAINER_ID",
    "PUBLIC_IPADDR",
    "MASTER_TOKEN",
    "UNSECURED",
    "USE_SSL",
    "WORKER_PORT",
    "MAX_QUEUE_TIME",
    "MAX_RESERVATION_SECONDS",
    "NULL_CONTROL_PORT",
}

_REQUEST_IDX = itertools.count(1)


@dataclass
class Row:
    phase: str
    measurement: str
    result: str
    ok: bool | None = None  # None: a figure, not a check


ROWS: list[Row] = []


def row(phase: str, measurement: str, result: str, ok: bool | None = None) -> None:
    ROWS.append(Row(phase, measurement, result, ok))


# --- the worker process -------------------------------------------------------------------


@dataclass
class Worker:
    proc: trio.Process
    port: int
    control_port: int
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _create(path: Path) -> BinaryIO:
    return open(path, "wb")  # the child's stdout; a local file, so opening it does not block


def _limit_nofile(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@asynccontextmanager
async def worker(
    tmp: Path, name: str, *, env: dict[str, str] | None = None, nofile: int | None = None
) -> AsyncIterator[Worker]:
    """`python -m nullworker serve`, standalone, ready; SIGTERM (then SIGKILL) on the way out."""
    port, control_port = _free_ports(2)
    child_env = {
        k: v
        for k, v in os.environ.items()
        if k not in _WORKER_ENV and not k.startswith(("NULLWORKER_", "VAST_TCP_PORT_"))
    }
    child_env |= {
        "WORKER_PORT": str(port),
        "NULLWORKER_CONTROL_PORT": str(control_port),
        "NULLWORKER_LOCK_DIR": str(tmp),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_path = tmp / f"{name}.log"
    with _create(log_path) as out:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "nullworker", "serve"],
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=partial(_limit_nofile, nofile) if nofile else None,
        )
    w = Worker(proc, port, control_port, log_path)
    try:
        with trio.fail_after(STEP_LIMIT_S):
            while (await _get_json(port, "/health", quiet=True)) is None:
                if not w.alive():
                    raise RuntimeError(f"the {name} worker exited at start:\n{w.log()}")
                await trio.sleep(0.05)
        yield w
    finally:
        if w.alive():
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await proc.wait()
            if w.alive():
                proc.kill()
                await proc.wait()


def check_log(phase: str, w: Worker) -> None:
    text = w.log()
    tracebacks = text.count("Traceback")
    errors = sum(1 for line in text.splitlines() if " ERROR " in line)
    row(phase, "worker output: tracebacks, ERROR lines", f"{tracebacks}, {errors}", tracebacks == 0)


# --- raw HTTP/1.1 -------------------------------------------------------------------------


async def _connect(port: int) -> trio.SocketStream:
    with trio.fail_after(5):
        return await trio.open_tcp_stream(HOST, port)


async def _read_to_eof(stream: trio.SocketStream, limit: int = 1 << 22) -> bytes:
    """Everything until the server closes (EOF, or a reset: a close too)."""
    data = bytearray()
    while len(data) <= limit:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _request(method: str, path: str, body: bytes = b"", *, close: bool = True) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
    if method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def _reserve_body(duration: float) -> bytes:
    idx = next(_REQUEST_IDX)  # a fresh request_idx each time: a live one is refused (409)
    auth = {
        "signature": "",
        "url": "http://127.0.0.1:1",
        "cost": 100,
        "endpoint": "bench",
        "reqnum": idx,
        "request_idx": idx,
    }
    return json.dumps({"auth_data": auth, "payload": {"duration": duration}}).encode()


def _parse(data: bytes) -> tuple[int | None, Any]:
    """Status and JSON body (or text) of the first response in ``data``."""
    if not data.startswith(b"HTTP/1."):
        return None, None
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        rest = bytes(body)
    try:
        return status, json.loads(rest)
    except ValueError:
        return status, rest.decode(errors="replace")


async def _http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int | None, Any]:
    with trio.fail_after(STEP_LIMIT_S):
        stream = await _connect(port)
        async with stream:
            await stream.send_all(_request(method, path, body))
            return _parse(await _read_to_eof(stream))


async def _get_json(port: int, path: str, *, quiet: bool = False) -> Any:
    """The JSON of a 200 answer, or None (when ``quiet``, also on a refused connection)."""
    try:
        status, body = await _http(port, "GET", path)
    except OSError:
        if quiet:
            return None
        raise
    return body if status == 200 else None


async def _reserve(port: int, duration: float = 0) -> tuple[int | None, Any, float]:
    start = time.monotonic()
    status, body = await _http(port, "POST", "/reserve", _reserve_body(duration))
    return status, body, time.monotonic() - start


async def _open_reserve(port: int, duration: float) -> trio.SocketStream:
    stream = await _connect(port)
    await stream.send_all(_request("POST", "/reserve", _reserve_body(duration)))
    return stream


async def _status_until(w: Worker, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    with trio.fail_after(STEP_LIMIT_S):
        while True:
            status = await _get_json(w.control_port, "/status", quiet=True)
            if status is not None and predicate(status):
                return dict(status)
            await trio.sleep(0.02)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _p50_max(samples: list[float]) -> str:
    return f"p50 {_ms(statistics.median(samples))}, max {_ms(max(samples))}"


def _counts(counter: Counter[Any]) -> str:
    return ", ".join(f"{k if k is not None else 'none'} x{n}" for k, n in sorted(counter.items()))


async def check_reserves(phase: str, w: Worker, when: str) -> None:
    status, body, took = await _reserve(w.port, 0)
    released = body.get("released") if isinstance(body, dict) else body
    row(
        phase,
        f"POST /reserve (duration 0) {when}",
        f"{status} {released}, {_ms(took)}; process alive: {w.alive()}",
        status == 200 and w.alive(),
    )


# --- 1. hostile requests ------------------------------------------------------------------


async def phase_hostile(tmp: Path, count: int) -> None:
    phase = "hostile"
    async with worker(tmp, "hostile") as w:
        for name, raw in TRUNCATED.items():
            answers: Counter[int | None] = Counter()
            closed_after: list[float] = []
            for _ in range(count):  # then FIN: the server answers (or not) and closes
                stream = await _connect(w.port)
                start = time.monotonic()
                async with stream:
                    await stream.send_all(raw)
                    await stream.send_eof()
                    with trio.fail_after(STEP_LIMIT_S):
                        data = await _read_to_eof(stream)
                closed_after.append(time.monotonic() - start)
                answers[_parse(data)[0]] += 1
            for _ in range(count):  # then an abrupt close, as in the original report
                stream = await _connect(w.port)
                await stream.send_all(raw)
                await stream.aclose()
            await trio.sleep(0.05)
            row(
                phase,
                f"{name}: x{count} then FIN, x{count} then close",
                f"answers after FIN: {_counts(answers)}; server closed after "
                f"{_p50_max(closed_after)}; alive: {w.alive()}",
                w.alive(),
            )

        request = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"
        total = 1100
        stream = await _connect(w.port)
        start = time.monotonic()

        async def sender() -> None:
            try:
                for _ in range(total // 100):
                    await stream.send_all(request * 100)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server closed after its last answer

        async with stream:
            with trio.fail_after(STEP_LIMIT_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender)
                    data = await _read_to_eof(stream)
                    nursery.cancel_scope.cancel()
        answered = data.count(b"HTTP/1.1 200")
        last_closes = data.rfind(b"connection: close") > data.rfind(b"HTTP/1.1 200 ") > 0
        row(
            phase,
            f"{total} GET /health pipelined on one keep-alive connection",
            f"{answered} answered (200), last says connection: close: {last_closes}, "
            f"then closed; {_ms(time.monotonic() - start)}",
            0 < answered <= 1000 and w.alive(),
        )
        await check_reserves(phase, w, "afterwards")
        check_log(phase, w)


# --- 2. stalled connections ---------------------------------------------------------------


async def phase_stalled(tmp: Path, per_kind: int) -> None:
    phase = "stalled"
    async with worker(tmp, "stalled") as w:
        closed: dict[str, list[float]] = {kind: [] for kind in STALLED}
        never: Counter[str] = Counter()
        first: dict[str, Counter[int | None]] = {kind: Counter() for kind in STALLED}
        first_at: dict[str, list[float]] = {kind: [] for kind in STALLED}
        meanwhile: list[tuple[float, int | None, float]] = []

        async def stall(kind: str) -> None:
            raw, bound, _ = STALLED[kind]
            stream = await _connect(w.port)
            start = time.monotonic()
            data = bytearray()
            async with stream:
                await stream.send_all(raw)
                with trio.move_on_after(bound + 5) as waited:
                    while True:
                        try:
                            chunk = await stream.receive_some(65536)
                        except trio.BrokenResourceError:
                            break  # a reset is a close too
                        if not chunk:
                            break
                        if not data:
                            first_at[kind].append(time.monotonic() - start)
                        data += chunk
            if waited.cancelled_caught:
                never[kind] += 1
            else:
                closed[kind].append(time.monotonic() - start)
            first[kind][_parse(bytes(data))[0]] += 1

        async def probe(at: float) -> None:
            await trio.sleep(at)
            status, _, took = await _reserve(w.port, 0)
            meanwhile.append((at, status, took))

        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(per_kind):
                for kind in STALLED:
                    nursery.start_soon(stall, kind)
            for at in (1.0, 7.0):  # while all stall; while only the bodies still do
                nursery.start_soon(probe, at)
        elapsed = time.monotonic() - start

        for kind, (_, bound, documented) in STALLED.items():
            times = closed[kind]
            answered = _counts(first[kind])
            if first_at[kind]:
                answered += f" (first byte {_p50_max(first_at[kind])})"
            within = bool(times) and not never[kind] and max(times) <= bound + SLACK_S
            row(
                phase,
                f"{per_kind} x {kind} (documented: {documented})",
                f"closed after {_p50_max(times) if times else '-'}; not closed in "
                f"{bound + 5:.0f} s: {never[kind]}; answers: {answered}",
                within,
            )
        for at, status, took in sorted(meanwhile):
            row(
                phase,
                f"POST /reserve (duration 0) {at:.0f} s into the stall",
                f"{status}, {_ms(took)}",
                status == 200,
            )
        row(phase, "phase duration", _ms(elapsed))
        await check_reserves(phase, w, "afterwards")
        check_log(phase, w)


# --- 3. concurrency -----------------------------------------------------------------------


async def phase_concurrency(tmp: Path, count: int) -> None:
    phase = "concurrency"
    async with worker(tmp, "concurrency", env={"MAX_QUEUE_TIME": "0"}) as w:
        answers: list[tuple[int | None, Any, float]] = []
        sent: list[float] = []
        start, wall_start = time.monotonic(), time.time()

        async def one() -> None:
            stream = await _open_reserve(w.port, 2)
            sent.append(time.monotonic() - start)
            async with stream:
                status, body = _parse(await _read_to_eof(stream))
            answers.append((status, body, time.monotonic() - start))

        with trio.fail_after(STEP_LIMIT_S):
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(one)
        statuses = Counter(status for status, _, _ in answers)
        rejected = [t for status, _, t in answers if status == 429]
        # A request read after the first hold ended finds the slot free again; but two
        # holds must never overlap. The worker's log (written in event order) says when.
        holds, overlap = _holds_from_log(w.log(), wall_start)
        row(
            phase,
            f"{count} concurrent POST /reserve (duration 2), MAX_QUEUE_TIME=0",
            f"{len(answers)} answered: {_counts(statuses)}",
            len(answers) == count
            and set(statuses) <= {200, 429}
            and statuses[200] == len(holds) >= 1,
        )
        row(
            phase,
            "holds in the worker's log (s after the first request; never two at once)",
            ", ".join(f"{a:.2f}-{b:.2f}" for a, b in holds),
            bool(holds) and not overlap,
        )
        row(phase, "all requests sent (connected, written) after", _ms(max(sent)))
        if rejected:
            row(phase, "all 429s answered after", _ms(max(rejected)))
        row(phase, "every request answered after", _ms(max(t for *_, t in answers)))
        status = await _status_until(w, lambda s: True)
        counts = status.get("counts", {})
        row(
            phase,
            "then /status (control port): busy, queue_length, counts started/rejected",
            f"{status['busy']}, {status['queue_length']}, "
            f"{counts.get('started')}/{counts.get('rejected')}",
            status["busy"] is False
            and status["queue_length"] == 0
            and counts.get("started") == len(holds)
            and counts.get("rejected") == len(rejected),
        )
        await check_reserves(phase, w, "afterwards")
        check_log(phase, w)


_LOG_EVENT = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ nullworker: reservation (\d+) "
    r"\(request_idx \S+\) (held for up to|ended: )"
)


def _holds_from_log(text: str, wall_start: float) -> tuple[list[tuple[float, float]], bool]:
    """(start, end) of each hold, in seconds after ``wall_start``; and whether two overlapped."""
    started: dict[str, float] = {}
    holds: list[tuple[float, float]] = []
    active = 0
    overlap = False
    for line in text.splitlines():
        match = _LOG_EVENT.match(line)
        if match is None:
            continue
        stamp, rid, what = match.groups()
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - wall_start
        if what.startswith("held"):
            active += 1
            overlap |= active > 1
            started[rid] = at
        elif rid in started:  # a rejected one never started
            active -= 1
            holds.append((started.pop(rid), at))
    return holds, overlap


# --- 4. signals ---------------------------------------------------------------------------


async def phase_signals(tmp: Path) -> None:
    phase = "signals"
    async with worker(tmp, "signals") as w:
        streams = [await _open_reserve(w.port, 60)]
        await _status_until(w, lambda s: s["busy"] is True)
        streams += [await _open_reserve(w.port, 60) for _ in range(3)]
        await _status_until(w, lambda s: s["queue_length"] == 3)
        answers: list[tuple[str, int | None, Any, float]] = []
        exited: list[float] = []

        async def answer(role: str, stream: trio.SocketStream) -> None:
            async with stream:
                status, body = _parse(await _read_to_eof(stream))
            answers.append((role, status, body, time.monotonic() - start))

        async def exit_() -> None:
            await w.proc.wait()
            exited.append(time.monotonic() - start)

        start = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP_LIMIT_S):
            async with trio.open_nursery() as nursery:
                for i, stream in enumerate(streams):
                    nursery.start_soon(answer, "held" if i == 0 else "queued", stream)
                nursery.start_soon(exit_)
        for role in ("held", "queued"):
            got = Counter(
                f"{status} {json.dumps(body, separators=(',', ':'))}"
                if role == "queued"
                else f"{status} released={body.get('released') if isinstance(body, dict) else body}"
                for r, status, body, _ in answers
                if r == role
            )
            row(phase, f"SIGTERM: the {role} reservation(s) answered", _counts(got))
        row(
            phase,
            "SIGTERM with 1 held + 3 queued: all 4 answered",
            f"{len(answers)} answered, the last {_ms(max(t for *_, t in answers))} after SIGTERM",
            len(answers) == 4 and all(status == 503 for _, status, _, _ in answers),
        )
        row(
            phase,
            "SIGTERM → process exit",
            f"{_ms(exited[0])}, exit code {w.proc.returncode}",
            w.proc.returncode == 0,
        )
        check_log(phase, w)


# --- 5. descriptor exhaustion -------------------------------------------------------------


async def phase_descriptors(tmp: Path, flood_size: int) -> None:
    phase = "descriptors"
    async with worker(tmp, "descriptors", nofile=64) as w:
        hold = await _open_reserve(w.port, 60)
        await _status_until(w, lambda s: s["busy"] is True)
        flood = [await _connect(w.port) for _ in range(flood_size)]
        await trio.sleep(1.5)  # the listener hits EMFILE and backs off, many times over
        alive = w.alive()
        with trio.move_on_after(0.2) as nothing:
            early = await hold.receive_some(1)
        held = nothing.cancelled_caught
        row(
            phase,
            f"RLIMIT_NOFILE 64: a held reservation, then {flood_size} idle connections, 1.5 s",
            f"process alive: {alive}; hold answered early: {not held}"
            + ("" if held else f" ({early!r})"),
            alive and held,
        )
        for stream in flood:
            await stream.aclose()
        closed = time.monotonic()
        status = await _status_until(w, lambda s: True)
        row(
            phase,
            "flood closed → /status (control port) answers",
            f"after {_ms(time.monotonic() - closed)}: busy {status['busy']}",
            status["busy"] is True,
        )
        await trio.sleep(1.2)  # calm: the next accept ends the episode
        health = await _get_json(w.port, "/health")
        row(phase, "then GET /health (main port)", json.dumps(health), bool(health))
        await hold.aclose()
        await _status_until(w, lambda s: s["busy"] is False)
        w.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP_LIMIT_S):
            await w.proc.wait()
        text = w.log()
        alarms = text.count("cannot accept connections")
        again = text.count("accepting connections again")
        row(
            phase,
            'log lines "cannot accept connections" / "accepting connections again"',
            f"{alarms} / {again}",
            alarms == 1 and again == 1,
        )
        row(phase, "SIGTERM → exit code", str(w.proc.returncode), w.proc.returncode == 0)
        check_log(phase, w)


# --- 6. HTTP/2 on the HTTP/1.1 port ------------------------------------------------------

#: How long each HTTP/2 flood runs, and the most it sends in all (streams, DATA frames).
H2_FLOOD_S = 2.0
H2_FLOOD_STREAMS = 20_000
H2_FLOOD_FRAMES = 200_000
#: The worker is idle again once it uses less than this share of a core over IDLE_WINDOW_S.
IDLE_SHARE = 0.05
IDLE_WINDOW_S = 0.25

_H2_GET = [(":method", "GET"), (":path", "/health"), (":scheme", "http"), (":authority", "b")]


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _h2_client() -> Any:
    """An HTTP/2 client connection (the ``h2`` package, which Hypercorn depends on)."""
    import h2.config
    import h2.connection

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def _h2_data_frame(stream_id: int) -> bytes:
    return (16).to_bytes(3, "big") + b"\x00\x01" + stream_id.to_bytes(4, "big") + b"x" * 16


class _RapidReset:
    """Batches of 100 HTTP/2 requests, each reset at once (CVE-2023-44487)."""

    limit = H2_FLOOD_STREAMS

    def __init__(self) -> None:
        self._conn = _h2_client()

    def opening(self) -> bytes:
        return bytes(self._conn.data_to_send())

    def batch(self) -> tuple[bytes, int]:
        for _ in range(100):
            stream_id = self._conn.get_next_available_stream_id()
            self._conn.send_headers(stream_id, _H2_GET)
            self._conn.reset_stream(stream_id)
        return bytes(self._conn.data_to_send()), 100


class _DataAfterAnswer:
    """10 HTTP/2 requests whose bodies never end; once they are answered, batches of 20
    DATA frames on their streams (the first logged a traceback and cost the connection)."""

    limit = H2_FLOOD_FRAMES

    def __init__(self) -> None:
        self._conn = _h2_client()
        self._ids = []
        for _ in range(10):
            stream_id = self._conn.get_next_available_stream_id()
            self._conn.send_headers(stream_id, _H2_GET)
            self._ids.append(stream_id)
        self._frames = b"".join(_h2_data_frame(self._ids[i % 10]) for i in range(20))

    def opening(self) -> bytes:
        return bytes(self._conn.data_to_send())

    def batch(self) -> tuple[bytes, int]:
        return self._frames, 20


async def _until_idle(pid: int, limit_s: float) -> float:
    """Seconds until process ``pid`` spends under ``IDLE_SHARE`` of a core (``limit_s`` at most)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        before = _cpu_s(pid)
        await trio.sleep(IDLE_WINDOW_S)
        if _cpu_s(pid) - before < IDLE_SHARE * IDLE_WINDOW_S:
            return max(0.0, time.monotonic() - start - IDLE_WINDOW_S)
    return limit_s


async def _h2_flood(
    w: Worker, connections: int, client: Callable[[], _RapidReset | _DataAfterAnswer]
) -> tuple[int, int, Counter[str], list[tuple[int | None, float]]]:
    """``connections`` clients, each sending ``client()``'s opening then its batches on one
    connection as fast as the server takes them, reconnecting whenever it closes, for
    ``H2_FLOOD_S`` or up to the client's ``limit`` in all; a reservation half-way.

    Returns the units sent (streams or frames), the connections opened, the count of each
    answer's first bytes, and the reservation's (status, time).
    """
    sent = [0, 0]
    answers: Counter[str] = Counter()
    probe: list[tuple[int | None, float]] = []
    deadline = trio.current_time() + H2_FLOOD_S

    async def session(attack: _RapidReset | _DataAfterAnswer) -> None:
        stream = await _connect(w.port)
        sent[1] += 1
        first = bytearray()  # the first 12 bytes of the answer

        async def drain(nursery: trio.Nursery) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while chunk := await stream.receive_some(65536):
                    first.extend(chunk[: 12 - len(first)])
            nursery.cancel_scope.cancel()  # the server closed: reconnect

        async with stream:
            with (
                trio.move_on_at(deadline),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain, nursery)
                    await stream.send_all(attack.opening())
                    await trio.sleep(0.05)  # the answers to the opening are under way
                    while sent[0] < attack.limit:
                        data, units = attack.batch()
                        await stream.send_all(data)
                        sent[0] += units
                    nursery.cancel_scope.cancel()
        if first.startswith(b"HTTP/1.1 "):
            answers[first.decode(errors="replace").strip()] += 1
        else:
            answers["HTTP/2 frames" if first else "EOF"] += 1

    async def clients() -> None:
        async def one() -> None:
            while trio.current_time() < deadline:
                attack = client()
                if sent[0] >= attack.limit:
                    return
                await session(attack)

        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(one)

    async def reserve_during() -> None:
        await trio.sleep(H2_FLOOD_S / 2)
        status, _, took = await _reserve(w.port, 0)
        probe.append((status, took))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(clients)
        nursery.start_soon(reserve_during)
    return sent[0], sent[1], answers, probe


async def phase_http2(tmp: Path, scale: int) -> None:
    phase = "http2"
    floods: list[tuple[str, str, int, Callable[[], _RapidReset | _DataAfterAnswer]]] = [
        ("rapid reset (HEADERS then RST_STREAM)", "streams", 40 // scale, _RapidReset),
        ("DATA frames on answered streams", "DATA frames", 100 // scale, _DataAfterAnswer),
    ]
    async with worker(tmp, "http2") as w:
        pid = w.proc.pid
        for name, unit, connections, client in floods:
            short = name.split(" (")[0]
            log_before, cpu_before = w.log_path.stat().st_size, _cpu_s(pid)
            started = time.monotonic()
            units, opened, answers, probe = await _h2_flood(w, connections, client)
            flood_s = time.monotonic() - started
            idle_after = await _until_idle(pid, STEP_LIMIT_S)
            cpu = _cpu_s(pid) - cpu_before
            log_bytes = w.log_path.stat().st_size - log_before
            http2 = answers["HTTP/2 frames"]
            row(
                phase,
                f"{name}: {connections} clients for {H2_FLOOD_S:.0f} s",
                f"{units} {unit} sent on {opened} connections in {_ms(flood_s)}; "
                f"answers begin: {_counts(answers)}",
                http2 == 0,
            )
            row(
                phase,
                f"{short}: worker CPU, log bytes; idle again",
                f"{cpu:.2f} s CPU, {log_bytes} log bytes; idle {_ms(idle_after)} after the flood",
                log_bytes < 10_000 and idle_after < STEP_LIMIT_S,
            )
            for status, took in probe:
                row(
                    phase,
                    f"{short}: POST /reserve (duration 0) during the flood",
                    f"{status}, {_ms(took)}",
                    status == 200,
                )
            await check_reserves(phase, w, f"after the {short} flood")
        after = await _status_until(w, lambda s: True)
        row(phase, "/status busy afterwards", str(after["busy"]), after["busy"] is False)
        check_log(phase, w)


# --- main ---------------------------------------------------------------------------------


def _versions() -> str:
    names = ("hypercorn", "h11", "trio", "quart", "quart-trio")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


PHASES = ("hostile", "stalled", "concurrency", "signals", "descriptors", "http2")


async def main(quick: bool, phases: tuple[str, ...] = PHASES) -> int:
    # 1,000 concurrent connections from this process: lift our own soft descriptor limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nullworker-reliability-") as tmp_name:
        tmp = Path(tmp_name)
        if "hostile" in phases:
            await phase_hostile(tmp, 10 if quick else 50)
        if "stalled" in phases:
            await phase_stalled(tmp, 20 if quick else 200)
        if "concurrency" in phases:
            await phase_concurrency(tmp, 100 if quick else 1000)
        if "signals" in phases:
            await phase_signals(tmp)
        if "descriptors" in phases:
            await phase_descriptors(tmp, 120)
        if "http2" in phases:
            await phase_http2(tmp, 4 if quick else 1)
    failed = [r for r in ROWS if r.ok is False]
    print(
        f"nullworker reliability benchmark{' (--quick)' if quick else ''}, {date.today()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {_versions()}; "
        f"{time.monotonic() - started:.0f} s"
    )
    print()
    print("| Phase | Measurement | Result | Check |")
    print("|---|---|---|---|")
    for r in ROWS:
        check = "" if r.ok is None else ("ok" if r.ok else "**FAIL**")
        print(f"| {r.phase} | {r.measurement} | {r.result} | {check} |")
    print()
    print(f"{len(failed)} check(s) failed" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, a smoke run")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases to run (default: all of {','.join(PHASES)})",
    )
    args = parser.parse_args()
    chosen = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = sorted(set(chosen) - set(PHASES))
    if unknown:
        parser.error(f"--phases: unknown phase(s) {', '.join(unknown)}; known: {', '.join(PHASES)}")
    sys.exit(trio.run(main, args.quick, chosen))
