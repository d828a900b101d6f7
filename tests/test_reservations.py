"""The reservation core, pure Trio, on a MockClock: hours of holding run in milliseconds."""

from __future__ import annotations

import math
from functools import partial

import pytest
import trio
import trio.testing

from nullworker.errors import DuplicateRequest, QueueTimeout, ReleaseConflict, ShuttingDown
from nullworker.worker.reservations import (
    Outcome,
    ReleaseRequest,
    ReleaseRequestError,
    Reservation,
    ReservationEvent,
    ReservationResult,
    ReservationSlot,
    State,
    parse_release_request,
)


def make_slot(
    events: list[ReservationEvent] | None = None,
    *,
    max_reservation_s: float = 3600.0,
    max_queue_time_s: float = 30.0,
) -> ReservationSlot:
    return ReservationSlot(
        max_reservation_s=max_reservation_s,
        max_queue_time_s=max_queue_time_s,
        observer=events.append if events is not None else None,
    )


def ended(events: list[ReservationEvent]) -> list[tuple[int, Outcome | None]]:
    return [(e.reservation.id, e.reservation.outcome) for e in events if e.kind == "ended"]


async def test_default_hold_elapses_exactly_at_the_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events)
    start = trio.current_time()
    result = await slot.hold()
    assert trio.current_time() - start == pytest.approx(3600.0)
    assert result.outcome is Outcome.ELAPSED
    assert result.duration_s == 3600.0
    assert [e.kind for e in events] == ["queued", "started", "ended"]
    assert not slot.statistics().busy


async def test_requested_duration_and_cap(autojump_clock: trio.testing.MockClock) -> None:
    slot = make_slot(max_reservation_s=100.0)
    start = trio.current_time()
    result = await slot.hold(5.0)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert result.duration_s == 5.0
    start = trio.current_time()
    result = await slot.hold(10_000.0)
    assert trio.current_time() - start == pytest.approx(100.0)
    assert result.duration_s == 100.0


async def test_zero_duration_elapses_at_once(autojump_clock: trio.testing.MockClock) -> None:
    slot = make_slot()
    start = trio.current_time()
    result = await slot.hold(0.0)
    assert result.outcome is Outcome.ELAPSED
    assert trio.current_time() == start


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
async def test_bad_durations_are_refused_before_queueing(bad: float) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events)
    with pytest.raises(ValueError):
        await slot.hold(bad)
    assert events == []


async def test_second_request_gets_queue_timeout_exactly_at_max_queue_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events, max_queue_time_s=30.0)
    rejected_at: list[float] = []

    async def second() -> None:
        start = trio.current_time()
        with pytest.raises(QueueTimeout):
            await slot.hold(10.0)
        rejected_at.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slot.hold, 600.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert slot.statistics().waiting == 1
        assert slot.statistics().busy
    assert rejected_at == [pytest.approx(30.0)]
    assert ended(events) == [(2, Outcome.REJECTED), (1, Outcome.ELAPSED)]


async def test_queued_request_is_served_when_slot_frees_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slot = make_slot(max_queue_time_s=30.0)
    results: list[tuple[float, ReservationResult]] = []

    async def holder(duration: float) -> None:
        result = await slot.hold(duration)
        results.append((trio.current_time(), result))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder, 10.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(holder, 5.0)
    assert [r.outcome for _, r in results] == [Outcome.ELAPSED, Outcome.ELAPSED]
    # The second hold started when the first ended (t=10) and lasted 5 s.
    assert results[1][0] - results[0][0] == pytest.approx(5.0)


async def test_three_queued_holders_start_in_fifo_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events, max_queue_time_s=1000.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slot.hold, 10.0)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):
            nursery.start_soon(slot.hold, 10.0)
            await trio.testing.wait_all_tasks_blocked()
        assert slot.statistics().waiting == 3
    started = [e.reservation.id for e in events if e.kind == "started"]
    assert started == [1, 2, 3, 4]


async def test_cancel_frees_slot_for_the_waiter_immediately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events, max_queue_time_s=100.0)
    started: dict[int, float] = {}
    slot.add_observer(
        lambda e: (
            started.setdefault(e.reservation.id, trio.current_time())
            if e.kind == "started"
            else None
        )
    )
    first_scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def first() -> None:
            with first_scope:
                await slot.hold()

        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(slot.hold, 1.0)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(50.0)
        first_scope.cancel()
        cancelled_at = trio.current_time()
    assert started[2] == pytest.approx(cancelled_at)
    assert ended(events) == [(1, Outcome.CANCELLED), (2, Outcome.ELAPSED)]
    assert not slot.statistics().busy


async def test_cancelled_while_queued_leaves_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slot.hold, 100.0)
        await trio.testing.wait_all_tasks_blocked()
        waiter = trio.CancelScope()

        async def queued() -> None:
            with waiter:
                await slot.hold(1.0)

        nursery.start_soon(queued)
        await trio.testing.wait_all_tasks_blocked()
        assert slot.statistics().waiting == 1
        waiter.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert slot.statistics().waiting == 0
    assert ended(events) == [(2, Outcome.CANCELLED), (1, Outcome.ELAPSED)]


