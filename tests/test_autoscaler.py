"""Tests of the autoscaler's control loop (``nullworker.client.autoscaler``), on a MockClock.

No engine and no queue: the demand is a script (a value, or an exception, from a given
time on) and ``reserve`` is :class:`FakeEngine`'s, an async context manager that can wait
before the reservation is held (the engine finding a worker), fail (``EngineUnavailable``),
end the hold by itself after a while, or take a while to close. It records every attempt
(when it was entered, held, left) and how many were open at once, so each test runs the
autoscaler for a while and then checks the record, to the exact MockClock time where
the policy fixes one.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from nullworker.client.autoscaler import (
    AutoscaleEvent,
    Autoscaler,
    AutoscalerStatistics,
    autoscale,
)
from nullworker.client.demand import (
    CallableDemand,
    CombinedDemand,
    DemandError,
    DemandSource,
    DemandTimeout,
)
from nullworker.errors import ConfigError, EngineUnavailable

# -- the fake engine -------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one attempt to reserve does."""

    #: Seconds the engine takes to find a worker (the reservation is "waiting").
    wait_s: float = 0.0
    #: Raise EngineUnavailable instead of holding (after wait_s).
    fail: bool = False
    #: End the hold by itself after this long, with ``outcome``.
    end_after_s: float | None = None
    outcome: str = "duration_elapsed"
    #: Closing the connection takes this long (shielded, as a slow close would be).
    close_s: float = 0.0


@dataclass(eq=False)
class FakeReservation:
    """What the real ``nullworker.client.Reservation`` offers the autoscaler."""

    worker_url: str
    ended: trio.Event = field(default_factory=trio.Event)
    outcome: str | None = None


@dataclass(eq=False)
class Attempt:
    n: int
    plan: Plan
    entered_at: float
    held_at: float | None = None
    exited_at: float | None = None
    reservation: FakeReservation | None = None

    def open_at(self, t: float) -> bool:
        return self.entered_at <= t and (self.exited_at is None or self.exited_at > t)


class FakeEngine:
    def __init__(self, *plans: Plan, default: Plan = Plan()) -> None:
        self.plans = deque(plans)
        self.default = default
        self.attempts: list[Attempt] = []
        self.count = 0
        self.peak = 0

    def open_at(self, t: float) -> int:
        return sum(attempt.open_at(t) for attempt in self.attempts)

    def held_at(self, t: float) -> int:
        return sum(
            attempt.open_at(t) and attempt.held_at is not None and attempt.held_at <= t
            for attempt in self.attempts
        )

    def times(self) -> list[float]:
        return [attempt.entered_at for attempt in self.attempts]

    @asynccontextmanager
    async def reserve(self) -> AsyncIterator[FakeReservation]:
        plan = self.plans.popleft() if self.plans else self.default
        attempt = Attempt(len(self.attempts) + 1, plan, trio.current_time())
        self.attempts.append(attempt)
        self.count += 1
        self.peak = max(self.peak, self.count)
        try:
            await trio.sleep(plan.wait_s)
            if plan.fail:
                raise EngineUnavailable("the engine at http://engine.test refused /route/: 503")
            reservation = FakeReservation(f"http://worker-{attempt.n}.test")
            attempt.held_at = trio.current_time()
            attempt.reservation = reservation
            async with trio.open_nursery() as nursery:
                if plan.end_after_s is not None:
                    nursery.start_soon(self._end_later, reservation, plan)
                try:
                    yield reservation
                finally:
                    nursery.cancel_scope.cancel()
                    if not reservation.ended.is_set():
                        reservation.outcome = "client_released"
                        reservation.ended.set()
        finally:
            if plan.close_s:
                with trio.CancelScope(shield=True):
                    await trio.sleep(plan.close_s)
            attempt.exited_at = trio.current_time()
            self.count -= 1

    async def _end_later(self, reservation: FakeReservation, plan: Plan) -> None:
        assert plan.end_after_s is not None
        await trio.sleep(plan.end_after_s)
        reservation.outcome = plan.outcome
        reservation.ended.set()


FAIL = Plan(fail=True)
FOREVER = Plan(wait_s=1e9)


