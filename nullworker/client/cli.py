"""The reservation client's command line: ``python -m nullworker.client`` and
``nullworker reserve``.

Argument parsing and printing only: each reservation is one :func:`~.reservation.hold`
call, run side by side in one Trio run, and every event it reports becomes one line.

When stdout is a terminal (and without ``--quiet``), one more line sits under those:
a status line redrawn in place (``held for 1:05, 3:55 remaining, Ctrl-C to release``,
or how long the request has waited for a worker and why). Every other line is printed
above it: the status line is cleared first and drawn again after. Nothing of it is
written when stdout is a file or a pipe, so scripts read the same lines as before.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

import httpx
import trio

from .. import logs
from ..errors import ClientError, EngineUnavailable, ReservationFailed, ReservationRejected
from ..vast.vocabulary import ClientOutcome
from .reservation import (
    DEFAULT_ENGINE_URL,
    EngineRefused,
    ProgressEvent,
    RouteTimeout,
    hold,
)
from .transport import default_client

__all__ = [
    "EXIT_ENDED_EARLY",
    "EXIT_ENGINE",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_USAGE",
    "SIGNAL_EXIT",
    "main",
]

#: Exit codes of ``python -m nullworker.client``.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ENGINE = 3
EXIT_REJECTED = 4
EXIT_ENDED_EARLY = 5

#: Outcomes of a hold that ran its course (exit 0): elapsed, released by the consumer, or
#: a 200 that does not say which.
_CLEAN_ENDS = frozenset({ClientOutcome.ELAPSED, ClientOutcome.EXPLICIT, ClientOutcome.COMPLETED})
#: The exit status after a stop by signal, as a shell reports it (128 + the signal);
#: ``nullworker autoscale`` exits the same way.
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
#: Print a WAITING line at most this often per reservation (when not on a terminal).
_WAITING_LINE_EVERY_S = 5.0
#: How often the status line is redrawn on a terminal.
_STATUS_EVERY_S = 0.5
#: Return to the line's start and erase it (every VT100-style terminal knows both).
_CLEAR_LINE = "\r\x1b[K"


def _build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m nullworker.client",
        description=(
            "Reserve worker(s) of a Vast serverless endpoint running nullworker and hold "
            "them until the duration elapses, the worker releases them, or you press "
            "Ctrl-C."
        ),
        epilog=(
            "exit status: 0 the hold(s) elapsed or the worker released them; 2 usage; "
            "3 the engine is unreachable or refused (e.g. the API key), or no worker "
            "became free within --route-timeout; 4 workers refused (429 bound or "
            "another 4xx); 5 a hold ended early (worker shut down, connection lost); "
            "130/143 interrupted by SIGINT/SIGTERM."
        ),
    )
    parser.add_argument("--endpoint", required=True, help="endpoint name")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to hold (default: the worker's MAX_RESERVATION_SECONDS)",
    )
    parser.add_argument(
        "--count", type=int, default=1, metavar="N", help="hold N workers at once (default 1)"
    )
    parser.add_argument("--api-key", default=None, help="endpoint API key (default $VAST_API_KEY)")
    parser.add_argument(
        "--engine-url",
        default=None,
        metavar="URL",
        help=f"engine base URL (default $VAST_ENGINE_URL, else {DEFAULT_ENGINE_URL})",
    )
    parser.add_argument(
        "--max-rejections",
        type=int,
        default=5,
        metavar="N",
        help="re-route at most N times when workers refuse (default 5)",
    )
    parser.add_argument(
        "--route-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up if no worker is free within SECONDS (default: wait)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only held/ended lines and errors (no status line on a terminal)",
    )
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="log lines as text, or json: one object per line "
        "(default $NULLWORKER_LOG_FORMAT or text)",
    )
    return parser


_JobState = Literal["routing", "waiting", "held", "done"]


@dataclass
class _Job:
    number: int
    state: _JobState = "routing"
    code: int | None = None
    last_waiting_line: float = -math.inf
    #: Trio clock: when the engine was first asked, and when the hold began.
    waiting_since: float | None = None
    held_since: float | None = None
    #: Why the engine has no free worker, when it said so.
    reason: str | None = None

    @property
    def held(self) -> bool:
        return self.state == "held"


def _clock(seconds: float) -> str:
    """``42`` -> ``0:42``, ``3725`` -> ``1:02:05`` (whole seconds, rounded down)."""
    total = max(int(seconds), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _status_line(jobs: Sequence[_Job], *, now: float, duration_s: float | None, width: int) -> str:
    """The terminal's status line for ``jobs`` at Trio time ``now``, at most ``width``
    characters; ``""`` when there is nothing to show (nothing held or waiting yet).

    One reservation: ``held for 1:05, 3:55 remaining, Ctrl-C to release`` (no
    remaining time without ``--duration``: the worker's cap is not known here), or
    ``waiting for a worker... 12 s (engine: at --max-workers 3 (3 busy)), Ctrl-C to
    give up``. Several: how many are held, for the longest hold and the time left on
    it, then how many wait, for the longest wait.
    """
    held = [j.held_since for j in jobs if j.state == "held" and j.held_since is not None]
    waiting = [j for j in jobs if j.state == "waiting" and j.waiting_since is not None]
    parts: list[str] = []
    if held:
        longest = now - min(held)
        count = f"{len(held)}/{len(jobs)} " if len(jobs) > 1 else ""
        parts.append(f"{count}held for {_clock(longest)}")
        if duration_s is not None:
            # Round the time left up, so that it reads 0:00 only when the hold ends.
            parts.append(f"{_clock(math.ceil(max(duration_s - longest, 0.0)))} remaining")
    if waiting:
        waited = max(now - j.waiting_since for j in waiting if j.waiting_since is not None)
        if len(jobs) > 1:
            text = f"{len(waiting)} waiting for a worker... {waited:.0f} s"
        else:
            text = f"waiting for a worker... {waited:.0f} s"
        reason = next((j.reason for j in waiting if j.reason), None)
        parts.append(f"{text} ({'engine: ' + reason if reason else 'no free worker'})")
    if not parts:
        return ""
    parts.append("Ctrl-C to release" if held else "Ctrl-C to give up")
    line = ", ".join(parts)
    if len(line) > width:
        line = line[: max(width - 3, 0)] + "..."
    return line


class _Cli:
    """Runs N reservations and prints one line per event (progress on stdout, errors on
    stderr), with a status line redrawn in place under them when ``live``."""

    def __init__(
        self,
        args: argparse.Namespace,
        *,
        api_key: str,
        engine_url: str,
        live: bool = False,
        json_lines: bool = False,
    ) -> None:
        self.args = args
        self.api_key = api_key
        self.engine_url = engine_url
        self.jobs = [_Job(n) for n in range(1, args.count + 1)]
        self.signum: int | None = None
        self.released_on_signal = 0
        #: Draw the status line (stdout is a terminal and not --quiet).
        self.live = live and not json_lines
        #: ``--log-format json``: every line is a JSON object (:func:`logs.json_line`).
        self.json_lines = json_lines
        self._status_shown = ""

    # -- output ------------------------------------------------------------------------

    def _print(
        self,
        text: str,
        *,
        file: TextIO | None = None,
        level: int = logging.INFO,
        **fields: object,
    ) -> None:
        """One permanent line, above the status line (which is drawn again after).

        With ``--log-format json`` the line is a JSON object with ``fields`` (``event``
        names what happened), on the same stream as the text line would be.
        """
        self._clear_status()
        if self.json_lines:
            text = logs.json_line(text, level=level, logger="nullworker.reserve", **fields)
        print(text, file=file or sys.stdout, flush=True)
        self._draw_status()

    def _clear_status(self) -> None:
        if self._status_shown:
            sys.stdout.write(_CLEAR_LINE)
            sys.stdout.flush()
            self._status_shown = ""

    def _draw_status(self) -> None:
        if not self.live:
            return
        width = shutil.get_terminal_size().columns - 1  # the last column would wrap
        line = _status_line(
            self.jobs, now=trio.current_time(), duration_s=self.args.duration, width=width
        )
        if line == self._status_shown:
            return
        sys.stdout.write(f"{_CLEAR_LINE}{line}")
        sys.stdout.flush()
        self._status_shown = line

    async def _redraw_status(self) -> None:
        try:
            while True:
                self._draw_status()
                await trio.sleep(_STATUS_EVERY_S)
        finally:
            self._clear_status()

    def _say(self, job: _Job, text: str, *, event: str, progress: bool = False) -> None:
        if progress and self.args.quiet:
            return
        suffix = f" (reservation {job.number}/{len(self.jobs)})" if len(self.jobs) > 1 else ""
        self._print(f"{text}{suffix}", event=event, reservation=job.number)

    def _error(self, job: _Job, text: str) -> None:
        prefix = f"[reservation {job.number}/{len(self.jobs)}] " if len(self.jobs) > 1 else ""
        self._print(
            f"{prefix}{text}",
            file=sys.stderr,
            level=logging.ERROR,
            event="error",
            reservation=job.number,
        )

    def _on_progress(self, job: _Job, event: ProgressEvent) -> None:
        if event.kind == "held":
            job.state = "held"
            job.held_since = trio.current_time()
            # Always numbered, so scripts can count held lines.
            self._print(
                f"held: {event.worker_url} (reservation {job.number}/{len(self.jobs)})",
                event="held",
                reservation=job.number,
                worker_url=event.worker_url,
            )
        elif event.kind == "ended":
            job.state = "done"
            self._say(job, event.message, event="ended")
        elif event.kind == "waiting":
            job.state = "waiting"
            job.reason = event.reason
            if job.waiting_since is None:
                job.waiting_since = trio.current_time() - event.waited_s
            if self.live:
                self._draw_status()  # the status line shows the wait; no line per poll
            elif event.waited_s - job.last_waiting_line >= _WAITING_LINE_EVERY_S:
                job.last_waiting_line = event.waited_s
                self._say(job, event.message, event="waiting", progress=True)
        else:
            self._say(job, event.message, event=event.kind, progress=True)

    async def run(self) -> int:
        async with default_client() as http, trio.open_nursery() as nursery:
            await nursery.start(self._watch_signals, nursery.cancel_scope)
            if self.live:
                nursery.start_soon(self._redraw_status)
            async with trio.open_nursery() as jobs:
                for job in self.jobs:
                    jobs.start_soon(self._run_job, job, http)
            nursery.cancel_scope.cancel()
        self._clear_status()
        if self.signum is not None:
            status = SIGNAL_EXIT.get(signal.Signals(self.signum), 128 + self.signum)
            self._print(
                f"interrupted: released {self.released_on_signal} worker(s)",
                event="interrupted",
                released=self.released_on_signal,
                exit_status=status,
            )
            return status
        codes = {job.code for job in self.jobs}
        for code in (EXIT_ENGINE, EXIT_REJECTED, EXIT_ENDED_EARLY):
            if code in codes:
                return code
        return EXIT_OK

    async def _watch_signals(
        self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                self.signum = signum
                self.released_on_signal = sum(1 for job in self.jobs if job.held)
                scope.cancel()
                return

    async def _run_job(self, job: _Job, http: httpx.AsyncClient) -> None:
        try:
            reservation = await hold(
                self.args.endpoint,
                duration_s=self.args.duration,
                api_key=self.api_key,
                engine_url=self.engine_url,
                max_rejections=self.args.max_rejections,
                route_timeout_s=self.args.route_timeout,
                http=http,
                on_progress=lambda event: self._on_progress(job, event),
            )
        except RouteTimeout as exc:
            job.state = "done"
            said = f"; the engine said: {exc.reason}" if exc.reason else ""
            self._error(job, f"no worker became free within {self.args.route_timeout:g} s{said}")
            job.code = EXIT_ENGINE
            return
        except EngineUnavailable as exc:
            job.state = "done"
            if isinstance(exc, EngineRefused) and exc.api_key_refused:
                self._error(
                    job,
                    f"the engine refused the API key (HTTP {exc.status}): check --api-key "
                    "or VAST_API_KEY (the endpoint's key)",
                )
            else:
                self._error(job, f"engine unavailable: {exc}")
            job.code = EXIT_ENGINE
            return
        except (ReservationRejected, ReservationFailed) as exc:
            job.state = "done"
            self._error(job, f"rejected: {exc}")
            job.code = EXIT_REJECTED
            return
        except ClientError as exc:  # pragma: no cover - no other subclass today
            job.state = "done"
            self._error(job, f"error: {exc}")
            job.code = EXIT_REJECTED
            return
        if reservation.outcome in _CLEAN_ENDS:
            job.code = EXIT_OK
        elif reservation.outcome == ClientOutcome.REJECTED:  # queued, then refused (a late 429)
            job.code = EXIT_REJECTED
        elif _late_refusal(reservation.status):
            # A refusal (bad signature, bad envelope, too large) that a slow worker sent
            # after the accept window: the same mistake as one within it, so the same
            # line and exit status, not "ended early".
            self._error(job, f"rejected: HTTP {reservation.status}: {reservation.error}")
            job.code = EXIT_REJECTED
        else:
            job.code = EXIT_ENDED_EARLY


def _late_refusal(status: int | None) -> bool:
    """Whether a reservation that ended with ``status`` was refused rather than cut short.

    A 4xx is the worker refusing the request itself; 408 (the body came too slowly) and
    499 (reported when the client went away) describe the connection, not the request.
    """
    return status is not None and 400 <= status < 500 and status not in (408, 429, 499)


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """``python -m nullworker.client`` (and ``nullworker reserve``); returns the exit status.

    ``argv`` defaults to ``sys.argv[1:]``; ``prog`` names the command in usage messages
    (``nullworker reserve`` when dispatched from the main CLI). Runs its own
    ``trio.run``, so call it from the main thread, outside any Trio run.
    """
    parser = _build_parser(prog)
    try:
        args = parser.parse_args(argv)
        if args.duration is not None and not (math.isfinite(args.duration) and args.duration >= 0):
            parser.error(f"--duration must be a finite number >= 0, got {args.duration}")
        if args.count < 1:
            parser.error(f"--count must be at least 1, got {args.count}")
        if args.max_rejections < 0:
            parser.error(f"--max-rejections must be >= 0, got {args.max_rejections}")
        if args.route_timeout is not None and not (
            math.isfinite(args.route_timeout) and args.route_timeout > 0
        ):
            parser.error(f"--route-timeout must be a number > 0, got {args.route_timeout}")
        api_key = args.api_key or os.environ.get("VAST_API_KEY")
        if not api_key:
            parser.error("an API key is required: pass --api-key or set VAST_API_KEY")
    except SystemExit as exc:  # argparse's way out: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    engine_url = args.engine_url or os.environ.get("VAST_ENGINE_URL") or DEFAULT_ENGINE_URL
    if not engine_url.startswith(("http://", "https://")):
        print(f"{parser.prog}: error: --engine-url must be an http(s) URL", file=sys.stderr)
        return EXIT_USAGE
    fmt = logs.configure(logging.WARNING, args.log_format, text_format=logs.SHORT_TEXT_FORMAT)
    live = not args.quiet and _is_terminal(sys.stdout)
    cli = _Cli(args, api_key=api_key, engine_url=engine_url, live=live, json_lines=fmt == "json")
    return trio.run(cli.run)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False
