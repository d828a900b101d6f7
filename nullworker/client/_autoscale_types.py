"""The autoscaler's records and the protocols it takes: its vocabulary, apart from its loop.

What :func:`~nullworker.client.autoscaler.autoscale` hands out (an
:class:`AutoscaleEvent` per thing it did or saw, an :class:`AutoscalerStatistics`
snapshot) and what it takes (a :class:`HeldReservation` from a ``ReserveFunction``, a
:class:`DemandReader`, a :class:`PushingSource`). The display, the metrics and the lease
sharing read these without running, or importing, the control loop's machinery. Every
name here is re-exported by :mod:`nullworker.client.autoscaler`, the place to import them
from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

__all__ = [
    "AutoscaleEvent",
    "AutoscaleEventKind",
    "AutoscalerStatistics",
    "DemandReader",
    "EndCause",
    "HeldReservation",
    "PushingSource",
    "ReserveFunction",
]


class HeldReservation(Protocol):
    """What the autoscaler needs of a reservation: :class:`nullworker.client.Reservation`."""

    @property
    def worker_url(self) -> str: ...

    @property
    def ended(self) -> trio.Event: ...

    @property
    def outcome(self) -> str | None: ...


class DemandReader(Protocol):
    """Anything with an async ``read()`` returning the job count: a
    :class:`~nullworker.client.demand.DemandSource`, e.g. a ``CombinedDemand``."""

    async def read(self) -> int: ...


class PushingSource(Protocol):
    """A source that can wake the poller (:meth:`DemandSource.watch`)."""

    def can_push(self) -> bool: ...

    async def watch(self, changed: Callable[[], None]) -> None: ...


#: Makes one reservation: entering the context manager waits for a worker and yields the
#: held reservation (or raises a ``ClientError``); leaving it releases the worker.
ReserveFunction = Callable[[], AbstractAsyncContextManager[HeldReservation]]

AutoscaleEventKind = Literal[
    "state",
    "reservation_started",
    "reservation_ended",
    "reservation_failed",
    "source_error",
    "source_recovered",
    "backoff",
    "rate_limited",
]

EndCause = Literal["worker", "scale_down", "shutdown"]


@dataclass(frozen=True)
class AutoscaleEvent:
    """One thing the autoscaler did or saw, for displays, logs and metrics.

    Every event carries the state *after* it: ``demand`` (``None`` until the first
    successful read), ``target`` (reservations kept), ``held`` and ``waiting`` (for a
    worker). ``at`` is the Trio clock (:func:`trio.current_time`). ``kind`` is one of:

    * ``state`` -- demand, target, held or waiting changed;
    * ``reservation_started`` -- a reservation is held on ``worker_url`` after
      ``waited_s``;
    * ``reservation_ended`` -- a held reservation on ``worker_url`` ended after ``held_s``
      with ``outcome`` (the reservation's own, e.g. ``duration_elapsed``, ``explicit``,
      ``connection_lost``, or ``client_released`` when we let go); ``cause`` says who
      ended it: ``worker`` (it ended by itself), ``scale_down``, or ``shutdown``;
    * ``reservation_failed`` -- ``reserve`` raised; ``error`` is the exception's text;
    * ``source_error`` -- the demand could not be read (``error``); sent once when an
      outage starts, not for every failed read;
    * ``source_recovered`` -- the demand was read again, after ``outage_s`` and
      ``failures`` failed reads;
    * ``backoff`` -- starting reservations pauses for ``delay_s`` after ``failures``
      failures in a row, the last one being ``error``;
    * ``rate_limited`` -- the scale-up rate limit holds back ``held_back`` reservations
      the target asks for; the next may start in ``delay_s``.

    ``reason`` (on ``state`` events) says which policy rules shaped the target, e.g.
    ``demand 2 ≤ activation 3``; ``None`` when only the plain rule applied.
    """

    kind: AutoscaleEventKind
    at: float
    message: str
    demand: int | None
    target: int
    held: int
    waiting: int
    worker_url: str | None = None
    outcome: str | None = None
    cause: EndCause | None = None
    held_s: float | None = None
    waited_s: float | None = None
    error: str | None = None
    delay_s: float | None = None
    failures: int | None = None
    outage_s: float | None = None
    reason: str | None = None
    held_back: int | None = None


@dataclass(frozen=True)
class AutoscalerStatistics:
    """A snapshot of an :class:`Autoscaler` (see :meth:`Autoscaler.statistics`).

    Attributes:
      demand: the last demand read, ``None`` before the first successful read.
      target: the number of reservations kept (after the stabilisation window).
      held: reservations held on a worker.
      waiting: reservations waiting for the engine to give them a worker.
      stopping: reservations cancelled by a scale-down and still closing; they count
        against ``max_workers`` until closed.
      ended_by_outcome: held reservations that ended, by outcome (a copy).
      reservations_failed: attempts to reserve that raised.
      source_errors: failed demand reads (every one, not once per outage).
      source_ok: the last demand read succeeded (``False`` before the first one).
    """

    demand: int | None
    target: int
    held: int
    waiting: int
    stopping: int
    ended_by_outcome: Mapping[str, int]
    reservations_failed: int
    source_errors: int
    source_ok: bool