class Script:
    """Demand as a function of time: ``Script((0, 3), (10, DemandError("down")), (40, 1))``."""

    def __init__(self, *steps: tuple[float, int | Exception]) -> None:
        self.steps = steps
        self.reads: list[tuple[float, int | Exception]] = []

    async def __call__(self) -> int:
        now = trio.current_time()
        value = [v for t, v in self.steps if t <= now][-1]
        self.reads.append((now, value))
        if isinstance(value, Exception):
            raise type(value)(*value.args)
        return value

    def read_times(self) -> list[float]:
        return [t for t, _ in self.reads]


@dataclass
class Run:
    engine: FakeEngine
    events: list[AutoscaleEvent]
    scaler: Autoscaler | None = None

    def of_kind(self, kind: str) -> list[AutoscaleEvent]:
        return [event for event in self.events if event.kind == kind]

    def stats(self) -> AutoscalerStatistics:
        assert self.scaler is not None
        return self.scaler.statistics()


@asynccontextmanager
async def running(engine: FakeEngine, demand: Any, **options: Any) -> AsyncIterator[Run]:
    """Run the autoscaler with ``engine.reserve`` until the block ends, then cancel it."""
    run = Run(engine, [])
    options.setdefault("scale_down_delay_s", 0.0)
    async with trio.open_nursery() as nursery:
        run.scaler = await nursery.start(
            partial(
                autoscale,
                "test-endpoint",
                demand=demand,
                reserve=engine.reserve,
                on_event=run.events.append,
                **options,
            )
        )
        yield run
        nursery.cancel_scope.cancel()


async def settle_at(t: float) -> None:
    """Go to time ``t`` and let every task do what it does at ``t``."""
    await trio.sleep_until(t)
    await trio.testing.wait_all_tasks_blocked()


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def backoff_range(k: int) -> tuple[float, float]:
    """The k-th pause in a row (k >= 1): 1 s doubling, capped at 30 s, minus up to 20 %."""
    base = min(2.0 ** (k - 1), 30.0)
    return 0.8 * base, base


# -- scaling up and down ---------------------------------------------------------------


async def test_scales_up_within_one_poll(autojump_clock: trio.testing.MockClock) -> None:
    engine = FakeEngine()
    async with running(engine, Script((0, 0), (5, 3))) as run:
        await settle_at(4.5)
        assert engine.count == 0
        await settle_at(5.0)
        assert engine.times() == [5.0, 5.0, 5.0]
        assert engine.held_at(5.0) == 3
        stats = run.stats()
        assert (stats.demand, stats.target, stats.held, stats.waiting) == (3, 3, 3, 0)
        assert [e.at for e in run.of_kind("reservation_started")] == [5.0, 5.0, 5.0]
        assert {e.worker_url for e in run.of_kind("reservation_started")} == {
            f"http://worker-{n}.test" for n in (1, 2, 3)
        }
    last = run.of_kind("state")[-1]
    assert (last.demand, last.target, last.held, last.waiting) == (3, 3, 3, 0)


async def test_reservations_wait_for_the_engine_then_are_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(default=Plan(wait_s=20.0))
    async with running(engine, Script((0, 2))) as run:
        await settle_at(10.0)
        assert (run.stats().held, run.stats().waiting) == (0, 2)
        await settle_at(20.0)
        assert (run.stats().held, run.stats().waiting) == (2, 0)
    started = run.of_kind("reservation_started")
    assert [(e.at, e.waited_s) for e in started] == [(20.0, 20.0), (20.0, 20.0)]


async def test_scales_down_exactly_after_the_delay(autojump_clock: trio.testing.MockClock) -> None:
    engine = FakeEngine()
    # Polls at 0, 1, 2, ...: the last reading of 3 is at t=9, so 3 are kept until t=39.
    async with running(engine, Script((0, 3), (10, 1)), scale_down_delay_s=30.0) as run:
        await settle_at(38.999)
        assert engine.count == 3
        assert run.stats().target == 3
        await settle_at(39.0)
        assert engine.count == 1
        assert run.stats().target == 1
        await settle_at(100.0)
    exits = sorted(a.exited_at for a in engine.attempts if a.exited_at is not None)
    assert exits[:2] == [39.0, 39.0]
    assert exits[2:] == [100.0]  # the last one, when the run was cancelled
    assert len(engine.attempts) == 3
    ended = run.of_kind("reservation_ended")
    assert [(e.at, e.cause, e.outcome) for e in ended[:2]] == [
        (39.0, "scale_down", "client_released")
    ] * 2
    assert ended[0].held_s == 39.0
    targets = [(e.at, e.target) for e in run.of_kind("state")]
    assert (39.0, 1) in targets
    assert all(target == 3 for at, target in targets if 0 < at < 39.0)
    # While the delay keeps the target above the demand, the line says so.
    messages = {e.at: e.message for e in run.of_kind("state")}
    assert messages[10.0] == (
        "demand 1, target 3 (kept by the scale-down delay; 1 after it): 3 held, 0 waiting"
    )
    assert messages[39.0] == "demand 1, target 1: 1 held, 0 waiting"


