"""``nullworker dev``: its command line, and the run that ties engine, workers and view together.

One Trio process runs the engine emulator (:mod:`nullworker.engine`) and supervises
worker child processes (``python -m nullworker serve``), each given the Vast
environment contract on free loopback ports, so the whole route -> reserve -> report
loop runs on one machine exactly as it does on Vast, signatures included. This module
is the command: options from the command line (:class:`DevOptions`, in
:mod:`.dev_options`), dev's console output and its one-line live view, and
:func:`run_dev`, which composes the parts:

* :mod:`.dev_scaling` -- the scaling policy: when a worker starts and when an idle one
  stops (``--min-workers``, ``--max-workers``, ``--idle-timeout``, the backoff after a
  crash);
* :mod:`.dev_processes` -- the processes: each worker and its ``--consumer``, started,
  watched and stopped with a shielded, bounded cleanup, so Ctrl-C never leaves a child
  process behind.

Everything runs in one Trio run; SIGINT and SIGTERM are received as signals (not
``KeyboardInterrupt``), so stopping is an ordinary cancellation in which every child is
stopped and reaped.

What the engine page shows beyond the protocol comes from dev: the scaling policy
(:class:`~.records.Scaling`, with the pause after a crash), each worker's pid and log,
why it stopped, its control listener and its consumer's state, and, while a worker is
busy, its active hold and its local holds (by their labels) as its control listener's
``GET /status`` describes them: the time left, what keeps it busy, and whether a
finished hold elapsed or was released.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import TextIO

import httpx
import trio

from .. import logs
from .._groups import split_leaves
from .core import DEFAULT_ENGINE_PORT, Engine
from .dev_options import DevOptions
from .dev_processes import Processes
from .dev_scaling import Scaler
from .records import Scaling, WorkerRecord
from .web import serve_engine

__all__ = ["DevOptions", "main", "run_dev"]

#: Redraws of the live view per second, at most (TTY); changes are checked as often.
VIEW_INTERVAL_S = 0.25


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


def _render_view(engine: Engine, processes: Processes) -> tuple[str, tuple[object, ...]]:
    """The one-line view and a key that changes only when a state changes (not an age)."""
    now = trio.current_time()
    parts: list[str] = []
    key: list[object] = [engine.waiting]
    for child in sorted(processes.children.values(), key=lambda c: c.id):
        record = engine.workers.get(child.id)
        state = "stopping" if child.stopping else (engine.worker_state(child.id) or "starting")
        parts.append(f"w{child.id} {_describe(record, state, now)}")
        key.append((child.id, state))
    workers = " | ".join(parts) if parts else "no workers"
    return f"[dev] waiting {engine.waiting} | {workers}", tuple(key)


async def _view_loop(engine: Engine, processes: Processes, console: _Console) -> None:
    last_key: tuple[object, ...] | None = None
    try:
        while True:
            text, key = _render_view(engine, processes)
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
            processes = Processes(engine, options, master_token, http, say=console.line)
            scaler = Scaler(engine, options, processes, say=console.line)
            engine.on_demand = scaler.on_demand
            url = await nursery.start(
                partial(serve_engine, engine, host=options.host, port=options.port)
            )
            started = True
            console.line(_banner(options, url))
            await nursery.start(processes.run)
            await nursery.start(scaler.run)
            nursery.start_soon(_view_loop, engine, processes, console)
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
    os_errors, others = split_leaves(group, OSError)
    if others or not os_errors:
        return None
    first = os_errors[0]
    assert isinstance(first, OSError)
    return first


if __name__ == "__main__":
    sys.exit(main())
