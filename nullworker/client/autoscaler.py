"""The autoscaler: turn a job queue's depth into reservations held.

``nullworker autoscale`` reads how many jobs wait (a :mod:`nullworker.client.demand` source, or
any async function returning an int) and holds one reservation
(:func:`nullworker.client.reserve`) per ``jobs_per_worker`` jobs::

    async with RedisList("redis://queue:6379/0", "jobs") as source:
        await autoscale("my-endpoint", demand=source.read, max_workers=8)

Policy
------
* Every ``poll_s`` the demand is read and turned into a *raw target*:
  ``clamp(ceil(demand / jobs_per_worker), min_workers, max_workers)``. A source that
  can push (:meth:`~nullworker.client.demand.DemandSource.watch`: Redis keyspace
  notifications, NATS, PostgreSQL ``LISTEN``) also wakes the poller when the queue
  changes, and the demand is read at once; reads prompted so start at least
  ``_WAKE_MIN_INTERVAL_S`` (:mod:`._autoscale_poller`) apart, and a burst of wake-ups
  during a read asks for one more read, not one each. The interval's polling goes on
  beside it, as the fallback.
  With such a source, the reading before a read stands until that read (a change would
  have woken it sooner), so the scale-down delay counts from the change itself; and a
  reading that leaves the target above the raw target (a scale-down waiting out its
  delay) brings the next read forward to when the delay ends, so a rare poll neither
  cuts the delay short nor holds the scale-down back.
* Up at once: reservations are started up to the raw target as soon as it is read.
* Down after a delay, with a stabilisation window (as HPA's and KEDA's): the number of
  reservations *kept* (the target) is the largest raw target read within the last
  ``scale_down_delay_s``. A drop therefore takes effect ``scale_down_delay_s`` after the
  last reading that asked for more (a reading exactly that old no longer counts), and
  demand that dips and comes back within the window cancels nothing.
* The window keeps capacity; it never asks for more. A reservation that ends by itself
  (the duration elapsed, the consumer called ``/release``, the worker was lost, it was
  rejected) is replaced only up to the latest raw target.
* Scaling down cancels the reservations still waiting for a worker first (the newest
  first: the oldest are nearest the head of the engine's queue), then held ones, the most
  recently held first (the longest-held workers are the likeliest to be running a job).
* A failed attempt -- ``reserve`` raised a :class:`~nullworker.errors.ClientError`, or a
  hold ended by itself within ``_HEALTHY_HOLD_S`` -- pauses the starting of reservations
  for ``BACKOFF_FIRST_S``, doubling with each failure in a row up to ``BACKOFF_MAX_S``
  (:mod:`._autoscale_settings`), minus up to 20 % jitter. A hold that lasts
  ``_HEALTHY_HOLD_S`` ends the streak.
* When the demand cannot be read, the reservations are kept (the target is frozen and
  the reading before the outage stands for the demand), the read is retried after
  ``poll_s``, doubling up to ``max(poll_s, BACKOFF_MAX_S)``, and the outage is reported
  once at each end (``source_error``, ``source_recovered``). The outage counts as a
  reading of the frozen target taken at recovery, so a scale-down still waits
  ``scale_down_delay_s`` of readings after it.
* More rules (:mod:`.policy`, each off by default): a scheduled minimum, an age boost,
  an activation threshold (these shape the raw target of each reading), a
  scale-to-zero delay (the last reservation is kept until the raw target has been 0
  that long) and a scale-up rate limit (at most ``max_new_per_minute`` reservations
  started within any 60 s). During a demand outage the target stays frozen, except
  that a scheduled minimum still raises it.

Modules
-------
This module holds :func:`autoscale` and the :class:`Autoscaler`'s reconciler and slot
tasks. Beside it: the settings and their checks, with the backoff's timing
(:mod:`._autoscale_settings`); the poller (:mod:`._autoscale_poller`); the records it
hands out and the protocols it takes (:mod:`._autoscale_types`), all re-exported here.

Concurrency invariants
----------------------
* Everything runs in the one nursery :func:`autoscale` opens, as three kinds of task:

  - the *poller* (:class:`~._autoscale_poller.DemandPoller`, whose attributes the
    reconciler reads) reads the demand (with, for a source that can push, a *watcher*
    task in its own nursery that only sets the poller's ``_changed`` event). It alone
    writes the demand, the raw target, the window and the target, and the source-outage
    state. It never starts or cancels a reservation: it wakes the reconciler.
  - the *reconciler* alone starts and cancels reservations. It counts and acts in one
    synchronous step (no checkpoint in between, so no other task can change the count
    meanwhile), then sleeps until woken or until the backoff ends.
  - one *slot task* per reservation, inside its own cancel scope. The reconciler creates
    the scope and the slot before ``start_soon``, so a slot can be cancelled before its
    task first runs. The task enters ``reserve()``, records when it is held, waits for
    the end, and in ``finally`` (after ``reserve()``'s ``async with`` has closed the
    connection) removes its slot and wakes the reconciler.

* A slot counts against ``max_workers`` from the moment the reconciler creates it until
  its task has left ``reserve()``: waiting, held, and *stopping* (cancelled, still
  closing) alike. The reconciler creates a slot only while fewer than ``max_workers``
  exist, and nothing else creates one, so there are never more than ``max_workers``.
* A scale-down chooses among the slots not already stopping, marks its choices stopping
  and cancels their scopes. Stopping slots no longer count towards the target, so a later
  pass never cancels more than the excess.
* One backoff streak is shared by all slots. A failure lengthens it only if its attempt
  was started after the current pause was decided (a generation number), so attempts
  that fail together are one piece of evidence, not many.
* Cancelling :func:`autoscale` cancels the nursery and with it every slot's scope; each
  ``reserve()`` context manager closes its connection on the way out, and the worker
  ends the hold when it sees the disconnect. Nothing here is shielded, and
  ``trio.Cancelled`` is never caught.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import trio

from .._support import describe_error, public_module
from ..errors import ClientError, ConfigError
from ..vast.vocabulary import ClientOutcome
from ._autoscale_poller import DemandPoller
from ._autoscale_settings import BACKOFF_FIRST_S, BACKOFF_MAX_S, Settings, backoff
from ._autoscale_types import (
    AutoscaleEvent,
    AutoscaleEventKind,
    AutoscalerStatistics,
    DemandReader,
    EndCause,
    HeldReservation,
    ReserveFunction,
)
from .policy import RateLimit, ScheduleWindow

__all__ = [
    "AutoscaleEvent",
    "AutoscaleEventKind",
    "Autoscaler",
    "AutoscalerStatistics",
    "DemandReader",
    "HeldReservation",
    "ReserveFunction",
    "autoscale",
]

public_module(__name__, [AutoscaleEvent, AutoscalerStatistics, DemandReader, HeldReservation])

log = logging.getLogger(__name__)

#: A hold that lasts this long proves that the engine and the workers work: the backoff
#: streak ends. A hold that ends by itself sooner counts as a failure.
_HEALTHY_HOLD_S = 5.0


async def autoscale(
    endpoint: str,
    *,
    demand: Callable[[], Awaitable[int]] | DemandReader,
    min_workers: int = 0,
    max_workers: int = 10,
    jobs_per_worker: int = 1,
    poll_s: float = 1.0,
    scale_down_delay_s: float = 30.0,
    duration_s: float | None = None,
    engine_url: str | None = None,
    api_key: str | None = None,
    reserve: ReserveFunction | None = None,
    on_event: Callable[[AutoscaleEvent], None] | None = None,
    activation: int = 0,
    scale_to_zero_delay_s: float | None = None,
    max_new_per_minute: int | None = None,
    min_schedule: Sequence[ScheduleWindow] = (),
    age_boost_after_s: float | None = None,
    age_boost: int = 1,
    oldest_age: Callable[[], Awaitable[float | None]] | None = None,
    now: Callable[[], datetime] | None = None,
    task_status: trio.TaskStatus[Autoscaler] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold as many reservations of ``endpoint`` as the demand asks for, until cancelled.

    Usage::

        async with trio.open_nursery() as nursery:
            scaler = await nursery.start(partial(autoscale, "my-endpoint", demand=source.read))
            ...
            print(scaler.statistics().held)

    The policy (scale up at once, down after ``scale_down_delay_s``, backoff) is in this
    module's docstring.

    Args:
      endpoint: the Vast endpoint name.
      demand: an async function of no arguments returning the number of jobs (an int
        >= 0), e.g. a :class:`~nullworker.client.demand.DemandSource`'s ``read``, or the
        source itself (a ``CombinedDemand`` of several, say). It should bound its own
        time (a ``DemandSource`` does): a read that hangs holds up the next ones.
      min_workers: reservations held even with no demand.
      max_workers: the most reservations that exist at once, counting those still waiting
        for a worker.
      jobs_per_worker: jobs one reservation stands for (the count is rounded up).
      poll_s: seconds between demand reads.
      scale_down_delay_s: how long the demand must stay lower before reservations are
        cancelled; ``0`` follows it down at once.
      duration_s: each reservation's duration, for the default ``reserve``; one that
        elapses is replaced if still wanted. ``None`` holds for the worker's cap.
      engine_url, api_key: a convenience for the default ``reserve`` (their defaults are
        :func:`nullworker.client.reserve`'s own: ``$VAST_ENGINE_URL``,
        ``$VAST_API_KEY``). Not deprecated: the one-line form stays. Giving them with
        ``reserve`` is a :class:`~nullworker.errors.ConfigError`, since they would not
        be used.
      reserve: the reserve factory: called with no arguments, it returns one
        reservation's async context manager. By default
        ``partial(nullworker.client.reserve, endpoint, duration_s=duration_s,
        engine_url=engine_url, api_key=api_key)``. Pass your own for any other option
        of :func:`~nullworker.client.reserve` (``cost``, ``route_timeout_s``, a shared
        ``http`` client), e.g.
        ``reserve=partial(nullworker.reserve, "my-endpoint", duration_s=600, cost=50)``.
      on_event: called synchronously with each :class:`AutoscaleEvent`; it must not
        block. Exceptions it raises are logged and dropped.
      activation: while no reservation is kept, a demand of this many jobs or fewer
        starts none (KEDA's ``activationQueueLength``); once active, the plain rule.
      scale_to_zero_delay_s: how long the raw target must have been 0 before the last
        reservation is released; ``None`` (the default) is ``scale_down_delay_s``.
      max_new_per_minute: the most reservations started within any 60 s of the Trio
        clock (replacements included); ``None`` (the default) is no limit.
      min_schedule: a list or tuple of :class:`~nullworker.client.policy.ScheduleWindow` (see
        :func:`~nullworker.client.policy.parse_schedule`); the effective minimum is the
        largest of ``min_workers`` and the windows covering ``now()``.
      age_boost_after_s, age_boost: while the oldest waiting job is older than
        ``age_boost_after_s``, the target is ``ceil(demand / jobs_per_worker) +
        age_boost``; ``None`` (the default) turns the boost off and reads no age.
      oldest_age: an async function returning the oldest waiting job's age in seconds,
        or ``None`` when unknown; by default ``demand.oldest_age`` when ``demand`` is a
        source that has one. Read after each successful demand read above 0, only with
        ``age_boost_after_s``; a failed or unknown read adds nothing.
      now: the wall clock for ``min_schedule``, returning an aware ``datetime``
        (default ``datetime.now(UTC)``); tests pass one driven by the Trio clock.
      task_status: receives the :class:`Autoscaler` once running (before the first
        read), for :meth:`Autoscaler.statistics`.

    Resource handling:
      Cancelling the call releases everything at once: every reservation's context
      manager is left, which closes its connection, and the call returns only when all
      are closed.

    Error handling:
      A demand read that fails (any ``Exception``: a :class:`~nullworker.client.demand.DemandError`
      or the function's own) keeps the reservations and is retried with backoff. A
      :class:`~nullworker.errors.ClientError` from ``reserve`` (the engine unreachable,
      the reservation rejected or failed) is reported and retried with backoff. Any other
      exception from ``reserve`` is a bug: it cancels everything and propagates (in an
      exception group, as Trio nurseries raise them).

    Raises:
      ConfigError: (a ``ValueError``) an invalid argument, ``engine_url``/``api_key``
        given with ``reserve``, or no API key for the default ``reserve``; raised before
        anything starts.
    """
    settings = Settings.build(
        endpoint=endpoint,
        min_workers=min_workers,
        max_workers=max_workers,
        jobs_per_worker=jobs_per_worker,
        poll_s=poll_s,
        scale_down_delay_s=scale_down_delay_s,
        duration_s=duration_s,
        activation=activation,
        scale_to_zero_delay_s=scale_to_zero_delay_s,
        max_new_per_minute=max_new_per_minute,
        min_schedule=min_schedule,
        age_boost_after_s=age_boost_after_s,
        age_boost=age_boost,
        now=now,
    )
    if oldest_age is not None and not callable(oldest_age):
        raise ConfigError(f"oldest_age must be an async function, not {oldest_age!r}")
    if settings.policy.age_boost_after_s is None:
        oldest_age = None  # no boost: no age read, no extra query
    elif oldest_age is None:
        found = getattr(demand, "oldest_age", None)
        oldest_age = found if callable(found) else None
    if not callable(demand) and callable(getattr(demand, "read", None)):
        demand = demand.read
    if not callable(demand):
        raise ConfigError(f"demand must be an async function returning an int, not {demand!r}")
    if on_event is not None and not callable(on_event):
        raise ConfigError(f"on_event must be callable, not {on_event!r}")
    if reserve is not None and (engine_url is not None or api_key is not None):
        raise ConfigError(
            "engine_url and api_key are for the default reserve; with reserve=, give them "
            "to the factory (partial(nullworker.reserve, endpoint, api_key=...))"
        )
    if reserve is None:
        reserve = _default_reserve(
            endpoint, duration_s=duration_s, engine_url=engine_url, api_key=api_key
        )
    elif not callable(reserve):
        raise ConfigError(f"reserve must be callable, not {reserve!r}")
    scaler = Autoscaler(
        settings, demand=demand, reserve=reserve, on_event=on_event, oldest_age=oldest_age
    )
    await scaler._run(task_status=task_status)