async def test_flapping_demand_inside_the_window_never_scales_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    # Each low phase ends one second before the scale-down it would cause.
    script = Script((0, 3), (10, 1), (39, 3), (45, 0), (74, 3), (80, 2), (109, 3))
    async with running(engine, script, scale_down_delay_s=30.0):
        await settle_at(150.0)
    assert len(engine.attempts) == 3
    assert all(a.exited_at == 150.0 for a in engine.attempts)


async def test_scale_down_cancels_waiting_first_then_the_most_recently_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(
        Plan(wait_s=5.0),  # 1: started at 0, held at 5
        Plan(wait_s=1.0),  # 2: started at 1, held at 2
        FOREVER,  # 3: started at 2, waiting
        FOREVER,  # 4: started at 3, waiting
    )
    # One more each poll, so the attempts start in a known order.
    script = Script((0, 1), (1, 2), (2, 3), (3, 4), (10, 3), (20, 1))
    async with running(engine, script) as run:
        await settle_at(9.0)
        assert (run.stats().held, run.stats().waiting) == (2, 2)
        await settle_at(10.0)
        a1, a2, a3, a4 = engine.attempts
        assert a4.exited_at == 10.0 and a4.held_at is None  # the newest waiting one
        assert a3.exited_at is None
        await settle_at(20.0)
        assert a3.exited_at == 20.0 and a3.held_at is None  # then the other waiting one
        assert (a1.held_at, a1.exited_at) == (5.0, 20.0)  # held at 5: more recently than 2
        assert a2.exited_at is None
        assert (run.stats().held, run.stats().waiting) == (1, 0)
    ended = [e for e in run.of_kind("reservation_ended") if e.cause == "scale_down"]
    assert [(e.worker_url, e.at) for e in ended] == [("http://worker-1.test", 20.0)]


# -- bounds ----------------------------------------------------------------------------


async def test_max_workers_counts_waiting_reservations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(default=FOREVER)
    async with running(engine, Script((0, 100)), max_workers=4) as run:
        await settle_at(60.0)
        stats = run.stats()
        assert (stats.target, stats.held, stats.waiting) == (4, 0, 4)
    assert engine.peak == 4
    assert len(engine.attempts) == 4


async def test_max_workers_counts_reservations_still_closing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(default=Plan(close_s=2.5))
    # Cancelled at t=1, still closing when the demand comes back at t=2.
    async with running(engine, Script((0, 4), (1, 0), (2, 4)), max_workers=4) as run:
        await settle_at(2.0)
        stats = run.stats()
        assert (stats.target, stats.held, stats.waiting, stats.stopping) == (4, 0, 0, 4)
        assert engine.count == 4
        await settle_at(3.5)
        assert run.stats().held == 4
    assert engine.peak == 4
    assert engine.times() == [0.0] * 4 + [3.5] * 4


async def test_max_workers_holds_under_churn(autojump_clock: trio.testing.MockClock) -> None:
    rng = random.Random(1234)
    plans = [
        Plan(
            wait_s=rng.choice([0.0, 0.5, 3.0, 20.0]),
            fail=rng.random() < 0.2,
            end_after_s=rng.choice([None, 0.5, 4.0, 30.0]),
            close_s=rng.choice([0.0, 0.0, 1.5]),
        )
        for _ in range(400)
    ]
    steps = [(float(t), rng.randrange(0, 12)) for t in range(0, 300, 3)]
    engine = FakeEngine(*plans)
    async with running(engine, Script(*steps), max_workers=5, poll_s=1.0):
        await settle_at(300.0)
    assert engine.peak == 5
    assert engine.count == 0


