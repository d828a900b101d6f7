"""The reporter's accounting, sans I/O: what the engine must hear, and what it has heard.

This module never touches the network, a file or a clock, and calls nothing of Trio or
httpx (as h11's ``_state.py`` never touches a socket); it only logs. The loop
(:mod:`._loop`) feeds it inputs -- reservation events, readiness, "this body was
delivered", "this batch was refused", the current time -- and acts on what it answers:
the body to send, the batch to POST next, the journal lines to strike, how long to wait.
So every decision below is a plain function of its inputs, tested synchronously in
``tests/test_reporter_core.py``.

Theory of operation
-------------------
* Snapshot and subtract, never zero (docs/protocol.md pitfall §10.8): a
  ``worker_status`` round takes a :class:`_StatusSnapshot` (the counters copied into the
  body) and, only once an address accepted that body, subtracts exactly those copied
  values. Increments made while the POST was in flight survive into the next report; a
  failed round subtracts nothing.
* A delete entry travels only once a delivered ``worker_status`` showed its request gone
  (``reported``), and leaves the pending list only when a POST carrying it was accepted
  (by identity, not by ``request_idx``) or refused on its own.
* One status in flight at a time: :meth:`Accounting.status_sending` opens it, and
  exactly one of ``status_delivered`` / ``status_failed`` / ``status_interrupted``
  closes it.

Illegal transitions raise :class:`_AccountingError` (a bug in the caller, never the
engine's fault): closing a status that is not in flight, opening a second one, and
settling a delete batch that holds an entry no delivered status has shown gone.
Unexpected but harmless inputs are tolerated: an unknown event kind changes nothing, an
``ended`` for a reservation never seen ``queued`` still owes the engine its delete entry,
and an accepted entry that was dropped meanwhile (the pending bound) is simply gone.
"""

from __future__ import annotations

import collections
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ...vast.vocabulary import RequestStatus
from ..config import MAX_PERF, WorkerConfig
from ..reservations import Outcome, Reservation, ReservationEvent

log = logging.getLogger("nullworker.reporter")

#: The ``version`` field of every ``worker_status`` (what the official worker sends).
WORKER_VERSION = "1.1.0"
#: Cap on every retry sleep towards the engine (between tries, between failed rounds,
#: between key fetches): after an outage the engine hears from the worker within about
#: this long (times the jitter) of answering again, and meanwhile gets about one request
#: a second per address.
RETRY_CAP_S = 1.0
#: Sleeps between failed rounds and key fetches are spread by +-20 %, so that workers
#: which lost the engine together do not all come back in step.
RETRY_JITTER = 0.2
#: The engine address that takes ``worker_status`` but never ``delete_requests`` (§6.4).
_NO_DELETES_ADDR = "https://cloud.vast.ai/api/v0"
#: How many recent ``request_idx`` values are remembered to de-duplicate the count.
_RECENT_IDX_WINDOW = 4096
#: Bound on ended requests waiting for delivery (the oldest are dropped beyond it).
_MAX_PENDING_DELETES = 10_000
#: At most this many entries per ``delete_requests`` POST.
_DELETE_BATCH = 500
#: The ``cur_load`` floor while local holds are open: one busy worker (``max_perf``).
LOCAL_HOLD_LOAD = MAX_PERF

_STATUS_OF: dict[Outcome, str] = {
    Outcome.ELAPSED: RequestStatus.SUCCESS,
    Outcome.RELEASED: RequestStatus.SUCCESS,
    Outcome.CANCELLED: RequestStatus.CANCELLED,
    Outcome.SHUTDOWN: RequestStatus.CANCELLED,
    Outcome.REJECTED: RequestStatus.REJECTED,
    Outcome.ERROR: RequestStatus.ERROR,
}
#: The engine's ``success`` flag: served or cancelled, not refused or failed (§6.4).
_SUCCESS_STATUSES = frozenset({RequestStatus.SUCCESS, RequestStatus.CANCELLED})


class _AccountingError(RuntimeError):
    """An input the accounting's state does not allow (a bug in its caller)."""


def retry_pause(seconds: float = RETRY_CAP_S) -> float:
    """``seconds`` spread by +-``RETRY_JITTER`` (a sleep before trying the engine again)."""
    return seconds * random.uniform(1.0 - RETRY_JITTER, 1.0 + RETRY_JITTER)


def round_backoff_s(failures: int, *, engine_retry_s: float, heartbeat_s: float) -> float:
    """The pause (before jitter) after the ``failures``-th failed round in a row."""
    base: float = engine_retry_s * 2 ** min(failures - 1, 16)
    return min(base, RETRY_CAP_S, heartbeat_s)