async def test_max_queue_time_zero_rejects_at_once(autojump_clock: trio.testing.MockClock) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events, max_queue_time_s=0.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slot.hold, 10.0)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        with pytest.raises(QueueTimeout):
            await slot.hold(1.0)
        assert trio.current_time() == start
    # Free again: the next one is admitted without waiting.
    result = await slot.hold(0.0)
    assert result.outcome is Outcome.ELAPSED
    assert ended(events) == [(2, Outcome.REJECTED), (1, Outcome.ELAPSED), (3, Outcome.ELAPSED)]


async def test_explicit_release_ends_the_hold(autojump_clock: trio.testing.MockClock) -> None:
    slot = make_slot()
    results: list[ReservationResult] = []

    async def holder() -> None:
        results.append(await slot.hold())

    assert slot.release() is None  # nothing to release
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(42.0)
        info = slot.release()
        assert info is not None and info.id == 1
        assert slot.release() is None  # already released: not twice
        released_at = trio.current_time()
    assert results[0].outcome is Outcome.RELEASED
    assert trio.current_time() == released_at
    assert slot.statistics().counts["explicit"] == 1


async def test_a_named_release_ends_only_the_reservation_it_names(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The consumer saw reservation 1 and decided to release it; meanwhile 1 ended and 2
    started. Its release names 1 (by id, or by starting before the decision): 2 stays."""
    slot = make_slot()
    results: list[ReservationResult] = []

    async def holder(duration: float) -> None:
        results.append(await slot.hold(duration))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder, 10.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(holder, 100.0)  # queued behind 1
        await trio.testing.wait_all_tasks_blocked()
        seen = slot.statistics().active
        assert seen is not None and seen.id == 1
        await trio.sleep(10.5)  # 1 elapses, 2 starts
        active = slot.statistics().active
        assert active is not None and active.id == 2
        active_started = active.started_at
        for named in (
            {"id": 1},
            {"started_before": active_started},
            {"id": 2, "started_before": 1.0},
        ):
            with pytest.raises(ReleaseConflict) as conflict:
                slot.release(**named)
            assert conflict.value.active.id == 2
        assert slot.statistics().active is not None  # left alone
        info = slot.release(id=2, started_before=active_started + 0.001)
        assert info is not None and info.id == 2
        assert slot.release(id=2) is None  # ended: nothing to release
    assert [r.outcome for r in results] == [Outcome.ELAPSED, Outcome.RELEASED]
    assert slot.release(id=1) is None and slot.release(started_before=math.inf) is None


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"", 428, None),
        (b"{}", 428, None),
        (b'{"id": null}', 428, None),
        (b"{nope", 422, None),
        (b"[1]", 422, None),
        (b'{"id": "3"}', 422, "id"),
        (b'{"id": true}', 422, "id"),
        (b'{"id": 0}', 422, "id"),
        (b'{"id": 1.5}', 422, "id"),
        (b'{"started_before": "now"}', 422, "started_before"),
        (b'{"started_before": 1' + b"0" * 400 + b"}", 422, "started_before"),
        (b'{"reservation": 3}', 422, "reservation"),
    ],
)
def test_bad_release_requests_are_refused_naming_the_field(
    body: bytes, status: int, field: str | None
) -> None:
    with pytest.raises(ReleaseRequestError) as info:
        parse_release_request(body)
    assert info.value.status == status
    assert info.value.detail["released"] is False and info.value.detail["error"]
    assert info.value.detail.get("field") == field


def test_good_release_requests() -> None:
    assert parse_release_request(b'{"id": 3}') == ReleaseRequest(id=3)
    assert parse_release_request(b'{"started_before": 17.5}') == ReleaseRequest(started_before=17.5)
    assert parse_release_request(b'{"id": 4, "started_before": 2}') == ReleaseRequest(4, 2.0)


async def test_shutdown_ends_holders_and_waiters_and_refuses_new(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events)
    results: list[ReservationResult] = []
    refused: list[str] = []

    async def holder() -> None:
        results.append(await slot.hold())

    async def waiter() -> None:
        try:
            await slot.hold()
        except ShuttingDown:
            refused.append("waiter")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        slot.shutdown()
    assert results[0].outcome is Outcome.SHUTDOWN
    assert refused == ["waiter"]
    with pytest.raises(ShuttingDown):
        await slot.hold()
    assert sorted(o.value for _, o in ended(events) if o) == ["shutdown", "shutdown"]
    await slot.wait_idle()


async def test_every_exit_path_emits_exactly_one_ended_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events, max_queue_time_s=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slot.hold, 20.0)  # 1: elapses
        await trio.testing.wait_all_tasks_blocked()

        async def rejected() -> None:
            with pytest.raises(QueueTimeout):
                await slot.hold(1.0)

        nursery.start_soon(rejected)  # 2: rejected at t=5
        scope = trio.CancelScope()

        async def cancelled() -> None:
            with scope:
                await slot.hold(1.0)

        nursery.start_soon(cancelled)  # 3: cancelled while queued
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    await slot.hold(0.0)  # 4
    ids = [rid for rid, _ in ended(events)]
    assert sorted(ids) == [1, 2, 3, 4]
    assert len(ids) == len(set(ids))
    queued = [e.reservation.id for e in events if e.kind == "queued"]
    assert queued == [1, 2, 3, 4]


async def test_a_failing_observer_never_leaves_the_slot_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def broken(event: ReservationEvent) -> None:
        raise RuntimeError("reporting bug")

    slot = ReservationSlot(max_reservation_s=10.0, max_queue_time_s=1.0, observer=broken)
    result = await slot.hold(1.0)
    assert result.outcome is Outcome.ELAPSED
    assert not slot.statistics().busy


def test_state_transition_table_refuses_illegal_moves() -> None:
    res = Reservation(id=1, duration_s=1.0, workload=100.0)
    res._move(State.HELD)
    res._move(State.ENDED)
    with pytest.raises(RuntimeError):
        res._move(State.HELD)
    fresh = Reservation(id=2, duration_s=1.0, workload=100.0)
    fresh._move(State.ENDED)  # rejected or cancelled while queued
    with pytest.raises(RuntimeError):
        fresh._move(State.QUEUED)


def test_slot_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        ReservationSlot(max_reservation_s=0.0, max_queue_time_s=1.0)
    with pytest.raises(ValueError):
        ReservationSlot(max_reservation_s=10.0, max_queue_time_s=-1.0)


async def test_an_unexpected_error_in_a_hold_is_recorded_once_and_frees_the_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []

    class Broken(ReservationSlot):
        async def _hold_token(self, res: Reservation) -> ReservationResult:
            res._move(State.HELD)
            self._active = res
            self._emit("started", res)
            raise RuntimeError("bug while holding")

    slot = Broken(max_reservation_s=10.0, max_queue_time_s=1.0, observer=events.append)
    with pytest.raises(RuntimeError, match="bug while holding"):
        await slot.hold(5.0)
    assert ended(events) == [(1, Outcome.ERROR)]
    stats = slot.statistics()
    assert not stats.busy and stats.counts["error"] == 1
    # The token went back: the slot is free for the next one.
    assert slot._limiter.statistics().borrowed_tokens == 0


async def test_a_key_in_use_is_refused_before_queueing_and_free_again_after_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[ReservationEvent] = []
    slot = make_slot(events, max_queue_time_s=30.0)
    results: dict[int, ReservationResult] = {}

    async def hold(key: int, duration: float) -> None:
        results[key] = await slot.hold(duration, tag={"request_idx": key}, key=key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, 7, 10.0)  # held
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, 8, 10.0)  # queued behind it
        await trio.testing.wait_all_tasks_blocked()
        before = list(events)
        for key in (7, 8):
            with pytest.raises(DuplicateRequest) as refused:
                await slot.hold(1.0, tag={"request_idx": key}, key=key)
            assert refused.value.key == key
        assert events == before  # nothing queued, nothing for the reporter
        stats = slot.statistics()
        assert (
            stats.waiting == 1
            and stats.active is not None
            and stats.active.tag == {"request_idx": 7}
        )
        assert sum(stats.counts.values()) == 1  # only "started" for 7
    assert results[7].outcome is Outcome.ELAPSED and results[8].outcome is Outcome.ELAPSED
    assert trio.current_time() == pytest.approx(20.0)  # the refusals never waited
    # After the end the key is free: a later replay is a new reservation.
    again = await slot.hold(0.0, key=7)
    assert again.outcome is Outcome.ELAPSED
    assert [e.kind for e in events].count("ended") == 3


async def test_every_exit_path_gives_the_key_back(autojump_clock: trio.testing.MockClock) -> None:
    slot = make_slot(max_queue_time_s=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(slot.hold, 100.0, key="held"))
        await trio.testing.wait_all_tasks_blocked()
        # Rejected after max_queue_time: the key is free while the first still holds.
        with pytest.raises(QueueTimeout):
            await slot.hold(1.0, key="late")
        with pytest.raises(QueueTimeout):
            await slot.hold(1.0, key="late")
        # Cancelled while queued.
        with trio.move_on_after(1.0):
            await slot.hold(1.0, key="gone")
        with trio.move_on_after(1.0):
            await slot.hold(1.0, key="gone")
        # Released: the holder's key is free at once.
        assert slot.release() is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(slot.hold, 100.0, key="held"))
        await trio.testing.wait_all_tasks_blocked()
        slot.shutdown()
    assert slot.statistics().counts == {
        "duration_elapsed": 0,
        "explicit": 1,
        "cancelled": 2,
        "shutdown": 1,
        "rejected": 2,
        "error": 0,
        "started": 2,
    }


async def test_without_a_key_the_same_tag_may_queue_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slot = make_slot()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(partial(slot.hold, 1.0, tag={"request_idx": 5}))
            await trio.testing.wait_all_tasks_blocked()
        assert slot.statistics().waiting == 1
    assert slot.statistics().counts["duration_elapsed"] == 2