async def test_min_workers_are_held_with_no_demand(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    async with running(engine, Script((0, 0)), min_workers=2, scale_down_delay_s=5.0) as run:
        await settle_at(100.0)
        stats = run.stats()
        assert (stats.demand, stats.target, stats.held) == (0, 2, 2)
    assert engine.times() == [0.0, 0.0]


async def test_jobs_per_worker_rounds_up_and_max_caps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 1), (10, 3), (20, 4), (30, 7), (40, 0), (50, 100))
    async with running(engine, script, jobs_per_worker=3, max_workers=5) as run:
        seen = []
        for t in (5.0, 15.0, 25.0, 35.0, 45.0, 55.0):
            await settle_at(t)
            seen.append((run.stats().target, engine.count))
    assert seen == [(1, 1), (1, 1), (2, 2), (3, 3), (0, 0), (5, 5)]


# -- faults ----------------------------------------------------------------------------


async def test_source_errors_keep_capacity_and_are_reported_once_per_outage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script(
        (0, 3),
        (10, DemandError("redis list jobs on redis://:***@queue:6379/0: ConnectionError")),
        (40, 1),
        (100, RuntimeError("the callable's own bug, redis://:hunter2@queue:6379")),
        (130, 1),
    )
    async with running(engine, script) as run:
        await settle_at(200.0)
        stats = run.stats()
    reads = script.reads
    recovered_at = next(t for t, v in reads if t >= 40 and v == 1)
    # Capacity is kept through the outage (delay 0: a reading of 1 would drop 2 at once).
    assert engine.open_at(recovered_at - 0.001) == 3
    assert engine.open_at(recovered_at) == 1
    assert sorted(a.exited_at or 0 for a in engine.attempts)[:2] == [recovered_at] * 2
    assert len(engine.attempts) == 3
    # One event at each end of each outage, not one per failed read.
    errors, recoveries = run.of_kind("source_error"), run.of_kind("source_recovered")
    second_outage_at = next(t for t, v in reads if t >= 100)
    assert [e.at for e in errors] == [10.0, second_outage_at]
    assert errors[0].error is not None and errors[0].error.startswith("DemandError: redis list")
    assert errors[1].error == "RuntimeError: the callable's own bug, redis://:***@queue:6379"
    assert errors[0].held == 3 and errors[1].held == 1
    failed = [t for t, v in reads if isinstance(v, Exception)]
    first_outage = [t for t in failed if t < 40]
    assert recoveries[0].at == recovered_at
    assert recoveries[0].failures == len(first_outage)
    assert recoveries[0].outage_s == recovered_at - 10.0
    assert stats.source_errors == len(failed)
    assert stats.source_ok
    # The failed reads back off: 1 s (the poll), doubling, minus jitter.
    for k, gap in enumerate(gaps([*first_outage, recovered_at]), start=1):
        low, high = backoff_range(k)
        assert low <= gap <= high
    assert len(first_outage) <= 6


async def test_a_scale_down_after_an_outage_waits_the_delay_from_the_recovery(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 3), (5, DemandError("down")), (120, 1))
    async with running(engine, script, scale_down_delay_s=30.0):
        await settle_at(300.0)
    recovered_at = next(t for t, v in script.reads if v == 1)
    exits = sorted(a.exited_at or 0 for a in engine.attempts)
    assert exits[:2] == [recovered_at + 30.0] * 2


async def test_a_demand_that_is_not_a_count_is_a_source_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    values: deque[object] = deque([2, -1, True, "3", 2])

    async def demand() -> Any:
        return values.popleft() if len(values) > 1 else values[0]

    engine = FakeEngine()
    async with running(engine, demand) as run:
        await settle_at(30.0)
        assert run.stats().source_errors == 3
    (error,) = run.of_kind("source_error")
    assert error.error == "DemandError: the demand function returned -1, not an int >= 0"
    assert len(run.of_kind("source_recovered")) == 1
    assert len(engine.attempts) == 2 and engine.count == 0


