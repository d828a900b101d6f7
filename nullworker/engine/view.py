"""The engine page's content: the tables as rows of display text, and the page itself.

One formatting path for both ways the page is seen: :func:`render_page` puts the rows
into ``static/index.html`` on the server (the page works without JavaScript, as of the
moment it was loaded), and ``GET /dashboard`` hands the same rows to
``static/dashboard.js``, which swaps them in every second and draws the timeline chart
from ``GET /timeline``'s samples. The script therefore knows nothing about workers or
holds: it fills tables with text cells and plots numbers.

A row is ``{"cls": str, "cells": [cell, ...]}``; a cell is a string or
``{"text": str, "title": str, "cls": str}`` (title and cls optional).
"""

from __future__ import annotations

import html
import time
from typing import Any

from .core import Engine
from .timeline import TIMELINE_SERIES

__all__ = ["COLUMNS", "dashboard", "render_page", "render_table"]

#: Each table's column headings, in order.
COLUMNS: dict[str, tuple[str, ...]] = {
    "workers": (
        "#",
        "url",
        "state",
        "up",
        "hold",
        "idle",
        "consumer",
        "reports",
        "pid",
        "control",
        "log",
    ),
    "pending": ("request", "endpoint", "waiting for", "polls", "why"),
    "finished": ("request", "worker", "start", "end", "held", "how it ended", "engine status"),
    "stopped": ("#", "url", "lived", "stopped", "why", "routed", "pid", "log"),
}
EMPTY: dict[str, str] = {
    "workers": "no workers",
    "pending": "no request is waiting",
    "finished": "no hold has finished yet",
    "stopped": "no worker has stopped yet",
}
#: How many finished holds (and abandoned requests) the page lists.
FINISHED_ROWS = 50

_NONE = "\u2014"  # an em dash: "does not apply"


