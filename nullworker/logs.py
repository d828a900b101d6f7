"""Log output for every ``nullworker`` command: human text (the default) or one JSON object a line.

Each command line calls :func:`configure` once, at start::

    from nullworker import logs

    logs.configure("INFO", args.log_format)     # None: NULLWORKER_LOG_FORMAT, else text

``json`` writes one object per line for log shippers::

    {"time": "2026-11-27T10:00:00.123Z", "level": "INFO", "logger": "nullworker",
     "message": "reservation 3 (request_idx 4242) ended: duration_elapsed after 300.002 s",
     "reservation_id": 3, "request_idx": 4242, "outcome": "duration_elapsed", "held_s": 300.002}

``time`` is ISO-8601 UTC with milliseconds; ``level``, ``logger`` and ``message`` are the
record's; every field a call passed with ``extra=`` follows (values that JSON cannot hold
are written with ``str()``); a traceback is in ``exc_info``. Nothing else of the record is
written, so a field appears only because a call chose to log it: no call logs a secret
(the master token, an API key), in either format.

A shared module: it imports nothing of nullworker, and every role may import it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

__all__ = [
    "DEFAULT_FORMAT",
    "ENV_VAR",
    "FORMATS",
    "SHORT_TEXT_FORMAT",
    "TEXT_FORMAT",
    "JsonFormatter",
    "LogFormat",
    "configure",
    "json_line",
    "make_formatter",
    "resolve_format",
]

LogFormat = Literal["text", "json"]

#: The choices of ``--log-format`` and ``NULLWORKER_LOG_FORMAT``.
FORMATS: tuple[LogFormat, ...] = ("text", "json")
DEFAULT_FORMAT: LogFormat = "text"
#: The environment variable every command reads when no flag says otherwise.
ENV_VAR = "NULLWORKER_LOG_FORMAT"
#: The text line of ``nullworker serve`` and ``nullworker engine``.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The text line of the client commands (``reserve``, ``autoscale``, ``hold``).
SHORT_TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None)).keys()
) | {"message", "asctime", "taskName"}

#: Marks the handler :func:`configure` installed, so a second call replaces it.
_OWN_HANDLER_ATTR = "_nullworker_logs"


def resolve_format(fmt: str | None = None, env: Mapping[str, str] | None = None) -> LogFormat:
    """The format to use: ``fmt`` when given, else ``NULLWORKER_LOG_FORMAT``, else text.

    Raises:
      ValueError: ``fmt`` (or, without it, the variable) is neither ``text`` nor ``json``;
        the message names where the value came from.
    """
    if fmt is not None:
        source, raw = "the log format", fmt
    else:
        environ = os.environ if env is None else env
        raw = environ.get(ENV_VAR, "")
        source = ENV_VAR
        if not raw.strip():
            return DEFAULT_FORMAT
    value = raw.strip().lower()
    for known in FORMATS:
        if value == known:
            return known
    raise ValueError(f"{source} must be one of {', '.join(FORMATS)}, got {raw!r}")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD_ATTRS or key.startswith("_") or key in entry:
                continue
            entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":"))


def _iso_utc(created: float) -> str:
    stamp = datetime.fromtimestamp(created, tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def json_line(
    message: str, *, level: int = logging.INFO, logger: str = "nullworker", **fields: Any
) -> str:
    """``message`` and ``fields`` as one line of the ``json`` format, without logging it.

    For a command's own output lines (``held: …``, ``ended …``), so that with
    ``--log-format json`` every line it writes is an object of the same shape as its log
    records: ``time``, ``level``, ``logger``, ``message``, then ``fields``.
    """
    record = logging.LogRecord(logger, level, "", 0, message, None, None)
    record.__dict__.update(fields)
    return JsonFormatter().format(record)


def make_formatter(fmt: LogFormat, *, text_format: str = TEXT_FORMAT) -> logging.Formatter:
    """The formatter for ``fmt``: :class:`JsonFormatter`, or ``text_format`` for text."""
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(text_format)


def configure(
    level: str | int = "INFO",
    fmt: str | None = None,
    *,
    stream: TextIO | None = None,
    text_format: str = TEXT_FORMAT,
    env: Mapping[str, str] | None = None,
) -> LogFormat:
    """Send the root logger's records to ``stream`` in the chosen format; returns the format.

    Args:
      level: a level name (``"DEBUG"``, ``"info"``) or number; an unknown name means INFO.
      fmt: ``"text"`` or ``"json"``; ``None`` reads ``NULLWORKER_LOG_FORMAT`` (from
        ``env``, default ``os.environ``) and falls back to text. A bad value in the
        variable is reported on stderr once and text is used (logging never stops a
        command); a bad ``fmt`` raises ``ValueError``, as the caller passed it.
      stream: where lines go (default ``sys.stderr``).
      text_format: the ``%``-style line of the text format (each command keeps its own).

    Calling it again replaces the handler it installed before; handlers someone else
    added (pytest's, an embedding program's) are left alone. The ``httpx`` and
    ``httpcore`` loggers are set to WARNING: their per-call lines are noise here.

    Records skip what no format here prints: the caller's file and line, thread and
    process ids (the switches of the Logging HOWTO's "Optimization" section). That
    takes about half the cost of a record, which matters on a worker that logs each
    reservation's start and end.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no sys._getframe() walk per record
    if fmt is None:
        try:
            chosen = resolve_format(None, env)
        except ValueError as exc:
            print(f"nullworker: {exc}; using text", file=sys.stderr)
            chosen = DEFAULT_FORMAT
    else:
        chosen = resolve_format(fmt)
    if isinstance(level, str):
        numeric = logging.getLevelName(level.strip().upper())
        level_no = numeric if isinstance(numeric, int) else logging.INFO
    else:
        level_no = level
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(chosen, text_format=text_format))
    setattr(handler, _OWN_HANDLER_ATTR, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OWN_HANDLER_ATTR, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level_no)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return chosen