async def test_engine_errors_back_off_and_a_good_hold_resets_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(*[FAIL] * 7, Plan(end_after_s=20.0), default=FAIL)
    async with running(engine, Script((0, 1))) as run:
        await settle_at(200.0)
    times = engine.times()
    assert times[0] == 0.0
    for k, gap in enumerate(gaps(times[:8]), start=1):  # attempts 1-8: 7 failures
        low, high = backoff_range(k)
        assert low <= gap <= high, (k, gap)
    held_at = times[7]
    assert engine.attempts[7].held_at == held_at
    # The hold lasted 20 s: the next attempt is at once, and its failure backs off 1 s.
    assert times[8] == held_at + 20.0
    low, high = backoff_range(1)
    assert low <= times[9] - times[8] <= high
    backoffs = [e.failures for e in run.of_kind("backoff")]
    assert backoffs[:8] == [1, 2, 3, 4, 5, 6, 7, 1]
    failed = run.of_kind("reservation_failed")
    assert failed[0].error == (
        "EngineUnavailable: the engine at http://engine.test refused /route/: 503"
    )
    assert run.stats().reservations_failed == len(engine.attempts) - 1
    (ended,) = run.of_kind("reservation_ended")[:1]
    assert (ended.cause, ended.outcome, ended.held_s) == ("worker", "duration_elapsed", 20.0)


async def test_failing_attempts_never_loop_hot(autojump_clock: trio.testing.MockClock) -> None:
    engine = FakeEngine(default=FAIL)
    async with running(engine, Script((0, 5)), max_workers=5) as run:
        await settle_at(600.0)
    # Attempts go in rounds of 5 (the target); a round that fails together is one
    # failure, so the pause grows once per round: 0, ~1, ~3, ~7, ~15, ~31, then ~30 s.
    rounds = sorted(set(engine.times()))
    assert [engine.times().count(t) for t in rounds] == [5] * len(rounds)
    assert len(rounds) <= 6 + (600 - 31) // 24 + 1
    assert min(gaps(rounds)) >= 0.8
    assert [e.failures for e in run.of_kind("backoff")] == list(range(1, len(rounds) + 1))


async def test_holds_that_end_at_once_count_as_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(default=Plan(end_after_s=0.5, outcome="explicit"))
    async with running(engine, Script((0, 1))) as run:
        await settle_at(40.0)
    ends = [a.exited_at or 0 for a in engine.attempts]
    starts = engine.times()
    for k, (ended, next_start) in enumerate(zip(ends[:-1], starts[1:], strict=True), start=1):
        low, high = backoff_range(k)
        assert low <= next_start - ended <= high
    assert 4 <= len(starts) <= 7
    assert run.of_kind("backoff")[0].error == "the hold ended after 0.5 s (explicit)"
    ended_alone = [
        a for a in engine.attempts if a.reservation and a.reservation.outcome == "explicit"
    ]
    assert run.stats().ended_by_outcome["explicit"] == len(ended_alone) >= len(starts) - 1


async def test_a_reservation_that_ends_by_itself_is_replaced_while_wanted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(Plan(end_after_s=60.0, outcome="explicit"))
    async with running(engine, Script((0, 1))) as run:
        await settle_at(100.0)
        assert run.stats().ended_by_outcome == {"explicit": 1}
    assert engine.times() == [0.0, 60.0]
    ended = run.of_kind("reservation_ended")[0]
    assert (ended.at, ended.cause, ended.outcome) == (60.0, "worker", "explicit")
    assert (ended.worker_url, ended.held_s) == ("http://worker-1.test", 60.0)


async def test_a_reservation_that_ends_by_itself_is_not_replaced_without_demand(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(Plan(end_after_s=60.0))
    script = Script((0, 1), (30, 0), (200, 1))
    async with running(engine, script, scale_down_delay_s=100.0) as run:
        await settle_at(61.0)
        # The window still keeps one, but nobody asks for a new one.
        stats = run.stats()
        assert (stats.demand, stats.target, stats.held, stats.waiting) == (0, 1, 0, 0)
        await settle_at(250.0)
    assert engine.times() == [0.0, 200.0]


# -- wake-ups from a source that can push -----------------------------------------------

#: The least time between two reads that wake-ups prompt (the autoscaler's bound).
WAKE_MIN_S = 0.05


class PushedScript(DemandSource):
    """A :class:`Script` read through a real :class:`DemandSource` that can push.

    ``wake(n, every_s)`` makes its ``watch`` call ``changed()`` ``n`` times, ``every_s``
    apart (0: all at once, a burst). Each read takes ``read_s``.
    """

    def __init__(self, script: Script, *, read_s: float = 0.0, broken: bool = False) -> None:
        super().__init__(timeout_s=5.0)
        self.script = script
        self.read_s = read_s
        self.broken = broken
        self._send, self._receive = trio.open_memory_channel[tuple[int, float]](100)

    def describe(self) -> str:
        return "a pushed script"

    async def _read(self) -> int:
        value = await self.script()
        await trio.sleep(self.read_s)
        return value

    def can_push(self) -> bool:
        return True

    async def watch(self, changed: Callable[[], None]) -> None:
        if self.broken:
            raise RuntimeError("the subscription code has a bug")
        async for count, every_s in self._receive:
            for _ in range(count):
                changed()
                if every_s:
                    await trio.sleep(every_s)

    def wake(self, count: int = 1, every_s: float = 0.0) -> None:
        self._send.send_nowait((count, every_s))


async def test_a_wake_up_reads_at_once_without_waiting_for_the_poll(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 0), (5, 3))
    source = PushedScript(script)
    async with running(engine, source, poll_s=60.0):
        await settle_at(5.0)
        assert script.read_times() == [0.0]
        source.wake()
        await settle_at(5.0)
        # Only the wake-up explains a read at 5 s with a 60 s poll.
        assert script.read_times() == [0.0, 5.0]
        assert engine.times() == [5.0, 5.0, 5.0]
        # The poll goes on from the last read.
        await settle_at(100.0)
    assert script.read_times() == [0.0, 5.0, 65.0]


