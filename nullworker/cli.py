"""The ``nullworker`` command: ``serve`` the worker, ``reserve`` capacity, run a local ``engine``
or a whole ``dev`` loop. Argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import trio

from . import __version__
from .errors import ConfigError, WorkerFailed
from .worker.config import DEFAULT_CONTROL_PORT, DEFAULT_PORT, WorkerConfig

__all__ = ["main"]

_PROCESS_START = time.monotonic()

log = logging.getLogger("nullworker")

_SERVE_EPILOG = """\
Settings come from the environment (the Vast contract: WORKER_PORT, REPORT_ADDR, CONTAINER_ID,
PUBLIC_IPADDR, VAST_TCP_PORT_<port>, MASTER_TOKEN, UNSECURED, USE_SSL; and MAX_RESERVATION_SECONDS,
MAX_QUEUE_TIME, NULLWORKER_CONTROL_PORT, NULLWORKER_HOST). Flags override them. With neither
REPORT_ADDR nor CONTAINER_ID set the worker runs standalone on 127.0.0.1, unsecured, not reporting.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nullworker",
        description="A Vast.ai Serverless worker that only holds capacity for your own job queue.",
    )
    parser.add_argument("--version", action="version", version=f"nullworker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the worker (POST /reserve)",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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

    for name, help_text in (
        ("reserve", "hold capacity on an endpoint (same as python -m nullworker.client)"),
        ("engine", "run a local emulation of the Vast engine"),
        ("dev", "run a local engine that starts and stops workers on demand"),
    ):
        cmd = sub.add_parser(name, help=help_text, add_help=False)
        cmd.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nullworker`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Sub-commands with their own parsers get the rest of the line untouched.
    if argv and argv[0] in ("reserve", "engine", "dev"):
        command, rest = argv[0], argv[1:]
        if command == "reserve":
            from .client import main as client_main

            return client_main(rest, prog="nullworker reserve")
        if command == "engine":
            from .engine import main as engine_main

            return engine_main(rest)
        from .engine.dev import main as dev_main

        return dev_main(rest)
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    _parser().print_help()
    return 2


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
    return out


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    # One line per request is ours to write; the HTTP client's per-call lines are noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = WorkerConfig.from_env(os.environ, **_overrides(args))
    except ConfigError as exc:
        print(f"nullworker: configuration error: {exc}", file=sys.stderr)
        _beacon_from_env(f"Worker Server failed to launch: configuration error: {exc}")
        return 2
    _setup_logging(config.log_level)
    try:
        trio.run(_serve_until_signal, config)
    except BaseException as exc:  # start-up failure: one line, a beacon, non-zero
        reason = _one_line(exc)
        if reason is None:
            raise
        if _contains(exc, WorkerFailed):  # the worker reported it to the engine itself
            print(f"nullworker: stopped: {reason}", file=sys.stderr)
            return 1
        print(f"nullworker: failed to start: {reason}", file=sys.stderr)
        if config.reporting:
            trio.run(_send_beacon, config, f"Worker Server failed to launch: {reason}")
        return 1
    return 0


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains(inner, kind) for inner in exc.exceptions)
    return isinstance(exc, kind)


def _one_line(exc: BaseException) -> str | None:
    """The reason behind a start-up failure, or None for what is not one (a bug, Ctrl-C)."""
    if isinstance(exc, KeyboardInterrupt):
        return None
    if isinstance(exc, OSError | ConfigError | WorkerFailed):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _one_line(inner)
            if found:
                return found
    # Hypercorn wraps a failing before_serving hook (e.g. the single-process lock).
    if type(exc).__name__ == "LifespanFailureError":
        return str(exc).split(": ", 1)[-1]
    return None


async def _serve_until_signal(config: WorkerConfig) -> None:
    from .worker.server import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def trigger() -> None:
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                return

        await serve(config, shutdown_trigger=trigger, started_at=_PROCESS_START)


async def _send_beacon(config: WorkerConfig, message: str) -> None:
    from .worker.reporter import send_error_beacon

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
