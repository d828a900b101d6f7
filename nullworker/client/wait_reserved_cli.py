"""``nullworker wait-reserved``: wait until this instance's worker holds a reservation.

For consumers that are shell scripts: take a job only once the worker is reserved, so
that one reservation brings one machine for one job (see
:func:`~nullworker.client.local_hold.wait_reserved`)::

    nullworker wait-reserved && id=$(redis-cli BLMOVE jobs jobs:processing RIGHT LEFT 5)

A ``nullworker hold --when-reserved`` would not do: the job must be taken *between* the
wait and the hold, and only the script knows how to take it.

* Without ``--timeout`` it waits as long as it takes; with it, at most that long.
* The control listener is found as for ``nullworker hold`` (``--control-url``, else
  ``NULLWORKER_CONTROL_URL``, else ``NULLWORKER_CONTROL_PORT`` or ``NULL_CONTROL_PORT``
  on 127.0.0.1, else port 18999).
* Exit status: 0 reserved (the reservation, as JSON, on stdout); 1 the timeout passed;
  2 usage; 3 the worker could not be reached, is shutting down or answered something
  else (said on stderr), as ``nullworker hold`` says it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import trio

from .hold_cli import EXIT_UNAVAILABLE, EXIT_USAGE
from .local_hold import (
    CONTROL_PORT_ENV,
    CONTROL_URL_ENV,
    DEFAULT_CONTROL_URL,
    LocalHoldFailed,
    control_url,
    wait_reserved,
)

__all__ = ["EXIT_TIMEOUT", "main"]

#: ``--timeout`` passed without a reservation.
EXIT_TIMEOUT = 1


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Wait until this instance's nullworker holds a reservation "
        "(take a job only then).",
        epilog="exit status: 0 reserved (its JSON on stdout); 1 --timeout passed; 2 usage; "
        "3 the worker could not be reached or is shutting down.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="wait at most this long (default: as long as it takes; 0: ask once)",
    )
    parser.add_argument(
        "--control-url",
        metavar="URL",
        help=f"the worker's control listener (default ${CONTROL_URL_ENV}, else "
        f"http://127.0.0.1:${CONTROL_PORT_ENV}, else {DEFAULT_CONTROL_URL})",
    )
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "nullworker wait-reserved") -> int:
    """``nullworker wait-reserved [--timeout S] [--control-url URL]``; the exit status.

    Runs its own ``trio.run``: call it from the main thread, outside any Trio run.
    """
    parser = _parser(prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout >= 0):
            parser.error(f"--timeout must be a finite number >= 0, got {args.timeout}")
        if args.control_url is not None and not args.control_url.startswith(
            ("http://", "https://")
        ):
            parser.error(f"--control-url must be an http(s) URL, got {args.control_url!r}")
    except SystemExit as exc:  # argparse's way out: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        url = args.control_url or control_url()
        held = trio.run(lambda: wait_reserved(args.timeout, control_url=url))
    except (LocalHoldFailed, ValueError) as exc:  # ValueError: the environment's URL
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return EXIT_UNAVAILABLE
    if held is None:
        print(f"{prog}: not reserved within {args.timeout:g} s", file=sys.stderr, flush=True)
        return EXIT_TIMEOUT
    print(json.dumps(held, separators=(",", ":")), flush=True)
    return 0
