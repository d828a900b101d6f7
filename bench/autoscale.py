"""Autoscaler benchmark: memory and CPU holding 1,000 (or 10,000) reservations, and reaction times.

    .venv/bin/python bench/autoscale.py            # about 4 min (a file, polled every 1 s)
    .venv/bin/python bench/autoscale.py --quick    # a smoke run, about 1 min
    .venv/bin/python bench/autoscale.py --driver library --reps 5 --reps-loaded 2
    .venv/bin/python bench/autoscale.py --source redis --poll 60 --hold 10000 \
        --json bench/results/autoscale-push-DATE.json   # wake-ups, holding 10,000: ~3 min

One autoscaler process -- ``nullworker autoscale --demand-command 'cat FILE' --json``, or,
with ``--driver library`` (or when that command is not installed), a small script here
that calls ``nullworker.client.autoscaler.autoscale()`` with its default ``reserve`` --
runs against a stand-in engine and worker in this process, on 127.0.0.1:

* the *engine* answers every ``POST /route/`` at once with a READY reply (the shape
  ``nullworker.engine`` gives: ``url``, ``signature``, ``cost``, ``endpoint``, ``reqnum``,
  ``request_idx``) routing to the sink, and keeps idle connections 5 s (Hypercorn's
  default; from ``ROUTE_CLOSE_AT`` holds on it closes them at once, so that 10,000 holds
  fit in the descriptors); it timestamps every ``/route/`` (a reservation *requested*);
* the *sink* takes any number of ``POST /reserve`` requests and never answers them: a
  reservation is *held* from the moment its request has fully arrived to the moment the
  client closes the connection. The sink counts open requests and timestamps every
  change; that count is what "held" and "released" mean here.

The demand is a file the bench rewrites (atomically), which the autoscaler reads every
``--poll`` seconds; or, with ``--source redis``, a Redis list (``--redis-list``) on a
``redis-server`` the bench starts on 127.0.0.1 with keyspace notifications on, so every
change wakes the autoscaler (then run it with a long ``--poll``, e.g. 60 s: only a
wake-up explains a fast reaction). Measured:

* first jobs: one job at a time, ``--first-reps`` times, on top of those before: the job
  -> its ``/route/`` at the engine (requested) and its ``/reserve`` at the sink (held);
* hold ``--hold``: the autoscaler's RSS (``/proc/PID/status`` VmRSS, and VmHWM, the
  peak) and its CPU over ``--steady`` seconds of holding still (``/proc/PID/stat`` utime +
  stime; the ``cat`` children of ``--demand-command`` are shown apart, cutime + cstime);
* reaction: demand +``--step`` -> the last new reservation held at the sink, and back
  -> the last released, minus ``--delay``; ``--reps`` times each from 0 held, the same
  with ``--big-step`` ``--big-reps`` times, and a few from ``--hold`` held; each change at
  a random phase of the poll. When the autoscaler printed the new demand splits the
  first into waiting for the read and the work after (with the autoscaler's CPU time
  meanwhile); when it printed the lower target shows how much of the second is the
  stabilisation window's own timing.

The machine's load average is printed at the start and the end (and saved with
``--json FILE``, with every sample): figures from a shared machine need it beside them.
Every wait is bounded (``STEP_LIMIT_S``). ``RLIMIT_NOFILE`` is raised to its hard limit
here (the autoscaler inherits it): 1,000 holds need about 2,000 descriptors on each side.
``--profile FILE`` runs the autoscaler under cProfile and prints its top functions.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import pstats
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import h11
import trio

#: Bound on every wait for the autoscaler.
STEP_LIMIT_S = 120.0
#: Idle keep-alive connections of the stand-in engine are closed after this (Hypercorn's).
KEEP_ALIVE_S = 5.0
ENDPOINT = "bench"
API_KEY = "bench"
RSS_GOAL_MB = 150.0
#: ... holding more than 1,000 (the goal is set for 10,000).
RSS_GOAL_10K_MB = 1024.0
#: Goals with a source that pushes (``--source redis``): a job -> its reservation
#: requested (``/route/``), +``--step`` (100) -> all held, +``--big-step`` (1,000) -> all
#: held, each at p99.
FIRST_JOB_GOAL_S = 0.1
STEP_GOAL_S = 0.5
BIG_STEP_GOAL_S = 2.0
#: From this many holds on, the stand-in engine closes each /route/ connection at once.
ROUTE_CLOSE_AT = 5000
CPU_GOAL_PCT = 2.0
#: From all held to the start of the steady window: longer than the autoscaler's 5 s
#: "healthy hold" timer, which fires once per reservation.
SETTLE_S = 7.0
#: Allowed on top of the poll interval by the reaction goal.
REACTION_SLACK_S = 0.1


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the stand-in engine and the sink ---------------------------------------------------


class Sink:
    """Open ``/reserve`` requests: a count and a timestamped history of its changes."""

    def __init__(self) -> None:
        self.open = 0
        self.most = 0
        #: (time.monotonic(), count after the change), one entry per change.
        self.history: list[tuple[float, int]] = []
        self._changed = trio.Event()

    def _set(self, delta: int) -> None:
        self.open += delta
        self.most = max(self.most, self.open)
        self.history.append((time.monotonic(), self.open))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_count(self, count: int, since: float) -> float:
        """Wait until ``count`` requests are open; when (monotonic) the count got there.

        ``since`` is when the change that leads there was made: the answer is the first
        time after it that the count was ``count``.
        """
        with trio.fail_after(STEP_LIMIT_S):
            while self.open != count:
                await self._changed.wait()
        for at, value in self.history:
            if at >= since and value == count:
                return at
        return since  # it was there already

    async def wait_quiet(self, quiet_s: float) -> None:
        """Wait until the count has not changed for ``quiet_s``."""
        with trio.fail_after(STEP_LIMIT_S):
            while True:
                with trio.move_on_after(quiet_s):
                    await self._changed.wait()
                    continue
                return


@dataclass
class Servers:
    sink: Sink = field(default_factory=Sink)
    engine_url: str = ""
    sink_url: str = ""
    routes: int = 0
    #: time.monotonic() of every ``/route/`` request, as it arrived.
    route_times: list[float] = field(default_factory=list)
    #: Close each connection after its ``/route/`` reply (no idle keep-alive): holding
    #: 10,000 needs every descriptor for the held connections.
    route_close: bool = False
    _reqnum: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _routed: trio.Event = field(default_factory=trio.Event)

    async def wait_routes(self, count: int) -> float:
        """Wait until ``count`` ``/route/`` requests have arrived; when the last did."""
        with trio.fail_after(STEP_LIMIT_S):
            while self.routes < count:
                await self._routed.wait()
        return self.route_times[count - 1]

    def route_reply(self, body: bytes) -> dict[str, Any]:
        self.routes += 1
        self.route_times.append(time.monotonic())
        self._routed.set()
        self._routed = trio.Event()
        request = json.loads(body or b"{}")
        idx = request.get("request_idx") or 0
        reqnum = next(self._reqnum)
        return {
            "url": self.sink_url,
            "signature": "",
            "cost": request.get("cost", 100),
            "endpoint": request.get("endpoint", ENDPOINT),
            "reqnum": reqnum,
            "request_idx": idx if idx else reqnum,
        }


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(data)


async def _send(conn: h11.Connection, stream: trio.SocketStream, status: int, body: bytes) -> None:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def handle_connection(servers: Servers, stream: trio.SocketStream) -> None:
    """One connection to the engine or the sink: HTTP/1.1 with keep-alive."""
    conn = h11.Connection(h11.SERVER)
    try:
        async with stream:
            while True:
                with trio.move_on_after(KEEP_ALIVE_S) as idle:
                    request = await _next_event(conn, stream)
                if idle.cancelled_caught or not isinstance(request, h11.Request):
                    return
                body = b""
                while not isinstance(event := await _next_event(conn, stream), h11.EndOfMessage):
                    if not isinstance(event, h11.Data):
                        return
                    body += event.data
                target = request.target.split(b"?", 1)[0]
                if request.method == b"POST" and target == b"/reserve":
                    await hold_reservation(servers.sink, stream)
                    return
                if request.method == b"POST" and target == b"/route/":
                    reply = json.dumps(servers.route_reply(body)).encode()
                    await _send(conn, stream, 200, reply)
                    if servers.route_close:
                        return
                else:
                    await _send(conn, stream, 404, b'{"error": "not found"}')
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        return


async def hold_reservation(sink: Sink, stream: trio.SocketStream) -> None:
    """Held until the client closes the connection (anything it sends is ignored)."""
    sink._set(+1)
    try:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(4096):
                pass
    finally:
        sink._set(-1)


async def serve_servers(servers: Servers, *, task_status: trio.TaskStatus[None]) -> None:
    handler = partial(handle_connection, servers)
    async with trio.open_nursery() as nursery:
        engine = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        sink = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        servers.engine_url = f"http://127.0.0.1:{engine[0].socket.getsockname()[1]}"
        servers.sink_url = f"http://127.0.0.1:{sink[0].socket.getsockname()[1]}"
        task_status.started()


# -- the autoscaler process ---------------------------------------------------------------


def cli_available() -> bool:
    return find_spec("nullworker.client.autoscale_cli") is not None


@dataclass
class Settings:
    poll_s: float
    delay_s: float
    max_workers: int
    demand_file: Path
    #: ``redis://…`` of the list to read instead of the file (``--source redis``).
    redis_url: str | None = None


#: The Redis list the autoscaler reads with ``--source redis``.
REDIS_KEY = "bench:jobs"


class FileDemand:
    """The demand as a file the autoscaler reads with ``cat`` every poll."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, demand: int) -> float:
        return write_demand(self.path, demand)

    def close(self) -> None:
        return None


