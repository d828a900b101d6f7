"""The routing core's decisions, as plain synchronous tests (no Trio run, no sockets).

The engine's core (:class:`nullworker.engine.Engine`) is sans-IO: each call takes a
decoded body and returns an answer. Here it runs on a hand-moved clock, and each test
walks one worker through reports and routes, checking which answer the core gives: READY
(with ``url`` and a signature the worker accepts) or WAITING. The tables below list
what a report makes of a worker, and which of those states may be routed to.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import rsa

from nullworker.engine import Engine
from nullworker.engine.records import PendingRequest, Scaling, WorkerRecord
from nullworker.engine.timeline import sample_of, wait_reasons
from nullworker.vast.signing import verify_url

URL = "http://127.0.0.1:45101"
OTHER = "http://127.0.0.1:45102"


class Clock:
    """The engine's time, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> Engine:
    return Engine(private_key=rsa_key, clock=clock, lease_s=3.0, stale_after_s=35.0)


def report(
    engine: Engine,
    worker_id: int,
    url: str = URL,
    *,
    working: tuple[int, ...] = (),
    loadtime: float = 1.5,
    error_msg: str = "",
) -> WorkerRecord | None:
    """One ``/worker_status/`` report (the fields routing reads; the rest are optional)."""
    return engine.worker_status(
        {
            "id": worker_id,
            "url": url,
            "loadtime": loadtime,
            "max_perf": 1.0,
            "cur_load": float(len(working)),
            "error_msg": error_msg,
            "num_requests_working": len(working),
            "working_request_idxs": list(working),
        }
    )


def route(engine: Engine, request_idx: int = 0) -> dict[str, Any]:
    return engine.route({"endpoint": "dev", "cost": 100, "request_idx": request_idx})


def test_a_ready_idle_worker_is_routed_and_leased(engine: Engine) -> None:
    report(engine, 1)
    assert engine.worker_state(1) == "idle"
    answer = route(engine)
    assert answer["url"] == URL
    assert verify_url(engine.private_key.public_key(), URL, answer["signature"])
    assert answer["request_idx"] == 1 and answer["reqnum"] == 1
    assert engine.worker_state(1) == "leased"
    assert engine.workers[1].lease_request_idx == 1
    assert engine.workers[1].routed_count == 1
    assert [(r.request_idx, r.worker_id) for r in engine.ready_replies] == [(1, 1)]
    assert engine.waiting == 0 and engine.counters["route_ready"] == 1


def test_waiting_when_no_worker_and_polls_are_one_request(engine: Engine) -> None:
    demand: list[int] = []
    engine.on_demand = demand.append
    first = route(engine)
    assert "url" not in first
    assert first["status"] == "WAITING" and first["request_idx"] == 1
    assert first["reason"] == "no worker has reported (this engine starts none)"
    poll = route(engine, first["request_idx"])
    assert poll["request_idx"] == 1 and poll["waiting"] == 1
    assert engine.pending[1].polls == 1
    second = route(engine)
    assert second["request_idx"] == 2 and second["waiting"] == 2
    # The hook hears the demand on each WAITING answer; a poll does not add to it.
    assert demand == [1, 1, 2]


def test_a_waiting_request_is_routed_once_a_worker_is_free(engine: Engine) -> None:
    waiting = route(engine)
    report(engine, 1)
    answer = route(engine, waiting["request_idx"])
    assert answer["url"] == URL and answer["request_idx"] == waiting["request_idx"]
    assert engine.pending == {}


def test_a_busy_worker_is_not_routed(engine: Engine) -> None:
    report(engine, 1, working=(7,))
    assert engine.worker_state(1) == "busy"
    waiting = route(engine)
    assert "url" not in waiting and waiting["workers"] == {"busy": 1}
    report(engine, 1)
    assert route(engine, waiting["request_idx"])["url"] == URL


def test_a_leased_worker_is_not_routed_until_its_lease_ends(engine: Engine, clock: Clock) -> None:
    report(engine, 1)
    assert "url" in route(engine)
    waiting = route(engine)
    assert "url" not in waiting
    clock.now += 2.9
    assert "url" not in route(engine, waiting["request_idx"])
    clock.now += 0.2  # the client never reached the worker: it is free again
    assert route(engine, waiting["request_idx"])["url"] == URL


