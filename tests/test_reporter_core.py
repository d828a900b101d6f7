"""The reporter's sans-IO accounting, walked with plain synchronous calls.

As h11's ``tests/test_state.py`` walks its state machine: no network, no Trio, no clock;
each test feeds :class:`Accounting` (or the pacing arithmetic) inputs and checks what it
answers, including the inputs its state does not allow. The delivery over real sockets
is ``tests/test_reporter.py``'s.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from nullworker.worker.config import WorkerConfig
from nullworker.worker.reporter._core import (
    _MAX_PENDING_DELETES,
    RETRY_CAP_S,
    Accounting,
    TokenBucket,
    _AccountingError,
    delete_addrs,
    delete_body,
    delete_groups,
    round_backoff_s,
    try_pause_s,
)
from nullworker.worker.reservations import Outcome, Reservation, ReservationEvent

_ids = itertools.count(1)


def make_config(**overrides: Any) -> WorkerConfig:
    settings: dict[str, Any] = {
        "report_addrs": ("http://engine.test",),
        "container_id": 7,
        "master_token": "tok",
        "public_url": "http://127.0.0.1:1234",
        "unsecured": False,
    }
    settings.update(overrides)
    return WorkerConfig(**settings)


def make_acc(*, journaled: bool = False, disk_gib: float = 1.0) -> Accounting:
    return Accounting(make_config(), disk_gib=disk_gib, journaled=journaled)


def reservation(idx: int | None, *, workload: float = 100.0) -> Reservation:
    tag = {} if idx is None else {"request_idx": idx}
    return Reservation(id=next(_ids), duration_s=30.0, workload=workload, tag=tag)


def queued(acc: Accounting, res: Reservation) -> bool:
    return acc.apply(ReservationEvent("queued", res))


def ended(acc: Accounting, res: Reservation, outcome: Outcome = Outcome.RELEASED) -> bool:
    res.outcome = outcome
    res.entered_queue_at, res.started_at, res.ended_at = 1000.0, 1001.0, 1002.0
    return acc.apply(ReservationEvent("ended", res))


def deliver_status(acc: Accounting, *, now: float = 0.0) -> dict[str, Any]:
    snap = acc.status_sending(now=now, disk_gib=1.0)
    acc.status_delivered(snap)
    return snap.body


def end_and_report(acc: Accounting, *idxs: int) -> None:
    for idx in idxs:
        res = reservation(idx)
        queued(acc, res)
        ended(acc, res)
    deliver_status(acc)


# -- worker_status: snapshot and subtract ------------------------------------------------


def test_fresh_accounting_is_dirty_and_owes_an_empty_report() -> None:
    acc = make_acc()
    assert acc.dirty and acc.changed and not acc.urgent
    body = deliver_status(acc)
    assert body["new_load"] == 0.0 and body["cur_load"] == 0.0
    assert body["working_request_idxs"] == [] and body["num_requests_recieved"] == 0
    assert not acc.dirty and acc.reports_sent == 1


def test_increments_made_while_a_status_is_in_flight_survive_its_delivery() -> None:
    acc = make_acc()
    queued(acc, reservation(1))
    snap = acc.status_sending(now=5.0, disk_gib=1.0)
    assert snap.body["new_load"] == 100.0 and snap.body["working_request_idxs"] == [1]
    assert not acc.dirty and acc.last_status_round_at == 5.0
    # A second admission lands while the POST is in flight.
    assert queued(acc, reservation(2))
    assert acc.dirty
    acc.status_delivered(snap)
    # Exactly what was sent is subtracted: the second admission is still owed.
    assert acc.counters.received == 100.0
    body = deliver_status(acc)
    assert body["new_load"] == 100.0
    assert body["working_request_idxs"] == [1, 2]
    assert acc.counters.received == 0.0


def test_a_failed_status_subtracts_nothing_and_marks_the_engine_unreachable() -> None:
    acc = make_acc()
    queued(acc, reservation(1))
    snap = acc.status_sending(now=0.0, disk_gib=1.0)
    acc.status_failed(snap)
    assert acc.dirty and acc.unreachable and acc.report_failures == 1
    assert acc.counters.received == 100.0
    body = deliver_status(acc)
    assert body["new_load"] == 100.0 and not acc.unreachable


def test_an_interrupted_status_is_owed_again() -> None:
    acc = make_acc()
    snap = acc.status_sending(now=0.0, disk_gib=1.0)
    acc.status_interrupted(snap)
    assert acc.dirty and acc.reports_sent == 0
    # The in-flight slot is free again.
    deliver_status(acc)
    assert acc.reports_sent == 1


def test_the_disk_delta_is_measured_from_the_last_delivered_report() -> None:
    acc = make_acc(disk_gib=10.0)
    failed = acc.status_sending(now=0.0, disk_gib=11.0)
    assert failed.body["additional_disk_usage"] == 1.0
    acc.status_failed(failed)
    snap = acc.status_sending(now=1.0, disk_gib=12.0)
    assert snap.body["additional_disk_usage"] == 2.0  # still from the baseline
    acc.status_delivered(snap)
    snap = acc.status_sending(now=2.0, disk_gib=12.5)
    assert snap.body["additional_disk_usage"] == 0.5


def test_a_second_status_cannot_open_while_one_is_in_flight() -> None:
    acc = make_acc()
    acc.status_sending(now=0.0, disk_gib=1.0)
    with pytest.raises(_AccountingError):
        acc.status_sending(now=0.0, disk_gib=1.0)


@pytest.mark.parametrize("close", ["status_delivered", "status_failed"])
def test_only_the_status_in_flight_can_be_closed_and_only_once(close: str) -> None:
    acc = make_acc()
    snap = acc.status_sending(now=0.0, disk_gib=1.0)
    getattr(acc, close)(snap)
    with pytest.raises(_AccountingError):
        acc.status_delivered(snap)
    with pytest.raises(_AccountingError):
        acc.status_failed(snap)
    other = acc.status_sending(now=1.0, disk_gib=1.0)
    with pytest.raises(_AccountingError):
        getattr(acc, close)(snap)  # a stale snapshot, not the one in flight
    acc.status_delivered(other)


def test_assuming_the_pending_entries_reported_needs_an_unchanged_state() -> None:
    acc = make_acc()
    with pytest.raises(_AccountingError):
        acc.assume_reported()  # dirty at start: the engine has not heard anything
    deliver_status(acc)
    acc.assume_reported()


# -- inputs ---------------------------------------------------------------------------------


def test_outcomes_feed_their_counters_and_statuses() -> None:
    acc = make_acc()
    for idx, outcome in enumerate(Outcome):
        res = reservation(idx, workload=1.0)
        queued(acc, res)
        ended(acc, res, outcome)
    assert acc.counters.received == 6.0
    assert acc.counters.served == 2.0  # elapsed, released
    assert acc.counters.cancelled == 2.0  # cancelled, shutdown
    assert acc.counters.rejected == 1.0
    assert acc.counters.errored == 1.0
    statuses = [(e.status, e.success) for e in acc.pending]
    assert statuses == [
        ("Success", True),
        ("Success", True),
        ("Cancelled", True),
        ("Cancelled", True),
        ("Rejected", False),
        ("Error", False),
    ]
    body = deliver_status(acc)
    assert body["new_load"] == 4.0 and body["cur_perf"] == 2.0 and body["rej_load"] == 1.0


def test_started_changes_nothing_and_an_unknown_event_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    acc = make_acc()
    deliver_status(acc)
    acc.changed = False
    res = reservation(1)
    assert not acc.apply(ReservationEvent("started", res))
    assert not acc.apply(ReservationEvent("teleported", res))
    assert not acc.dirty and not acc.changed and not acc.working
    assert "unknown reservation event 'teleported'" in caplog.text


def test_an_end_without_admission_still_owes_its_delete_entry() -> None:
    acc = make_acc()
    assert ended(acc, reservation(9))
    assert [e.request_idx for e in acc.pending] == [9] and not acc.working
    assert acc.counters.served == 100.0


def test_a_request_idx_is_counted_once_and_a_missing_one_each_time() -> None:
    acc = make_acc()
    for idx in (5, 5, None, None, 6):
        queued(acc, reservation(idx))
    assert acc.received_count == 4


def test_only_the_first_local_hold_and_the_last_end_change_the_report() -> None:
    acc = make_acc()
    deliver_status(acc)
    assert acc.set_local_holds(1) and acc.dirty
    deliver_status(acc)
    assert not acc.set_local_holds(3) and not acc.dirty
    assert acc.load() == (100.0, 1)
    assert acc.set_local_holds(0)
    assert acc.load() == (0.0, 0)


def test_ready_clears_an_error_and_loadtime_is_strictly_positive() -> None:
    acc = make_acc()
    acc.set_error("no key")
    assert acc.urgent and acc.error_msg == "no key"
    acc.set_ready(loadtime=0.0, max_perf=100.0)
    assert acc.error_msg == "" and acc.loadtime == 1e-3 and acc.max_perf == 100.0


# -- delete_requests ------------------------------------------------------------------------


def test_an_entry_travels_only_after_a_delivered_status_showed_it_gone() -> None:
    acc = make_acc()
    res = reservation(1)
    queued(acc, res)
    ended(acc, res)
    assert not acc.has_reported_pending() and acc.next_batch() == []
    with pytest.raises(_AccountingError):
        acc.deletes_accepted(list(acc.pending))  # illegal: the engine never heard "idle"
    deliver_status(acc)
    batch = acc.next_batch()
    assert [e.request_idx for e in batch] == [1]
    acc.deletes_accepted(batch)
    assert acc.pending == [] and acc.deletes_sent == 1


def test_an_entry_ending_while_the_status_is_in_flight_waits_for_the_next_one() -> None:
    acc = make_acc()
    early, late = reservation(1), reservation(2)
    for res in (early, late):
        queued(acc, res)
    ended(acc, early)
    snap = acc.status_sending(now=0.0, disk_gib=1.0)
    ended(acc, late)
    acc.status_delivered(snap)
    assert [e.request_idx for e in acc.next_batch()] == [1]
    deliver_status(acc)
    assert [e.request_idx for e in acc.next_batch()] == [1, 2]


def test_a_failed_delete_post_keeps_its_entries() -> None:
    acc = make_acc()
    end_and_report(acc, 1, 2)
    batch = acc.next_batch()
    # No settle call at all: a failure to retry changes nothing.
    assert acc.next_batch() == batch and len(acc.pending) == 2


def test_a_refused_batch_is_bisected_until_the_bad_entry_is_alone() -> None:
    acc = make_acc()
    end_and_report(acc, *range(8))
    bad = 5
    posts = 0
    while acc.has_reported_pending():
        batch = acc.next_batch()
        posts += 1
        if any(e.request_idx == bad for e in batch):
            outcome = acc.deletes_refused(batch)
            assert outcome == ("dropped" if len(batch) == 1 else "split")
        else:
            acc.deletes_accepted(batch)
        assert posts <= 8
    # 8 refused, 4 refused, 4 accepted, 2 accepted, 2 refused, 1 accepted, 1 dropped.
    assert posts == 7
    assert acc.deletes_sent == 7 and acc.refused_deletes == 1 and acc.pending == []


def test_an_empty_or_unsendable_batch_cannot_be_settled() -> None:
    acc = make_acc()
    with pytest.raises(_AccountingError):
        acc.deletes_accepted([])
    with pytest.raises(_AccountingError):
        acc.deletes_refused([])
    res_a, res_b = reservation(1), reservation(2)
    for res in (res_a, res_b):
        queued(acc, res)
        ended(acc, res)
    with pytest.raises(_AccountingError):
        acc.deletes_refused(list(acc.pending))
    assert all(e.max_batch == 500 for e in acc.pending)  # nothing was split


def test_an_entry_dropped_while_its_post_was_in_flight_is_simply_gone() -> None:
    acc = make_acc()
    end_and_report(acc, 1)
    batch = acc.next_batch()
    acc.pending.clear()  # the bound dropped it meanwhile
    acc.deletes_accepted(batch)
    assert acc.pending == [] and acc.deletes_sent == 1


def test_the_pending_list_is_bounded_oldest_first() -> None:
    acc = make_acc(journaled=True)
    for idx in range(_MAX_PENDING_DELETES + 3):
        ended(acc, reservation(idx))
    assert acc.dropped_deletes == 3
    assert acc.pending[0].request_idx == 3
    assert acc.take_journal_strikes() == [0, 1, 2]


def test_journal_strikes_follow_accepted_and_dropped_entries_not_reused_ones() -> None:
    acc = make_acc(journaled=True)
    end_and_report(acc, 1, 2, 3)
    # request_idx 2 is held again (a retry after a 429): its line must stay.
    queued(acc, reservation(2))
    batch = acc.next_batch()
    acc.deletes_accepted(batch)
    assert acc.take_journal_strikes() == [1, 3]
    assert acc.take_journal_strikes() == []


def test_without_a_journal_nothing_is_queued_to_strike() -> None:
    acc = make_acc()
    end_and_report(acc, 1)
    acc.deletes_accepted(acc.next_batch())
    assert acc.take_journal_strikes() == []


def test_leftovers_of_a_killed_process_are_owed_as_errors() -> None:
    acc = make_acc()
    acc.queue_leftovers([4, 8], now_wall=1234.0)
    assert [(e.request_idx, e.status, e.success) for e in acc.pending] == [
        (4, "Error", False),
        (8, "Error", False),
    ]
    assert acc.pending[0].work_completed_at == 1234.0


def test_bodies_and_groups_in_both_formats() -> None:
    acc = make_acc()
    res_ok, res_bad = reservation(1), reservation(2)
    for res, outcome in ((res_ok, Outcome.RELEASED), (res_bad, Outcome.ERROR)):
        queued(acc, res)
        ended(acc, res, outcome)
    deliver_status(acc)
    batch = acc.next_batch()
    modern = make_config()
    assert delete_groups(modern, batch) == [batch]
    body = delete_body(modern, batch)
    assert body["worker_id"] == 7 and [r["request_idx"] for r in body["requests"]] == [1, 2]
    legacy = make_config(delete_requests_format="legacy")
    groups = delete_groups(legacy, batch)
    assert [[e.request_idx for e in g] for g in groups] == [[1], [2]]
    assert [delete_body(legacy, g)["success"] for g in groups] == [True, False]


def test_the_address_that_never_takes_deletes_is_left_out() -> None:
    addrs = ("https://cloud.vast.ai/api/v0/", "http://engine.test")
    assert delete_addrs(addrs) == ["http://engine.test"]


# -- scheduling and pacing --------------------------------------------------------------


def test_a_change_goes_at_once_unless_a_retry_is_pending() -> None:
    acc = make_acc()
    assert acc.due_at(0.0, retry_at=-float("inf"), heartbeat_s=10.0) is None
    deliver_status(acc, now=0.0)
    acc.changed = False
    # Nothing to do: sleep until the heartbeat.
    assert acc.due_at(1.0, retry_at=-float("inf"), heartbeat_s=10.0) == 10.0
    acc.mark_changed()
    # Backing off after a failed round: the change waits for the retry.
    assert acc.due_at(1.0, retry_at=3.0, heartbeat_s=10.0) == 3.0
    assert acc.due_at(3.0, retry_at=3.0, heartbeat_s=10.0) is None


def test_a_due_heartbeat_makes_the_unchanged_state_owed() -> None:
    acc = make_acc()
    deliver_status(acc, now=0.0)
    acc.changed = False
    assert not acc.dirty
    assert acc.due_at(10.0, retry_at=-float("inf"), heartbeat_s=10.0) is None
    assert acc.dirty


def test_the_bucket_gives_a_burst_then_one_round_per_interval() -> None:
    bucket = TokenBucket(burst=2, interval_s=1.0)
    waits = []
    now = 0.0
    for _ in range(5):
        wait = bucket.wait_s(now)
        waits.append(wait)
        now += wait
        bucket.take(now)
    assert waits == [0.0, 0.0, 1.0, 1.0, 1.0]
    # A quiet spell refills the bucket up to the burst, no more.
    assert bucket.wait_s(now + 100.0) == 0.0
    assert bucket.tokens == 2.0


def test_the_bucket_never_waits_without_an_interval() -> None:
    bucket = TokenBucket(burst=1, interval_s=0.0)
    for _ in range(3):
        assert bucket.wait_s(0.0) == 0.0
        bucket.take(0.0)


def test_backoff_doubles_and_is_capped() -> None:
    pauses = [round_backoff_s(n, engine_retry_s=0.5, heartbeat_s=10.0) for n in (1, 2, 3, 40)]
    assert pauses == [0.5, RETRY_CAP_S, RETRY_CAP_S, RETRY_CAP_S]
    assert round_backoff_s(1, engine_retry_s=0.5, heartbeat_s=0.2) == 0.2
    tries = [try_pause_s(n, engine_retry_s=0.25) for n in (1, 2, 3)]
    assert tries == [0.25, 0.5, RETRY_CAP_S]
