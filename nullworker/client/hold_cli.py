"""``nullworker hold -- CMD ARGS...``: keep this instance's worker busy while a command runs.

For consumers that are shell scripts or programs in any language::

    nullworker hold --label "job $JOB_ID" -- ./process-job "$JOB_ID"

The hold (:func:`~nullworker.client.local_hold.local_hold`) is taken before the command
starts and dropped the moment it exits, or the moment this process dies, whatever kills
it: the hold is an open connection, and the kernel closes it.

* Without ``--duration`` the worker is held for as long as the command runs, however long
  (the worker puts no cap on such a hold; after a worker restart it is taken again).
  With it, at most that long; a warning says when the hold ended before the command.
* The control listener is found as the worker's environment says (``--control-url``,
  else ``NULLWORKER_CONTROL_URL``, else ``NULLWORKER_CONTROL_PORT`` or
  ``NULL_CONTROL_PORT`` on 127.0.0.1, else port 18999).
* SIGTERM, and SIGINT sent to this process, are passed on to the command. Ctrl-C on a
  terminal already reaches the command (it runs in the same foreground process group),
  so it is not sent a second time.
* The exit status is the command's: its own code, or 128 + N when signal N killed it.
  126: the command cannot be run; 127: not found; 2: usage. When the worker cannot be
  reached or refuses the hold, the command is **not** run and the status is 3: a job
  that must not be scaled away should not start unprotected. ``--best-effort`` runs it
  anyway, with a warning.
* Its own lines go to stderr (the command's stdout stays the command's). With
  ``--log-format json`` each is a JSON object of the same shape as a log record
  (:func:`nullworker.logs.json_line`, logger ``nullworker.hold``) whose ``event`` names
  what happened: ``held``, ``unavailable``, ``unprotected``, ``hold_ended``,
  ``not_found``, ``cannot_run``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack

import trio

from .. import logs
from .local_hold import (
    CONTROL_PORT_ENV,
    CONTROL_URL_ENV,
    DEFAULT_CONTROL_URL,
    LocalHold,
    LocalHoldFailed,
    control_url,
    local_hold,
)

__all__ = ["EXIT_CANNOT_RUN", "EXIT_NOT_FOUND", "EXIT_UNAVAILABLE", "EXIT_USAGE", "main"]

EXIT_USAGE = 2
#: The worker's control listener could not be reached or refused the hold.
EXIT_UNAVAILABLE = 3
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127

#: The worker refuses longer labels (nullworker.worker.local_holds.MAX_LABEL_CHARS).
_MAX_LABEL = 200
_FORWARDED = (signal.SIGINT, signal.SIGTERM)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [options] -- CMD [ARGS...]",
        description="Keep this instance's nullworker busy (a local hold) while CMD runs.",
        epilog=(
            "exit status: CMD's own (128+N when signal N killed it); 2 usage; 3 the worker "
            "could not be reached or refused the hold (CMD not run; see --best-effort); "
            "126 CMD cannot be run; 127 CMD not found."
        ),
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="hold at most this long (default: as long as CMD runs)",
    )
    parser.add_argument("--label", help="shown in the worker's logs and /status (default: CMD)")
    parser.add_argument(
        "--control-url",
        metavar="URL",
        help=f"the worker's control listener (default ${CONTROL_URL_ENV}, else "
        f"http://127.0.0.1:${CONTROL_PORT_ENV}, else {DEFAULT_CONTROL_URL})",
    )
    parser.add_argument(
        "--best-effort",
        action="store_true",
        help="run CMD even when the worker cannot be reached (with a warning)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="log lines as text, or json: one object per line "
        "(default $NULLWORKER_LOG_FORMAT or text)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "nullworker hold") -> int:
    """``nullworker hold [options] -- CMD [ARGS...]``; returns the exit status.

    Runs its own ``trio.run``: call it from the main thread, outside any Trio run.
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog)
    try:
        if "--" in args_in:
            cut = args_in.index("--")
            args = parser.parse_args(args_in[:cut])
            if args.command:
                parser.error(f"unexpected arguments before --: {' '.join(args.command)}")
            command = args_in[cut + 1 :]
        else:
            args = parser.parse_args(args_in)
            command = list(args.command)
        if not command:
            parser.error("a command is required: nullworker hold [options] -- CMD [ARGS...]")
        if args.duration is not None and not (math.isfinite(args.duration) and args.duration >= 0):
            parser.error(f"--duration must be a finite number >= 0, got {args.duration}")
        if args.control_url is not None and not args.control_url.startswith(
            ("http://", "https://")
        ):
            parser.error(f"--control-url must be an http(s) URL, got {args.control_url!r}")
        if args.label is not None and (
            len(args.label) > _MAX_LABEL or not args.label.isprintable()
        ):
            parser.error(f"--label must be at most {_MAX_LABEL} printable characters")
    except SystemExit as exc:  # argparse's way out: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    fmt = logs.configure("WARNING", args.log_format, text_format=logs.SHORT_TEXT_FORMAT)
    args.json_lines = fmt == "json"
    if shutil.which(command[0]) is None:  # no hold for a command that cannot start
        _line(args, f"{command[0]}: command not found", level=logging.ERROR, event="not_found")
        return EXIT_NOT_FOUND
    label = args.label if args.label is not None else _label_for(command)
    return trio.run(_run, args, command, label)


