"""The autoscaler's poller: read the demand, and turn each reading into the target.

One :class:`DemandPoller` is the *poller* task of an
:class:`~nullworker.client.autoscaler.Autoscaler` (the policy and the invariants it keeps
are in that module's docstring), and, for a source that can push, its *watcher*. It reads
the demand (and, for the age boost, the oldest job's age), applies the policy's rules and
the scale-down window to each reading, and rides out a source outage: the target stays
frozen, the read is retried with backoff, and the outage is reported once at each end.

It alone writes the demand, the raw target, the window, the target and the outage state;
the reconciler only reads them. It never starts or cancels a reservation: after a change
it calls ``wake``, and the reconciler acts.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime

import trio

from .._support import describe_error, finite
from ..errors import DemandError
from ._autoscale_settings import BACKOFF_MAX_S, Settings, backoff
from ._autoscale_types import PushingSource
from ._redact import redact
from .policy import kept_target, minimum_at, raw_target

__all__ = ["DemandPoller"]

# The autoscaler's logger, whichever of its modules logs: one name to configure.
log = logging.getLogger("nullworker.client.autoscaler")

#: Reads prompted by a source's wake-ups start at least this far apart (from the start
#: of the read before): a flood of notifications is at most 20 reads a second, a burst
#: of them one read (two if it straddles a read).
_WAKE_MIN_INTERVAL_S = 0.05


class DemandPoller:
    """The demand side of one autoscaler: its readings, and the target they make."""

    def __init__(
        self,
        settings: Settings,
        *,
        demand: Callable[[], Awaitable[int]],
        oldest_age: Callable[[], Awaitable[float | None]] | None,
        wake: Callable[[], None],
        emit: Callable[..., None],
    ) -> None:
        self._settings = settings
        self._demand_fn = demand
        self._oldest_age_fn = oldest_age
        self._wake = wake
        # The autoscaler's emit(kind, message, **fields), which adds its counts.
        self._emit = emit
        self._oldest_age: float | None = None
        self._last_above_zero: float | None = None
        # Read by the reconciler, written here only.
        #: The policy rules that shaped the target, for the ``state`` events.
        self.reasons: tuple[str, ...] = ()
        #: The last demand read, ``None`` before the first successful read.
        self.demand: int | None = None
        #: The target the latest reading asks for, before the scale-down window.
        self.raw_target = settings.min_workers
        #: The reservations kept: the window's largest raw target.
        self.target = settings.min_workers
        # (time, raw target) readings of the last scale_down_delay_s, kept as a sliding
        # maximum: each entry is larger than every later one, so the first is the max.
        self._window: deque[tuple[float, int]] = deque()
        #: Whether the last demand read succeeded (``False`` before the first one).
        self.source_ok = False
        self._outage_started: float | None = None
        self._outage_failures = 0
        #: Failed demand reads, every one.
        self.source_errors = 0
        # Set by the demand source's wake-ups (see run); read by run.
        self._changed = trio.Event()

    async def run(self) -> None:
        """Read the demand until cancelled: every ``poll_s``, and when the source pushes."""
        settings = self._settings
        source = _pushing_source(self._demand_fn)
        async with trio.open_nursery() as nursery:
            if source is not None:
                nursery.start_soon(self._watch, source, name="nullworker autoscale watcher")
            next_at = trio.current_time()
            last_read = -math.inf
            while True:
                with trio.move_on_at(next_at):
                    await self._changed.wait()
                    # Woken by the source: read now, but not sooner than the bound allows.
                    await trio.sleep_until(last_read + _WAKE_MIN_INTERVAL_S)
                # A fresh event before reading: a wake-up during the read asks for one
                # more read after it (however many come), never for one per wake-up.
                self._changed = trio.Event()
                started = last_read = trio.current_time()
                try:
                    value = await self._read_demand()
                except Exception as exc:
                    self._source_failed(exc)
                    delay = backoff(
                        settings.poll_s,
                        self._outage_failures,
                        max(settings.poll_s, BACKOFF_MAX_S),
                    )
                else:
                    if source is not None and self.source_ok:
                        # Pushed changes wake a read, so the last reading stood until
                        # now: the scale-down delay counts from this change, not from a
                        # reading a long poll ago.
                        self._push_reading(trio.current_time(), self.raw_target)
                    self._source_read(value)
                    delay = settings.poll_s
                next_at = started + delay
                if source is not None and self.target > self.raw_target:
                    # A scale-down waits for a reading after the delay: read when the
                    # window's highest reading expires (or the scale-to-zero delay
                    # ends), not a long poll later (a source that pushes is often
                    # polled rarely).
                    next_at = min(next_at, self._scale_down_due())

    async def _watch(self, source: PushingSource) -> None:
        try:
            await source.watch(self._changed_set)
        except Exception:
            # A source's own watch should not raise; if it does, polling carries on.
            log.exception("watching %r for changes failed; polling only", source)

    def _changed_set(self) -> None:
        self._changed.set()

    def _scale_down_due(self) -> float:
        """When a reading could next lower the target: when the window's highest reading
        expires (if it is above the latest), or when the scale-to-zero delay ends (if
        the latest is 0); the earlier of the two, ``inf`` if neither is pending."""
        settings = self._settings
        due = math.inf
        highest_at, highest = self._window[0]
        if highest > self.raw_target:
            due = highest_at + settings.scale_down_delay_s
        if self.raw_target == 0 and self._last_above_zero is not None:
            due = min(due, self._last_above_zero + settings.scale_to_zero_delay_s)
        return due

    def _source_failed(self, exc: Exception) -> None:
        now = trio.current_time()
        self.source_errors += 1
        self._outage_failures += 1
        self.source_ok = False
        # DemandError texts are password-free already; a function's own may not be.
        error = redact(describe_error(exc))
        log.debug("demand read failed: %s", error)
        self._raise_to_schedule(now)
        if self._outage_started is None:
            self._outage_started = now
            self._emit(
                "source_error",
                f"cannot read the demand ({error}); keeping {self.target} reservation(s)",
                error=error,
            )

    def _source_read(self, demand: int) -> None:
        now = trio.current_time()
        settings = self._settings
        outage_started, failures = self._outage_started, self._outage_failures
        if outage_started is not None:
            # The outage counts as a reading of the frozen target taken now, so no
            # scale-down follows from the readings before it.
            self._push_reading(now, self.target)
        self._outage_started = None
        self._outage_failures = 0
        self.source_ok = True
        self.demand = demand
        decided = raw_target(
            settings.policy,
            demand=demand,
            active=self.target > 0,
            oldest_age_s=self._oldest_age,
            now=self._wall_clock(),
        )
        self.raw_target = decided.raw
        self._push_reading(now, self.raw_target)
        zero_for = None if self._last_above_zero is None else now - self._last_above_zero
        self.target, kept = kept_target(
            self._window[0][1],
            raw=self.raw_target,
            zero_for_s=zero_for,
            scale_to_zero_delay_s=settings.scale_to_zero_delay_s,
        )
        self.reasons = decided.reasons if kept is None else (*decided.reasons, kept)
        if outage_started is not None:
            outage_s = now - outage_started
            self._emit(
                "source_recovered",
                f"reading the demand again after {outage_s:.0f} s ({failures} failed read(s))",
                failures=failures,
                outage_s=outage_s,
            )
        self._wake()

    async def _read_demand(self) -> int:
        """One demand read, then (with an age boost, and jobs waiting) the oldest age."""
        value = _check_demand(await self._demand_fn())
        self._oldest_age = None
        if self._oldest_age_fn is not None and value > 0:
            try:
                age = await self._oldest_age_fn()
            except Exception as exc:
                # Unknown adds nothing; the demand read stands.
                log.debug("oldest-age read failed: %s", redact(describe_error(exc)))
                age = None
            self._oldest_age = _check_age(age)
        return value

    def _wall_clock(self) -> datetime | None:
        settings = self._settings
        return settings.now() if settings.policy.schedule else None

    def _raise_to_schedule(self, now: float) -> None:
        """Fail static, but a scheduled minimum still raises the frozen target."""
        minimum, why = minimum_at(self._settings.policy, self._wall_clock())
        if minimum <= self.target or why is None:
            return
        self.raw_target = max(self.raw_target, minimum)
        self.target = minimum
        self.reasons = (why,)
        self._push_reading(now, minimum)
        self._wake()

    def _push_reading(self, now: float, raw: int) -> None:
        if raw > 0:
            self._last_above_zero = now
        window = self._window
        cutoff = now - self._settings.scale_down_delay_s
        while window and window[0][0] <= cutoff:
            window.popleft()
        while window and window[-1][1] <= raw:
            window.pop()
        window.append((now, raw))


def _pushing_source(demand_fn: Callable[[], Awaitable[int]]) -> PushingSource | None:
    """The source behind ``demand_fn`` if it can push wake-ups, else None.

    :func:`~.autoscaler.autoscale` takes a source as its bound ``read`` (``demand=source.read``, or
    the source itself, which it turns into that), so the source is the method's
    ``__self__``. A plain function has no wake-ups: it is polled only.
    """
    source = getattr(demand_fn, "__self__", None)
    can_push = getattr(source, "can_push", None)
    if not callable(can_push) or not callable(getattr(source, "watch", None)):
        return None
    pushing: PushingSource = source  # type: ignore[assignment]
    return pushing if can_push() is True else None


def _check_demand(value: object) -> int:
    # bool is an int subclass, and True is no job count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DemandError(f"the demand function returned {value!r}, not an int >= 0")
    return value


def _check_age(value: object) -> float | None:
    """An oldest-job age as seconds >= 0, or ``None`` (unknown) for anything else."""
    if not finite(value):
        return None
    assert isinstance(value, int | float)
    return max(0.0, float(value))
