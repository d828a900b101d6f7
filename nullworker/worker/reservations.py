"""The reservation core: one slot, a FIFO queue with a real deadline, and holds.

Pure Trio; no HTTP in here. The web layer turns requests into :meth:`ReservationSlot.hold`
calls and outcomes into status codes.

Concurrency invariants
----------------------
* The slot is a ``trio.CapacityLimiter(1)``. Waiters are woken in FIFO order (the
  limiter parks them in a ``ParkingLot``), so queued reservations start in arrival order.
* A waiter waits under ``trio.move_on_after(max_queue_time_s)``: the bound is a real
  deadline on the wait, not an estimate made at admission. ``max_queue_time_s == 0``
  uses ``acquire_nowait`` and rejects at once when busy.
* A hold runs inside ``trio.move_on_at(deadline)``. Every way out -- the deadline, an
  explicit :meth:`release`, :meth:`shutdown`, the caller's cancellation (a client
  disconnect cancels the request handler) or an unexpected error -- runs the same
  ``finally`` block, which gives the token back and emits exactly one ``ended`` event.
* The token is acquired and released by the task that runs :meth:`hold`, as
  ``CapacityLimiter`` requires.
* ``Cancelled`` is never swallowed: it is recorded as the ``cancelled`` outcome and
  re-raised.
* At most one live (queued or held) reservation has a given ``key`` (the web layer
  passes the engine's ``request_idx``). The check and the claim happen synchronously,
  with no checkpoint between them, before the reservation is queued or any event is
  emitted; the key is given back when the reservation ends, so a later replay is
  admitted again.

State transitions of one reservation (anything else is a bug)::

    QUEUED --token--> HELD --deadline--------> ENDED(duration_elapsed)
       |                 |--release()--------> ENDED(explicit)  (if it names this one)
       |                 |--shutdown()-------> ENDED(shutdown)
       |                 |--caller cancelled-> ENDED(cancelled)
       |                 '--exception--------> ENDED(error)
       |--max_queue_time-----------------> ENDED(rejected)
       |--shutdown()---------------------> ENDED(shutdown)
       '--caller cancelled---------------> ENDED(cancelled)
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..errors import DuplicateRequest, QueueTimeout, ReleaseConflict, ShuttingDown
from ..vast.vocabulary import Outcome  # re-exported: its home before nullworker.vast

__all__ = [
    "MAX_RELEASE_BODY_BYTES",
    "Outcome",
    "ReleaseRequest",
    "ReleaseRequestError",
    "Reservation",
    "ReservationEvent",
    "ReservationResult",
    "ReservationSlot",
    "SlotStatistics",
    "State",
    "parse_release_request",
]

log = logging.getLogger("nullworker.reservations")


class State(enum.Enum):
    QUEUED = "queued"
    HELD = "held"
    ENDED = "ended"


_TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.HELD, State.ENDED}),
    State.HELD: frozenset({State.ENDED}),
    State.ENDED: frozenset(),
}


@dataclass(eq=False)
class Reservation:
    """One reservation, from arrival to its outcome.

    ``tag`` is the caller's (the web layer stores the engine's ``request_idx`` and
    ``reqnum`` there); ``key``, if not ``None``, is unique among live reservations.
    Times named ``*_at`` are wall-clock epoch seconds (for the engine); ``deadline`` is
    on the Trio clock.
    """

    id: int
    duration_s: float
    workload: float
    tag: dict[str, Any] = field(default_factory=dict)
    key: Hashable | None = None
    state: State = State.QUEUED
    outcome: Outcome | None = None
    entered_queue_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    deadline: float = math.inf
    #: The same moments on the Trio clock, for durations (the wall clock can step).
    _queued_clock: float | None = None
    _started_clock: float | None = None
    _ended_clock: float | None = None
    _release_reason: Outcome | None = None
    _released: trio.Event = field(default_factory=trio.Event)
    _wait_scope: trio.CancelScope | None = None

    def _move(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"reservation {self.id}: illegal transition {self.state} -> {new}")
        self.state = new

    @property
    def held_s(self) -> float:
        """Seconds between the hold starting and ending (0 if it never started).

        Measured on the Trio clock: a wall-clock step (NTP) must not stretch or shrink it.
        """
        if self._started_clock is None:
            return 0.0
        end = self._ended_clock if self._ended_clock is not None else trio.current_time()
        return max(end - self._started_clock, 0.0)

    @property
    def queue_wait_s(self) -> float:
        """Seconds from admission until the hold started (or the reservation ended)."""
        if self._queued_clock is None:
            return 0.0
        left = self._started_clock if self._started_clock is not None else self._ended_clock
        end = left if left is not None else trio.current_time()
        return max(end - self._queued_clock, 0.0)


@dataclass(frozen=True)
class ReservationEvent:
    """What observers (the engine reporter) are told: ``kind`` is queued, started or ended."""

    kind: str
    reservation: Reservation


@dataclass(frozen=True)
class ReservationResult:
    """The end of a hold that the holder is still there to hear about."""

    outcome: Outcome
    duration_s: float
    held_s: float
    reservation_id: int


@dataclass(frozen=True)
class ActiveInfo:
    id: int
    duration_s: float
    started_at: float
    #: Wall-clock epoch seconds at which the hold will elapse.
    ends_at: float
    tag: dict[str, Any]
    #: Seconds held so far and left, on the Trio clock.
    held_s: float = 0.0
    remaining_s: float = 0.0


@dataclass(frozen=True)
class SlotStatistics:
    """A frozen snapshot of the slot, as :meth:`trio.CapacityLimiter.statistics` gives."""

    busy: bool
    active: ActiveInfo | None
    waiting: int
    closing: bool
    counts: dict[str, int]
    #: Tasks in :meth:`ReservationSlot.wait_held` (the control listener's long-polls).
    held_waiters: int = 0


Observer = Callable[[ReservationEvent], None]

#: A ``/release`` body is two small fields.
MAX_RELEASE_BODY_BYTES = 4096


class ReleaseRequestError(ValueError):
    """A ``/release`` body the worker cannot use; ``detail`` is the JSON answer.

    ``status`` is 428 when the body names no reservation, else 422 (``detail`` names the
    field).
    """

    def __init__(self, message: str, *, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.status = status
        self.detail: dict[str, Any] = {"released": False, "error": message}
        if field is not None:
            self.detail["field"] = field


@dataclass(frozen=True)
class ReleaseRequest:
    """A parsed ``/release`` body: what :meth:`ReservationSlot.release` is to end."""

    id: int | None = None
    started_before: float | None = None


def parse_release_request(body: bytes) -> ReleaseRequest:
    """Parse a ``/release`` body: a JSON object with ``id`` and/or ``started_before``.

    ``id`` is a reservation's id (an integer >= 1, as ``GET /status`` shows it);
    ``started_before`` wall-clock epoch seconds (a finite number). At least one is
    required: a release that names nothing could end a reservation that started after
    its sender decided (see :meth:`ReservationSlot.release`). Any other field is
    refused, so that a typo does not release by accident.

    Raises:
      ReleaseRequestError: 428 when nothing is named, 422 naming the bad field.
    """
    data: Any = {}
    if body.strip():
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ReleaseRequestError("invalid JSON") from None
        if not isinstance(data, dict):
            raise ReleaseRequestError("the body must be a JSON object")
    unknown = sorted(set(data) - {"id", "started_before"})
    if unknown:
        raise ReleaseRequestError(
            f"unknown field {unknown[0]!r}: /release takes id and started_before",
            field=unknown[0],
        )
    raw_id = data.get("id")
    if raw_id is not None and (
        isinstance(raw_id, bool) or not isinstance(raw_id, int) or raw_id < 1
    ):
        raise ReleaseRequestError("id must be a reservation id (an integer >= 1)", field="id")
    before = data.get("started_before")
    if before is not None:
        if isinstance(before, bool) or not isinstance(before, int | float):
            raise ReleaseRequestError(
                "started_before must be wall-clock epoch seconds", field="started_before"
            )
        try:
            before = float(before)
        except OverflowError:
            before = math.inf
        if not math.isfinite(before):
            raise ReleaseRequestError(
                "started_before must be a finite number", field="started_before"
            )
    if raw_id is None and before is None:
        raise ReleaseRequestError(
            'name the reservation to release: {"id": N} (GET /status shows active.id) '
            'or {"started_before": EPOCH_SECONDS} (when you decided to release)',
            status=428,
        )
    return ReleaseRequest(id=raw_id, started_before=before)


class ReservationSlot:
    """One reservation at a time; the rest queue for at most ``max_queue_time_s``.

    Args:
      max_reservation_s: the cap on a hold; a larger or missing duration gets it.
      max_queue_time_s: the longest a reservation may wait for the slot before it is
        rejected with :class:`~nullworker.errors.QueueTimeout`. ``0`` rejects at once.
      workload: the workload each reservation counts for in the engine's load maths.
      observer: called (synchronously, never awaited) with every
        :class:`ReservationEvent`. It must not block; exceptions it raises are logged
        and dropped so that a reporting bug can never leave the slot held.
    """

    def __init__(
        self,
        *,
        max_reservation_s: float,
        max_queue_time_s: float,
        workload: float = 100.0,
        observer: Observer | None = None,
    ) -> None:
        if not (math.isfinite(max_reservation_s) and max_reservation_s > 0):
            raise ValueError("max_reservation_s must be a finite number > 0")
        if not (math.isfinite(max_queue_time_s) and max_queue_time_s >= 0):
            raise ValueError("max_queue_time_s must be a finite number >= 0")
        self.max_reservation_s = max_reservation_s
        self.max_queue_time_s = max_queue_time_s
        self.workload = workload
        self._observers: list[Observer] = [observer] if observer else []
        self._limiter = trio.CapacityLimiter(1)
        self._ids = itertools.count(1)
        self._active: Reservation | None = None
        self._queued: list[Reservation] = []
        #: The key of each live (queued or held) reservation that has one.
        self._live_keys: dict[Hashable, Reservation] = {}
        self._closing = False
        self._idle = trio.Event()
        self._idle.set()
        #: Set (and replaced) when a hold starts and at shutdown: wakes :meth:`wait_held`.
        self._held_or_closing = trio.Event()
        self._counts = {o.value: 0 for o in Outcome} | {"started": 0}

    # -- observers -------------------------------------------------------------------

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def _emit(self, kind: str, reservation: Reservation) -> None:
        event = ReservationEvent(kind, reservation)
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                log.exception("reservation observer failed on %s event", kind)

    # -- public API ------------------------------------------------------------------

    def effective_duration(self, requested: float | None) -> float:
        """The hold length for a requested duration: the cap when omitted or larger."""
        if requested is None:
            return self.max_reservation_s
        if not math.isfinite(requested) or requested < 0:
            raise ValueError("duration must be a finite number >= 0")
        return min(float(requested), self.max_reservation_s)

    async def hold(
        self,
        duration_s: float | None = None,
        *,
        tag: dict[str, Any] | None = None,
        key: Hashable | None = None,
    ) -> ReservationResult:
        """Wait for the slot, hold it, and return how the hold ended.

        Returns when the duration elapses, on :meth:`release` and on :meth:`shutdown`
        (check ``result.outcome``). ``key``, if given, must not be the key of a
        reservation that is still queued or held (the web layer passes the engine's
        ``request_idx``, so that a replayed envelope cannot hold twice).

        Raises:
          DuplicateRequest: ``key`` is in use; nothing was queued and no event emitted.
          QueueTimeout: the slot stayed busy for ``max_queue_time_s``.
          ShuttingDown: the slot is closing (before or while queued).
          ValueError: ``duration_s`` is negative, NaN or infinite.
          trio.Cancelled: the caller was cancelled (recorded as ``cancelled``).
        """
        duration = self.effective_duration(duration_s)
        if self._closing:
            raise ShuttingDown("the worker is shutting down")
        if key is not None and key in self._live_keys:
            raise DuplicateRequest(
                f"a reservation with key {key!r} is already held or queued", key=key
            )
        res = Reservation(
            id=next(self._ids),
            duration_s=duration,
            workload=self.workload,
            tag=dict(tag or {}),
            key=key,
            entered_queue_at=time.time(),
            _queued_clock=trio.current_time(),
        )
        if key is not None:
            self._live_keys[key] = res
        self._queued.append(res)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._emit("queued", res)
        acquired = False
        try:
            acquired = await self._wait_for_token(res)
            if not acquired:
                if res._release_reason is Outcome.SHUTDOWN:
                    self._finish(res, Outcome.SHUTDOWN)
                    raise ShuttingDown("the worker is shutting down")
                self._finish(res, Outcome.REJECTED)
                raise QueueTimeout(
                    f"the worker stayed busy for max_queue_time ({self.max_queue_time_s:g} s)"
                )
            return await self._hold_token(res)
        except trio.Cancelled:
            self._finish(res, Outcome.CANCELLED)
            raise
        except BaseException:
            self._finish(res, Outcome.ERROR)
            raise
        finally:
            self._forget_key(res)
            if acquired:
                self._active = None
                self._limiter.release()
            if res in self._queued:
                self._queued.remove(res)
            if self._active is None and not self._queued:
                self._idle.set()

    def release(
        self, *, id: int | None = None, started_before: float | None = None
    ) -> ActiveInfo | None:
        """End the active hold now with the ``explicit`` outcome, if it is the one named.

        A release is decided from what its caller saw a moment before; meanwhile that
        reservation may have ended and the next one started. So the caller names what
        it means: ``id`` (the reservation's :attr:`Reservation.id`) and/or
        ``started_before`` (wall-clock epoch seconds: only a reservation that started
        before then). The check and the release happen with no checkpoint between.
        Naming neither releases whatever is active.

        Returns what was released, or ``None`` if nothing is held (the named one ended).

        Raises:
          ReleaseConflict: another reservation is held now; it was left alone.
        """
        res = self._active
        if res is None or res._release_reason is not None:
            return None
        if id is not None and res.id != id:
            raise ReleaseConflict(
                f"reservation {id} is not active: reservation {res.id} is", active=self._info(res)
            )
        if started_before is not None and not res.started_at < started_before:
            raise ReleaseConflict(
                f"the active reservation {res.id} started after started_before",
                active=self._info(res),
            )
        res._release_reason = Outcome.RELEASED
        res._released.set()
        return self._info(res)

    def shutdown(self) -> None:
        """Refuse new reservations and end the active and queued ones with ``shutdown``.

        Holders return a result with ``Outcome.SHUTDOWN``; waiters raise
        :class:`ShuttingDown`. Idempotent.
        """
        self._closing = True
        self._wake_held_waiters()
        for res in list(self._queued):
            if res._release_reason is None:
                res._release_reason = Outcome.SHUTDOWN
                res._released.set()
                if res._wait_scope is not None:
                    res._wait_scope.cancel()

    async def wait_held(self) -> ActiveInfo:
        """Wait until a reservation is held; what it is (now, when one is held already).

        A hold that is ending (released, or shut down, but its holder has not run yet)
        does not count. Waiters park on one event that a hold's start sets and replaces
        (no polling); a cancelled waiter leaves nothing behind.

        Raises:
          ShuttingDown: the slot is closing (now, or once the wait began).
        """
        while True:
            if self._closing:
                raise ShuttingDown("the worker is shutting down")
            res = self._active
            if res is not None and res._release_reason is None:
                return self._info(res)
            await self._held_or_closing.wait()

    def _wake_held_waiters(self) -> None:
        self._held_or_closing.set()
        self._held_or_closing = trio.Event()

    async def wait_idle(self) -> None:
        """Return once nothing is held or queued."""
        await self._idle.wait()

    def statistics(self) -> SlotStatistics:
        res = self._active
        return SlotStatistics(
            busy=res is not None,
            active=self._info(res) if res is not None else None,
            waiting=sum(1 for r in self._queued if r.state is State.QUEUED),
            closing=self._closing,
            counts=dict(self._counts),
            held_waiters=self._held_or_closing.statistics().tasks_waiting,
        )

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def busy(self) -> bool:
        """A reservation holds the slot (``statistics().busy``, without walking the queue)."""
        return self._active is not None

    # -- internals -------------------------------------------------------------------

    def _info(self, res: Reservation) -> ActiveInfo:
        return ActiveInfo(
            id=res.id,
            duration_s=res.duration_s,
            started_at=res.started_at,
            ends_at=res.started_at + res.duration_s,
            tag=dict(res.tag),
            held_s=res.held_s,
            remaining_s=max(res.deadline - trio.current_time(), 0.0),
        )

    async def _wait_for_token(self, res: Reservation) -> bool:
        if self.max_queue_time_s == 0:
            try:
                self._limiter.acquire_nowait()
            except trio.WouldBlock:
                return False
            return True
        with trio.move_on_after(self.max_queue_time_s) as scope:
            res._wait_scope = scope
            await self._limiter.acquire()
            return True
        return False

    async def _hold_token(self, res: Reservation) -> ReservationResult:
        res._move(State.HELD)
        self._active = res
        res.started_at = time.time()
        res._started_clock = trio.current_time()
        res.deadline = res._started_clock + res.duration_s
        self._counts["started"] += 1
        self._emit("started", res)
        self._wake_held_waiters()
        # A shutdown that raced with acquiring the token set the event already.
        with trio.move_on_at(res.deadline):
            await res._released.wait()
        outcome = res._release_reason or Outcome.ELAPSED
        self._finish(res, outcome)
        return ReservationResult(
            outcome=outcome, duration_s=res.duration_s, held_s=res.held_s, reservation_id=res.id
        )

    def _forget_key(self, res: Reservation) -> None:
        if res.key is not None and self._live_keys.get(res.key) is res:
            del self._live_keys[res.key]

    def _finish(self, res: Reservation, outcome: Outcome) -> None:
        if res.state is State.ENDED:
            return
        # The key is free from the moment the reservation ends: an observer (or the
        # holder's caller) may see the end and replay at once.
        self._forget_key(res)
        res._move(State.ENDED)
        res.outcome = outcome
        res.ended_at = time.time()
        res._ended_clock = trio.current_time()
        self._counts[outcome.value] += 1
        self._emit("ended", res)
