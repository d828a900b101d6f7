"""``nullworker serve``: the worker's command line.

Its arguments (:func:`add_arguments`, used by the ``nullworker`` command's parser) and
running them (:func:`run`): settings from the environment and the flags, logging, the
worker until SIGINT/SIGTERM, and the exit code (what ``start_server.sh`` supervises by):

* 0 -- stopped by SIGINT/SIGTERM. More of them while it stops are the same request
  (Ctrl-C on ``start_server.sh`` sends the worker SIGINT from the terminal and SIGTERM
  from the script): logged, and the graceful stop goes on.
* 1 -- failed to start for a reason a later start may not have (a port in use, the
  port's lock held by another process), or the background work failed after start-up.
* 2 -- a configuration error (a bad or missing setting, an unusable
  ``NULLWORKER_LOCK_DIR``, TLS files that cannot be loaded): a restart cannot fix it.

A failure to start is one line on stderr, ``nullworker: <what failed>``, and the same
words go to the engine as ``error_msg`` (every ``REPORT_ADDR``, bounded). The traceback
is logged only with ``NULLWORKER_LOG_LEVEL=DEBUG``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import trio

from .. import logs
from .._groups import split_leaves
from ..errors import ConfigError, WorkerFailed
from .config import DEFAULT_CONTROL_PORT, DEFAULT_PORT, WorkerConfig

__all__ = ["EPILOG", "HELP", "add_arguments", "run"]

log = logging.getLogger("nullworker")

#: The one line ``nullworker --help`` shows for ``serve``.
HELP = "run the worker (POST /reserve)"

EPILOG = """\
Settings come from the environment (the Vast contract: WORKER_PORT, REPORT_ADDR, CONTAINER_ID,
PUBLIC_IPADDR, VAST_TCP_PORT_<port>, MASTER_TOKEN, UNSECURED, USE_SSL; and MAX_RESERVATION_SECONDS,
MAX_QUEUE_TIME, NULLWORKER_CONTROL_PORT, NULLWORKER_HOST, NULLWORKER_PUBLIC_URL; the consumer's
health check: BACKEND_HEALTH_URL or NULLWORKER_BACKEND_HEALTH_COMMAND). Flags override them.
With neither REPORT_ADDR nor CONTAINER_ID set the worker runs standalone on 127.0.0.1,
unsecured, not reporting. Exit codes: 0 stopped by a signal, 1 failed (a port in use; a restart
may help), 2 a configuration error (a restart cannot help).
"""


def add_arguments(serve: argparse.ArgumentParser) -> None:
    """Add ``nullworker serve``'s flags to ``serve`` (the ``serve`` sub-command's parser)."""
    serve.add_argument(
        "--host", help="bind address (default 127.0.0.1 standalone, 0.0.0.0 on Vast)"
    )
    serve.add_argument(
        "--port", type=int, help=f"main port (default $WORKER_PORT or {DEFAULT_PORT})"
    )
    serve.add_argument(
        "--control-port",
        help=f"127.0.0.1 control listener port, or 'off' (default {DEFAULT_CONTROL_PORT})",
    )
    serve.add_argument("--max-reservation-seconds", type=float, help="cap on a hold (default 3600)")
    serve.add_argument(
        "--max-queue-time", type=float, help="longest wait in the queue (default 30)"
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text, or json: one object per line (default $NULLWORKER_LOG_FORMAT or text)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    if args.host:
        out["host"] = args.host
    if args.port is not None:
        out["port"] = args.port
    if args.control_port is not None:
        raw = str(args.control_port).strip().lower()
        if raw in ("off", "none", "-"):
            out["control_port"] = None
        else:
            try:
                out["control_port"] = int(raw)
            except ValueError:
                raise ConfigError(f"--control-port must be a port or 'off', got {raw!r}") from None
    if args.max_reservation_seconds is not None:
        out["max_reservation_s"] = args.max_reservation_seconds
    if args.max_queue_time is not None:
        out["max_queue_time_s"] = args.max_queue_time
    if args.log_level:
        out["log_level"] = args.log_level.upper()
    if getattr(args, "log_format", None):
        out["log_format"] = args.log_format
    return out


def run(args: argparse.Namespace, *, started_at: float | None = None) -> int:
    """Run ``nullworker serve`` with parsed ``args``; returns the exit code.

    ``started_at`` is ``time.monotonic()`` at process start, for the reported ``loadtime``.
    """
    try:
        config = WorkerConfig.from_env(os.environ, **_overrides(args))
    except ConfigError as exc:
        print(f"nullworker: configuration error: {exc}", file=sys.stderr)
        logs.configure("INFO", "text", stream=sys.stdout)  # the beacon's own lines
        _beacon_from_env(f"Worker Server failed to launch: configuration error: {exc}")
        return 2
    logs.configure(config.log_level, config.log_format, stream=sys.stdout)
    try:
        trio.run(_serve_until_signal, config, started_at)
    except BaseException as exc:  # start-up failure: one line, a beacon, non-zero
        reason = _one_line(exc)
        if reason is None:
            raise
        if _contains(exc, WorkerFailed):  # the worker reported it to the engine itself
            print(f"nullworker: stopped: {reason}", file=sys.stderr)
            return 1
        log.debug("failed to start", exc_info=exc)  # the traceback, when debugging
        configuration = _contains(exc, ConfigError)
        if configuration:
            reason = f"configuration error: {reason}"
        print(f"nullworker: failed to start: {reason}", file=sys.stderr)
        if config.reporting:
            trio.run(_send_beacon, config, f"Worker Server failed to launch: {reason}")
        return 2 if configuration else 1
    # Stopped by a signal, and on the way out. A second stop signal (Ctrl-C reaches the
    # worker and start_server.sh, which passes it on) may still arrive while the
    # interpreter shuts down, and Python's own shutdown puts the default handler back
    # in place of a Python one: SIG_IGN is the one it leaves alone, so exit 0 stays 0.
    # (No child is started from here on, so none inherits it.)
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    return 0


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    return bool(split_leaves(exc, kind)[0])


def _is_start_failure(exc: BaseException) -> bool:
    # Hypercorn wraps a failing before_serving hook (e.g. the single-process lock) in a
    # LifespanFailureError.
    return (
        isinstance(exc, OSError | ConfigError | WorkerFailed)
        or type(exc).__name__ == "LifespanFailureError"
    )


def _one_line(exc: BaseException) -> str | None:
    """The reason behind a start-up failure, or None for what is not one (a bug, Ctrl-C)."""
    failures, _ = split_leaves(exc, _is_start_failure)
    if not failures:
        return None
    first = failures[0]
    if type(first).__name__ == "LifespanFailureError":
        return str(first).split(": ", 1)[-1]
    return " ".join(str(first).split())  # one line, whatever the message held


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _serve_until_signal(config: WorkerConfig, started_at: float | None) -> None:
    """Serve until the first SIGINT or SIGTERM, then stop gracefully and return.

    Every later one is the same request, not a harder one: Ctrl-C on a terminal reaches
    ``start_server.sh`` and the worker alike, and the script passes its SIGINT on as
    SIGTERM, so a worker stopped that way always gets two. The stop is bounded anyway
    (``graceful_timeout_s``). Trio hands a signal still pending when its receiver closes
    back to the handler that was there before, which for SIGTERM would kill the process
    (status 143, not 0) and for SIGINT raise ``KeyboardInterrupt``: so the receiver is
    drained until ``serve`` returns, and the handler under it ignores what comes after.
    """
    from .server import serve

    stopping = trio.Event()
    with _late_stop_signals_ignored(), trio.open_signal_receiver(*_STOP_SIGNALS) as signals:

        async def watch() -> None:
            async for signum in signals:
                name = signal.Signals(signum).name
                if stopping.is_set():
                    log.info("received %s: already shutting down", name)
                    continue
                log.info("received %s: shutting down", name)
                stopping.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await serve(config, shutdown_trigger=stopping.wait, started_at=started_at)
            nursery.cancel_scope.cancel()


@contextlib.contextmanager
def _late_stop_signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM do nothing inside, and after a graceful stop too.

    The previous handlers come back only when serving failed (the start-up failure
    path may still send a beacon, which Ctrl-C should be able to cut): after a stop the
    process is on its way out, and a second stop signal arriving during the
    interpreter's own shutdown must not turn exit 0 into 143. A Python handler that
    does nothing rather than ``SIG_IGN``, which a child process would inherit.
    """
    previous = {signum: signal.signal(signum, _ignore) for signum in _STOP_SIGNALS}
    try:
        yield
    except BaseException:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        raise


def _ignore(signum: int, frame: FrameType | None) -> None:
    pass


async def _send_beacon(config: WorkerConfig, message: str) -> None:
    from .reporter import send_error_beacon

    with trio.move_on_after(15):
        await send_error_beacon(config, message)


def _beacon_from_env(message: str) -> None:
    """Report a configuration error to the engine, if the env names one at all."""
    addrs = tuple(a.strip() for a in os.environ.get("REPORT_ADDR", "").split(",") if a.strip())
    try:
        container_id = int(os.environ.get("CONTAINER_ID", ""))
    except ValueError:
        return
    if not addrs:
        return
    config = WorkerConfig(
        report_addrs=addrs,
        container_id=container_id,
        master_token=os.environ.get("MASTER_TOKEN", ""),
        unsecured=True,
    )
    trio.run(_send_beacon, config, message)