class RedisDemand:
    """The demand as a Redis list (``--source redis``): a ``redis-server`` of our own on
    127.0.0.1 with keyspace notifications for lists on, so the autoscaler is woken by
    every change instead of waiting for its poll."""

    def __init__(self, workdir: Path) -> None:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("--source redis needs redis-server on the PATH")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        self._log = (workdir / "redis.log").open("wb")
        self.process = subprocess.Popen(
            [
                *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(workdir), "--notify-keyspace-events", "Kl"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit("redis-server did not start (see redis.log)") from None
                time.sleep(0.05)
        self.length = 0

    def set(self, demand: int) -> float:
        """Push or trim jobs so the list holds ``demand``; the monotonic time just before
        the command went out (the job's arrival, at the latest)."""
        changed = time.monotonic()
        if demand > self.length:
            self.client.rpush(REDIS_KEY, *[b"job"] * (demand - self.length))
        elif demand < self.length:
            # LTRIM, even to empty (not DEL): it is a list event (``l``), which the
            # notifications on here include; DEL is a generic one (``g``).
            # (LTRIM 0 -1 keeps everything: 1 0 is the empty range.)
            self.client.ltrim(REDIS_KEY, *((0, demand - 1) if demand else (1, 0)))
        self.length = demand
        return changed

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def autoscaler_argv(
    driver: str, settings: Settings, engine_url: str, profile: str | None
) -> list[str]:
    common = [
        "--poll",
        f"{settings.poll_s:g}",
        "--scale-down-delay",
        f"{settings.delay_s:g}",
        "--max",
        str(settings.max_workers),
        "--engine-url",
        engine_url,
        "--api-key",
        API_KEY,
    ]
    prefix = [sys.executable]
    if profile is not None:
        prefix += ["-m", "cProfile", "-o", profile]
    if driver == "cli":
        tail = ["-m", "nullworker", "autoscale", "--endpoint", ENDPOINT, "--json"]
        if settings.redis_url is not None:
            tail += ["--redis-list", settings.redis_url, REDIS_KEY, *common]
        else:
            tail += ["--demand-command", f"cat {shlex.quote(str(settings.demand_file))}", *common]
        return prefix + tail
    script = [str(Path(__file__).resolve()), "--child", "--demand-file", str(settings.demand_file)]
    if settings.redis_url is not None:
        script += ["--demand-redis", settings.redis_url]
    return prefix + script + common


def child_main(args: argparse.Namespace) -> int:
    """``--driver library``: ``autoscale()`` with its default ``reserve`` until SIGTERM.

    Prints a JSON line (``{"kind": "state", "demand": N, "target": T}``) whenever the
    demand or the target changes, as ``nullworker autoscale --json`` does for every event.
    """
    from nullworker.client.autoscaler import AutoscaleEvent, autoscale
    from nullworker.client.demand import RedisList

    raise_nofile()
    path = Path(args.demand_file)

    async def read_file() -> int:
        return int(read_text(path).strip() or 0)

    source = None if args.demand_redis is None else RedisList(args.demand_redis, REDIS_KEY)

    last: list[tuple[int | None, int]] = [(None, -1)]

    def on_event(event: AutoscaleEvent) -> None:
        if event.kind == "state" and (event.demand, event.target) != last[0]:
            last[0] = (event.demand, event.target)
            line = {"kind": "state", "demand": event.demand, "target": event.target}
            print(json.dumps(line), flush=True)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with contextlib.AsyncExitStack() as stack:
                if source is not None:
                    await stack.enter_async_context(source)
                nursery = await stack.enter_async_context(trio.open_nursery())
                await nursery.start(
                    partial(
                        autoscale,
                        ENDPOINT,
                        demand=read_file if source is None else source,
                        max_workers=args.max,
                        poll_s=args.poll,
                        scale_down_delay_s=args.scale_down_delay,
                        engine_url=args.engine_url,
                        api_key=args.api_key,
                        on_event=on_event,
                    )
                )
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0


def read_text(path: Path) -> str:
    return path.read_text()


@dataclass
class ProcStat:
    cpu_s: float  # utime + stime
    children_cpu_s: float  # cutime + cstime (reaped children: the demand commands)
    rss_mb: float
    hwm_mb: float


def proc_stat(pid: int) -> ProcStat:
    ticks = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    # Fields after the command name start at field 3 (state): utime is field 14.
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    status: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                status[name] = int(value.split()[0]) / 1024
    return ProcStat(
        cpu_s=(utime + stime) / ticks,
        children_cpu_s=(cutime + cstime) / ticks,
        rss_mb=status["VmRSS"],
        hwm_mb=status["VmHWM"],
    )


class Autoscaler:
    """The autoscaler subprocess, its stdout (demand changes, timestamped) and its pid."""

    def __init__(self, process: trio.Process, stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        #: (time.monotonic() the line arrived, demand, target) for each printed change of
        #: the demand or the target.
        self.states: list[tuple[float, int, int]] = []
        self.lines = 0
        self._last: tuple[int, int] | None = None

    async def pump(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async with self.process.stdout:
            while chunk := await self.process.stdout.receive_some(1 << 16):
                arrived = time.monotonic()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    self.lines += 1
                    with contextlib.suppress(ValueError):
                        event = json.loads(raw)
                        state = (event.get("demand"), event.get("target"))
                        if event.get("kind") == "state" and state != self._last:
                            self._last = state
                            self.states.append((arrived, *state))

    def seen_at(
        self, *, since: float, demand: int | None = None, target: int | None = None
    ) -> float | None:
        """When the autoscaler first printed this demand (or target) after ``since``."""
        for at, seen_demand, seen_target in self.states:
            if at >= since and demand in (None, seen_demand) and target in (None, seen_target):
                return at
        return None

    def stderr_tail(self) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise RuntimeError(
                f"the autoscaler exited with {self.process.returncode}:\n{self.stderr_tail()}"
            )


def write_demand(path: Path, demand: int) -> float:
    """Replace the demand file atomically; the monotonic time it changed."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{demand}\n")
    os.replace(tmp, path)
    return time.monotonic()


# -- the measurements ---------------------------------------------------------------------


@dataclass
class Reaction:
    up: list[float] = field(default_factory=list)  # change -> last of the new ones held
    up_seen: list[float] = field(default_factory=list)  # change -> the autoscaler printed it
    down: list[float] = field(default_factory=list)  # change -> last released, minus delay
    #: change -> the autoscaler printed the lower target, minus the delay
    down_target: list[float] = field(default_factory=list)
    #: The autoscaler's CPU time (utime + stime) from the change to the last held.
    up_cpu: list[float] = field(default_factory=list)


async def measure_reactions(
    servers: Servers,
    scaler: Autoscaler,
    settings: Settings,
    demand: FileDemand | RedisDemand,
    *,
    base: int,
    step: int,
    reps: int,
    into: Reaction,
) -> None:
    sink = servers.sink
    for _ in range(reps):
        scaler.check_alive()
        await trio.sleep(random_phase(settings))
        cpu_before = proc_stat(scaler.process.pid).cpu_s
        changed = demand.set(base + step)
        held_at = await sink.wait_count(base + step, changed)
        into.up_cpu.append(proc_stat(scaler.process.pid).cpu_s - cpu_before)
        into.up.append(held_at - changed)
        seen = scaler.seen_at(since=changed, demand=base + step)
        if seen is not None:
            into.up_seen.append(seen - changed)
        # Let the accept windows pass and the count settle before going down.
        await sink.wait_quiet(0.5)
        await trio.sleep(random_phase(settings))
        changed = demand.set(base)
        released_at = await sink.wait_count(base, changed)
        into.down.append(released_at - changed - settings.delay_s)
        lowered = scaler.seen_at(since=changed, target=base)
        if lowered is not None:
            into.down_target.append(lowered - changed - settings.delay_s)
        await sink.wait_quiet(0.3)


@dataclass
class FirstJob:
    requested: list[float] = field(default_factory=list)  # job -> its /route/ arrived
    held: list[float] = field(default_factory=list)  # job -> its /reserve arrived


async def measure_first_jobs(
    servers: Servers,
    scaler: Autoscaler,
    settings: Settings,
    demand: FileDemand | RedisDemand,
    *,
    reps: int,
    into: FirstJob,
) -> None:
    """One job at a time, ``reps`` times: job -> its reservation requested (``/route/``)
    and held (``/reserve`` at the sink). Each job comes at a random phase of the poll, on
    top of those before it (so no scale-down is waited for); then all are released."""
    sink = servers.sink
    for n in range(1, reps + 1):
        scaler.check_alive()
        await trio.sleep(random_phase(settings))
        routes = servers.routes
        changed = demand.set(n)
        requested = await servers.wait_routes(routes + 1)
        held = await sink.wait_count(n, changed)
        into.requested.append(requested - changed)
        into.held.append(held - changed)
    demand.set(0)
    await sink.wait_count(0, time.monotonic())
    await sink.wait_quiet(0.3)


def random_phase(settings: Settings) -> float:
    """A pause before a change, so changes come at random phases of the poll. A pushed
    change is read when it happens, whatever the phase: a short pause will do."""
    return random.uniform(0, settings.poll_s if settings.redis_url is None else 0.2)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def fmt_ms(samples: list[float]) -> str:
    if not samples:
        return "n/a"
    return f"{pct(samples, 0.5) * 1000:.0f} / {pct(samples, 0.99) * 1000:.0f} ms"


def print_split(reaction: Reaction, cpu: str) -> None:
    """The row under a reaction: waiting for the read, then the work after it."""
    if not reaction.up_seen:
        return
    rest = [u - s for u, s in zip(reaction.up, reaction.up_seen, strict=False)]
    print(
        f"| … of which: until the new demand was read; the work after it ({cpu}) | | "
        f"{fmt_ms(reaction.up_seen)}; {fmt_ms(rest)} ({fmt_ms(reaction.up_cpu)}) | |"
    )


def versions() -> str:
    names = ("trio", "httpx", "httpcore", "h11")
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return f"Python {platform.python_version()}, " + ", ".join(found)


async def run_bench(args: argparse.Namespace, workdir: Path) -> int:
    limit = raise_nofile()
    hold_n = args.hold
    # Past ROUTE_CLOSE_AT holds, /route/ connections are closed at once, so each side
    # needs about one descriptor per hold instead of two.
    route_close = hold_n >= ROUTE_CLOSE_AT
    if limit < (1 if route_close else 2) * hold_n + 200:
        print(f"RLIMIT_NOFILE is {limit}: too low for {hold_n} holds", file=sys.stderr)
        return 2
    driver = args.driver
    if driver == "auto":
        driver = "cli" if cli_available() else "library"
    demand: FileDemand | RedisDemand = (
        RedisDemand(workdir) if args.source == "redis" else FileDemand(workdir / "demand")
    )
    settings = Settings(
        poll_s=args.poll,
        delay_s=args.delay,
        max_workers=max(hold_n, args.big_step) + args.step + 100,
        demand_file=workdir / "demand",
        redis_url=demand.url if isinstance(demand, RedisDemand) else None,
    )
    write_demand(settings.demand_file, 0)
    servers = Servers(route_close=route_close)
    results: dict[str, Any] = {"load_start": uptime()}
    reaction = Reaction()
    reaction_loaded = Reaction()
    reaction_big = Reaction()
    first = FirstJob()
    try:
        await _run_bench(
            args,
            workdir,
            driver,
            settings,
            demand,
            servers,
            results,
            reaction,
            reaction_loaded,
            reaction_big,
            first,
        )
    finally:
        demand.close()
    results["load_end"] = uptime()
    report(args, driver, settings, results, reaction, reaction_loaded, reaction_big, first)
    if args.json:
        save_json(args, driver, settings, results, reaction, reaction_loaded, reaction_big, first)
    if args.profile:
        print(f"\nprofile of the autoscaler (cProfile, {args.profile}), top 25 by own time:\n")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    return 0


def uptime() -> str:
    """The machine's load, as ``uptime`` shows it (the machine is shared)."""
    one, five, fifteen = os.getloadavg()
    return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


async def _run_bench(
    args: argparse.Namespace,
    workdir: Path,
    driver: str,
    settings: Settings,
    demand: FileDemand | RedisDemand,
    servers: Servers,
    results: dict[str, Any],
    reaction: Reaction,
    reaction_loaded: Reaction,
    reaction_big: Reaction,
    first: FirstJob,
) -> None:
    hold_n = args.hold
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_servers, servers))
        argv = autoscaler_argv(driver, settings, servers.engine_url, args.profile)
        stderr_path = workdir / "autoscaler.stderr"
        with stderr_path.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        scaler = Autoscaler(process, stderr_path)
        nursery.start_soon(scaler.pump)
        try:
            with trio.fail_after(STEP_LIMIT_S):
                while not scaler.states:
                    scaler.check_alive()
                    await trio.sleep(0.05)
            results["start_rss_mb"] = proc_stat(process.pid).rss_mb

            if args.first_reps:
                print(f"first jobs: {args.first_reps} x (+1)")
                await measure_first_jobs(
                    servers, scaler, settings, demand, reps=args.first_reps, into=first
                )

            print(f"reaction from 0 held: {args.reps} x (+{args.step}, -{args.step})")
            await measure_reactions(
                servers,
                scaler,
                settings,
                demand,
                base=0,
                step=args.step,
                reps=args.reps,
                into=reaction,
            )
            if args.big_reps:
                print(
                    f"reaction from 0 held: {args.big_reps} x (+{args.big_step}, -{args.big_step})"
                )
                await measure_reactions(
                    servers,
                    scaler,
                    settings,
                    demand,
                    base=0,
                    step=args.big_step,
                    reps=args.big_reps,
                    into=reaction_big,
                )

            print(f"holding {hold_n}")
            changed = demand.set(hold_n)
            held_at = await servers.sink.wait_count(hold_n, changed)
            results["hold_all_s"] = held_at - changed
            ramp_end = proc_stat(process.pid)
            # Settle: past the autoscaler's one-off timer per reservation 5 s after it was
            # held (a hold that lasts that long ends its failure streak).
            await servers.sink.wait_quiet(2.0)
            await trio.sleep_until(trio.current_time() + SETTLE_S - 2.0)
            scaler.check_alive()
            before, started = proc_stat(process.pid), time.monotonic()
            results["settle_cpu_s"] = before.cpu_s - ramp_end.cpu_s
            print(f"steady for {args.steady:g} s")
            await trio.sleep(args.steady)
            after, ended = proc_stat(process.pid), time.monotonic()
            wall = ended - started
            results["steady_cpu_pct"] = 100 * (after.cpu_s - before.cpu_s) / wall
            results["steady_children_pct"] = (
                100 * (after.children_cpu_s - before.children_cpu_s) / wall
            )
            results["steady_s"] = wall
            results["rss_mb"] = after.rss_mb
            results["hwm_mb"] = after.hwm_mb
            results["held_during_steady"] = servers.sink.open
            changes = [at for at, _ in servers.sink.history if started <= at <= ended]
            results["changes_during_steady"] = len(changes)

            if args.reps_loaded:
                print(f"reaction from {hold_n} held: {args.reps_loaded} x")
                await measure_reactions(
                    servers,
                    scaler,
                    settings,
                    demand,
                    base=hold_n,
                    step=args.step,
                    reps=args.reps_loaded,
                    into=reaction_loaded,
                )

            changed = demand.set(0)
            released_at = await servers.sink.wait_count(0, changed)
            results["release_all_s"] = released_at - changed - settings.delay_s
            results["final"] = proc_stat(process.pid)
            results["most_held"] = servers.sink.most
            results["routes"] = servers.routes
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(30):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            nursery.cancel_scope.cancel()
    results["exit_status"] = process.returncode


def report(
    args: argparse.Namespace,
    driver: str,
    settings: Settings,
    results: dict[str, Any],
    reaction: Reaction,
    reaction_loaded: Reaction,
    reaction_big: Reaction,
    first: FirstJob,
) -> None:
    push = settings.redis_url is not None
    # Polled, a reaction may wait a whole poll; pushed, the goals are absolute.
    bound = STEP_GOAL_S if push else settings.poll_s + REACTION_SLACK_S
    rss_goal = RSS_GOAL_MB if args.hold <= 1000 else RSS_GOAL_10K_MB

    def check(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def worst(samples: list[float]) -> float:
        return pct(samples, 0.99) if samples else math.inf

    source = "--redis-list URL KEY" if push else "--demand-command 'cat FILE'"
    how = (
        f"`nullworker autoscale {source}` (an HTTP client per reservation)"
        if driver == "cli"
        else "`autoscale()` with its default `reserve` (an HTTP client per reservation)"
    )
    if push:
        how += "; the demand is a Redis list, keyspace notifications on: changes wake it"
    hold_n, step = args.hold, args.step
    print()
    print(
        f"bench/autoscale.py on {date.today().isoformat()}, {os.cpu_count()} CPUs "
        f"({platform.machine()}, Linux {platform.release()}), {versions()}"
    )
    print(
        f"autoscaler: {how}; poll {settings.poll_s:g} s, scale-down delay "
        f"{settings.delay_s:g} s; RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"
    )
    print(f"machine load: at the start {results['load_start']}; at the end {results['load_end']}")
    print()
    print("| Measurement | Goal | Result | |")
    print("|---|---|---|---|")
    if first.requested:
        goal = FIRST_JOB_GOAL_S if push else settings.poll_s + REACTION_SLACK_S
        print(
            f"| a job → its reservation requested (`/route/`), p50 / p99 "
            f"(n={len(first.requested)}) | ≤ {goal * 1000:.0f} ms | {fmt_ms(first.requested)} | "
            f"{check(worst(first.requested) <= goal)} |"
        )
        print(f"| … → held (`/reserve` at the sink) | | {fmt_ms(first.held)} | |")
    rss, hwm = results["rss_mb"], results["hwm_mb"]
    print(
        f"| RSS holding {hold_n:,} (peak so far) | ≤ {rss_goal:g} MB | "
        f"{rss:.0f} MB ({hwm:.0f} MB; {results['start_rss_mb']:.0f} MB at start) | "
        f"{check(rss <= rss_goal)} |"
    )
    cpu = results["steady_cpu_pct"]
    children = results["steady_children_pct"]
    extra = f"; the `cat` children {children:.2f} %" if driver == "cli" else ""
    print(
        f"| CPU holding {hold_n:,} still, {results['steady_s']:.0f} s | "
        f"≤ {CPU_GOAL_PCT:g} % of one core | {cpu:.2f} %{extra} | {check(cpu <= CPU_GOAL_PCT)} |"
    )
    n = len(reaction.up)
    print(
        f"| +{step} jobs → the {step}th new reservation held, p50 / p99 (n={n}, from 0) | "
        f"≤ {bound * 1000:.0f} ms | {fmt_ms(reaction.up)} | {check(worst(reaction.up) <= bound)} |"
    )
    print_split(reaction, "the autoscaler's CPU meanwhile")
    print(
        f"| -{step} jobs → the {step}th released, minus the {settings.delay_s:g} s delay, "
        f"p50 / p99 (n={len(reaction.down)}, from {step}) | ≤ {bound * 1000:.0f} ms | "
        f"{fmt_ms(reaction.down)} | {check(worst(reaction.down) <= bound)} |"
    )
    if reaction.down_target:
        print(
            f"| … of which: the target lowered (minus the delay) | | "
            f"{fmt_ms(reaction.down_target)} | |"
        )
    if reaction_big.up:
        big, big_step = reaction_big, args.big_step
        goal = BIG_STEP_GOAL_S if push else settings.poll_s + REACTION_SLACK_S
        print(
            f"| +{big_step:,} jobs → the {big_step:,}th new reservation held, p50 / p99 "
            f"(n={len(big.up)}, from 0) | ≤ {goal * 1000:.0f} ms | {fmt_ms(big.up)} | "
            f"{check(worst(big.up) <= goal)} |"
        )
        print_split(big, "CPU")
        print(
            f"| -{big_step:,} jobs → all released, minus the delay, p50 / p99 | | "
            f"{fmt_ms(big.down)} | |"
        )
    if reaction_loaded.up:
        loaded = reaction_loaded
        m = len(loaded.up)
        print(
            f"| the same from {hold_n:,} held: +{step} (n={m}) | ≤ {bound * 1000:.0f} ms | "
            f"{fmt_ms(loaded.up)} | {check(worst(loaded.up) <= bound)} |"
        )
        print_split(loaded, "CPU")
        print(
            f"| the same from {hold_n + step:,} held: -{step}, minus the delay (n={m}) | "
            f"≤ {bound * 1000:.0f} ms | {fmt_ms(loaded.down)} | "
            f"{check(worst(loaded.down) <= bound)} |"
        )
        if loaded.down_target:
            print(
                f"| … of which: the target lowered (minus the delay) | | "
                f"{fmt_ms(loaded.down_target)} | |"
            )
    print(
        f"| 0 → {hold_n:,} jobs → all held; {hold_n:,} → 0 → all released, minus the delay | | "
        f"{results['hold_all_s']:.2f} s; {results['release_all_s']:.2f} s | |"
    )
    print(
        f"| CPU from all {hold_n:,} held to the steady window ({SETTLE_S:g} s) | | "
        f"{results['settle_cpu_s']:.2f} s | |"
    )
    print()
    print(
        "A release can come before the delay has passed since the change: the delay counts "
        "from the last reading that still saw the higher demand, up to one poll earlier."
    )
    final: ProcStat = results["final"]
    print(
        f"most held at once {results['most_held']}, /route/ calls {results['routes']}, "
        f"sink changes while holding still {results['changes_during_steady']} "
        f"(held {results['held_during_steady']}), autoscaler CPU in all {final.cpu_s:.1f} s, "
        f"exit status {results['exit_status']}"
    )


def save_json(
    args: argparse.Namespace,
    driver: str,
    settings: Settings,
    results: dict[str, Any],
    reaction: Reaction,
    reaction_loaded: Reaction,
    reaction_big: Reaction,
    first: FirstJob,
) -> None:
    """The figures, and the samples they come from, as JSON at ``args.json``."""

    def summary(samples: list[float]) -> dict[str, Any]:
        if not samples:
            return {"n": 0}
        return {
            "n": len(samples),
            "p50_ms": round(pct(samples, 0.5) * 1000, 1),
            "p99_ms": round(pct(samples, 0.99) * 1000, 1),
            "samples_ms": [round(x * 1000, 1) for x in samples],
        }

    final: ProcStat = results["final"]
    document = {
        "date": date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}",
        "versions": versions(),
        "load_start": results["load_start"],
        "load_end": results["load_end"],
        "driver": driver,
        "source": "redis (keyspace notifications, pushed)" if settings.redis_url else "file",
        "poll_s": settings.poll_s,
        "scale_down_delay_s": settings.delay_s,
        "hold": args.hold,
        "step": args.step,
        "big_step": args.big_step,
        "first_job_requested": summary(first.requested),
        "first_job_held": summary(first.held),
        "up": summary(reaction.up),
        "up_seen": summary(reaction.up_seen),
        "down_minus_delay": summary(reaction.down),
        "big_up": summary(reaction_big.up),
        "big_up_seen": summary(reaction_big.up_seen),
        "big_down_minus_delay": summary(reaction_big.down),
        "loaded_up": summary(reaction_loaded.up),
        "loaded_down_minus_delay": summary(reaction_loaded.down),
        "rss_mb": round(results["rss_mb"], 1),
        "hwm_mb": round(results["hwm_mb"], 1),
        "start_rss_mb": round(results["start_rss_mb"], 1),
        "steady_cpu_pct": round(results["steady_cpu_pct"], 3),
        "steady_children_pct": round(results["steady_children_pct"], 3),
        "steady_s": round(results["steady_s"], 1),
        "hold_all_s": round(results["hold_all_s"], 3),
        "release_all_minus_delay_s": round(results["release_all_s"], 3),
        "settle_cpu_s": round(results["settle_cpu_s"], 2),
        "autoscaler_cpu_total_s": round(final.cpu_s, 1),
        "most_held": results["most_held"],
        "routes": results["routes"],
        "exit_status": results["exit_status"],
    }
    Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    print(f"figures written to {args.json}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument(
        "--driver",
        choices=("auto", "cli", "library"),
        default="auto",
        help="the autoscaler: `nullworker autoscale` (cli), autoscale() with its default "
        "reserve (library); auto: cli when installed",
    )
    parser.add_argument("--hold", type=int, default=None, help="reservations to hold (1000)")
    parser.add_argument("--step", type=int, default=None, help="demand step (100)")
    parser.add_argument("--reps", type=int, default=None, help="reaction repetitions (10)")
    parser.add_argument(
        "--reps-loaded", type=int, default=None, help="repetitions on top of --hold (3)"
    )
    parser.add_argument("--steady", type=float, default=None, help="seconds holding still (20)")
    parser.add_argument("--poll", type=float, default=1.0, help="the autoscaler's poll (1 s)")
    parser.add_argument("--delay", type=float, default=2.0, help="its scale-down delay (2 s)")
    parser.add_argument("--profile", metavar="FILE", help="run the autoscaler under cProfile")
    parser.add_argument(
        "--source",
        choices=("file", "redis"),
        default="file",
        help="the demand: a file read by `cat` every poll, or a Redis list on a redis-server "
        "of our own with keyspace notifications on, whose changes wake the autoscaler",
    )
    parser.add_argument(
        "--first-reps", type=int, default=None, help="single jobs timed to their /route/ (100)"
    )
    parser.add_argument("--big-step", type=int, default=None, help="the large step (1000)")
    parser.add_argument(
        "--big-reps", type=int, default=None, help="repetitions of the large step (3)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON here")
    # The autoscaler side of --driver library (this script runs itself).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--demand-file", help=argparse.SUPPRESS)
    parser.add_argument("--demand-redis", help=argparse.SUPPRESS)
    parser.add_argument("--max", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scale-down-delay", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--engine-url", help=argparse.SUPPRESS)
    parser.add_argument("--api-key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    quick = {
        "hold": 100,
        "step": 20,
        "reps": 3,
        "reps_loaded": 1,
        "steady": 5.0,
        "first_reps": 10,
        "big_step": 100,
        "big_reps": 1,
    }
    full = {
        "hold": 1000,
        "step": 100,
        "reps": 10,
        "reps_loaded": 3,
        "steady": 20.0,
        "first_reps": 100,
        "big_step": 1000,
        "big_reps": 3,
    }
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    with tempfile.TemporaryDirectory(prefix="nullworker-bench-") as workdir:
        return trio.run(run_bench, args, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
