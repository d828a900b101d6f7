"""The ``nullworker`` command: ``serve`` the worker, ``reserve`` capacity, ``autoscale``
with a job queue, ``hold`` an instance while a command runs (and ``wait-reserved``
before taking its job), run a local ``engine`` or a whole ``dev`` loop.

Dispatch only: each role's command line lives in its own package
(:mod:`nullworker.worker.cli`, :mod:`nullworker.client.cli`,
:mod:`nullworker.client.autoscale_cli`, :mod:`nullworker.client.hold_cli`,
:mod:`nullworker.client.wait_reserved_cli`,
:mod:`nullworker.engine.cli`, :mod:`nullworker.engine.dev`) and is imported when its
command runs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from . import __version__

__all__ = ["main"]

#: Process start, for the ``loadtime`` the worker reports.
_PROCESS_START = time.monotonic()


def _parser() -> argparse.ArgumentParser:
    from .worker import cli as serve_cli

    parser = argparse.ArgumentParser(
        prog="nullworker",
        description="A Vast.ai Serverless worker that only holds capacity for your own job queue.",
    )
    parser.add_argument("--version", action="version", version=f"nullworker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help=serve_cli.HELP,
        epilog=serve_cli.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_cli.add_arguments(serve)

    for name, help_text in (
        ("reserve", "hold capacity on an endpoint (same as python -m nullworker.client)"),
        ("engine", "run a local emulation of the Vast engine"),
        ("dev", "run a local engine that starts and stops workers on demand"),
        ("autoscale", "hold as many reservations as your job queue needs"),
        ("hold", "keep this instance busy while a command runs (nullworker hold -- CMD)"),
        ("wait-reserved", "wait until this instance's worker holds a reservation"),
    ):
        cmd = sub.add_parser(name, help=help_text, add_help=False)
        cmd.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nullworker`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Sub-commands with their own parsers get the rest of the line untouched.
    if argv and argv[0] in ("reserve", "engine", "dev", "autoscale", "hold", "wait-reserved"):
        command, rest = argv[0], argv[1:]
        if command == "reserve":
            from .client.cli import main as client_main

            return client_main(rest, prog="nullworker reserve")
        if command == "autoscale":
            from .client.extras import AUTOSCALE_EXTRA_MODULES, missing_extra_message

            try:
                from .client.autoscale_cli import main as autoscale_main
            except ModuleNotFoundError as exc:
                if exc.name not in AUTOSCALE_EXTRA_MODULES:
                    raise
                print(f"nullworker autoscale: {missing_extra_message(exc.name)}", file=sys.stderr)
                return 2
            return autoscale_main(rest)
        if command == "hold":
            from .client.hold_cli import main as hold_main

            return hold_main(rest)
        if command == "wait-reserved":
            from .client.wait_reserved_cli import main as wait_reserved_main

            return wait_reserved_main(rest)
        if command == "engine":
            from .engine.cli import main as engine_main

            return engine_main(rest)
        from .engine.dev import main as dev_main

        return dev_main(rest)
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .worker.cli import run as serve

        return serve(args, started_at=_PROCESS_START)
    _parser().print_help()
    return 2
