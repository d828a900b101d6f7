"""Local holds: the consumer on the instance keeps the worker busy while it runs a job.

A reservation brings a machine; a local hold keeps it. When the autoscaler closes a
reservation, the worker would report idle and the engine could stop the instance under a
job that is still running. A local hold (``POST /hold`` on the control listener, see
:mod:`nullworker.worker.app`) makes the worker count as busy for as long as it lasts.

Pure Trio; no HTTP in here. The web layer parses the request with
:func:`parse_hold_request` and runs the hold inside :meth:`LocalHolds.open`.

Concurrency invariants
----------------------
* Local holds take no slot and wait for nothing: any number may be open at once, beside
  a held reservation. They are not engine requests: the engine reporter only learns
  whether *any* is open (see :meth:`~nullworker.worker.reporter.EngineReporter.set_local_holds`).
* A hold is registered when :meth:`LocalHolds.open` enters, before its caller can tell
  anyone it holds, and ends exactly once when the block exits, by every way out: its
  deadline or :meth:`LocalHolds.shutdown` (as :meth:`LocalHold.wait` returns), the
  holder going away (:meth:`LocalHold.end`, or the caller's cancellation) or an error.
  Each end emits one ``ended`` event.
* ``Cancelled`` is never swallowed: it is recorded as ``disconnected`` and re-raised.
* Deadlines are on the Trio clock (``MockClock`` drives them in tests); the ``*_at``
  times are wall-clock epoch seconds, for people.

No cap on a hold without a duration
-----------------------------------
A hold without a duration lasts until its holder goes away: no ``MAX_RESERVATION_SECONDS``,
no renewal. That cap exists for remote clients, which can forget a reservation while
their connection stays up behind a proxy; a local holder is a process on this machine
holding a loopback connection, and when it dies, however it dies, the kernel closes its
socket and the worker ends the hold at once (``disconnected``). A job of any length is
then held for exactly as long as it runs. An explicit ``duration`` is honoured as given.

States of one hold::

    OPEN --deadline (if any)--------> ENDED(duration_elapsed)
      |--shutdown()-----------------> ENDED(shutdown)
      |--holder gone (end/cancel)---> ENDED(disconnected)
      |--the block returned---------> ENDED(released)
      '--exception------------------> ENDED(error)
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from .._groups import split_leaves
from ..errors import ShuttingDown
from ..vast.vocabulary import HoldOutcome  # re-exported: its home before nullworker.vast

__all__ = [
    "MAX_HOLD_BODY_BYTES",
    "MAX_LABEL_CHARS",
    "HoldOutcome",
    "HoldRequest",
    "HoldRequestError",
    "LocalHold",
    "LocalHoldEvent",
    "LocalHoldInfo",
    "LocalHolds",
    "LocalHoldsStatistics",
    "parse_hold_request",
]

log = logging.getLogger("nullworker.local_holds")

#: Longest label, in characters (it goes into log lines and ``/status``).
MAX_LABEL_CHARS = 200
#: A ``/hold`` body is two small fields; anything larger is refused with 413.
MAX_HOLD_BODY_BYTES = 4096


# -- the request -----------------------------------------------------------------------


class HoldRequestError(ValueError):
    """A ``/hold`` body the worker cannot use; ``detail`` is the JSON answer (names the field)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.detail: dict[str, Any] = {"error": message}
        if field is not None:
            self.detail["field"] = field


@dataclass(frozen=True)
class HoldRequest:
    """A parsed ``/hold`` body: ``duration_s`` None means until the holder goes away."""

    duration_s: float | None = None
    label: str = ""