def try_pause_s(attempt: int, *, engine_retry_s: float) -> float:
    """The pause after the ``attempt``-th failed try at one address (1-based)."""
    pause: float = engine_retry_s * 2 ** (attempt - 1)
    return min(pause, RETRY_CAP_S)


def _as_idx(value: Any) -> int | None:
    # The envelope already turns request_idx into an int; be strict anyway so a
    # malformed tag can never put a non-int into working_request_idxs.
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def delete_addrs(addrs: Iterable[str]) -> list[str]:
    """The addresses that take ``delete_requests`` (the official worker skips one, §6.4)."""
    return [a for a in addrs if a.rstrip("/") != _NO_DELETES_ADDR]


class TokenBucket:
    """The round pacing: ``burst`` tokens at most, one more every ``interval_s``.

    Changes after a quiet spell are reported at once, and a worker whose state changes
    hundreds of times a second (short reservations back to back) sends a round every
    ``interval_s`` with the state at that moment, not one per change. Full at start.
    Use: ``wait = bucket.wait_s(now)``; sleep ``wait`` if it is positive; then
    ``bucket.take(now)`` with the time after the sleep.
    """

    def __init__(self, *, burst: int, interval_s: float) -> None:
        self._burst = float(burst)
        self._interval_s = interval_s
        self.tokens = float(burst)
        self._at = -math.inf

    def wait_s(self, now: float) -> float:
        """Refill up to ``now``; how long until a token is there (0: one is)."""
        if self._interval_s > 0:
            refill = (now - self._at) / self._interval_s
            self.tokens = min(self._burst, self.tokens + refill)
        else:
            self.tokens = self._burst
        self._at = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) * self._interval_s

    def take(self, now: float) -> None:
        """Take a token; after a wait, the one that ripened during it."""
        if self.tokens < 1.0:
            self.tokens, self._at = 1.0, now
        self.tokens -= 1.0


@dataclass
class Counters:
    """Workload totals accumulated since the last delivered report."""

    received: float = 0.0
    cancelled: float = 0.0
    served: float = 0.0
    errored: float = 0.0
    rejected: float = 0.0

    def copy(self) -> Counters:
        return Counters(self.received, self.cancelled, self.served, self.errored, self.rejected)

    def subtract(self, sent: Counters) -> None:
        self.received -= sent.received
        self.cancelled -= sent.cancelled
        self.served -= sent.served
        self.errored -= sent.errored
        self.rejected -= sent.rejected


@dataclass(eq=False)
class DeleteEntry:
    """One ended request waiting for ``/delete_requests/`` (compared by identity)."""

    request_idx: int
    status: str
    entered_queue_at: float
    work_started_at: float
    work_completed_at: float
    #: Set once a delivered worker_status showed this request gone from the working set.
    reported: bool = False
    #: The largest batch this entry may travel in; halved each time a batch carrying it
    #: is refused, so a refused entry ends up alone (and is dropped).
    max_batch: int = _DELETE_BATCH

    @property
    def success(self) -> bool:
        return self.status in _SUCCESS_STATUSES

    def as_json(self) -> dict[str, Any]:
        return {
            "request_idx": self.request_idx,
            "success": self.success,
            "status": self.status,
            "entered_queue_at": self.entered_queue_at,
            "work_started_at": self.work_started_at,
            "work_completed_at": self.work_completed_at,
        }


@dataclass(frozen=True)
class _StatusSnapshot:
    body: dict[str, Any]
    counters: Counters
    disk_gib: float
    #: The ended requests this body already shows as gone.
    ended: list[DeleteEntry]


def status_body(
    config: WorkerConfig,
    *,
    loadtime: float,
    counters: Counters,
    cur_load: float,
    max_perf: float,
    error_msg: str,
    num_requests_working: int,
    num_requests_received: int,
    disk_gib: float,
    additional_disk_gib: float,
    working_request_idxs: list[int],
) -> dict[str, Any]:
    """The ``/worker_status/`` body: every §6.2 field plus 1.9.1's ``disk_usage``."""
    return {
        "id": config.container_id,
        "mtoken": config.master_token,
        "version": WORKER_VERSION,
        "loadtime": float(loadtime),
        "new_load": float(max(counters.received - counters.cancelled, 0.0)),
        "cur_load": float(cur_load),
        "rej_load": float(counters.rejected),
        "max_perf": float(max_perf),
        "cur_perf": float(counters.served),
        "error_msg": error_msg,
        "num_requests_working": int(num_requests_working),
        "num_requests_recieved": int(num_requests_received),  # sic: the wire spelling
        "additional_disk_usage": float(additional_disk_gib),
        "disk_usage": float(disk_gib),
        "working_request_idxs": list(working_request_idxs),
        "cur_capacity": 0,
        "max_capacity": 0,
        "url": config.public_url or "",
    }


