"""``nullworker dev``: a local engine that starts and stops real workers on demand.

One Trio process runs the engine emulator (:mod:`nullworker.engine`) and supervises
worker child processes (``python -m nullworker serve``), each given the Vast
environment contract on free loopback ports, so the whole route -> reserve -> report
loop runs on one machine exactly as it does on Vast, signatures included.

Scaling model (small and honest):

* ``--min-workers`` workers start at once and are kept alive (restarted with a
  backoff if they exit on their own).
* Each WAITING answer fires the engine's ``on_demand`` hook. A worker is started
  when fewer workers are starting than requests are waiting and fewer than
  ``--max-workers`` exist (starting ones count, so a burst of polls does not start
  a crowd).
* A worker that stayed idle (ready, not busy, not leased) for ``--idle-timeout``
  seconds is stopped while more than ``--min-workers`` exist: SIGTERM, then SIGKILL
  after ``stop_timeout_s``.
* ``--consumer CMD`` runs CMD (``/bin/sh -c``) beside each worker, as the consumer on a
  Vast instance runs beside its worker: started once the worker is ready, with that
  worker's control listener in ``NULLWORKER_CONTROL_URL`` (and
  ``NULLWORKER_CONTROL_PORT``), so a new worker's consumer never talks to a worker
  that is gone (with a consumer health check in the environment, which the workers
  inherit, at the worker's first report instead: it is ready only once its consumer
  answers); started again with a backoff (1, 2, 4, ... 30 s) if it exits while
  its worker lives; stopped with its worker.

Concurrency invariants
----------------------
* Everything runs in one Trio run. The engine's hook and the scaling tick are
  synchronous, so "is this worker idle?" and "retire it from the engine" happen in one
  step: no client can be routed to a worker between the check and its retirement.
* Each child has its own task and cancel scope. Every way out of that task (the
  scope cancelled to scale down, Ctrl-C/SIGTERM cancelling everything, the child
  exiting by itself) runs the same ``finally``: SIGTERM, a bounded wait, SIGKILL, a
  reap, and the worker's removal from the engine. The cleanup is shielded and bounded,
  so Ctrl-C never leaves a child process behind.
* A consumer runs in its worker's task nursery, so it is stopped before its worker,
  by the same shielded, bounded cleanup, sent to its whole process group (it has its
  own, so that stopping it also reaches the command's children and a terminal's Ctrl-C
  reaches dev first).
* Workers are registered with the engine before they start (state ``starting``) and
  retired before they are signalled, so the engine never routes to a worker that is
  going away.

What the engine page shows beyond the protocol comes from here: the scaling policy
(:class:`~.core.Scaling`, with the pause after a crash), each worker's pid and log,
why it stopped, its control listener and its consumer's state, and, while a worker is
busy, its active hold and its local holds (by their labels) as its control listener's
``GET /status`` describes them (polled every ``HOLD_POLL_S``): the time left, what keeps
it busy, and whether a finished hold elapsed or was released.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any, TextIO

import httpx
import trio

from .. import logs
from .core import (
    DEFAULT_ENGINE_PORT,
    Consumer,
    Engine,
    Hold,
    LocalHoldView,
    Scaling,
    WorkerRecord,
)
from .web import serve_engine

__all__ = ["DevOptions", "main", "run_dev"]

#: How often the supervisor checks idle workers and the minimum count.
TICK_S = 0.25
#: Redraws of the live view per second, at most (TTY); changes are checked as often.
VIEW_INTERVAL_S = 0.25
#: Backoff after a worker exits on its own: 2, 4, 8, 16, 30, 30, ... seconds.
MAX_RESPAWN_BACKOFF_S = 30.0
#: How long the output pump may drain a child's last lines after it exited.
DRAIN_S = 1.0
#: How often a busy worker's control listener is asked about its hold (for the page).
HOLD_POLL_S = 0.5
#: Backoff after a consumer exits while its worker lives: 1, 2, 4, ... up to this.
MAX_CONSUMER_BACKOFF_S = 30.0
#: A consumer that ran this long before exiting starts its backoff over.
CONSUMER_STABLE_S = 60.0
#: The worker's consumer health check settings (they reach the workers with dev's
#: environment).
CONSUMER_HEALTH_VARIABLES = ("BACKEND_HEALTH_URL", "NULLWORKER_BACKEND_HEALTH_COMMAND")
#: The shell that runs ``--consumer``.
CONSUMER_SHELL = "/bin/sh"


@dataclass(frozen=True, kw_only=True)
class DevOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_ENGINE_PORT
    min_workers: int = 0
    max_workers: int = 3
    idle_timeout_s: float = 60.0
    #: Per-worker log files go here; ``None`` prefixes worker output with ``[worker N]``.
    log_dir: str | None = None
    #: Require this key on ``/route/`` (``None``: any key is accepted).
    api_key: str | None = None
    stop_timeout_s: float = 5.0
    worker_command: tuple[str, ...] = (sys.executable, "-m", "nullworker", "serve")
    #: Extra environment for the workers (e.g. ``MAX_RESERVATION_SECONDS``).
    worker_env: Mapping[str, str] = field(default_factory=dict)
    #: A shell command run beside each worker once it is ready, with the worker's
    #: control listener in ``NULLWORKER_CONTROL_URL`` (``None``: no consumer).
    consumer: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError("--max-workers must be at least 1")
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError("--min-workers must be between 0 and --max-workers")
        if not math.isfinite(self.idle_timeout_s) or self.idle_timeout_s < 0:
            raise ValueError("--idle-timeout must be a finite number of seconds >= 0")
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be between 0 and 65535")
        if self.consumer is not None and not self.consumer.strip():
            raise ValueError("--consumer must be a command, not empty")


def _free_port(host: str) -> int:
    """A currently free TCP port on ``host`` (the kernel's pick; small race accepted)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class _Console:
    """Serialises output: event lines, worker output and (on a TTY) one status line
    redrawn in place below them."""

    def __init__(self, stream: TextIO, *, tty: bool) -> None:
        self._stream = stream
        self.tty = tty
        self._status = ""
        self._status_ended = False

    def line(self, text: str) -> None:
        if self.tty and self._status:
            self._stream.write("\r\x1b[K")
        self._stream.write(text + "\n")
        if self.tty and self._status:
            self._stream.write(self._status)
        self._stream.flush()

    def status(self, text: str) -> None:
        if self._status_ended:
            return
        width = max(20, shutil.get_terminal_size().columns - 1)
        text = text[:width]
        if text == self._status:
            return
        self._status = text
        self._stream.write("\r\x1b[K" + self._status)
        self._stream.flush()

    def end_status(self) -> None:
        """Wipe the status line for good: once stopping, it would only be stale."""
        self._status_ended = True
        if self.tty and self._status:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
        self._status = ""

    def close(self) -> None:
        if self.tty and self._status:
            self._stream.write("\n")
            self._stream.flush()
            self._status = ""


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: _Console) -> None:
        super().__init__()
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._console.line(self.format(record))
        except Exception:
            self.handleError(record)