def parse_hold_request(body: bytes) -> HoldRequest:
    """Parse a ``/hold`` body: empty, or a JSON object with ``duration`` and ``label``.

    ``duration`` is a finite number of seconds >= 0 (booleans and strings are refused;
    ``null`` means until the holder goes away); ``label`` a printable string of at most
    :data:`MAX_LABEL_CHARS` characters. Any other field is refused, so that a typo does
    not silently hold without a bound.

    Raises:
      HoldRequestError: the body is not that; its ``detail`` names the field.
    """
    if not body.strip():
        return HoldRequest()
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise HoldRequestError("invalid JSON") from None
    if not isinstance(data, dict):
        raise HoldRequestError("the body must be a JSON object")
    unknown = sorted(set(data) - {"duration", "label"})
    if unknown:
        raise HoldRequestError(
            f"unknown field {unknown[0]!r}: /hold takes duration and label", field=unknown[0]
        )
    duration: float | None = None
    raw = data.get("duration")
    if raw is not None:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise HoldRequestError("duration must be a number of seconds", field="duration")
        try:
            duration = float(raw)
        except OverflowError:
            duration = math.inf
        if not math.isfinite(duration) or duration < 0:
            raise HoldRequestError("duration must be a finite number >= 0", field="duration")
    label = data.get("label")
    if label is None:
        label = ""
    if not isinstance(label, str):
        raise HoldRequestError("label must be a string", field="label")
    if len(label) > MAX_LABEL_CHARS:
        raise HoldRequestError(f"label must be at most {MAX_LABEL_CHARS} characters", field="label")
    if not label.isprintable():
        raise HoldRequestError("label must be printable (no control characters)", field="label")
    return HoldRequest(duration_s=duration, label=label)


# -- the holds -------------------------------------------------------------------------


@dataclass(eq=False)
class LocalHold:
    """One local hold, from :meth:`LocalHolds.open` to its outcome."""

    id: int
    label: str
    #: ``None``: until the holder goes away.
    duration_s: float | None
    #: Wall-clock epoch seconds.
    started_at: float
    #: On the Trio clock; ``math.inf`` without a duration.
    deadline: float
    outcome: HoldOutcome | None = None
    ended_at: float = 0.0
    #: The start and end on the Trio clock, for durations (the wall clock can step).
    _started_clock: float = 0.0
    _ended_clock: float | None = None
    _reason: HoldOutcome | None = None
    _released: trio.Event = field(default_factory=trio.Event)

    @property
    def held_s(self) -> float:
        """Seconds from the start to the end (or to now, while open), on the Trio clock."""
        end = self._ended_clock if self._ended_clock is not None else trio.current_time()
        return max(end - self._started_clock, 0.0)

    def end(self, reason: HoldOutcome = HoldOutcome.DISCONNECTED) -> None:
        """End the hold now (its holder went away): :meth:`wait` returns ``reason``."""
        if self._reason is None:
            self._reason = reason
        self._released.set()

    async def wait(self) -> HoldOutcome:
        """Wait until the hold ends; returns why (the deadline, shutdown, :meth:`end`)."""
        with trio.move_on_at(self.deadline):
            await self._released.wait()
        if self._reason is None:
            self._reason = HoldOutcome.ELAPSED
        return self._reason


@dataclass(frozen=True)
class LocalHoldEvent:
    """What observers are told: ``kind`` is ``started`` or ``ended``."""

    kind: str
    hold: LocalHold


@dataclass(frozen=True)
class LocalHoldInfo:
    id: int
    label: str
    #: ``None`` (and ``remaining_s`` too): until the holder goes away.
    duration_s: float | None
    started_at: float
    age_s: float
    remaining_s: float | None


@dataclass(frozen=True)
class LocalHoldsStatistics:
    """A frozen snapshot: the open holds (oldest first) and the ends so far, by outcome."""

    count: int
    holds: tuple[LocalHoldInfo, ...]
    closing: bool
    counts: dict[str, int]


Observer = Callable[[LocalHoldEvent], None]