def delete_body(config: WorkerConfig, entries: list[DeleteEntry]) -> dict[str, Any]:
    """One ``/delete_requests/`` body, in ``config.delete_requests_format``."""
    if config.delete_requests_format == "legacy":
        return {
            "worker_id": config.container_id,
            "mtoken": config.master_token,
            "request_idxs": [e.request_idx for e in entries],
            "success": entries[0].success,  # a group shares its flag
        }
    return {
        "worker_id": config.container_id,
        "mtoken": config.master_token,
        "requests": [e.as_json() for e in entries],
    }


def delete_groups(config: WorkerConfig, batch: list[DeleteEntry]) -> list[list[DeleteEntry]]:
    """The POSTs a batch takes: one, or (legacy) one per ``success`` flag present.

    In the legacy format each group is done as soon as it is accepted (or refused), so a
    group is never sent again when the other one fails.
    """
    if config.delete_requests_format != "legacy":
        return [batch]
    return [
        [e for e in batch if e.success is flag]
        for flag in (True, False)
        if any(e.success is flag for e in batch)
    ]


class Accounting:
    """What the engine must hear and has heard; every method is synchronous and pure.

    The journal's file I/O is not done here: the methods that end delete entries queue
    the ``request_idx`` values to strike out in :attr:`journal_strikes`, which the
    caller drains (:meth:`take_journal_strikes`).
    """

    def __init__(self, config: WorkerConfig, *, disk_gib: float, journaled: bool = False) -> None:
        self._config = config
        self._journaled = journaled
        # -- reported state -----------------------------------------------------------
        self.loadtime = 0.0
        self.max_perf = 0.0
        self.error_msg = ""
        self.counters = Counters()
        #: Reservations queued or held, in admission order (the working set).
        self.working: dict[int, Reservation] = {}
        self.received_count = 0
        self._recent_idxs: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.pending: list[DeleteEntry] = []
        #: At least one local hold is open (the count itself is not reported).
        self.local_holds = False
        # 1.9.1 measures the disk delta from the last *delivered* report; the baseline
        # is the figure at start, as the official worker takes it.
        self.last_disk_gib = disk_gib
        # -- scheduling -----------------------------------------------------------------
        #: Something the engine has not seen yet; True at start: the first report goes
        #: out as soon as the loop runs.
        self.dirty = True
        #: A state change since the current round began: report again without backoff.
        self.changed = True
        #: Readiness or an error changed: the next round skips the coalescing window.
        self.urgent = False
        self.last_status_round_at = -math.inf
        #: True while the last worker_status found no engine address that took it.
        self.unreachable = False
        self._in_flight: _StatusSnapshot | None = None
        # -- statistics -----------------------------------------------------------------
        self.reports_sent = 0
        self.deletes_sent = 0
        self.report_failures = 0
        self.dropped_deletes = 0
        self.refused_deletes = 0
        #: ``request_idx`` values to strike out of the journal (drained by the caller).
        self.journal_strikes: list[int] = []

    # -- inputs -------------------------------------------------------------------------

    def mark_changed(self) -> None:
        self.dirty = True
        self.changed = True

    def apply(self, event: ReservationEvent) -> bool:
        """Account for one reservation event; True (and marked) when the report changes."""
        changed = self._apply(event)
        if changed:
            self.mark_changed()
        return changed

    def _apply(self, event: ReservationEvent) -> bool:
        res = event.reservation
        workload = float(res.workload)
        idx = _as_idx(res.tag.get("request_idx"))
        if event.kind == "queued":
            # Admission is the protocol's "start": the request joins the working set.
            self.working[res.id] = res
            self.counters.received += workload
            self._count_received(idx)
            return True
        if event.kind == "started":
            # The hold began; nothing in the report changes (a queued reservation is
            # already in the working set), and work_started_at is read at the end.
            return False
        if event.kind != "ended":
            log.warning("engine reporter: unknown reservation event %r", event.kind)
            return False
        self.working.pop(res.id, None)
        outcome = res.outcome or Outcome.ERROR
        status = _STATUS_OF[outcome]
        if status == RequestStatus.SUCCESS:
            self.counters.served += workload
        elif status == RequestStatus.CANCELLED:
            self.counters.cancelled += workload
        elif status == RequestStatus.REJECTED:
            self.counters.rejected += workload
        else:
            self.counters.errored += workload
        if idx is not None:
            self.add_pending(
                DeleteEntry(
                    request_idx=idx,
                    status=status,
                    entered_queue_at=float(res.entered_queue_at or 0.0),
                    work_started_at=float(res.started_at or 0.0),
                    work_completed_at=float(res.ended_at or 0.0),
                )
            )
        return True

    def set_ready(self, *, loadtime: float, max_perf: float) -> None:
        # A strictly positive loadtime even if ready in the same clock tick as start.
        self.loadtime = max(loadtime, 1e-3)
        self.max_perf = float(max_perf)
        self.error_msg = ""
        self.urgent = True
        self.mark_changed()

    def set_error(self, message: str) -> None:
        self.error_msg = str(message)
        self.urgent = True
        self.mark_changed()

    def set_local_holds(self, count: int) -> bool:
        """True when the report changes (the first hold opened or the last one closed)."""
        held = count > 0
        if held == self.local_holds:
            return False
        self.local_holds = held
        self.mark_changed()
        return True

    def queue_leftovers(self, leftover: list[int], *, now_wall: float) -> None:
        """Failed delete entries for requests a previous process never closed."""
        for idx in leftover:
            self.add_pending(
                DeleteEntry(
                    request_idx=idx,
                    status=RequestStatus.ERROR,
                    entered_queue_at=0.0,
                    work_started_at=0.0,
                    work_completed_at=now_wall,
                )
            )

    def _count_received(self, idx: int | None) -> None:
        if idx is None:
            self.received_count += 1
            return
        if idx in self._recent_idxs:
            self._recent_idxs.move_to_end(idx)
            return
        self.received_count += 1
        self._recent_idxs[idx] = None
        if len(self._recent_idxs) > _RECENT_IDX_WINDOW:
            self._recent_idxs.popitem(last=False)

    def add_pending(self, entry: DeleteEntry) -> None:
        self.pending.append(entry)
        if len(self.pending) > _MAX_PENDING_DELETES:
            excess = len(self.pending) - _MAX_PENDING_DELETES
            self._strike(self.pending[:excess])
            del self.pending[:excess]
            self.dropped_deletes += excess
            log.warning(
                "engine unreachable for long: dropped %d undelivered delete_requests entries",
                excess,
            )

    # -- the journal's bookkeeping ------------------------------------------------------

    def _strike(self, entries: list[DeleteEntry]) -> None:
        """Queue delivered (or abandoned) entries to be struck out of the journal.

        An index still in the working set stays: a reused ``request_idx`` (a retry after
        a 429) is held again, and its own end is still to come.
        """
        if not self._journaled or not entries:
            return
        working = {_as_idx(r.tag.get("request_idx")) for r in self.working.values()}
        self.journal_strikes.extend(e.request_idx for e in entries if e.request_idx not in working)

    def take_journal_strikes(self) -> list[int]:
        strikes, self.journal_strikes = self.journal_strikes, []
        return strikes

    # -- worker_status --------------------------------------------------------------------

    def load(self) -> tuple[float, int]:
        """``cur_load`` and ``num_requests_working``: the working set, with the local-hold floor."""
        cur_load = sum(float(r.workload) for r in self.working.values())
        num_working = len(self.working)
        if self.local_holds:
            cur_load = max(cur_load, LOCAL_HOLD_LOAD)
            num_working = max(num_working, 1)
        return cur_load, num_working

    def status_sending(self, *, now: float, disk_gib: float) -> _StatusSnapshot:
        """Open a ``worker_status`` delivery: the body to send, as the state is now.

        Clears ``dirty``: a change made while the body is in flight sets it again. The
        body's ``working_request_idxs`` are what the journal must hold before it is sent.
        """
        if self._in_flight is not None:
            raise _AccountingError("a worker_status is already in flight")
        counters = self.counters.copy()
        working = list(self.working.values())
        idxs = [i for i in (_as_idx(r.tag.get("request_idx")) for r in working) if i is not None]
        cur_load, num_working = self.load()
        body = status_body(
            self._config,
            loadtime=self.loadtime,
            counters=counters,
            cur_load=cur_load,
            max_perf=self.max_perf,
            error_msg=self.error_msg,
            num_requests_working=num_working,
            num_requests_received=self.received_count,
            disk_gib=disk_gib,
            additional_disk_gib=disk_gib - self.last_disk_gib,
            working_request_idxs=idxs,
        )
        snap = _StatusSnapshot(
            body=body, counters=counters, disk_gib=disk_gib, ended=list(self.pending)
        )
        self.dirty = False
        self.last_status_round_at = now
        self._in_flight = snap
        return snap

    def _close(self, snap: _StatusSnapshot) -> None:
        if self._in_flight is not snap:
            raise _AccountingError("this worker_status is not the one in flight")
        self._in_flight = None

    def status_delivered(self, snap: _StatusSnapshot) -> None:
        """An address accepted ``snap``: subtract exactly what it carried."""
        self._close(snap)
        self.counters.subtract(snap.counters)
        self.last_disk_gib = snap.disk_gib
        for entry in snap.ended:
            entry.reported = True
        self.reports_sent += 1
        self.unreachable = False

    def status_failed(self, snap: _StatusSnapshot) -> None:
        """No address accepted ``snap``: it is all still owed."""
        self._close(snap)
        self.dirty = True
        self.unreachable = True
        self.report_failures += 1

    def status_interrupted(self, snap: _StatusSnapshot) -> None:
        """Cancelled mid-POST: the engine may not have it, so send this state again."""
        if self._in_flight is snap:
            self._in_flight = None
        self.dirty = True

    def assume_reported(self) -> None:
        """Nothing changed since the last delivered report, so it showed every pending
        request gone already (a safety net: delivery marks them itself)."""
        if self.dirty:
            raise _AccountingError("the state changed since the last delivered report")
        for entry in self.pending:
            entry.reported = True

    # -- delete_requests ------------------------------------------------------------------

    def has_reported_pending(self) -> bool:
        return any(entry.reported for entry in self.pending)

    def next_batch(self) -> list[DeleteEntry]:
        """The oldest reported entries, as many as every one of them may travel with."""
        batch: list[DeleteEntry] = []
        limit = _DELETE_BATCH
        for entry in self.pending:
            if not entry.reported:
                continue
            limit = min(limit, entry.max_batch)
            if len(batch) >= limit:
                break
            batch.append(entry)
        return batch

    def drop_pending(self) -> int:
        """No address takes delete_requests: keeping them would only grow memory."""
        dropped = len(self.pending)
        self.pending.clear()
        return dropped

    def _settle(self, entries: list[DeleteEntry]) -> None:
        if not entries:
            raise _AccountingError("an empty delete_requests batch")
        if not all(entry.reported for entry in entries):
            raise _AccountingError(
                "a delete_requests batch before a delivered worker_status showed it gone"
            )
        gone = set(entries)
        self.pending = [e for e in self.pending if e not in gone]
        self._strike(entries)

    def deletes_accepted(self, entries: list[DeleteEntry]) -> None:
        """An address accepted the POST carrying ``entries``: they are done."""
        self._settle(entries)
        self.deletes_sent += len(entries)

    def deletes_refused(self, entries: list[DeleteEntry]) -> Literal["dropped", "split"]:
        """The engine refused ``entries`` (a 4xx): a lone entry is dropped, a batch split.

        Every refusal halves the largest batch its entries may travel in, so the
        splitting ends (one bad entry among 8 costs 7 POSTs in all).
        """
        if len(entries) == 1:
            self._settle(entries)
            self.refused_deletes += 1
            return "dropped"
        if not entries or not all(entry.reported for entry in entries):
            raise _AccountingError("a refused delete_requests batch that was never sendable")
        half = len(entries) // 2
        for entry in entries:
            entry.max_batch = min(entry.max_batch, half)
        return "split"

    # -- scheduling -------------------------------------------------------------------------

    def due_at(self, now: float, *, retry_at: float, heartbeat_s: float) -> float | None:
        """When the loop must start a round: None for now, else the time to wake at.

        While backing off after a failed round, a state change waits for the retry
        (which sends the latest state): an unreachable engine is not hammered. A due
        heartbeat makes the state dirty (it is sent even if unchanged).
        """
        if self.changed and now >= retry_at:
            return None
        heartbeat_at = self.last_status_round_at + heartbeat_s
        leftover = self.changed or self.dirty or bool(self.pending)
        due = min(heartbeat_at, retry_at) if leftover else heartbeat_at
        if now >= due:
            if now >= heartbeat_at:
                self.dirty = True
            return None
        return due