async def test_a_burst_of_wake_ups_is_one_read_and_a_flood_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script((0, 1))
    source = PushedScript(script)
    async with running(FakeEngine(), source, poll_s=60.0):
        await settle_at(10.0)
        source.wake(1000)
        await settle_at(15.0)
        assert script.read_times() == [0.0, 10.0]
        # A wake-up every millisecond for a second: at most one read per WAKE_MIN_S.
        source.wake(1000, every_s=0.001)
        await settle_at(25.0)
    flood = [t for t in script.read_times() if 15.0 <= t < 25.0]
    assert 2 <= len(flood) <= 1 / WAKE_MIN_S + 2, flood
    assert min(gaps(flood)) >= WAKE_MIN_S - 1e-9, flood
    assert flood[0] == 15.0


async def test_wake_ups_during_a_read_ask_for_one_more_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script((0, 1))
    source = PushedScript(script, read_s=1.0)
    async with running(FakeEngine(), source, poll_s=60.0):
        await settle_at(10.0)
        source.wake()
        await settle_at(10.5)  # the read started at 10 s is in flight
        source.wake(100)
        await settle_at(50.0)
    assert script.read_times() == [0.0, 10.0, 11.0]


async def test_with_wake_ups_a_scale_down_reads_when_the_delay_ends_not_at_the_poll(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 3), (10, 1))
    source = PushedScript(script)
    async with running(engine, source, poll_s=60.0, scale_down_delay_s=30.0) as run:
        await settle_at(10.0)
        source.wake()
        await settle_at(39.999)
        assert (engine.count, run.stats().target) == (3, 3)
        # The 3 jobs stood until the change at 10 s: that reading expires at 40 s, and
        # a read then makes the scale-down (not the next poll, at 70 s).
        await settle_at(40.0)
        assert (engine.count, run.stats().target) == (1, 1)
        await settle_at(110.0)
    assert script.read_times() == [0.0, 10.0, 40.0, 100.0]


async def test_with_wake_ups_the_scale_down_delay_counts_from_the_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 3), (50, 1))
    source = PushedScript(script)
    async with running(engine, source, poll_s=60.0, scale_down_delay_s=30.0) as run:
        # No reading between 0 s and 50 s, but the 3 jobs stood all along (no wake-up).
        await settle_at(50.0)
        source.wake()
        await settle_at(79.999)
        assert (engine.count, run.stats().target) == (3, 3)
        await settle_at(80.0)
        assert (engine.count, run.stats().target) == (1, 1)
    assert script.read_times() == [0.0, 50.0, 80.0]


async def test_with_wake_ups_the_scale_to_zero_delay_reads_when_it_ends_and_not_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 2), (10, 0))
    source = PushedScript(script)
    settings = {"poll_s": 60.0, "scale_down_delay_s": 5.0, "scale_to_zero_delay_s": 40.0}
    async with running(engine, source, **settings) as run:
        await settle_at(10.0)
        source.wake()  # the queue empties at 10 s
        await settle_at(14.999)
        assert (engine.count, run.stats().target) == (2, 2)
        # The scale-down delay ends at 15 s: down to the one the scale-to-zero delay keeps.
        await settle_at(15.0)
        assert (engine.count, run.stats().target) == (1, 1)
        await settle_at(49.999)
        assert engine.count == 1
        # 40 s after the last job: one read lets the last reservation go.
        await settle_at(50.0)
        assert (engine.count, run.stats().target) == (0, 0)
        await settle_at(115.0)
    # No read in between: neither delay was pending but at its end.
    assert script.read_times() == [0.0, 10.0, 15.0, 50.0, 110.0]