class Autoscaler:
    """A running :func:`autoscale` call; ``task_status.started()`` hands it out.

    Made by :func:`autoscale` only. Its one public method is :meth:`statistics`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        demand: Callable[[], Awaitable[int]],
        reserve: ReserveFunction,
        on_event: Callable[[AutoscaleEvent], None] | None,
        oldest_age: Callable[[], Awaitable[float | None]] | None = None,
    ) -> None:
        self._settings = settings
        # The demand, the target and the outage state: written by the poller only.
        self._poller = DemandPoller(
            settings, demand=demand, oldest_age=oldest_age, wake=self._wake_up, emit=self._emit
        )
        # The rate limit's state, the reconciler's.
        self._rate = RateLimit(settings.max_new_per_minute)
        self._held_back = 0
        self._reserve = reserve
        self._on_event = on_event
        # Slots: added by the reconciler only, removed by their own task only.
        self._slots: list[_Slot] = []
        #: The slots by _state(): updated at every change of a slot's state.
        self._tally: Counter[str] = Counter()
        self._next_seq = 0
        self._next_held_seq = 0
        # The backoff streak; see _note_failure.
        self._failures = 0
        self._generation = 0
        self._retry_at = -math.inf
        self._reservations_failed = 0
        self._ended_by_outcome: Counter[str] = Counter()
        self._wake = trio.Event()
        self._last_state: tuple[int | None, int, int, int, int, tuple[str, ...]] | None = None
        self._nursery: trio.Nursery | None = None
        self._ran = False

    def __repr__(self) -> str:
        return f"<Autoscaler {self._settings.endpoint!r} target={self._poller.target}>"

    def statistics(self) -> AutoscalerStatistics:
        """A snapshot of the demand, the target and the reservations, for metrics."""
        held, waiting, stopping = self._counts()
        return AutoscalerStatistics(
            demand=self._poller.demand,
            target=self._poller.target,
            held=held,
            waiting=waiting,
            stopping=stopping,
            ended_by_outcome=dict(self._ended_by_outcome),
            reservations_failed=self._reservations_failed,
            source_errors=self._poller.source_errors,
            source_ok=self._poller.source_ok,
        )

    # -- the tasks ---------------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[Autoscaler]) -> None:
        if self._ran:
            raise RuntimeError("an Autoscaler runs once")
        self._ran = True
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reconcile_loop, name="nullworker autoscale reconciler")
            nursery.start_soon(self._poller.run, name="nullworker autoscale poller")
            task_status.started(self)

    async def _reconcile_loop(self) -> None:
        while True:
            # A fresh event before acting. Acting has no checkpoint, so any change it did
            # not see (a slot task's, the poller's) comes after it and sets this event.
            self._wake = trio.Event()
            self._reconcile()
            self._publish_state()
            deadline = math.inf
            now = trio.current_time()
            if self._missing() > 0:
                # Wake when the backoff ends or the rate limit lets the next one start.
                if self._retry_at > now:
                    deadline = self._retry_at
                free_at = self._rate.free_at(now)
                if free_at > now:
                    deadline = min(deadline, free_at)
            with trio.move_on_at(deadline):
                await self._wake.wait()

    async def _hold(self, slot: _Slot) -> None:
        try:
            with slot.scope:
                try:
                    async with self._reserve() as reservation:
                        self._on_held(slot, reservation)
                        with trio.move_on_after(_HEALTHY_HOLD_S):
                            await reservation.ended.wait()
                        if not reservation.ended.is_set():
                            self._on_healthy()
                            await reservation.ended.wait()
                        slot.ended_by_itself = True
                except ClientError as exc:
                    self._on_failed(slot, exc)
        finally:
            self._on_exit(slot)

    def _wake_up(self) -> None:
        """Wake the reconciler: the poller's way to ask it to act on a new target."""
        self._wake.set()

    # -- the reconciler's side -------------------------------------------------------------

    def _reconcile(self) -> None:
        settings = self._settings
        live = [slot for slot in self._slots if not slot.stopping]
        excess = len(live) - self._poller.target
        if excess > 0:
            waiting = [slot for slot in live if slot.held_seq is None]
            held = [slot for slot in live if slot.held_seq is not None]
            waiting.sort(key=lambda slot: slot.seq, reverse=True)
            held.sort(key=lambda slot: slot.held_seq or 0, reverse=True)
            for slot in (waiting + held)[:excess]:
                self._tally[_state(slot)] -= 1
                slot.stopping = True
                self._tally["stopping"] += 1
                slot.scope.cancel()
            return
        now = trio.current_time()
        if now < self._retry_at:
            return
        room = min(self._poller.raw_target - len(live), settings.max_workers - len(self._slots))
        allowed = self._rate.allowance(now)
        held_back = max(0, room - int(min(allowed, room)))
        for _ in range(room - held_back):
            self._rate.record(now)
            self._spawn()
        if held_back != self._held_back:
            self._held_back = held_back
            if held_back:
                delay = self._rate.free_at(now) - now
                self._emit(
                    "rate_limited",
                    f"rate limit {settings.max_new_per_minute} new per minute: {held_back} "
                    f"reservation(s) held back, the next in {delay:.0f} s",
                    delay_s=delay,
                    held_back=held_back,
                )

    def _spawn(self) -> None:
        assert self._nursery is not None
        assert len(self._slots) < self._settings.max_workers
        slot = _Slot(
            seq=self._next_seq,
            generation=self._generation,
            scope=trio.CancelScope(),
            started_at=trio.current_time(),
        )
        self._next_seq += 1
        self._slots.append(slot)
        self._tally["waiting"] += 1
        self._nursery.start_soon(self._hold, slot, name=f"nullworker autoscale slot {slot.seq}")

    def _missing(self) -> int:
        return self._poller.raw_target - (len(self._slots) - self._tally["stopping"])

    # -- the slot tasks' side ----------------------------------------------------------------

    def _on_held(self, slot: _Slot, reservation: HeldReservation) -> None:
        now = trio.current_time()
        slot.reservation = reservation
        slot.held_at = now
        self._tally[_state(slot)] -= 1
        slot.held_seq = self._next_held_seq
        self._tally[_state(slot)] += 1
        self._next_held_seq += 1
        self._emit(
            "reservation_started",
            f"held: {reservation.worker_url}",
            worker_url=reservation.worker_url,
            waited_s=now - slot.started_at,
        )
        self._wake.set()

    def _on_healthy(self) -> None:
        self._failures = 0
        self._retry_at = -math.inf
        self._wake.set()

    def _on_failed(self, slot: _Slot, exc: ClientError) -> None:
        self._reservations_failed += 1
        error = describe_error(exc)
        self._emit("reservation_failed", f"could not reserve a worker: {error}", error=error)
        self._note_failure(slot, error)

    def _on_exit(self, slot: _Slot) -> None:
        self._slots.remove(slot)
        self._tally[_state(slot)] -= 1
        self._wake.set()
        reservation = slot.reservation
        if reservation is None or slot.held_at is None:
            return
        held_s = trio.current_time() - slot.held_at
        cause: EndCause
        if slot.ended_by_itself:
            cause = "worker"
            outcome = reservation.outcome or "ended"
        else:
            cause = "scale_down" if slot.stopping else "shutdown"
            outcome = reservation.outcome or ClientOutcome.CLIENT_RELEASED
        self._ended_by_outcome[outcome] += 1
        how = {"worker": "ended", "scale_down": "released (scale-down)", "shutdown": "released"}
        self._emit(
            "reservation_ended",
            f"{how[cause]}: {reservation.worker_url} ({outcome}) after {held_s:.0f} s",
            worker_url=reservation.worker_url,
            outcome=outcome,
            cause=cause,
            held_s=held_s,
        )
        if slot.ended_by_itself and held_s < _HEALTHY_HOLD_S:
            self._note_failure(slot, f"the hold ended after {held_s:.1f} s ({outcome})")

    def _note_failure(self, slot: _Slot, error: str) -> None:
        if slot.generation != self._generation:
            # Started before the current pause was decided: the failure that decided it
            # already stands for this one.
            return
        self._generation += 1
        self._failures += 1
        delay = backoff(BACKOFF_FIRST_S, self._failures, BACKOFF_MAX_S)
        self._retry_at = trio.current_time() + delay
        self._emit(
            "backoff",
            f"{self._failures} failure(s) in a row; next reservation in {delay:.1f} s",
            error=error,
            delay_s=delay,
            failures=self._failures,
        )

    # -- reporting -------------------------------------------------------------------------

    def _counts(self) -> tuple[int, int, int]:
        # Kept as the slots change, not counted: every event reports them, and counting
        # 10,000 slots per event made each reservation cost more the more were held.
        tally = self._tally
        return tally["held"], tally["waiting"], tally["stopping"]

    def _publish_state(self) -> None:
        held, waiting, _ = self._counts()
        poller = self._poller
        state = (poller.demand, poller.target, poller.raw_target, held, waiting, poller.reasons)
        if state == self._last_state:
            return
        self._last_state = state
        demand = "unknown" if poller.demand is None else str(poller.demand)
        # A target above what the demand asks is the scale-down delay at work: say so,
        # or "demand 0, target 2: 0 held" reads as two reservations that failed.
        reasons = list(poller.reasons)
        if poller.target > poller.raw_target and not any("scale-to-zero" in r for r in reasons):
            reasons.insert(0, f"kept by the scale-down delay; {poller.raw_target} after it")
        why = f" ({'; '.join(reasons)})" if reasons else ""
        self._emit(
            "state",
            f"demand {demand}, target {poller.target}{why}: {held} held, {waiting} waiting",
            reason="; ".join(poller.reasons) or None,
        )

    def _emit(
        self,
        kind: AutoscaleEventKind,
        message: str,
        *,
        worker_url: str | None = None,
        outcome: str | None = None,
        cause: EndCause | None = None,
        held_s: float | None = None,
        waited_s: float | None = None,
        error: str | None = None,
        delay_s: float | None = None,
        failures: int | None = None,
        outage_s: float | None = None,
        reason: str | None = None,
        held_back: int | None = None,
    ) -> None:
        log.debug("%s: %s", kind, message)
        if self._on_event is None:
            return
        held, waiting, _ = self._counts()
        event = AutoscaleEvent(
            kind=kind,
            at=trio.current_time(),
            message=message,
            demand=self._poller.demand,
            target=self._poller.target,
            held=held,
            waiting=waiting,
            worker_url=worker_url,
            outcome=outcome,
            cause=cause,
            held_s=held_s,
            waited_s=waited_s,
            error=error,
            delay_s=delay_s,
            failures=failures,
            outage_s=outage_s,
            reason=reason,
            held_back=held_back,
        )
        try:
            self._on_event(event)
        except Exception:
            # A display or metrics bug must not drop capacity.
            log.exception("on_event callback failed on a %s event", kind)


# -- implementation ----------------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    """One reservation, from the reconciler's decision to its task's exit."""

    seq: int
    generation: int
    scope: trio.CancelScope
    started_at: float
    held_seq: int | None = None
    held_at: float | None = None
    reservation: HeldReservation | None = None
    stopping: bool = False
    ended_by_itself: bool = False


def _default_reserve(
    endpoint: str, *, duration_s: float | None, engine_url: str | None, api_key: str | None
) -> ReserveFunction:
    # Imported here: the client brings httpx, which a caller passing its own reserve
    # does not need.
    from .reservation import reserve as client_reserve

    def reserve_one() -> AbstractAsyncContextManager[HeldReservation]:
        return client_reserve(
            endpoint, duration_s=duration_s, engine_url=engine_url, api_key=api_key
        )

    # The client checks its settings (the API key above all) when called, before any
    # I/O: call it once now, so that a missing key stops us here rather than failing
    # every reservation. The context manager made is never entered.
    reserve_one()
    return reserve_one


def _state(slot: _Slot) -> Literal["stopping", "waiting", "held"]:
    if slot.stopping:
        return "stopping"
    return "waiting" if slot.held_seq is None else "held"