@dataclass(eq=False)
class _Child:
    id: int
    port: int
    control_port: int
    started_at: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    process: trio.Process | None = None
    stopping: bool = False
    was_ready: bool = False
    #: Why it stopped, for the page's list of recent workers.
    stop_reason: str = ""
    #: The ``--consumer`` beside it: its current process, last exit code, restarts.
    consumer_pid: int | None = None
    consumer_code: int | None = None
    consumer_restarts: int = 0

    @property
    def control_url(self) -> str:
        """The worker's control listener (it binds loopback only, whatever ``--host``)."""
        return f"http://127.0.0.1:{self.control_port}"


class _Supervisor:
    def __init__(
        self,
        engine: Engine,
        options: DevOptions,
        console: _Console,
        master_token: str,
        http: httpx.AsyncClient,
    ) -> None:
        self.engine = engine
        self.options = options
        self.console = console
        self.master_token = master_token
        self.http = http
        self.children: dict[int, _Child] = {}
        self._next_id = 1
        self._nursery: trio.Nursery | None = None
        self._crashes = 0
        self._spawn_not_before = -math.inf

    # -- scaling decisions (synchronous: atomic with respect to the engine) ------------

    def live(self) -> list[_Child]:
        return [c for c in self.children.values() if not c.stopping]

    def starting(self) -> int:
        return sum(
            1
            for c in self.live()
            if self.engine.worker_state(c.id) in (None, "starting", "loading")
        )

    def on_demand(self, waiting: int) -> None:
        """The engine's hook: called on every WAITING answer."""
        if self._nursery is None:
            return
        if self.starting() >= waiting or len(self.live()) >= self.options.max_workers:
            return
        if trio.current_time() < self._spawn_not_before:
            return
        self._spawn(f"{waiting} request(s) waiting")

    def _spawn(self, reason: str) -> None:
        assert self._nursery is not None
        host = self.options.host
        port = _free_port(host)
        control_port = _free_port(host)
        while control_port == port:  # the kernel rarely repeats itself; bounded in practice
            control_port = _free_port(host)
        child = _Child(
            id=self._next_id, port=port, control_port=control_port, started_at=trio.current_time()
        )
        self._next_id += 1
        self.children[child.id] = child
        self.engine.register_worker(
            child.id,
            label=f"port {port}",
            log=self._output_of(child),
            control_url=child.control_url,
        )
        self.console.line(f"[dev] starting worker {child.id} on port {port} ({reason})")
        self._nursery.start_soon(self._run_child, child)

    def _output_of(self, child: _Child, kind: str = "worker") -> str:
        """Where the worker's (or its consumer's) output goes: its log file, or dev's
        own output."""
        if self.options.log_dir is None:
            return f"dev's output, [{kind} {child.id}]"
        return os.path.join(self.options.log_dir, f"{kind}-{child.id}.log")

    def _stop(self, child: _Child, reason: str) -> None:
        child.stopping = True
        child.stop_reason = f"stopped by dev: {reason}"
        self.engine.retire_worker(child.id, reason=child.stop_reason)
        self.console.line(f"[dev] stopping worker {child.id} ({reason})")
        child.scope.cancel()

    def _tick(self) -> None:
        now = trio.current_time()
        for child in self.live():
            record = self.engine.workers.get(child.id)
            if record is not None and record.ready and not child.was_ready:
                child.was_ready = True
                self._crashes = 0
                self.console.line(
                    f"[dev] worker {child.id} ready after {now - child.started_at:.1f} s"
                )
        self._scale_down(now)
        missing = self.options.min_workers - len(self.live())
        if missing > 0 and now >= self._spawn_not_before:
            for _ in range(missing):
                self._spawn("--min-workers")

    def _scale_down(self, now: float) -> None:
        excess = len(self.live()) - self.options.min_workers
        if excess <= 0:
            return
        idle: list[tuple[float, _Child]] = []
        for child in self.live():
            record = self.engine.workers.get(child.id)
            if record is None or record.idle_since is None:
                continue
            if self.engine.worker_state(child.id) != "idle":
                continue
            if now - record.idle_since >= self.options.idle_timeout_s:
                idle.append((record.idle_since, child))
        idle.sort(key=lambda pair: pair[0])
        for _, child in idle[:excess]:
            self._stop(child, f"idle for {self.options.idle_timeout_s:g} s")

    # -- tasks -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.options.min_workers):
                self._spawn("--min-workers")
            task_status.started()
            while True:
                await trio.sleep(TICK_S)
                self._tick()

    def _child_env(self, child: _Child) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.options.worker_env)
        assert self.engine.url is not None
        env.update(
            {
                "REPORT_ADDR": self.engine.url,
                "CONTAINER_ID": str(child.id),
                "WORKER_PORT": str(child.port),
                # Said outright: a Vast-mode worker without a public address refuses
                # to start, and an inherited PUBLIC_IPADDR must not send clients elsewhere.
                "NULLWORKER_PUBLIC_URL": f"http://{_url_host(self.options.host)}:{child.port}",
                "MASTER_TOKEN": self.master_token,
                "NULLWORKER_HOST": self.options.host,
                "NULLWORKER_CONTROL_PORT": str(child.control_port),
                "UNSECURED": "false",
                "USE_SSL": "false",
                # Line by line through the pipe, not in 8 KiB blocks.
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    async def _run_child(self, child: _Child) -> None:
        log_file: IO[bytes] | None = None
        process: trio.Process | None = None
        try:
            with child.scope:
                if self.options.log_dir is not None:
                    path = self._output_of(child)
                    log_file = open(path, "ab")  # noqa: ASYNC230 -- a local file, opened once
                try:
                    process = await trio.lowlevel.open_process(
                        list(self.options.worker_command),
                        env=self._child_env(child),
                        stdin=subprocess.DEVNULL,
                        stdout=log_file if log_file is not None else subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                    )
                except OSError as exc:  # e.g. the interpreter vanished; not fatal to dev
                    self._crashed(child, f"could not be started: {exc}")
                    return
                child.process = process
                self.engine.set_pid(child.id, process.pid)
                self.console.line(
                    f"[dev] worker {child.id} started: pid {process.pid}, "
                    f"url http://{self.options.host}:{child.port}, control {child.control_url}"
                )
                async with trio.open_nursery() as nursery:
                    if process.stdout is not None:
                        nursery.start_soon(self._pump, f"[worker {child.id}] ", process.stdout)
                    nursery.start_soon(self._watch_hold, child)
                    if self.options.consumer is not None:
                        # In this nursery, so it is stopped (and reaped) before the worker.
                        nursery.start_soon(self._run_consumer, child, self.options.consumer)
                    await process.wait()
                    # Let the pump print the child's last words, but not forever.
                    nursery.cancel_scope.deadline = trio.current_time() + DRAIN_S
            if not child.stopping and process is not None:
                if process.returncode == 0:
                    # A clean exit (it got a signal of its own, e.g. Ctrl-C in the
                    # terminal): not a crash, and --min-workers replaces it if needed.
                    child.stop_reason = "exited by itself (code 0)"
                    self.console.line(f"[dev] worker {child.id} exited")
                else:
                    self._crashed(child, f"exited on its own with code {process.returncode}")
        finally:
            child.stopping = True
            self.engine.retire_worker(
                child.id, reason=child.stop_reason or "nullworker dev stopped"
            )
            if process is not None:
                # Shielded so Ctrl-C cannot skip it; bounded by the stop timeout.
                with trio.move_on_after(self.options.stop_timeout_s + 2.0, shield=True):
                    await _terminate(process, self.options.stop_timeout_s)
                if process.returncode is not None and self.options.verbose:
                    self.console.line(f"[dev] worker {child.id} exited ({process.returncode})")
            if log_file is not None:
                log_file.close()
            self.children.pop(child.id, None)

    def _crashed(self, child: _Child, what: str) -> None:
        self._crashes += 1
        backoff = min(2.0**self._crashes, MAX_RESPAWN_BACKOFF_S)
        self._spawn_not_before = trio.current_time() + backoff
        child.stop_reason = what
        if self.engine.scaling is not None:
            self.engine.scaling.paused_until = self._spawn_not_before
        self.console.line(f"[dev] worker {child.id} {what}; no new worker for {backoff:g} s")

    async def _watch_hold(self, child: _Child) -> None:
        """Tell the engine about the worker's active hold while it is busy.

        Only the worker knows how long a hold lasts; its control listener says so. A
        worker that does not answer (starting, a stand-in command) is simply asked
        again in the next round.
        """
        url = f"{child.control_url}/status"
        while True:
            await trio.sleep(HOLD_POLL_S)
            if self.engine.worker_state(child.id) not in ("busy", "leased"):
                continue
            try:
                response = await self.http.get(url)
                body = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                continue
            active = body.get("active") if isinstance(body, dict) else None
            self.engine.set_hold(child.id, _hold_of(active))
            self.engine.set_local_holds(child.id, _local_holds_of(body))

    # -- the consumer beside each worker -------------------------------------------------

    def _show_consumer(self, child: _Child, state: str, restart_at: float | None = None) -> None:
        log = self._output_of(child, "consumer")
        self.engine.set_consumer(
            child.id,
            Consumer(
                state=state,
                pid=child.consumer_pid,
                exit_code=child.consumer_code,
                restarts=child.consumer_restarts,
                restart_at=restart_at,
                log=log,
            ),
        )

    async def _run_consumer(self, child: _Child, command: str) -> None:
        """Run ``--consumer`` beside ``child`` for as long as the worker lives.

        It starts once the worker is ready (its control listener is up by then), is
        started again with a backoff when it exits while the worker lives, and is
        stopped with the worker: this task is cancelled with the worker's nursery, and
        the consumer's whole process group goes (SIGTERM, a bounded wait, SIGKILL, a
        reap; shielded, as for the workers).
        """
        self._show_consumer(child, "waiting")
        # With a consumer health check (BACKEND_HEALTH_URL or
        # NULLWORKER_BACKEND_HEALTH_COMMAND, passed on to the workers) a worker is ready
        # only once its consumer answers: the consumer then starts at the worker's first
        # report, when its control listener is up.
        env = {**os.environ, **self.options.worker_env}
        checked = any(env.get(name, "").strip() for name in CONSUMER_HEALTH_VARIABLES)
        try:
            await self.engine.wait_for(
                lambda engine: (
                    (w := engine.workers.get(child.id)) is not None
                    and (w.last_report_at is not None if checked else w.ready)
                ),
                timeout=math.inf,
            )
            failures = 0
            while True:
                began = trio.current_time()
                ran = await self._consumer_once(child, command)
                if trio.current_time() - began >= CONSUMER_STABLE_S:
                    failures = 0
                failures += 1
                backoff = min(2.0 ** (failures - 1), MAX_CONSUMER_BACKOFF_S)
                what = f"exited with code {child.consumer_code}" if ran else "could not start"
                self.console.line(
                    f"[dev] consumer {child.id} {what} while worker {child.id} lives; "
                    f"restarting in {backoff:g} s"
                )
                restart_at = trio.current_time() + backoff
                self._show_consumer(child, "restarting", restart_at)
                await trio.sleep_until(restart_at)
                child.consumer_restarts += 1
        finally:
            self._show_consumer(child, "stopped")

    async def _consumer_once(self, child: _Child, command: str) -> bool:
        """One run of the consumer, until it exits; stopped if cancelled meanwhile.

        Returns whether it started at all.
        """
        log_file: IO[bytes] | None = None
        process: trio.Process | None = None
        try:
            if self.options.log_dir is not None:
                path = self._output_of(child, "consumer")
                log_file = open(path, "ab")  # noqa: ASYNC230 -- a local file, opened once
            try:
                process = await trio.lowlevel.open_process(
                    [CONSUMER_SHELL, "-c", command],
                    env=self._consumer_env(child),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file if log_file is not None else subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    # Its own process group: Ctrl-C in the terminal does not reach it
                    # before dev stops it, and stopping it reaches the command's children.
                    start_new_session=True,
                )
            except OSError as exc:
                self.console.line(f"[dev] consumer {child.id} could not be started: {exc}")
                child.consumer_code = None
                return False
            child.consumer_pid = process.pid
            self._show_consumer(child, "running")
            self.console.line(
                f"[dev] consumer {child.id} started: pid {process.pid}, "
                f"NULLWORKER_CONTROL_URL={child.control_url}"
            )
            async with trio.open_nursery() as nursery:
                if process.stdout is not None:
                    nursery.start_soon(self._pump, f"[consumer {child.id}] ", process.stdout)
                await process.wait()
                nursery.cancel_scope.deadline = trio.current_time() + DRAIN_S
            return True
        finally:
            if process is not None:
                with trio.move_on_after(self.options.stop_timeout_s + 2.0, shield=True):
                    await _terminate_group(process, self.options.stop_timeout_s)
                child.consumer_code = process.returncode
                if self.options.verbose:
                    self.console.line(f"[dev] consumer {child.id} exited ({process.returncode})")
            if log_file is not None:
                log_file.close()

    def _consumer_env(self, child: _Child) -> dict[str, str]:
        """dev's environment and the worker's control listener (not its master token)."""
        env = dict(os.environ)
        env.update(
            {
                "NULLWORKER_CONTROL_URL": child.control_url,
                "NULLWORKER_CONTROL_PORT": str(child.control_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    async def _pump(self, prefix: str, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async with stream:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    self.console.line(prefix + raw.decode("utf-8", "replace").rstrip("\r"))
            if buffer:
                self.console.line(prefix + buffer.decode("utf-8", "replace"))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _hold_of(active: Any) -> Hold | None:
    """The control listener's ``active`` object as a :class:`Hold` (``None`` if absent
    or not understood)."""
    if not isinstance(active, dict):
        return None
    keys = ("duration", "started_at", "ends_at")
    duration, started, ends = (_number(active.get(key)) for key in keys)
    if duration is None or started is None or ends is None:
        return None
    idx = active.get("request_idx")
    return Hold(
        request_idx=idx if isinstance(idx, int) and not isinstance(idx, bool) else None,
        duration_s=duration,
        started_at=started,
        ends_at=ends,
    )


def _local_holds_of(body: Any) -> tuple[LocalHoldView, ...]:
    """The local holds in a control ``/status`` body (``local_holds.holds``), read
    defensively: what is missing or not understood is left out, never an error."""
    section = body.get("local_holds") if isinstance(body, dict) else None
    holds = section.get("holds") if isinstance(section, dict) else None
    if not isinstance(holds, list):
        return ()
    found: list[LocalHoldView] = []
    for item in holds[:_MAX_LOCAL_HOLDS_SHOWN]:
        if not isinstance(item, dict):
            continue
        raw_id = item.get("id")
        label = item.get("label")
        label = label if isinstance(label, str) else ""
        duration = item.get("duration", item.get("duration_s"))
        found.append(
            LocalHoldView(
                id=raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None,
                label="".join(c if c.isprintable() else "?" for c in label[:_MAX_LABEL_CHARS]),
                started_at=_number(item.get("started_at")),
                duration_s=_number(duration),
            )
        )
    return tuple(found)


#: What the page shows of a worker's local holds (a worker may have any number).
_MAX_LOCAL_HOLDS_SHOWN = 20
_MAX_LABEL_CHARS = 200


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


async def _terminate_group(process: trio.Process, grace_s: float) -> None:
    """SIGTERM to the process group ``process`` leads, wait up to ``grace_s`` for it,
    then SIGKILL to whatever is left of the group; always reaps ``process``."""
    _signal_group(process.pid, signal.SIGTERM)
    with trio.move_on_after(grace_s):
        await process.wait()
    # The command's own children, or a leader that ignored SIGTERM.
    _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # the whole group is gone already
        pass


async def _terminate(process: trio.Process, grace_s: float) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL; always reaps the child."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(grace_s):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


# -- the live view ---------------------------------------------------------------------


def _describe(record: WorkerRecord | None, state: str, now: float) -> str:
    if record is None:
        return state
    if state in ("busy", "leased") and record.busy_since is not None:
        return f"{state} {now - record.busy_since:.1f}s"
    if state == "idle" and record.idle_since is not None:
        return f"idle {now - record.idle_since:.0f}s"
    if state == "error":
        return f"error: {record.error_msg[:40]}"
    return state


def _render_view(engine: Engine, supervisor: _Supervisor) -> tuple[str, tuple[object, ...]]:
    """The one-line view and a key that changes only when a state changes (not an age)."""
    now = trio.current_time()
    parts: list[str] = []
    key: list[object] = [engine.waiting]
    for child in sorted(supervisor.children.values(), key=lambda c: c.id):
        record = engine.workers.get(child.id)
        state = "stopping" if child.stopping else (engine.worker_state(child.id) or "starting")
        parts.append(f"w{child.id} {_describe(record, state, now)}")
        key.append((child.id, state))
    workers = " | ".join(parts) if parts else "no workers"
    return f"[dev] waiting {engine.waiting} | {workers}", tuple(key)


async def _view_loop(engine: Engine, supervisor: _Supervisor, console: _Console) -> None:
    last_key: tuple[object, ...] | None = None
    try:
        while True:
            text, key = _render_view(engine, supervisor)
            if console.tty:
                console.status(text)
            elif key != last_key:
                console.line(text)
            last_key = key
            await trio.sleep(VIEW_INTERVAL_S)
    finally:
        # Stopping: the view would go stale while the workers are stopped.
        console.end_status()


# -- composition ---------------------------------------------------------------------------


def _banner(options: DevOptions, url: str) -> str:
    logs = (
        f"in {options.log_dir}/worker-N.log"
        if options.log_dir is not None
        else "below, each line prefixed [worker N]"
    )
    key = "dev" if options.api_key is None else shlex.quote("<the --api-key value>")
    # The running interpreter by its full path: the line works as pasted in any shell,
    # without the virtualenv activated and on systems with no `python` command.
    client = shlex.join([sys.executable, "-m", "nullworker.client"])
    lines = [
        f"nullworker dev: engine on {url}",
        f"  workers page: {url}/   (JSON: {url}/workers)",
        f"  workers: min {options.min_workers}, max {options.max_workers}, "
        f"stopped after {options.idle_timeout_s:g} s idle; worker logs {logs}",
    ]
    if options.consumer is not None:
        lines.append(
            f"  beside each worker: {options.consumer} "
            "(with its control listener in $NULLWORKER_CONTROL_URL)"
        )
    lines += [
        "  hold a worker for 60 s:",
        f"    VAST_API_KEY={key} {client} --engine-url {url} --endpoint dev --duration 60",
        "  Ctrl-C stops the engine and every worker"
        + (" and consumer." if options.consumer else "."),
    ]
    return "\n".join(lines)


async def run_dev(
    options: DevOptions,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the engine and the worker supervisor until cancelled.

    ``task_status.started(url)`` gets the engine's base URL once it listens. Output
    (banner, events, worker output, live view) goes to stdout. On cancellation every
    worker process is stopped (SIGTERM, then SIGKILL after ``options.stop_timeout_s``)
    and reaped before this returns.
    """
    console = _Console(sys.stdout, tty=sys.stdout.isatty())
    await _run_dev(options, console, task_status=task_status)


async def _run_dev(
    options: DevOptions,
    console: _Console,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    master_token = secrets.token_urlsafe(16)
    scaling = Scaling(
        min_workers=options.min_workers,
        max_workers=options.max_workers,
        idle_timeout_s=options.idle_timeout_s,
    )
    engine = Engine(api_key=options.api_key, master_token=master_token, scaling=scaling)
    started = False
    probe_log = logging.getLogger("httpx")
    if probe_log.level == logging.NOTSET:
        # One INFO line per hold probe (twice a second per busy worker) would bury the
        # output; the probes' failures are expected and handled.
        probe_log.setLevel(logging.WARNING)
    try:
        async with httpx.AsyncClient(timeout=1.0) as http, trio.open_nursery() as nursery:
            supervisor = _Supervisor(engine, options, console, master_token, http)
            engine.on_demand = supervisor.on_demand
            url = await nursery.start(
                partial(serve_engine, engine, host=options.host, port=options.port)
            )
            started = True
            console.line(_banner(options, url))
            await nursery.start(supervisor.run)
            nursery.start_soon(_view_loop, engine, supervisor, console)
            task_status.started(url)
    finally:
        console.end_status()
        if started:
            # Every worker is reaped and the engine closed by now.
            console.line("[dev] stopped")
        console.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nullworker dev",
        description="Run a local Vast engine emulator that starts and stops nullworker "
        "workers on demand.",
    )
    parser.add_argument("--max-workers", type=int, default=3, help="at most this many (3)")
    parser.add_argument("--min-workers", type=int, default=0, help="keep this many alive (0)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="stop a worker idle this many seconds, above --min-workers (60)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_ENGINE_PORT, help="engine port (8080; 0 = any)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="engine and worker address")
    parser.add_argument(
        "--log-dir", help="write each worker's output to DIR/worker-N.log instead of here"
    )
    parser.add_argument("--api-key", help="require this api_key on /route/ (default: any)")
    parser.add_argument(
        "--max-reservation-seconds",
        type=float,
        help="passed to the workers as MAX_RESERVATION_SECONDS",
    )
    parser.add_argument(
        "--consumer",
        metavar="CMD",
        help="run CMD (with /bin/sh -c) beside every worker once it is ready, with the "
        "worker's control listener in $NULLWORKER_CONTROL_URL; restarted if it exits, "
        "stopped with its worker",
    )
    parser.add_argument("--verbose", action="store_true", help="also log every engine request")
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="text, or json: one object per line, for the engine's lines and the workers' "
        "(default $NULLWORKER_LOG_FORMAT or text)",
    )
    return parser


def _setup_logging(console: _Console, *, verbose: bool, fmt: logs.LogFormat) -> None:
    handler = _ConsoleHandler(console)
    handler.setFormatter(
        logs.make_formatter(fmt, text_format="[engine] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    quiet = logging.INFO if verbose else logging.WARNING
    # Polls arrive every second or so; their access lines would drown the view.
    logging.getLogger("nullworker.engine.access").setLevel(quiet)
    logging.getLogger("nullworker.engine.http").setLevel(quiet)
    logging.getLogger("nullworker.engine").setLevel(quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """``nullworker dev [--max-workers N] [--min-workers N] [--idle-timeout S] [--port P]``."""
    args = _parser().parse_args(None if argv is None else list(argv))
    worker_env: dict[str, str] = {}
    if args.max_reservation_seconds is not None:
        worker_env["MAX_RESERVATION_SECONDS"] = str(args.max_reservation_seconds)
    try:
        log_format = logs.resolve_format(args.log_format)
        worker_env["NULLWORKER_LOG_FORMAT"] = log_format
        if args.log_dir is not None:
            os.makedirs(args.log_dir, exist_ok=True)
        options = DevOptions(
            host=args.host,
            port=args.port,
            min_workers=args.min_workers,
            max_workers=args.max_workers,
            idle_timeout_s=args.idle_timeout,
            log_dir=os.path.abspath(args.log_dir) if args.log_dir is not None else None,
            api_key=args.api_key,
            worker_env=worker_env,
            consumer=args.consumer,
            verbose=args.verbose,
        )
    except (ValueError, OSError) as exc:
        print(f"nullworker dev: {exc}", file=sys.stderr)
        return 2
    console = _Console(sys.stdout, tty=sys.stdout.isatty())
    _setup_logging(console, verbose=options.verbose, fmt=log_format)

    async def _until_signal() -> None:
        # Receiving SIGINT here (instead of KeyboardInterrupt) lets the shutdown run
        # as an ordinary cancellation, with every child stopped and reaped.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(_run_dev, options, console))
                async for signum in signals:
                    console.end_status()
                    console.line(
                        f"[dev] {signal.Signals(signum).name}: stopping the workers and the engine"
                    )
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(_until_signal)
    except BaseExceptionGroup as group:
        reason = _os_error(group)
        if reason is None:
            raise
        print(f"nullworker dev: {_start_failure(reason, options)}", file=sys.stderr)
        return 1
    except OSError as exc:  # typically the engine port is taken
        print(f"nullworker dev: {_start_failure(exc, options)}", file=sys.stderr)
        return 1
    return 0


def _start_failure(exc: OSError, options: DevOptions) -> str:
    """What went wrong at start, and what to do about the usual case: the port is taken."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {options.port} on {options.host} is already in use (another nullworker "
            "dev or engine?): stop it, or choose another port with --port "
            "(--port 0 picks a free one)"
        )
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on port {options.port}: choose another one with --port"
    return str(exc)


def _os_error(group: BaseExceptionGroup[BaseException]) -> OSError | None:
    """The OSError behind a start-up failure, if that is all the group holds."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if leaves and all(isinstance(exc, OSError) for exc in leaves):
        first = leaves[0]
        assert isinstance(first, OSError)
        return first
    return None


if __name__ == "__main__":
    sys.exit(main())