class LocalHolds:
    """Any number of local holds, each until its holder goes away or its own duration.

    Args:
      observer: called synchronously with every :class:`LocalHoldEvent`; it must not
        block, and an exception it raises is logged and dropped.
    """

    def __init__(self, *, observer: Observer | None = None) -> None:
        self._observers: list[Observer] = [observer] if observer else []
        self._ids = itertools.count(1)
        self._open: dict[int, LocalHold] = {}
        self._closing = False
        self._idle = trio.Event()
        self._idle.set()
        self._counts = {o.value: 0 for o in HoldOutcome} | {"started": 0}

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def _emit(self, kind: str, hold: LocalHold) -> None:
        event = LocalHoldEvent(kind, hold)
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                log.exception("local hold observer failed on %s event", kind)

    @property
    def count(self) -> int:
        """How many holds are open now."""
        return len(self._open)

    @property
    def closing(self) -> bool:
        return self._closing

    @asynccontextmanager
    async def open(
        self, duration_s: float | None = None, *, label: str = ""
    ) -> AsyncIterator[LocalHold]:
        """Open a hold for the block's lifetime; usually the block awaits :meth:`LocalHold.wait`.

        ``duration_s`` ``None``: no deadline (see the module docstring); else the hold
        elapses after that many seconds. The hold is registered (and the ``started``
        event emitted) before the block runs, and ends when the block exits: with the
        reason :meth:`LocalHold.wait` returned, else ``disconnected`` when the block was
        cancelled, ``error`` when it raised, ``released`` when it returned without
        waiting.

        Raises:
          ShuttingDown: the worker is stopping; nothing was registered.
          ValueError: ``duration_s`` is negative, NaN or infinite.
        """
        if duration_s is not None:
            duration_s = float(duration_s)
            if not math.isfinite(duration_s) or duration_s < 0:
                raise ValueError("duration must be a finite number >= 0")
        if self._closing:
            raise ShuttingDown("the worker is shutting down")
        now = trio.current_time()
        hold = LocalHold(
            id=next(self._ids),
            label=label,
            duration_s=duration_s,
            started_at=time.time(),
            deadline=math.inf if duration_s is None else now + duration_s,
            _started_clock=now,
        )
        self._open[hold.id] = hold
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._counts["started"] += 1
        self._emit("started", hold)
        outcome = HoldOutcome.ERROR
        try:
            yield hold
            outcome = hold._reason or HoldOutcome.RELEASED
        except BaseException as exc:
            outcome = hold._reason or (
                HoldOutcome.DISCONNECTED if _only_cancelled(exc) else HoldOutcome.ERROR
            )
            raise
        finally:
            self._finish(hold, outcome)

    def shutdown(self) -> None:
        """Refuse new holds and end the open ones with ``shutdown``. Idempotent."""
        self._closing = True
        for hold in list(self._open.values()):
            hold.end(HoldOutcome.SHUTDOWN)

    async def wait_idle(self) -> None:
        """Return once no hold is open."""
        await self._idle.wait()

    def statistics(self) -> LocalHoldsStatistics:
        now = trio.current_time()
        holds = tuple(
            LocalHoldInfo(
                id=h.id,
                label=h.label,
                duration_s=h.duration_s,
                started_at=h.started_at,
                age_s=max(now - h._started_clock, 0.0),
                remaining_s=None if h.duration_s is None else max(h.deadline - now, 0.0),
            )
            for h in self._open.values()
        )
        return LocalHoldsStatistics(
            count=len(holds), holds=holds, closing=self._closing, counts=dict(self._counts)
        )

    def _finish(self, hold: LocalHold, outcome: HoldOutcome) -> None:
        if hold.outcome is not None:
            return
        hold.outcome = outcome
        hold.ended_at = time.time()
        hold._ended_clock = trio.current_time()
        hold._released.set()
        self._open.pop(hold.id, None)
        self._counts[outcome.value] += 1
        if not self._open:
            self._idle.set()
        self._emit("ended", hold)


def _only_cancelled(exc: BaseException) -> bool:
    cancelled, others = split_leaves(exc, trio.Cancelled)
    return bool(cancelled) and not others