def span(seconds: float | None) -> str:
    """A duration for people: ``0.4 s``, ``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds is None:
        return _NONE
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _clock(wall: float | None) -> str:
    if not wall:
        return _NONE
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _cell(text: str, *, title: str = "", cls: str = "") -> dict[str, str]:
    cell = {"text": text}
    if title:
        cell["title"] = title
    if cls:
        cell["cls"] = cls
    return cell


def _worker_row(worker: dict[str, Any], scaling: dict[str, Any] | None) -> dict[str, Any]:
    state: str = worker["state"]
    state_cell = _cell(state, cls=f"state st-{state}")
    if worker["error"]:
        state_cell = _cell(f"error: {worker['error']}", cls="state st-error", title=worker["error"])

    hold = _NONE
    hold_title = ""
    idxs = worker["working_request_idxs"]
    request_text = f" (request {idxs[0]})" if idxs else ""
    local = worker.get("local_holds") or []
    if state == "busy":
        info = worker["hold"]
        if info is not None:
            held = time.time() - info["started_at"]
            hold = f"{span(held)} held, {span(info['remaining_s'])} left" + request_text
            hold_title = f"a hold of {span(info['duration_s'])}, until {_clock(info['ends_at'])}"
        elif idxs or not local:
            hold = f"{span(worker['reservation_age_s'])} held" + request_text
            hold_title = "only the worker and its client know how long the hold lasts"
        if local:
            # What keeps the worker beside (or instead of) a reservation: the
            # consumer's local holds, by their labels.
            text, title = _local_holds_text(local)
            hold = text if hold == _NONE else f"{hold} \u00b7 {text}"
            hold_title = "\n".join(t for t in (hold_title, title) if t)
    elif state == "leased":
        hold = f"routed {span(worker['reservation_age_s'])} ago, the client is on its way"

    idle = _NONE
    if state == "idle":
        idle = f"idle {span(worker['idle_age_s'])}"
        if scaling is not None:
            countdown = worker.get("scale_down_in_s")
            if countdown is None:
                idle += f", kept (--min-workers {scaling['min_workers']})"
            elif countdown > 0:
                idle += f", stops in {span(countdown)}"
            else:
                idle += ", stopping"

    if worker["report_count"]:
        reports = f"{worker['report_count']}, last {span(worker['last_report_age_s'])} ago"
    else:
        reports = "none yet"
    url = worker["url"] or worker["label"] or _NONE
    log = worker["log"] or _NONE
    control = worker.get("control_url") or _NONE
    return {
        "cls": f"w-{state}",
        "cells": [
            str(worker["id"]),
            _cell(url, cls="url"),
            state_cell,
            span(worker["uptime_s"]),
            _cell(hold, title=hold_title, cls="hold"),
            idle,
            _consumer_cell(worker.get("consumer")),
            reports,
            _NONE if worker["pid"] is None else str(worker["pid"]),
            _cell(
                control,
                cls="url",
                title="the worker's control listener: POST /hold, POST /release, GET /status",
            ),
            _cell(log, title=log, cls="path"),
        ],
    }


def _local_holds_text(holds: list[dict[str, Any]]) -> tuple[str, str]:
    """``job 5 · 21 s`` (and ``+ 2 more``) for the cell; one line per hold for its title."""
    lines = []
    for hold in holds:
        number = hold.get("id") or "?"
        name = hold.get("label") or "no label"
        line = f"local hold {number} \u2018{name}\u2019: held {span(hold.get('held_s'))}"
        if hold.get("remaining_s") is not None:
            line += f", at most {span(hold['remaining_s'])} left"
        lines.append(line)
    first = holds[0]
    text = f"{first.get('label') or 'local hold'} \u00b7 {span(first.get('held_s'))}"
    if len(holds) > 1:
        text += f" + {len(holds) - 1} more"
    title = "taken by the consumer on the worker (POST /hold), not an engine request:\n"
    return text, title + "\n".join(lines)


def _consumer_cell(consumer: dict[str, Any] | None) -> str | dict[str, str]:
    """The ``--consumer`` beside the worker: running, waiting, or restarting after an exit."""
    if consumer is None:
        return _NONE
    state = consumer["state"]
    code = consumer.get("exit_code")
    restarts = consumer.get("restarts") or 0
    again = f", restarted {_plural(restarts, 'time')}" if restarts else ""
    log = consumer.get("log") or ""
    if state == "running":
        if restarts and code is not None:
            again += f", last exit code {code}"
        return _cell(f"running (pid {consumer['pid']}){again}", cls="c-ok", title=log)
    if state == "waiting":
        return _cell("waiting for the worker to be ready", title=log)
    if state == "restarting":
        text = f"exited with code {code}, restarting in {span(consumer.get('restart_in_s'))}"
        return _cell(text + again, cls="c-warn", title=log)
    return _cell(f"stopped (code {code})" if code is not None else "stopped", title=log)


def _stopped_row(worker: dict[str, Any]) -> dict[str, Any]:
    log = worker["log"] or _NONE
    return {
        "cls": "w-stopped",
        "cells": [
            str(worker["id"]),
            _cell(worker["url"] or worker["label"] or _NONE, cls="url"),
            span(worker["lived_s"]),
            f"{span(worker['stopped_ago_s'])} ago",
            worker["reason"] or _NONE,
            str(worker["routed_count"]),
            _NONE if worker["pid"] is None else str(worker["pid"]),
            _cell(log, title=log, cls="path"),
        ],
    }


def _pending_row(pending: dict[str, Any]) -> dict[str, Any]:
    return {
        "cls": "",
        "cells": [
            str(pending["request_idx"]),
            pending["endpoint"],
            span(pending["age_s"]),
            str(pending["polls"]),
            pending["reason"],
        ],
    }


#: How each end reads: fine, worth a look, or a failure. A release by the client
#: (closing its connection: the autoscaler's scale-down, Ctrl-C) is a normal end.
_ENDED_CLASS = {
    "elapsed": "ok",
    "released by consumer": "ok",
    "released by client": "ok",
    "completed": "ok",
    "client left before the hold began": "note",
    "worker shut down": "note",
}
#: What the page says about each end, beside the engine's status.
_ENDED_TITLE = {
    "released by client": "the client closed its connection, which is how a client lets go "
    "(the autoscaler's scale-down, Ctrl-C); a client that crashed closes it too, and the "
    "worker cannot tell the two apart",
    "released by consumer": "POST /release on the worker's control listener",
    "client left before the hold began": "the client went away while its reservation was "
    "queued behind another hold",
    "worker shut down": "the worker was stopped while the hold was on: the hold was cut short",
}


def _finished_row(entry: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = entry["work_started_at"] or None
    completed = entry["work_completed_at"] or None
    held = completed - started if started and completed else None
    status = entry["status"]
    if status is None:  # the legacy body says success or not, nothing more
        status = "success" if entry["success"] else "failure"
    ended: str = entry["ended"]
    row = {
        "cls": "",
        "cells": [
            str(entry["request_idx"]),
            str(entry["worker_id"]),
            _clock(started),
            _clock(completed or entry["received_at"]),
            span(held),
            _cell(
                ended,
                cls=f"end-{_ENDED_CLASS.get(ended, 'bad')}",
                title=_ENDED_TITLE.get(ended, ""),
            ),
            _cell(status, title=f"success: {str(entry['success']).lower()}"),
        ],
    }
    return completed or entry["received_at"], row


def _abandoned_row(entry: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    row = {
        "cls": "",
        "cells": [
            str(entry["request_idx"]),
            _NONE,
            _NONE,
            _clock(entry["forgotten_at"]),
            _NONE,
            _cell(
                f"gave up after waiting {span(entry['waited_s'])}",
                cls="end-note",
                title="the client stopped polling the engine before a worker was free",
            ),
            _cell(_NONE, title="never reached a worker: no status"),
        ],
    }
    return entry["forgotten_at"], row


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _summary(snap: dict[str, Any]) -> str:
    workers = snap["workers"]
    breakdown = snap["breakdown"]
    kinds = ", ".join(f"{n} {state}" for state, n in sorted(breakdown.items()))
    parts = [_plural(len(workers), "worker") + (f": {kinds}" if kinds else "")]
    parts.append(_plural(snap["waiting"], "request") + " waiting")
    scaling = snap["scaling"]
    if scaling is not None:
        parts.append(
            f"scaling {scaling['min_workers']}\u2013{scaling['max_workers']} workers, "
            f"idle timeout {span(scaling['idle_timeout_s'])}"
        )
    else:
        parts.append("workers are started by you (this engine starts none)")
    parts.append(f"engine up {span(snap['uptime_s'])}")
    return " \u00b7 ".join(parts)


def _now_counts(snap: dict[str, Any]) -> dict[str, int]:
    counts = dict.fromkeys(TIMELINE_SERIES, 0)
    counts["waiting"] = snap["waiting"]
    kind = {
        "busy": "busy",
        "leased": "busy",
        "idle": "idle",
        "starting": "starting",
        "loading": "starting",
        "error": "unhealthy",
        "stale": "unhealthy",
    }
    for state, n in snap["breakdown"].items():
        counts[kind.get(state, "unhealthy")] += n
    return counts


def dashboard(engine: Engine) -> dict[str, Any]:
    """The page's content now: a summary line, the current counts and the four tables."""
    snap = engine.snapshot()
    scaling = snap["scaling"]
    ends = [_finished_row(f) for f in snap["finished"]]
    ends += [_abandoned_row(a) for a in snap["abandoned"]]
    ends.sort(key=lambda pair: pair[0], reverse=True)
    rows = {
        "workers": [_worker_row(w, scaling) for w in snap["workers"]],
        "pending": [_pending_row(p) for p in snap["pending"]],
        "finished": [row for _, row in ends[:FINISHED_ROWS]],
        "stopped": [_stopped_row(w) for w in snap["stopped"]],
    }
    return {
        "summary": _summary(snap),
        "counts": _now_counts(snap),
        "tables": {
            name: {"columns": list(COLUMNS[name]), "rows": rows[name], "empty": EMPTY[name]}
            for name in COLUMNS
        },
    }