async def test_a_watch_that_fails_leaves_the_polling(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    script = Script((0, 1))
    async with running(FakeEngine(), PushedScript(script, broken=True), poll_s=1.0) as run:
        await settle_at(3.0)
        assert run.stats().held == 1
    assert script.read_times() == [0.0, 1.0, 2.0, 3.0]
    assert "polling only" in caplog.text


# -- cancellation ----------------------------------------------------------------------


async def test_cancelling_releases_everything_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    engine = FakeEngine(*[Plan()] * 3, default=FOREVER)
    events: list[AutoscaleEvent] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            scaler: Autoscaler = await nursery.start(
                partial(
                    autoscale,
                    "test-endpoint",
                    demand=Script((0, 5)),
                    reserve=engine.reserve,
                    on_event=events.append,
                )
            )
            await settle_at(10.0)
            assert (scaler.statistics().held, scaler.statistics().waiting) == (3, 2)
            scope.cancel()
    assert trio.current_time() == 10.0
    assert engine.count == 0
    assert [a.exited_at for a in engine.attempts] == [10.0] * 5
    assert all(a.reservation.outcome == "client_released" for a in engine.attempts if a.reservation)
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before
    stats = scaler.statistics()
    assert (stats.held, stats.waiting, stats.stopping) == (0, 0, 0)
    assert stats.ended_by_outcome == {"client_released": 3}
    ended = [e for e in events if e.kind == "reservation_ended"]
    assert [(e.cause, e.at) for e in ended] == [("shutdown", 10.0)] * 3


# -- the interface ---------------------------------------------------------------------


async def test_a_failing_on_event_does_not_stop_the_autoscaler(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def on_event(event: AutoscaleEvent) -> None:
        raise RuntimeError("display bug")

    engine = FakeEngine()
    async with trio.open_nursery() as nursery:
        scaler: Autoscaler = await nursery.start(
            partial(
                autoscale, "e", demand=Script((0, 2)), reserve=engine.reserve, on_event=on_event
            )
        )
        await settle_at(5.0)
        assert scaler.statistics().held == 2
        nursery.cancel_scope.cancel()
    assert "on_event callback failed" in caplog.text


async def test_statistics_before_the_first_read(autojump_clock: trio.testing.MockClock) -> None:
    gate = trio.Event()

    async def demand() -> int:
        await gate.wait()
        return 1

    engine = FakeEngine()
    async with trio.open_nursery() as nursery:
        scaler: Autoscaler = await nursery.start(
            partial(autoscale, "e", demand=demand, reserve=engine.reserve, min_workers=1)
        )
        await trio.testing.wait_all_tasks_blocked()
        assert scaler.statistics() == AutoscalerStatistics(
            demand=None,
            target=1,
            held=1,
            waiting=0,
            stopping=0,
            ended_by_outcome={},
            reservations_failed=0,
            source_errors=0,
            source_ok=False,
        )
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert (scaler.statistics().demand, scaler.statistics().source_ok) == (1, True)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_workers": 3, "max_workers": 2}, r"min_workers \(3\) must not be greater"),
        ({"min_workers": -1}, "min_workers must be an integer >= 0"),
        ({"max_workers": 0}, "max_workers must be an integer >= 1"),
        ({"max_workers": 2.5}, "max_workers must be an integer >= 1"),
        ({"jobs_per_worker": 0}, "jobs_per_worker must be an integer >= 1"),
        ({"jobs_per_worker": True}, "jobs_per_worker must be an integer >= 1"),
        ({"poll_s": 0}, "poll_s must be a finite number of seconds > 0"),
        ({"poll_s": float("nan")}, "poll_s must be a finite number of seconds > 0"),
        ({"scale_down_delay_s": -1}, "scale_down_delay_s must be a finite number of seconds >= 0"),
        ({"scale_down_delay_s": float("inf")}, "scale_down_delay_s must be a finite"),
        ({"duration_s": 0}, "duration_s must be a finite number of seconds > 0 or None"),
        ({"demand": 3}, "demand must be an async function"),
        ({"reserve": "nope"}, "reserve must be callable"),
        ({"on_event": 1}, "on_event must be callable"),
    ],
)
async def test_invalid_arguments_are_refused(options: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"demand": Script((0, 1)), "reserve": FakeEngine().reserve}
    settings.update(options)
    with pytest.raises(ConfigError, match=message) as info:
        await autoscale("e", **settings)
    assert isinstance(info.value, ValueError)


