"""The processes of ``nullworker dev``: each worker and its consumer, started, watched, stopped.

Every worker is a child process (``python -m nullworker serve``) given the Vast
environment contract on ports held for it until it ends (:func:`_hold_port`,
:meth:`Processes._child_env`); with
``--consumer``, a shell command runs beside it once it is ready, with the worker's control
listener in ``NULLWORKER_CONTROL_URL``. While a worker is busy its control listener's
``GET /status`` is polled (every :data:`HOLD_POLL_S`) for its active hold and its local
holds, which the engine shows on the page. *When* a worker starts or stops is not
decided here: that is the scaling policy's (:mod:`.dev_scaling`), which calls
:meth:`Processes.spawn` and :meth:`Processes.stop` and hears of crashes through
:attr:`Processes.on_crash`.

Concurrency invariants
----------------------
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
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import httpx
import trio

from .core import Engine
from .dev_options import DevOptions
from .records import Consumer, Hold, LocalHoldView

__all__ = ["Child", "Processes"]

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


#: Whether a listener with ``SO_REUSEADDR`` may bind a port that a socket with
#: ``SO_REUSEADDR`` which never listens holds (Linux: yes; the BSDs want SO_REUSEPORT).
_LISTEN_BESIDE_HELD_PORT = sys.platform.startswith("linux")


def _hold_port(host: str) -> socket.socket:
    """A socket that holds a free TCP port on ``host`` (the kernel's pick) for a worker
    that is given the port's number, until it is closed.

    A port picked and closed again could be taken by another process (a second ``dev``,
    a test suite) before the worker binds it. This socket has ``SO_REUSEADDR`` and never
    listens: the worker's listener (``SO_REUSEADDR`` too) binds beside it, and the
    kernel hands the port to no ``bind`` to port 0 while it is held.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(eq=False)
class Child:
    """One worker process dev started (and the consumer beside it), as dev tracks it;
    ``id`` is the worker's ``CONTAINER_ID`` and its id in the engine."""

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
    #: The sockets that keep :attr:`port` and :attr:`control_port` for this worker
    #: (:func:`_hold_port`); closed when it ends.
    held_ports: list[socket.socket] = field(default_factory=list, repr=False)

    @property
    def control_url(self) -> str:
        """The worker's control listener (it binds loopback only, whatever ``--host``)."""
        return f"http://127.0.0.1:{self.control_port}"

    def release_ports(self) -> None:
        """Let go of the held ports (the worker has bound them, or is gone)."""
        for sock in self.held_ports:
            sock.close()
        self.held_ports.clear()


class Processes:
    """The worker processes of one ``nullworker dev`` run, and their consumers.

    ``say`` prints one line of dev's output. :meth:`run` must be started (it holds the
    nursery the children run in) before :meth:`spawn` starts any.
    """

    def __init__(
        self,
        engine: Engine,
        options: DevOptions,
        master_token: str,
        http: httpx.AsyncClient,
        *,
        say: Callable[[str], None],
    ) -> None:
        self.engine = engine
        self.options = options
        self.master_token = master_token
        self.http = http
        self.say = say
        self.children: dict[int, Child] = {}
        #: Called when a worker exits on its own with a failure, or cannot be started,
        #: with the child and what happened; the scaling policy sets its backoff here.
        self.on_crash: Callable[[Child, str], None] = self._note_crash
        self._next_id = 1
        self._nursery: trio.Nursery | None = None

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is up, so :meth:`spawn` may start a worker."""
        return self._nursery is not None

    def live(self) -> list[Child]:
        """The children not being stopped."""
        return [c for c in self.children.values() if not c.stopping]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the children run in until cancelled; every child is then
        stopped and reaped before this returns."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None  # closed: demand while the engine stops starts nothing

    def spawn(self, reason: str) -> None:
        """Start a new worker (registered with the engine first); ``reason`` is logged."""
        assert self._nursery is not None
        held = [_hold_port(self.options.host), _hold_port("127.0.0.1")]
        port, control_port = (sock.getsockname()[1] for sock in held)
        child = Child(
            id=self._next_id,
            port=port,
            control_port=control_port,
            started_at=trio.current_time(),
            held_ports=held,
        )
        self._next_id += 1
        self.children[child.id] = child
        self.engine.register_worker(
            child.id,
            label=f"port {port}",
            log=self._output_of(child),
            control_url=child.control_url,
        )
        self.say(f"[dev] starting worker {child.id} on port {port} ({reason})")
        self._nursery.start_soon(self._run_child, child)

    def _output_of(self, child: Child, kind: str = "worker") -> str:
        """Where the worker's (or its consumer's) output goes: its log file, or dev's
        own output."""
        if self.options.log_dir is None:
            return f"dev's output, [{kind} {child.id}]"
        return os.path.join(self.options.log_dir, f"{kind}-{child.id}.log")

    def stop(self, child: Child, reason: str) -> None:
        """Retire ``child`` from the engine, then cancel its task (which stops it)."""
        child.stopping = True
        child.stop_reason = f"stopped by dev: {reason}"
        self.engine.retire_worker(child.id, reason=child.stop_reason)
        self.say(f"[dev] stopping worker {child.id} ({reason})")
        child.scope.cancel()

    def _child_env(self, child: Child) -> dict[str, str]:
        """A worker's environment: dev's own, ``options.worker_env``, then the Vast
        contract pointing it at this engine on its own ports."""
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

    async def _run_child(self, child: Child) -> None:
        log_file: IO[bytes] | None = None
        process: trio.Process | None = None
        try:
            with child.scope:
                if self.options.log_dir is not None:
                    path = self._output_of(child)
                    log_file = open(path, "ab")  # noqa: ASYNC230 -- a local file, opened once
                if not _LISTEN_BESIDE_HELD_PORT:
                    child.release_ports()  # the worker could not bind beside them
                try:
                    process = await trio.lowlevel.open_process(
                        list(self.options.worker_command),
                        env=self._child_env(child),
                        stdin=subprocess.DEVNULL,
                        stdout=log_file if log_file is not None else subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                    )
                except OSError as exc:  # e.g. the interpreter vanished; not fatal to dev
                    self.on_crash(child, f"could not be started: {exc}")
                    return
                child.process = process
                self.engine.set_pid(child.id, process.pid)
                self.say(
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
                    self.say(f"[dev] worker {child.id} exited")
                else:
                    self.on_crash(child, f"exited on its own with code {process.returncode}")
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
                    self.say(f"[dev] worker {child.id} exited ({process.returncode})")
            if log_file is not None:
                log_file.close()
            child.release_ports()
            self.children.pop(child.id, None)

    def _note_crash(self, child: Child, what: str) -> None:
        child.stop_reason = what
        self.say(f"[dev] worker {child.id} {what}")

    async def _watch_hold(self, child: Child) -> None:
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

    def _show_consumer(self, child: Child, state: str, restart_at: float | None = None) -> None:
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

    async def _run_consumer(self, child: Child, command: str) -> None:
        """Run ``--consumer`` beside ``child`` for as long as the worker lives.

        It starts once the worker is ready (its control listener is up by then) -- with a
        consumer health check in the environment, which the workers inherit, at the
        worker's first report instead, since the worker is ready only once its consumer
        answers --, is started again with a backoff when it exits while the worker lives, and is
        stopped with the worker: this task is cancelled with the worker's nursery, and
        the consumer's whole process group goes (SIGTERM, a bounded wait, SIGKILL, a
        reap; shielded, as for the workers).
        """
        self._show_consumer(child, "waiting")
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
                self.say(
                    f"[dev] consumer {child.id} {what} while worker {child.id} lives; "
                    f"restarting in {backoff:g} s"
                )
                restart_at = trio.current_time() + backoff
                self._show_consumer(child, "restarting", restart_at)
                await trio.sleep_until(restart_at)
                child.consumer_restarts += 1
        finally:
            self._show_consumer(child, "stopped")

    async def _consumer_once(self, child: Child, command: str) -> bool:
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
                self.say(f"[dev] consumer {child.id} could not be started: {exc}")
                child.consumer_code = None
                return False
            child.consumer_pid = process.pid
            self._show_consumer(child, "running")
            self.say(
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
                    self.say(f"[dev] consumer {child.id} exited ({process.returncode})")
            if log_file is not None:
                log_file.close()

    def _consumer_env(self, child: Child) -> dict[str, str]:
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
                    self.say(prefix + raw.decode("utf-8", "replace").rstrip("\r"))
            if buffer:
                self.say(prefix + buffer.decode("utf-8", "replace"))


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
