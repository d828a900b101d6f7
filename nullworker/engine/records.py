"""The engine's records: what it knows about workers, requests and holds, as plain data.

Dataclasses only, and the small helpers that read them (:func:`age_of`, :func:`breakdown`,
:func:`new_counters`): no routing decision and no I/O. The routing core
(:mod:`.core`) creates and updates them; the page (:mod:`.timeline`, :mod:`.view`)
and ``nullworker dev`` read them, and dev describes what only it knows
(:class:`Hold`, :class:`LocalHoldView`, :class:`Consumer`, :class:`Scaling`).

Times are ``trio.current_time()`` values unless a field says *wall clock*
(``time.time()``, as the worker's own timestamps are).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COUNTERS",
    "AbandonedRequest",
    "Consumer",
    "FinishedRequest",
    "Hold",
    "LocalHoldView",
    "PendingRequest",
    "ReceivedBody",
    "RouteRecord",
    "Scaling",
    "WorkerRecord",
    "age_of",
    "breakdown",
    "new_counters",
]

#: The engine's counters (``Engine.counters``, shown in ``GET /workers``), by name.
COUNTERS = (
    "route_ready",
    "route_waiting",
    "route_rejected",
    "worker_status",
    "worker_status_rejected",
    "delete_requests",
    "delete_requests_rejected",
    "demand_expired",
    "pubkey",
)


def new_counters() -> dict[str, int]:
    """Every counter of :data:`COUNTERS`, at zero."""
    return dict.fromkeys(COUNTERS, 0)


@dataclass(frozen=True)
class ReceivedBody:
    """One accepted ``/worker_status/`` or ``/delete_requests/`` body, as received."""

    received_at: float  # wall clock, time.time()
    body: dict[str, Any]


@dataclass(frozen=True)
class FinishedRequest:
    """One request a worker reported finished through ``/delete_requests/``.

    ``status`` is ``None`` for the legacy body, which only says success or not.
    """

    worker_id: int
    request_idx: int
    success: bool | None
    status: str | None
    received_at: float
    entered_queue_at: float | None = None
    work_started_at: float | None = None
    work_completed_at: float | None = None
    #: How it ended in the project's words ("elapsed", "released by client", ...),
    #: from the status and what the engine knew when the entry arrived.
    ended: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "request_idx": self.request_idx,
            "success": self.success,
            "status": self.status,
            "ended": self.ended,
            "received_at": self.received_at,
            "entered_queue_at": self.entered_queue_at,
            "work_started_at": self.work_started_at,
            "work_completed_at": self.work_completed_at,
        }


@dataclass(frozen=True)
class AbandonedRequest:
    """A WAITING request whose client stopped polling before a worker was free."""

    request_idx: int
    endpoint: str
    waited_s: float
    forgotten_at: float  # wall clock

    def to_json(self) -> dict[str, Any]:
        return {
            "request_idx": self.request_idx,
            "endpoint": self.endpoint,
            "waited_s": round(self.waited_s, 3),
            "forgotten_at": self.forgotten_at,
        }


@dataclass(frozen=True)
class Hold:
    """A worker's active hold as the worker itself describes it (its control ``/status``).

    Times are the worker's wall clock, ``time.time()``.
    """

    request_idx: int | None
    duration_s: float
    started_at: float
    ends_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "request_idx": self.request_idx,
            "duration_s": self.duration_s,
            "started_at": self.started_at,
            "ends_at": self.ends_at,
            "remaining_s": round(max(0.0, self.ends_at - time.time()), 3),
        }


@dataclass(frozen=True)
class LocalHoldView:
    """One local hold open on a worker, as its control ``/status`` lists it.

    A local hold (the consumer's ``POST /hold``) is no engine request: the worker's
    reports only say it is busy. ``nullworker dev`` reads the holds from the worker, so
    the page can name what keeps it (``job 5``). ``started_at`` is the worker's wall
    clock, ``time.time()``; ``None`` where the worker did not say.
    """

    id: int | None
    label: str
    started_at: float | None
    duration_s: float | None

    def to_json(self) -> dict[str, Any]:
        now = time.time()
        ends = None
        if self.started_at is not None and self.duration_s is not None:
            ends = self.started_at + self.duration_s
        return {
            "id": self.id,
            "label": self.label,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "held_s": None
            if self.started_at is None
            else round(max(0.0, now - self.started_at), 3),
            "remaining_s": None if ends is None else round(max(0.0, ends - now), 3),
        }


@dataclass(frozen=True)
class Consumer:
    """The consumer command ``nullworker dev --consumer`` runs beside one worker.

    ``state`` is ``waiting`` (for its worker to be ready), ``running``, ``restarting``
    (it exited while its worker lives; started again at ``restart_at``, a
    ``trio.current_time()``) or ``stopped`` (with its worker). ``exit_code`` is the last
    exit's (negative: killed by that signal).
    """

    state: str
    pid: int | None = None
    exit_code: int | None = None
    restarts: int = 0
    restart_at: float | None = None
    log: str | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        at = self.restart_at
        return {
            "state": self.state,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "restarts": self.restarts,
            "restart_in_s": None if at is None else round(max(0.0, at - now), 3),
            "log": self.log,
        }


@dataclass
class Scaling:
    """How the workers behind the engine are scaled, as the page explains it.

    The engine does not scale; whoever does (``nullworker dev``) describes its policy
    here, so the page can say why a request waits and when an idle worker stops.
    """

    min_workers: int
    max_workers: int
    idle_timeout_s: float
    #: No new worker is started before this ``trio.current_time()`` (after a crash).
    paused_until: float | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        until = self.paused_until
        return {
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
            "idle_timeout_s": self.idle_timeout_s,
            "paused_s": round(until - now, 3) if until is not None and until > now else None,
        }


@dataclass(frozen=True)
class RouteRecord:
    """One READY answer: which request went to which worker."""

    reqnum: int
    request_idx: int
    worker_id: int
    url: str
    endpoint: str
    at: float  # wall clock


@dataclass
class PendingRequest:
    """A request that got WAITING and is still being polled."""

    request_idx: int
    endpoint: str
    cost: float
    first_seen: float  # trio time
    last_seen: float  # trio time
    polls: int = 0


@dataclass
class WorkerRecord:
    """What the engine knows about one worker (mutable; read it, do not write it).

    Times are ``trio.current_time()`` values; ``None`` means "not applicable".
    """

    id: int
    first_seen: float
    label: str = ""
    url: str = ""
    version: str = ""
    loadtime: float = 0.0
    max_perf: float = 0.0
    cur_load: float = 0.0
    error_msg: str = ""
    num_requests_working: int = 0
    working_request_idxs: tuple[int, ...] = ()
    report_count: int = 0
    last_report_at: float | None = None
    #: When it became busy (routed to, or first reported busy); the reservation age.
    busy_since: float | None = None
    #: When it became ready and idle; used by dev mode's scale-down.
    idle_since: float | None = None
    lease_until: float | None = None
    lease_request_idx: int | None = None
    last_routed_at: float | None = None
    routed_count: int = 0

    #: Set by whoever started the process (``nullworker dev``).
    pid: int | None = None
    log: str | None = None
    #: The active hold as the worker describes it, when someone asked it (dev).
    hold: Hold | None = None
    #: Its control listener (dev), the local holds open there and dev's consumer.
    control_url: str = ""
    local_holds: tuple[LocalHoldView, ...] = ()
    consumer: Consumer | None = None
    #: Set when the worker is retired: ``trio.current_time()`` and why.
    stopped_at: float | None = None
    stop_reason: str = ""

    @property
    def ready(self) -> bool:
        return self.loadtime > 0 and self.max_perf > 0 and not self.error_msg

    @property
    def busy(self) -> bool:
        """True when the last report shows requests in flight."""
        return self.num_requests_working > 0

    def leased(self, now: float) -> bool:
        return self.lease_until is not None and self.lease_until > now

    def stale(self, now: float, stale_after_s: float) -> bool:
        return self.last_report_at is not None and now - self.last_report_at > stale_after_s

    def state(self, now: float, stale_after_s: float) -> str:
        """One of starting, stale, error, loading, busy, leased, idle."""
        if self.last_report_at is None:
            return "starting"
        if self.stale(now, stale_after_s):
            return "stale"
        if self.error_msg:
            return "error"
        if not self.ready:
            return "loading"
        if self.busy:
            return "busy"
        if self.leased(now):
            return "leased"
        return "idle"

    def free(self, now: float, stale_after_s: float) -> bool:
        return self.state(now, stale_after_s) == "idle" and bool(self.url)

    def to_json(self, now: float, stale_after_s: float) -> dict[str, Any]:
        state = self.state(now, stale_after_s)
        return {
            "id": self.id,
            "label": self.label,
            "url": self.url,
            "state": state,
            "ready": self.ready,
            "busy": state in ("busy", "leased"),
            "leased": self.leased(now),
            "idle": state == "idle",
            "error": self.error_msg or None,
            "cur_load": self.cur_load,
            "num_requests_working": self.num_requests_working,
            "working_request_idxs": list(self.working_request_idxs),
            "reservation_age_s": age_of(now, self.busy_since),
            "idle_age_s": age_of(now, self.idle_since),
            "last_report_age_s": age_of(now, self.last_report_at),
            "report_count": self.report_count,
            "routed_count": self.routed_count,
            "version": self.version,
            "uptime_s": age_of(now, self.first_seen),
            "pid": self.pid,
            "log": self.log,
            "hold": None if self.hold is None else self.hold.to_json(),
            "control_url": self.control_url or None,
            "local_holds": [h.to_json() for h in self.local_holds],
            "consumer": None if self.consumer is None else self.consumer.to_json(now),
        }

    def stopped_json(self, now: float) -> dict[str, Any]:
        """The record of a retired worker: how long it lived and why it stopped."""
        assert self.stopped_at is not None
        return {
            "id": self.id,
            "label": self.label,
            "url": self.url,
            "lived_s": round(max(0.0, self.stopped_at - self.first_seen), 3),
            "stopped_ago_s": age_of(now, self.stopped_at),
            "reason": self.stop_reason,
            "routed_count": self.routed_count,
            "report_count": self.report_count,
            "pid": self.pid,
            "log": self.log,
            "control_url": self.control_url or None,
            "consumer": None if self.consumer is None else self.consumer.to_json(now),
        }


def age_of(now: float, since: float | None) -> float | None:
    """Seconds from ``since`` to ``now``, rounded to the millisecond (``None`` stays ``None``)."""
    return None if since is None else round(max(0.0, now - since), 3)


def breakdown(workers: Iterable[WorkerRecord], now: float, stale_after_s: float) -> dict[str, int]:
    """How many workers are in each :meth:`WorkerRecord.state`; absent states are left out."""
    counts: dict[str, int] = {}
    for worker in workers:
        state = worker.state(now, stale_after_s)
        counts[state] = counts.get(state, 0) + 1
    return counts