async def test_an_empty_endpoint_is_refused() -> None:
    with pytest.raises(ConfigError, match="an endpoint name is required"):
        await autoscale("", demand=Script((0, 1)), reserve=FakeEngine().reserve)


async def test_the_default_reserve_needs_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="an API key is required"):
        await autoscale("e", demand=Script((0, 1)))


# -- several sources for one endpoint: CombinedDemand ----------------------------------


async def test_combined_sum_drives_the_target_and_a_failed_part_fails_static(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A queue and its retry queue: the sum scales up; one part down keeps what is held."""
    jobs = Script((0, 2), (10, 3))
    retry = Script((0, 1), (20, DemandError("retry queue down")), (40, 0))
    source = CombinedDemand(
        [CallableDemand(jobs, name="jobs"), CallableDemand(retry, name="retry")], how="sum"
    )
    assert source.describe() == "sum of (callable jobs, callable retry)"
    engine = FakeEngine()
    async with (
        source,
        running(engine, source, poll_s=1.0, scale_down_delay_s=5.0, max_workers=10) as run,
    ):
        await settle_at(5)
        assert (run.stats().demand, run.stats().held) == (3, 3)
        await settle_at(15)
        assert (run.stats().demand, run.stats().held) == (4, 4)
        # The retry queue cannot be read: 3 readable jobs would be a scale-down; the
        # whole read fails instead and the 4 reservations stay, for the whole outage.
        await settle_at(39)
        (error,) = run.of_kind("source_error")
        assert error.at == 20 and "callable retry" in (error.error or "")
        assert "retry queue down" in (error.error or "")
        assert run.stats().held == 4 and run.stats().demand == 4
        assert run.of_kind("reservation_ended") == []
        assert not run.stats().source_ok
        # Back: 3 + 0 -> 3, after the scale-down delay counted from the recovery.
        await settle_at(70)
        (recovered,) = run.of_kind("source_recovered")
        (ended,) = run.of_kind("reservation_ended")
        assert ended.cause == "scale_down"
        assert ended.at - recovered.at == pytest.approx(5.0, abs=1.0)
        assert (run.stats().demand, run.stats().held) == (3, 3)


async def test_combined_max_counts_the_same_jobs_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    views = [CallableDemand(Script((0, n)), name=f"view{n}") for n in (2, 5, 4)]
    source = CombinedDemand(views, how="max")
    engine = FakeEngine()
    async with source, running(engine, source, poll_s=1.0) as run:
        await settle_at(3)
        assert (run.stats().demand, run.stats().held) == (5, 5)
    assert all(view._closed for view in views)  # the combination closed its parts


async def test_combined_parts_are_read_together_each_within_its_own_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow() -> int:
        await trio.sleep(3)
        return 1

    async def hangs() -> int:
        await trio.sleep_forever()

    fast_and_slow = CombinedDemand(
        [CallableDemand(slow, timeout_s=4), CallableDemand(slow, timeout_s=4)]
    )
    start = trio.current_time()
    assert await fast_and_slow.read() == 2
    assert trio.current_time() - start == 3  # together, not one after the other
    one_hangs = CombinedDemand(
        [CallableDemand(slow, timeout_s=4), CallableDemand(hangs, timeout_s=2, name="stuck")]
    )
    with pytest.raises(DemandTimeout, match="callable stuck: no answer within 2 s"):
        await one_hangs.read()


def test_combined_demand_refuses_bad_arguments() -> None:
    part = CallableDemand(Script((0, 1)))
    with pytest.raises(ValueError, match="at least one source"):
        CombinedDemand([])
    with pytest.raises(ValueError, match="the same source twice"):
        CombinedDemand([part, part])
    with pytest.raises(ValueError, match="'sum' or 'max'"):
        CombinedDemand([part], how="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes demand sources"):
        CombinedDemand([Script((0, 1))])  # type: ignore[list-item]