def _render_cell(cell: str | dict[str, str]) -> str:
    if isinstance(cell, str):
        return f"<td>{html.escape(cell)}</td>"
    attrs = ""
    if cell.get("cls"):
        attrs += f' class="{html.escape(cell["cls"])}"'
    if cell.get("title"):
        attrs += f' title="{html.escape(cell["title"])}"'
    return f"<td{attrs}>{html.escape(cell['text'])}</td>"


def render_table(name: str, table: dict[str, Any]) -> str:
    """One table as HTML; its body has ``id="<name>"`` for the script to refill."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table["columns"])
    if table["rows"]:
        body = "".join(
            f'<tr class="{html.escape(row["cls"])}">'
            + "".join(_render_cell(c) for c in row["cells"])
            + "</tr>"
            for row in table["rows"]
        )
    else:
        body = (
            f'<tr class="empty"><td colspan="{len(table["columns"])}">'
            f"{html.escape(table['empty'])}</td></tr>"
        )
    return (
        f'<table class="t-{html.escape(name)}"><thead><tr>{head}</tr></thead>'
        f'<tbody id="{html.escape(name)}">{body}</tbody></table>'
    )


def render_page(template: str, model: dict[str, Any]) -> str:
    """``template`` (``static/index.html``) with the model filled in at its markers:
    ``<!--summary-->``, ``<!--count:SERIES-->`` and ``<!--table:NAME-->``."""
    page = template.replace("<!--summary-->", html.escape(model["summary"]))
    for series, value in model["counts"].items():
        page = page.replace(f"<!--count:{series}-->", str(value))
    for name, table in model["tables"].items():
        page = page.replace(f"<!--table:{name}-->", render_table(name, table))
    return page
