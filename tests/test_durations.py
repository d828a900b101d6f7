"""Durations are measured on the Trio clock; only the ``*_at`` timestamps are wall-clock.

In virtual time (``autojump_clock``) the wall clock barely moves while the Trio clock
runs for minutes, so a duration taken from ``time.time()`` shows up as about zero. On a
real machine the same mistake shows as a hold that lasted minus an hour after an NTP
step.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from nullworker.worker.local_holds import LocalHolds
from nullworker.worker.metrics import MetricsSnapshot, WorkerMetrics
from nullworker.worker.reservations import ReservationEvent, ReservationSlot


async def test_hold_and_queue_wait_are_trio_clock_durations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []
    slot = ReservationSlot(max_reservation_s=100.0, max_queue_time_s=50.0, observer=events.append)
    results = []
    async with trio.open_nursery() as nursery:

        async def hold(duration_s: float) -> None:
            results.append(await slot.hold(duration_s))

        nursery.start_soon(hold, 30.0)
        await trio.sleep(10.0)
        active = slot.statistics().active
        assert active is not None
        assert active.held_s == pytest.approx(10.0)
        assert active.remaining_s == pytest.approx(20.0)
        nursery.start_soon(hold, 5.0)  # waits 20 s for the first hold to elapse
    assert [r.held_s for r in results] == pytest.approx([30.0, 5.0])
    second = [e.reservation for e in events if e.kind == "ended"][1]
    assert second.queue_wait_s == pytest.approx(20.0)
    # The timestamps for the engine stay on the wall clock (epoch seconds).
    assert second.started_at > 1e9 and second.entered_queue_at > 1e9


async def test_metrics_observe_trio_clock_durations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = WorkerMetrics(
        lambda: MetricsSnapshot(
            ready=True,
            reservation_held=False,
            queue_length=0,
            local_holds=0,
            reservations_ended={},
            local_holds_ended={},
            reporting=False,
            reports_sent=0,
            reports_failed=0,
            seconds_since_last_report=None,
        )
    )
    slot = ReservationSlot(max_reservation_s=100.0, max_queue_time_s=50.0, observer=metrics.observe)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slot.hold, 30.0)
        await trio.sleep(1.0)
        nursery.start_soon(slot.hold, 1.0)
    sample = metrics.registry.get_sample_value
    assert sample("nullworker_hold_seconds_sum") == pytest.approx(31.0)
    assert sample("nullworker_queue_wait_seconds_sum") == pytest.approx(29.0)


async def test_local_hold_age_and_length_are_trio_clock_durations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    holds = LocalHolds()
    async with holds.open(45.0, label="job") as hold:
        await trio.sleep(15.0)
        [info] = holds.statistics().holds
        assert info.age_s == pytest.approx(15.0)
        assert hold.held_s == pytest.approx(15.0)
        await hold.wait()
    assert hold.held_s == pytest.approx(45.0)
