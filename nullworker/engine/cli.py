"""``nullworker engine``: run the local engine emulator until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from functools import partial

import trio

from .. import logs
from .._groups import split_leaves
from .core import DEFAULT_ENGINE_PORT, Engine, load_private_key
from .web import serve_engine

__all__ = ["main"]

log = logging.getLogger("nullworker.engine")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nullworker engine",
        description="Run a local emulation of the Vast serverless engine (autoscaler).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_ENGINE_PORT, help="port (default 8080; 0 = any)"
    )
    parser.add_argument(
        "--key-file", help="PEM RSA private key to sign routes with (default: a new key)"
    )
    parser.add_argument("--api-key", help="require this api_key on /route/ (default: any)")
    parser.add_argument(
        "--master-token", help="require this mtoken on worker reports (default: any)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="text, or json: one object per line (default $NULLWORKER_LOG_FORMAT or text)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``nullworker engine [--host H] [--port P] [--key-file F] [--api-key K]``."""
    args = _parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    private_key = None
    if args.key_file:
        try:
            private_key = load_private_key(args.key_file)
        except (OSError, ValueError, TypeError) as exc:
            print(f"nullworker engine: cannot load --key-file: {exc}", file=sys.stderr)
            return 2
    engine = Engine(private_key=private_key, api_key=args.api_key, master_token=args.master_token)

    async def _run() -> None:
        # SIGINT/SIGTERM arrive as messages and become a plain cancellation, instead
        # of a KeyboardInterrupt that could land inside Hypercorn's own tasks.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(
                    partial(serve_engine, engine, host=args.host, port=args.port)
                )
                print(f"nullworker engine on {url}  (workers view: {url}/)", flush=True)
                async for signum in signals:
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(_run)
    except KeyboardInterrupt:
        return 0
    except BaseExceptionGroup as group:
        if not split_leaves(group, KeyboardInterrupt)[1]:
            return 0
        os_errors, others = split_leaves(group, OSError)
        if not others:  # typically the port is taken
            print(f"nullworker engine: {os_errors[0]}", file=sys.stderr)
            return 1
        raise
    except OSError as exc:
        print(f"nullworker engine: {exc}", file=sys.stderr)
        return 1
    return 0