def test_a_report_showing_the_reservation_ends_the_lease(engine: Engine, clock: Clock) -> None:
    report(engine, 1)
    routed = route(engine)
    report(engine, 1, working=(routed["request_idx"],))
    assert engine.workers[1].lease_until is None
    clock.now += 10.0  # long past the lease: still busy, by the report
    assert engine.worker_state(1) == "busy"
    assert "url" not in route(engine)


def test_a_retired_worker_is_never_routed(engine: Engine) -> None:
    report(engine, 1)
    engine.retire_worker(1, reason="stopped by dev: idle for 60 s")
    assert engine.worker_state(1) is None
    assert "url" not in route(engine)
    # Its later reports (it is still shutting down) are counted and ignored.
    assert report(engine, 1) is None
    assert engine.worker_state(1) is None
    assert "url" not in route(engine, 1)
    assert [w.id for w in engine.stopped] == [1]
    assert engine.stopped[0].stop_reason == "stopped by dev: idle for 60 s"


def test_a_registered_worker_that_never_reported_is_not_routed(engine: Engine) -> None:
    engine.register_worker(1, label="port 45101")
    assert engine.worker_state(1) == "starting"
    assert "url" not in route(engine)


def test_a_silent_worker_goes_stale_and_is_not_routed(engine: Engine, clock: Clock) -> None:
    report(engine, 1)
    clock.now += 36.0
    assert engine.worker_state(1) == "stale"
    assert "url" not in route(engine)
    report(engine, 1)
    assert route(engine, 1)["url"] == URL


def test_the_least_recently_routed_free_worker_wins(engine: Engine, clock: Clock) -> None:
    report(engine, 1, URL)
    report(engine, 2, OTHER)
    assert route(engine)["url"] == URL  # never routed: the lower id first
    assert route(engine)["url"] == OTHER
    clock.now += 3.1  # both leases over
    assert route(engine)["url"] == URL


#: What one report makes of a worker, and whether a request may go to it.
REPORT_STATES = [
    ({}, "idle", True),
    ({"working": (3,)}, "busy", False),
    ({"loadtime": 0.0}, "loading", False),
    ({"error_msg": "model failed to load"}, "error", False),
    ({"url": ""}, "idle", False),  # ready, but no address to send a client to
]


@pytest.mark.parametrize(("fields", "state", "routed"), REPORT_STATES)
def test_what_a_report_makes_of_a_worker(
    engine: Engine, fields: dict[str, Any], state: str, routed: bool
) -> None:
    report(engine, 1, **fields)
    assert engine.worker_state(1) == state
    assert ("url" in route(engine)) is routed


def test_the_wait_reasons_and_samples_read_the_records_alone() -> None:
    """The page's reading (:mod:`nullworker.engine.timeline`) needs records, no engine."""
    starting = WorkerRecord(id=4, first_seen=90.0)
    busy = WorkerRecord(
        id=5, first_seen=0.0, url=URL, loadtime=1.0, max_perf=1.0, last_report_at=99.0
    )
    busy.num_requests_working = 1
    workers = {4: starting, 5: busy}
    pending = {
        idx: PendingRequest(request_idx=idx, endpoint="dev", cost=100.0, first_seen=t, last_seen=t)
        for idx, t in ((8, 95.0), (7, 94.0))
    }
    scaling = Scaling(min_workers=0, max_workers=2, idle_timeout_s=60.0)
    assert wait_reasons(workers, pending, scaling, 100.0, 35.0) == {
        7: "no ready worker yet: worker 4 is starting (10 s)",
        8: "at --max-workers 2 (1 busy, 1 starting)",
    }
    assert sample_of(workers.values(), len(pending), 100.0, 35.0)[1:] == (2, 1, 0, 1, 0)


async def test_wait_for_wakes_when_a_lease_ends_with_no_report(
    rsa_key: rsa.RSAPrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    """A lease that ends between heartbeats turns the worker idle by time alone: a
    waiter hears of it then, not at the next report (or never, within its timeout)."""
    engine = Engine(private_key=rsa_key, lease_s=3.0, stale_after_s=35.0)
    report(engine, 1)
    route(engine)
    assert engine.worker_state(1) == "leased"
    start = trio.current_time()
    await engine.wait_for(lambda e: e.worker_state(1) == "idle", timeout=30.0)
    assert 3.0 <= trio.current_time() - start < 3.1
    # And staleness, the other state time alone changes, 35 s after the last report.
    await engine.wait_for(lambda e: e.worker_state(1) == "stale", timeout=60.0)
    assert 35.0 <= trio.current_time() - start < 35.1