def _label_for(command: list[str]) -> str:
    text = " ".join(shlex.quote(part) for part in command)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…"


def _line(
    args: argparse.Namespace, message: str, *, level: int, event: str, **fields: object
) -> None:
    """One line of this command's own, on stderr: text, or with ``--log-format json`` a
    JSON object whose ``event`` (and ``fields``) say what happened.

    ``--quiet`` keeps only warnings and errors.
    """
    if args.quiet and level < logging.WARNING:
        return
    if getattr(args, "json_lines", False):
        text = logs.json_line(message, level=level, logger="nullworker.hold", event=event, **fields)
    else:
        warning = "warning: " if level == logging.WARNING else ""
        text = f"nullworker hold: {warning}{message}"
    print(text, file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace, command: list[str], label: str) -> int:
    # Caught from the start: a signal that arrives while the hold is being taken waits
    # in the receiver and is passed on as soon as the command runs.
    with trio.open_signal_receiver(*_FORWARDED) as signals:
        async with AsyncExitStack() as stack:
            hold: LocalHold | None = None
            try:
                url = args.control_url or control_url()
                hold = await stack.enter_async_context(
                    local_hold(args.duration, label=label, control_url=url)
                )
            except (LocalHoldFailed, ValueError) as exc:  # ValueError: the environment's URL
                if not args.best_effort:
                    _line(
                        args,
                        f"{exc}; not running the command (--best-effort runs it anyway)",
                        level=logging.ERROR,
                        event="unavailable",
                    )
                    return EXIT_UNAVAILABLE
                _line(
                    args,
                    f"{exc}; running the command without a hold",
                    level=logging.WARNING,
                    event="unprotected",
                )
            if hold is not None:
                _line(
                    args,
                    f"local hold {hold.id} on {hold.control_url}; running {label}",
                    level=logging.INFO,
                    event="held",
                    hold_id=hold.id,
                    control_url=hold.control_url,
                    label=label,
                )
            return await _run_command(args, command, signals, hold)


async def _run_command(
    args: argparse.Namespace,
    command: list[str],
    signals: AsyncIterator[int],
    hold: LocalHold | None,
) -> int:
    try:
        # close_fds (the default) keeps the hold's socket out of the command: when this
        # process dies, the connection closes even if the command lives on.
        process = await trio.lowlevel.open_process(command)
    except FileNotFoundError:
        _line(args, f"{command[0]}: command not found", level=logging.ERROR, event="not_found")
        return EXIT_NOT_FOUND
    except OSError as exc:
        _line(
            args,
            f"cannot run {command[0]}: {exc.strerror or exc}",
            level=logging.ERROR,
            event="cannot_run",
        )
        return EXIT_CANNOT_RUN

    async def forward() -> None:
        async for signum in signals:
            if signum == signal.SIGINT and _terminal_sent_it():
                continue  # the terminal sent it to the command as well
            if process.returncode is None:
                process.send_signal(signum)

    async def warn_when_ended(hold: LocalHold) -> None:
        await hold.ended.wait()
        _line(
            args,
            f"the hold ended ({hold.outcome}) while the command runs",
            level=logging.WARNING,
            event="hold_ended",
            hold_id=hold.id,
            outcome=hold.outcome,
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(forward)
        if hold is not None:
            nursery.start_soon(warn_when_ended, hold)
        await process.wait()
        nursery.cancel_scope.cancel()
    code = process.returncode
    assert code is not None
    return 128 - code if code < 0 else code


def _terminal_sent_it() -> bool:
    """True when we run in the foreground of a terminal: Ctrl-C reached the command too."""
    try:
        fd = sys.stdin.fileno()
        return os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False
