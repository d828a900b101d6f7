"""Tests of the engine reporter against a real local HTTP recorder.

The recorder is a tiny Quart-Trio app served by Hypercorn on 127.0.0.1:0 in the test's
nursery: it records every request (path, JSON body, arrival time, answered status) and
can be told to fail (HTTP 500) or to be slow. Reservation events come from a real
``ReservationSlot`` whose observer is the reporter.

A few pure client-side policy tests (per-address deadlines and default cadences in
virtual time, the ``cloud.vast.ai`` skip rule) use ``httpx.MockTransport`` with
``autojump_clock``: no socket is involved there, so the mock clock cannot jump over I/O.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import request
from quart_trio import QuartTrio

from nullworker.errors import ConfigError, NullworkerError, QueueTimeout, ShuttingDown
from nullworker.vast.signing import generate_private_key, public_key_pem
from nullworker.worker.config import WorkerConfig
from nullworker.worker.reporter import (
    PUBKEY_BACKOFF_S,
    EngineReporter,
    PubkeyUnavailable,
    send_error_beacon,
)
from nullworker.worker.reservations import ReservationSlot

from .conftest import STATUS_FIELDS, StartWorker, runtime
from .helpers import closed_url, reserved_port

STATUS = "/worker_status/"
DELETE = "/delete_requests/"
PUBKEY = "/pubkey/"

#: The longest pause between two tries while the engine is unreachable: the 1 s retry
#: cap plus its 20 % jitter, plus the 20 ms coalescing window and some slack.
MAX_RETRY_GAP_S = 1.3

DELETE_ENTRY_KEYS = {
    "request_idx",
    "success",
    "status",
    "entered_queue_at",
    "work_started_at",
    "work_completed_at",
}


# -- the recorder ----------------------------------------------------------------------


@dataclass
class Record:
    path: str
    body: Any
    at: float
    status: int | None = None  # None until answered (or forever, if the client gave up)


@dataclass
class Recorder:
    pem: str = ""
    url: str = ""
    records: list[Record] = field(default_factory=list)
    #: path -> answer the next N requests to it with 500.
    fail_next: dict[str, int] = field(default_factory=dict)
    fail_all: bool = False
    #: path -> seconds to wait before answering.
    delay_s: dict[str, float] = field(default_factory=dict)
    pubkey_body: str | None = None  # overrides the PEM when set
    #: (path, JSON body) -> a status to answer instead of 200 (None: answer as usual).
    answer_with: Callable[[str, Any], int | None] | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def attempts(self, path: str) -> list[Record]:
        return [r for r in self.records if r.path == path]

    def accepted(self, path: str) -> list[Any]:
        return [r.body for r in self.records if r.path == path and r.status == 200]

    def accepted_entries(self) -> list[dict[str, Any]]:
        return [entry for body in self.accepted(DELETE) for entry in body["requests"]]

    async def wait_for(self, predicate: Callable[[], bool], *, within_s: float = 5.0) -> None:
        with trio.fail_after(within_s):
            while not predicate():
                await self._changed.wait()

    async def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], *, within_s: float = 5.0
    ) -> dict[str, Any]:
        """The first accepted worker_status body (oldest first) matching ``predicate``."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = [b for b in self.accepted(STATUS) if predicate(b)]
            return bool(found)

        await self.wait_for(check, within_s=within_s)
        return found[0]


def _recorder_app(rec: Recorder) -> QuartTrio:
    app = QuartTrio(__name__)

    async def handle() -> Any:
        record = Record(
            path=request.path,
            body=await request.get_json(force=True, silent=True)
            if request.method == "POST"
            else None,
            at=trio.current_time(),
        )
        rec.records.append(record)
        rec._notify()
        delay = rec.delay_s.get(request.path, 0.0)
        if delay:
            await trio.sleep(delay)
        status = 200
        if rec.fail_all or rec.fail_next.get(request.path, 0) > 0:
            rec.fail_next[request.path] = max(rec.fail_next.get(request.path, 0) - 1, 0)
            status = 500
        elif rec.answer_with is not None:
            status = rec.answer_with(request.path, record.body) or 200
        record.status = status
        rec._notify()
        if status != 200:
            return {"error": "told to fail"}, status
        if request.path == PUBKEY:
            text = rec.pem if rec.pubkey_body is None else rec.pubkey_body
            return text, 200, {"Content-Type": "text/plain"}
        return {"ok": True}, 200

    for path in (STATUS, DELETE, PUBKEY):
        app.add_url_rule(path, path, handle, methods=["GET", "POST"])
    return app


MakeRecorder = Callable[..., Awaitable[Recorder]]


@pytest.fixture(scope="module")
def engine_key() -> Any:
    return generate_private_key()


@pytest.fixture
def make_recorder(nursery: trio.Nursery, engine_key: Any) -> MakeRecorder:
    async def make(*, port: int = 0, **settings: Any) -> Recorder:
        rec = Recorder(pem=public_key_pem(engine_key), **settings)
        config = HypercornConfig()
        config.bind = [f"127.0.0.1:{port}"]
        config.graceful_timeout = 0.1
        binds: list[str] = await nursery.start(hypercorn_serve, _recorder_app(rec), config)
        rec.url = binds[0]
        return rec

    return make


@pytest.fixture(autouse=True)
def _quiet_hypercorn() -> None:
    logging.getLogger("hypercorn.error").setLevel(logging.WARNING)


async def settle(
    reporter: EngineReporter, predicate: Callable[[dict[str, Any]], bool], *, within_s: float = 2.0
) -> dict[str, Any]:
    """Wait until the reporter's statistics satisfy ``predicate``.

    The recorder marks a request answered before the reporter has read the answer, so
    the reporter's own view lags by a moment; a short bounded poll covers that.
    """
    with trio.fail_after(within_s):
        while not predicate(stats := reporter.statistics()):
            await trio.sleep(0.01)
    return stats


def make_config(*addrs: str, **overrides: Any) -> WorkerConfig:
    settings: dict[str, Any] = {
        "report_addrs": tuple(addrs),
        "container_id": 7,
        "master_token": "tok",
        "public_url": "http://127.0.0.1:1234",
        "unsecured": False,
        "heartbeat_s": 30.0,
        "engine_retry_s": 0.05,
        "engine_timeout_s": 1.0,
    }
    settings.update(overrides)
    return WorkerConfig(**settings)


def make_slot(reporter: EngineReporter, *, max_queue_time_s: float = 5.0) -> ReservationSlot:
    return ReservationSlot(
        max_reservation_s=60.0, max_queue_time_s=max_queue_time_s, observer=reporter.observe
    )


async def hold(slot: ReservationSlot, duration: float, idx: int | None) -> None:
    """A hold whose refusal (429/503 in the web layer) is an expected outcome here."""
    tag = {} if idx is None else {"request_idx": idx, "reqnum": idx + 1000}
    try:
        await slot.hold(duration, tag=tag)
    except (QueueTimeout, ShuttingDown):
        pass


# -- worker_status ----------------------------------------------------------------------


async def test_worker_status_fields_and_types(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    rec = await make_recorder()
    disk = [12.5]
    reporter = EngineReporter(make_config(rec.url), disk_usage=lambda: disk[0])
    slot = make_slot(reporter)
    await nursery.start(reporter.run)
    reporter.set_ready(max_perf=100.0)
    disk[0] = 13.0
    nursery.start_soon(hold, slot, 30.0, 41)

    body = await rec.wait_status(lambda b: b["num_requests_working"] == 1)
    assert set(body) == set(STATUS_FIELDS)
    for name, kind in STATUS_FIELDS.items():
        assert type(body[name]) is kind, (name, body[name])
    assert body["id"] == 7
    assert body["mtoken"] == "tok"
    assert body["version"] == "1.1.0"
    assert body["url"] == "http://127.0.0.1:1234"
    assert body["loadtime"] > 0
    assert body["max_perf"] == 100.0
    assert body["error_msg"] == ""
    assert body["cur_load"] == 100.0
    assert body["working_request_idxs"] == [41]
    assert body["num_requests_recieved"] == 1
    assert body["cur_capacity"] == 0 and body["max_capacity"] == 0
    assert body["disk_usage"] == 13.0
    # The first delivered report measures the delta from the figure at start (12.5).
    first = rec.accepted(STATUS)[0]
    assert first["additional_disk_usage"] == pytest.approx(first["disk_usage"] - 12.5)
    # Counters: new_load over all reports is the one admission so far.
    assert sum(b["new_load"] for b in rec.accepted(STATUS)) == 100.0

    slot.release()
    idle = await rec.wait_status(lambda b: b["num_requests_working"] == 0 and b["cur_perf"] > 0)
    assert idle["cur_load"] == 0.0
    assert idle["working_request_idxs"] == []
    assert idle["cur_perf"] == 100.0


async def test_readiness_is_reported_at_once(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url, heartbeat_s=30.0))
    await nursery.start(reporter.run)
    loading = await rec.wait_status(lambda b: True, within_s=2.0)
    assert loading["loadtime"] == 0.0 and loading["max_perf"] == 0.0

    reporter.set_ready(max_perf=100.0)
    # Generous bound: the official worker could take ~11 s here; a 30 s heartbeat
    # means only the state change itself can produce this report.
    ready = await rec.wait_status(lambda b: b["max_perf"] == 100.0, within_s=1.0)
    assert ready["loadtime"] > 0
    assert ready["error_msg"] == ""


async def test_readiness_skips_the_coalescing_window_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times: list[tuple[float, float]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith(STATUS):
            times.append((trio.current_time(), json.loads(req.content)["max_perf"]))
        return httpx.Response(200, json={})

    config = make_config("http://engine.test", report_coalesce_s=0.5)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(config, http=http)
        async with trio.open_nursery() as inner:
            await inner.start(reporter.run)
            await trio.sleep(2.0)
            ready_at = trio.current_time()
            reporter.set_ready(max_perf=100.0)
            await trio.sleep(2.0)
            inner.cancel_scope.cancel()
    # The first report (loading) waits out the window; readiness goes at once.
    assert times == [(pytest.approx(0.5), 0.0), (pytest.approx(ready_at), 100.0)]


async def test_errors_are_reported_at_once_and_cleared_by_readiness(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url))
    await nursery.start(reporter.run)
    reporter.set_error("cannot fetch the engine's public key")
    errored = await rec.wait_status(lambda b: b["error_msg"] != "", within_s=1.0)
    assert errored["error_msg"] == "cannot fetch the engine's public key"
    assert reporter.statistics()["ready"] is False

    reporter.set_ready(max_perf=100.0)
    ready = await rec.wait_status(lambda b: b["max_perf"] == 100.0, within_s=1.0)
    assert ready["error_msg"] == ""
    assert reporter.statistics()["ready"] is True


async def test_busy_then_idle_reports_and_delete_are_prompt(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url))
    slot = make_slot(reporter)
    await nursery.start(reporter.run)
    reporter.set_ready(max_perf=100.0)
    await rec.wait_status(lambda b: b["max_perf"] == 100.0)

    nursery.start_soon(hold, slot, 30.0, 5)
    busy = await rec.wait_status(lambda b: b["num_requests_working"] == 1, within_s=1.0)
    assert busy["cur_load"] == 100.0 and busy["working_request_idxs"] == [5]

    slot.release()
    await rec.wait_status(
        lambda b: b["num_requests_working"] == 0 and b["cur_perf"] == 100.0, within_s=1.0
    )
    await rec.wait_for(lambda: bool(rec.accepted(DELETE)), within_s=1.0)
    entries = rec.accepted_entries()
    assert [(e["request_idx"], e["status"], e["success"]) for e in entries] == [
        (5, "Success", True)
    ]
    # The delete goes right after the worker_status that shows the worker idle.
    delivered = [r for r in rec.records if r.status == 200]
    idle_at = next(
        i
        for i, r in enumerate(delivered)
        if r.path == STATUS and r.body["num_requests_working"] == 0 and r.body["cur_perf"]
    )
    assert delivered[idle_at + 1].path == DELETE


async def test_a_burst_of_events_is_coalesced(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url, report_coalesce_s=0.3))
    slot = make_slot(reporter, max_queue_time_s=0.0)
    await nursery.start(reporter.run)
    await rec.wait_status(lambda b: True)
    before = len(rec.accepted(STATUS))

    # One hold, then nine rejections 15 ms apart: 19 events (queued + ended) spread
    # over ~0.14 s, inside one 0.3 s coalescing window.
    nursery.start_soon(hold, slot, 30.0, 100)
    await trio.testing.wait_all_tasks_blocked()
    for idx in range(101, 110):
        await hold(slot, 30.0, idx)
        await trio.sleep(0.015)

    def burst_seen() -> bool:
        return bool(sum(b["rej_load"] for b in rec.accepted(STATUS)) == 900.0)

    await rec.wait_for(burst_seen, within_s=2.0)
    after = rec.accepted(STATUS)[before:]
    assert len(after) <= 3, [(b["cur_load"], b["rej_load"]) for b in after]
    assert after[-1]["cur_load"] == 100.0
    assert after[-1]["num_requests_recieved"] == 10
    slot.release()


async def test_sustained_changes_are_paced_and_the_last_state_is_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    statuses: list[tuple[float, dict[str, Any]]] = []
    deleted: list[int] = []

    def handler(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        if req.url.path.endswith(STATUS):
            statuses.append((trio.current_time(), body))
        else:
            deleted.extend(entry["request_idx"] for entry in body["requests"])
        return httpx.Response(200, json={})

    config = make_config("http://engine.test")  # 20 ms coalescing, the default pacing
    assert (config.report_burst, config.report_interval_s) == (2, 1.0)
    churn = 3000
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(config, http=http)
        slot = make_slot(reporter)
        async with trio.open_nursery() as inner:
            await inner.start(reporter.run)
            await trio.sleep(5.0)  # the first report, then a quiet spell
            start = trio.current_time()
            for idx in range(churn):  # 60 s of back-to-back short reservations
                await hold(slot, 0.0, idx)
                await trio.sleep(0.02)
            end = trio.current_time()
            await trio.sleep(5.0)
            short_at = trio.current_time()
            inner.start_soon(hold, slot, 0.1, 5000)  # a short one after a quiet spell
            await trio.sleep(3.0)
            inner.cancel_scope.cancel()

    during = [t for t, _ in statuses if start <= t <= end]
    # Unpaced, a round per 20 ms window: about 3,000. Paced: the burst of 2, then one a
    # second, about the official worker's cadence.
    print(f"{len(during)} worker_status rounds in {end - start:.0f} s of churn")
    assert len(during) <= 61 + config.report_burst, len(during)
    assert len(during) >= 50  # and it keeps reporting all along
    gaps = [b - a for a, b in itertools.pairwise(during[config.report_burst :])]
    assert all(gap >= 1.0 - 1e-6 for gap in gaps), gaps
    # The first change after the quiet spell goes at once (the coalescing window only).
    assert during[0] - start == pytest.approx(config.report_coalesce_s)
    # Nothing is lost to the pacing: the state after the churn, every request once, and
    # the counters of every change in between carried by some round.
    settled = [body for t, body in statuses if end < t < short_at]
    assert settled and settled[-1]["num_requests_working"] == 0
    assert settled[-1]["num_requests_recieved"] == churn
    assert sum(body["new_load"] for t, body in statuses if t < short_at) == 100.0 * churn
    assert sum(body["cur_perf"] for t, body in statuses if t < short_at) == 100.0 * churn
    assert sorted(deleted) == [*range(churn), 5000]
    # A short reservation after a quiet spell: its busy and its idle both go at once.
    busy_at = next(t for t, body in statuses if body["working_request_idxs"] == [5000])
    assert busy_at - short_at == pytest.approx(config.report_coalesce_s)
    idle_at = next(t for t, body in statuses if t > busy_at and body["cur_perf"] == 100.0)
    assert idle_at - short_at == pytest.approx(0.1 + config.report_coalesce_s)


async def test_delete_entries_keep_up_with_churn_faster_than_a_batch_per_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """1,000 reservations a second end, one round a second goes out: no backlog grows."""
    deleted: list[int] = []
    posts: list[int] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith(DELETE):
            entries = json.loads(req.content)["requests"]
            posts.append(len(entries))
            deleted.extend(entry["request_idx"] for entry in entries)
        return httpx.Response(200, json={})

    config = make_config("http://engine.test")
    churn = 8000
    most_pending = 0
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(config, http=http)
        slot = make_slot(reporter)
        async with trio.open_nursery() as inner:
            await inner.start(reporter.run)
            await trio.sleep(5.0)
            for idx in range(churn):  # 8 s at 1,000 a second
                await hold(slot, 0.0, idx)
                await trio.sleep(0.001)
                most_pending = max(most_pending, reporter.statistics()["pending_deletes"])
            await trio.sleep(3.0)
            inner.cancel_scope.cancel()

    stats = reporter.statistics()
    assert most_pending <= 2500, most_pending  # about two seconds' worth at most
    assert stats["pending_deletes"] == 0 and stats["dropped_deletes"] == 0
    assert sorted(deleted) == list(range(churn))  # each exactly once
    assert max(posts) <= 500


def test_report_pacing_comes_from_the_environment() -> None:
    env = {
        "REPORT_ADDR": "http://127.0.0.1:1",
        "CONTAINER_ID": "7",
        "NULLWORKER_PUBLIC_URL": "http://127.0.0.1:3000",
    }
    default = WorkerConfig.from_env(env)
    assert (default.report_burst, default.report_interval_s) == (2, 1.0)
    config = WorkerConfig.from_env(
        env | {"NULLWORKER_REPORT_BURST": "4", "NULLWORKER_REPORT_INTERVAL_SECONDS": "0.2"}
    )
    assert (config.report_burst, config.report_interval_s) == (4, 0.2)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NULLWORKER_REPORT_BURST", "0"),
        ("NULLWORKER_REPORT_BURST", "two"),
        ("NULLWORKER_REPORT_BURST", "1.5"),
        ("NULLWORKER_REPORT_INTERVAL_SECONDS", "-1"),
        ("NULLWORKER_REPORT_INTERVAL_SECONDS", "nan"),
        ("NULLWORKER_REPORT_INTERVAL_SECONDS", "soon"),
    ],
)
def test_bad_report_pacing_is_one_line_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env({variable: value})
    message = str(caught.value)
    assert variable in message and "\n" not in message


async def test_heartbeat_without_state_changes(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url, heartbeat_s=0.2), disk_usage=lambda: 1.0)
    await nursery.start(reporter.run)
    await rec.wait_for(lambda: len(rec.accepted(STATUS)) >= 4, within_s=3.0)
    bodies = rec.accepted(STATUS)
    assert all(b["new_load"] == 0.0 and b["cur_load"] == 0.0 for b in bodies)
    assert all(b == bodies[1] for b in bodies[1:])  # the same state, re-sent
    await settle(reporter, lambda st: st["reports_sent"] >= 4)


async def test_increments_during_an_in_flight_post_are_kept(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    rec = await make_recorder()
    rec.delay_s[STATUS] = 0.25  # every worker_status is in flight for a while
    reporter = EngineReporter(make_config(rec.url))
    slot = make_slot(reporter)
    await nursery.start(reporter.run)

    # Eight 60 ms holds queued at once: they end one after another while POSTs are
    # in flight, so a reset-after-send would lose most of the served workload.
    for idx in range(1, 9):
        nursery.start_soon(hold, slot, 0.06, idx)

    def all_served() -> bool:
        return bool(sum(b["cur_perf"] for b in rec.accepted(STATUS)) >= 800.0)

    await rec.wait_for(all_served, within_s=4.0)
    bodies = rec.accepted(STATUS)
    assert sum(b["new_load"] for b in bodies) == 800.0
    assert sum(b["cur_perf"] for b in bodies) == 800.0
    assert len(bodies) < 9  # reports did overlap with the events
    await rec.wait_for(lambda: len(rec.accepted_entries()) == 8, within_s=2.0)
    assert sorted(e["request_idx"] for e in rec.accepted_entries()) == list(range(1, 9))


# -- fallback and deadlines -------------------------------------------------------------


async def test_fallback_to_the_second_address_with_bounded_attempts(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    bad = await make_recorder(fail_all=True)
    good = await make_recorder()
    reporter = EngineReporter(make_config(bad.url, good.url, engine_tries=2))
    await nursery.start(reporter.run)
    await good.wait_status(lambda b: True, within_s=2.0)
    assert len(bad.attempts(STATUS)) == 2

    reporter.set_ready(max_perf=100.0)
    await good.wait_status(lambda b: b["max_perf"] == 100.0, within_s=2.0)
    # Every round starts again at the first address, with the same bound there.
    assert len(bad.attempts(STATUS)) == 2 * len(good.accepted(STATUS)) == 4
    assert reporter.statistics()["report_failures"] == 0


@pytest.mark.parametrize("failure", ["hangs", "refuses"])
async def test_a_dead_first_address_has_its_own_deadline(
    make_recorder: MakeRecorder, nursery: trio.Nursery, failure: str
) -> None:
    good = await make_recorder()
    if failure == "hangs":
        slow = await make_recorder()
        slow.delay_s[STATUS] = 30.0
        first = slow.url
    else:
        first = closed_url()
    reporter = EngineReporter(make_config(first, good.url, engine_tries=2, engine_timeout_s=0.2))
    await nursery.start(reporter.run)
    # Worst case at the first address: 2 tries x 0.2 s + 0.05 s backoff.
    await good.wait_status(lambda b: True, within_s=2.0)
    await settle(reporter, lambda st: st["reports_sent"] == 1)


async def test_each_address_gets_its_own_deadline_in_virtual_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    arrivals: list[tuple[str, float]] = []

    async def handler(req: httpx.Request) -> httpx.Response:
        arrivals.append((req.url.host, trio.current_time()))
        if req.url.host == "hung.test":
            await trio.sleep(1000)  # never answers
        return httpx.Response(200, json={})

    config = make_config(
        "http://hung.test",
        "http://good.test",
        engine_timeout_s=5.0,
        engine_tries=3,
        engine_retry_s=0.5,
        report_coalesce_s=0.0,
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(config, http=http)
        start = trio.current_time()
        await nursery.start(reporter.run)
        with trio.fail_after(100):
            while not any(host == "good.test" for host, _ in arrivals):
                await trio.sleep(0.1)
    hung = [t - start for host, t in arrivals if host == "hung.test"]
    good = [t - start for host, t in arrivals if host == "good.test"]
    # 3 tries of 5 s with 0.5 s and 1 s between them, then the next address.
    assert hung == pytest.approx([0.0, 5.5, 11.5])
    assert good[0] == pytest.approx(16.5)


async def test_default_heartbeat_cadence_in_virtual_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    times: list[float] = []

    def handler(req: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        return httpx.Response(200, json={})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(
            WorkerConfig(report_addrs=("http://engine.test",), container_id=1), http=http
        )
        async with trio.open_nursery() as inner:
            await inner.start(reporter.run)
            await trio.sleep(35.0)
            inner.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 4
    assert all(10.0 <= gap <= 10.1 for gap in gaps), gaps


async def test_unreachable_engine_is_retried_with_backoff_and_no_secrets_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[float] = []

    def handler(req: httpx.Request) -> httpx.Response:
        attempts.append(trio.current_time())
        return httpx.Response(500, text="down")

    config = make_config(
        "http://engine.test", master_token="s3cret-token", engine_retry_s=0.5, heartbeat_s=10.0
    )
    caplog.set_level(logging.DEBUG, logger="nullworker.reporter")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(config, http=http)
        async with trio.open_nursery() as inner:
            await inner.start(reporter.run)
            await trio.sleep(120.0)
            inner.cancel_scope.cancel()
    stats = reporter.statistics()
    # Rounds keep coming (never given up) but never spin: 3 tries in the first round,
    # then one per round, about a second apart.
    assert 100 <= len(attempts) <= 1.5 * 120
    assert max(b - a for a, b in itertools.pairwise(attempts)) <= MAX_RETRY_GAP_S
    assert stats["report_failures"] == len(attempts) - 2
    assert stats["reports_sent"] == 0
    assert "HTTP 500" in stats["last_error"]
    assert "s3cret-token" not in caplog.text
    assert "s3cret-token" not in json.dumps(stats)
    # One warning when it starts failing, then at most one a minute (the rest: debug).
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "not delivered" in r.getMessage()
    ]
    assert 1 <= len(warnings) <= 2


# -- delete_requests ----------------------------------------------------------------------


async def test_delete_requests_191_body(make_recorder: MakeRecorder, nursery: trio.Nursery) -> None:
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url))
    slot = make_slot(reporter, max_queue_time_s=0.0)
    await nursery.start(reporter.run)

    nursery.start_soon(hold, slot, 0.3, 1)  # elapses -> Success
    await trio.testing.wait_all_tasks_blocked()
    await hold(slot, 1.0, 2)  # slot busy, no queueing -> Rejected
    await slot.wait_idle()
    with trio.move_on_after(0.05):  # held, then the holder goes away -> Cancelled
        await hold(slot, 30.0, 3)
    await hold(slot, 0.0, None)  # no request_idx: counters only

    await rec.wait_for(lambda: len(rec.accepted_entries()) == 3, within_s=2.0)
    for body in rec.accepted(DELETE):
        assert set(body) == {"worker_id", "mtoken", "requests"}
        assert body["worker_id"] == 7 and body["mtoken"] == "tok"
    by_idx = {e["request_idx"]: e for e in rec.accepted_entries()}
    assert set(by_idx) == {1, 2, 3}
    for entry in by_idx.values():
        assert set(entry) == DELETE_ENTRY_KEYS
        for key in ("entered_queue_at", "work_started_at", "work_completed_at"):
            assert type(entry[key]) is float
    assert (by_idx[1]["status"], by_idx[1]["success"]) == ("Success", True)
    assert (by_idx[2]["status"], by_idx[2]["success"]) == ("Rejected", False)
    assert (by_idx[3]["status"], by_idx[3]["success"]) == ("Cancelled", True)
    one = by_idx[1]
    assert 0 < one["entered_queue_at"] <= one["work_started_at"] <= one["work_completed_at"]
    assert by_idx[2]["work_started_at"] == 0.0 and by_idx[2]["work_completed_at"] > 0
    # Counters: served 1 (+ the idx-less one), rejected 1, cancelled 1.
    await rec.wait_status(lambda b: True)
    await rec.wait_for(
        lambda: sum(b["cur_perf"] for b in rec.accepted(STATUS)) == 200.0, within_s=2.0
    )
    bodies = rec.accepted(STATUS)
    assert sum(b["rej_load"] for b in bodies) == 100.0
    await settle(reporter, lambda st: st["pending_deletes"] == 0)


async def test_delete_requests_legacy_bodies(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url, delete_requests_format="legacy"))
    slot = make_slot(reporter, max_queue_time_s=0.0)
    await nursery.start(reporter.run)

    nursery.start_soon(hold, slot, 30.0, 11)
    await trio.testing.wait_all_tasks_blocked()
    await hold(slot, 1.0, 12)  # rejected
    slot.release()  # 11 succeeds in the same burst

    def both_sent() -> bool:
        return sum(len(b["request_idxs"]) for b in rec.accepted(DELETE)) == 2

    await rec.wait_for(both_sent, within_s=2.0)
    bodies = rec.accepted(DELETE)
    for body in bodies:
        assert set(body) == {"worker_id", "mtoken", "request_idxs", "success"}
        assert body["worker_id"] == 7 and body["mtoken"] == "tok"
    pairs = {(idx, body["success"]) for body in bodies for idx in body["request_idxs"]}
    assert pairs == {(11, True), (12, False)}
    assert [b["success"] for b in bodies] == [True, False]  # the official order


async def test_legacy_groups_are_each_delivered_once_across_fallback(nursery: trio.Nursery) -> None:
    seen: list[tuple[str, bool, list[int]]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path != DELETE:
            return httpx.Response(200, json={})
        body = json.loads(req.content)
        seen.append((req.url.host, body["success"], body["request_idxs"]))
        if req.url.host == "first.test" and body["success"] is False:
            return httpx.Response(503)  # accepts the successes, fails the failures
        return httpx.Response(200, json={})

    config = make_config(
        "http://first.test",
        "http://second.test",
        delete_requests_format="legacy",
        engine_tries=1,
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(config, http=http)
        slot = make_slot(reporter, max_queue_time_s=0.0)
        nursery.start_soon(hold, slot, 30.0, 1)
        await trio.testing.wait_all_tasks_blocked()
        await hold(slot, 1.0, 2)
        slot.release()
        await slot.wait_idle()
        await reporter.flush(timeout_s=5.0)
    assert seen == [
        ("first.test", True, [1]),
        ("first.test", False, [2]),
        ("second.test", False, [2]),  # only the group the first address refused
    ]
    assert reporter.statistics()["pending_deletes"] == 0


@pytest.mark.parametrize("tries", [1, 2])
async def test_each_request_is_deleted_exactly_once_after_a_failed_try(
    make_recorder: MakeRecorder, nursery: trio.Nursery, tries: int
) -> None:
    rec = await make_recorder()
    rec.fail_next[DELETE] = 1
    reporter = EngineReporter(make_config(rec.url, engine_tries=tries))
    slot = make_slot(reporter)
    await nursery.start(reporter.run)

    await hold(slot, 0.0, 1)
    await rec.wait_for(lambda: len(rec.accepted_entries()) == 1, within_s=2.0)
    await hold(slot, 0.0, 2)
    await rec.wait_for(lambda: len(rec.accepted_entries()) == 2, within_s=2.0)
    await rec.wait_status(lambda b: b["num_requests_recieved"] == 2)
    # The failed first POST carried idx 1 too; it was re-sent once, and never again.
    assert [e["request_idx"] for e in rec.accepted_entries()] == [1, 2]
    assert len(rec.attempts(DELETE)) == 3
    await settle(reporter, lambda st: st["pending_deletes"] == 0 and st["deletes_sent"] == 2)


async def test_delete_requests_skip_the_cloud_api_address(nursery: trio.Nursery) -> None:
    urls: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        urls.append(str(req.url))
        return httpx.Response(200, json={})

    config = make_config("https://cloud.vast.ai/api/v0", "http://engine.test")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(config, http=http)
        slot = make_slot(reporter)
        await hold(slot, 0.0, 3)
        await reporter.flush(timeout_s=5.0)
    # worker_status still goes to it (the first address accepted, so no fallback).
    assert urls == [
        "https://cloud.vast.ai/api/v0/worker_status/",
        "http://engine.test/delete_requests/",
    ]


# -- flush and run edges ------------------------------------------------------------------


async def test_flush_sends_what_is_pending(make_recorder: MakeRecorder) -> None:
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url))
    slot = make_slot(reporter)
    await hold(slot, 0.0, 9)
    await reporter.flush(timeout_s=2.0)
    assert len(rec.accepted(STATUS)) == 1
    assert [e["request_idx"] for e in rec.accepted_entries()] == [9]
    stats = reporter.statistics()
    assert stats["pending_deletes"] == 0
    assert isinstance(stats["last_report_age_s"], float)
    json.dumps(stats)  # JSON-ready


async def test_flush_is_bounded_and_keeps_undelivered_requests(
    make_recorder: MakeRecorder,
) -> None:
    rec = await make_recorder()
    rec.delay_s[STATUS] = 30.0
    reporter = EngineReporter(make_config(rec.url, engine_timeout_s=5.0))
    slot = make_slot(reporter)
    await hold(slot, 0.0, 9)
    with trio.fail_after(2.0):
        await reporter.flush(timeout_s=0.3)
    assert reporter.statistics()["pending_deletes"] == 1
    assert rec.accepted(DELETE) == []


async def test_run_without_addresses_just_sleeps() -> None:
    reporter = EngineReporter(WorkerConfig())
    async with trio.open_nursery() as nursery:
        await nursery.start(reporter.run)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert reporter.statistics()["reports_sent"] == 0


def test_observe_never_raises_on_odd_input() -> None:
    reporter = EngineReporter(make_config("http://127.0.0.1:9"))
    slot = ReservationSlot(max_reservation_s=1.0, max_queue_time_s=0.0)
    slot.add_observer(reporter.observe)

    async def main() -> None:
        await slot.hold(0.0, tag={"request_idx": "not-an-int"})
        await slot.hold(0.0, tag={"request_idx": True})

    trio.run(main)
    stats = reporter.statistics()
    assert stats["pending_deletes"] == 0  # no usable request_idx: counters only
    assert stats["num_requests_received"] == 2
    assert stats["num_requests_working"] == 0


async def test_received_count_dedupes_a_reused_request_idx(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url))
    slot = make_slot(reporter, max_queue_time_s=0.0)
    await nursery.start(reporter.run)
    nursery.start_soon(hold, slot, 30.0, 5)
    await trio.testing.wait_all_tasks_blocked()
    await hold(slot, 1.0, 5)  # the client retried with the same request_idx: rejected
    body = await rec.wait_status(lambda b: sum(x["rej_load"] for x in rec.accepted(STATUS)) > 0)
    assert body["num_requests_recieved"] == 1
    slot.release()


# -- pubkey -------------------------------------------------------------------------------


async def test_pubkey_retries_each_address_by_its_own_url(
    make_recorder: MakeRecorder, engine_key: Any
) -> None:
    first = await make_recorder(fail_all=True)
    second = await make_recorder()
    second.fail_next[PUBKEY] = 1
    reporter = EngineReporter(make_config(first.url, second.url))
    with trio.fail_after(3.0):
        key = await reporter.fetch_pubkey()
    assert key.public_numbers() == engine_key.public_key().public_numbers()
    # Round 1: both fail; 0.25 s later round 2: the first fails again, the second serves.
    assert [r.path for r in first.records] == [PUBKEY, PUBKEY]
    assert [r.path for r in second.records] == [PUBKEY, PUBKEY]


async def test_pubkey_gives_up_with_a_clear_error(make_recorder: MakeRecorder) -> None:
    failing = await make_recorder(fail_all=True)
    garbage = await make_recorder(pubkey_body="this is not a PEM key")
    reporter = EngineReporter(make_config(failing.url, garbage.url, closed_url()))
    with pytest.raises(PubkeyUnavailable) as info, trio.fail_after(3.0):
        await reporter.fetch_pubkey(backoff_s=(0.01, 0.01))
    assert isinstance(info.value, NullworkerError)
    assert "3 rounds" in str(info.value)
    assert len(failing.attempts(PUBKEY)) == 3
    assert len(garbage.attempts(PUBKEY)) == 3


async def test_pubkey_default_schedule_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times: list[float] = []

    def handler(req: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(make_config("http://engine.test"), http=http)
        start = trio.current_time()
        with pytest.raises(PubkeyUnavailable):
            await reporter.fetch_pubkey()
    assert len(times) == len(PUBKEY_BACKOFF_S) + 1 == 5
    assert [t - start for t in times] == pytest.approx([0.0, 0.25, 0.75, 1.75, 2.75])


# -- error beacon -------------------------------------------------------------------------


async def test_error_beacon_reaches_every_address(make_recorder: MakeRecorder) -> None:
    failing = await make_recorder(fail_all=True)
    good = await make_recorder()
    config = make_config(failing.url, good.url)
    with trio.fail_after(3.0):
        assert await send_error_beacon(config, "Worker Server failed to launch: boom") is True
    assert len(failing.attempts(STATUS)) == 1
    [body] = good.accepted(STATUS)
    assert set(body) == set(STATUS_FIELDS)
    assert body["error_msg"] == "Worker Server failed to launch: boom"
    assert (body["id"], body["mtoken"], body["version"]) == (7, "tok", "1.1.0")
    assert body["loadtime"] == 0.0 and body["max_perf"] == 0.0


async def test_error_beacon_reports_failure_within_its_bound(make_recorder: MakeRecorder) -> None:
    failing = await make_recorder(fail_all=True)
    slow = await make_recorder()
    slow.delay_s[STATUS] = 30.0
    config = make_config(failing.url, slow.url, closed_url(), engine_timeout_s=0.3)
    with trio.fail_after(2.0):
        assert await send_error_beacon(config, "boom") is False
    assert len(failing.attempts(STATUS)) == 1


async def test_worker_without_the_engine_key_reports_the_error_then_recovers(
    make_recorder: MakeRecorder, start_worker: StartWorker
) -> None:
    """A failed key fetch is an error the engine sees, and it is not sticky.

    See docs/protocol.md §10.3, §10.8.
    """
    rec = await make_recorder()
    rec.fail_next[PUBKEY] = 5  # the whole first round of tries fails
    config = make_config(rec.url)
    settings = {
        name: getattr(config, name)
        for name in ("report_addrs", "container_id", "master_token", "unsecured")
    }
    async with trio.open_nursery() as nursery:
        ready: list[Any] = []

        async def start() -> None:
            ready.append(await start_worker(**settings, engine_retry_s=0.05))

        nursery.start_soon(start)
        errored = await rec.wait_status(lambda b: "public key" in b["error_msg"], within_s=10)
        assert errored["max_perf"] == 0.0
        recovered = await rec.wait_status(
            lambda b: b["max_perf"] == 100.0 and b["error_msg"] == "", within_s=10
        )
        assert recovered["loadtime"] > 0
    assert ready and runtime(ready[0]).public_key is not None
    assert len(rec.attempts(PUBKEY)) == 6


async def test_a_report_cancelled_in_flight_is_sent_again_before_the_deletes(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    """Shutdown cancels the loop mid-POST; the final flush must not skip that state."""
    rec = await make_recorder()
    reporter = EngineReporter(make_config(rec.url, engine_timeout_s=5.0))
    slot = make_slot(reporter)
    with trio.CancelScope() as loop_scope:
        async with trio.open_nursery() as loop:
            await loop.start(reporter.run)
            reporter.set_ready(max_perf=100.0)
            nursery.start_soon(hold, slot, 30.0, 42)
            await rec.wait_status(lambda b: b["working_request_idxs"] == [42])
            rec.delay_s[STATUS] = 3.0  # the idle report will hang in flight
            slot.release()
            await rec.wait_for(lambda: any(r.status is None for r in rec.attempts(STATUS)))
            loop_scope.cancel()  # what shutdown does to the report loop
    rec.delay_s.clear()
    await reporter.flush(timeout_s=2.0)
    delivered = [r for r in rec.records if r.status == 200]
    delete_at = next(i for i, r in enumerate(delivered) if r.path == DELETE)
    last_status = [r for r in delivered[:delete_at] if r.path == STATUS][-1]
    assert last_status.body["num_requests_working"] == 0
    assert [e["request_idx"] for e in rec.accepted_entries()] == [42]


# -- faults: refused delete entries, engine outages, unreachable addresses ----------------


def _delete_idxs(body: Any) -> list[int]:
    """The request_idx values a delete_requests body carries, in either shape."""
    if "requests" in body:
        return [entry["request_idx"] for entry in body["requests"]]
    return list(body["request_idxs"])


@pytest.mark.parametrize("fmt", ["1.9.1", "legacy"])
async def test_a_refused_delete_entry_is_dropped_and_the_rest_delivered_once(
    make_recorder: MakeRecorder,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    fmt: str,
) -> None:
    """An engine that answers 400 to any batch carrying one request_idx: no endless retry."""
    bad = 13
    rec = await make_recorder()
    rec.answer_with = lambda path, body: (
        400 if path == DELETE and bad in _delete_idxs(body) else None
    )
    caplog.set_level(logging.DEBUG, logger="nullworker.reporter")
    # Bisection sends one POST per round: a faster pacing than the default keeps it short.
    config = make_config(rec.url, delete_requests_format=fmt, report_burst=4, report_interval_s=0.2)
    reporter = EngineReporter(config)
    slot = make_slot(reporter)
    for idx in range(10, 18):  # ended before the loop runs: one batch of 8
        await hold(slot, 0.0, idx)
    await nursery.start(reporter.run)

    await settle(reporter, lambda st: st["pending_deletes"] == 0, within_s=5.0)
    delivered = sorted(idx for body in rec.accepted(DELETE) for idx in _delete_idxs(body))
    assert delivered == [10, 11, 12, 14, 15, 16, 17]  # each good entry exactly once
    # Bisection: 8 (refused), 4 (refused), 2, 2 (refused), 1, 1 (refused: dropped), 4.
    assert len(rec.attempts(DELETE)) == 7
    dropped = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "request_idx" in r.getMessage()
    ]
    assert len(dropped) == 1
    assert "request_idx 13" in dropped[0] and "HTTP 400" in dropped[0]

    # Settled: nothing more is sent, and the next ended request goes through as usual.
    await trio.sleep(0.3)
    assert len(rec.attempts(DELETE)) == 7
    await hold(slot, 0.0, 20)
    await rec.wait_for(lambda: 20 in [i for b in rec.accepted(DELETE) for i in _delete_idxs(b)])
    stats = await settle(reporter, lambda st: st["pending_deletes"] == 0)
    assert (stats["deletes_sent"], stats["refused_deletes"]) == (8, 1)
    assert len(rec.attempts(DELETE)) == 8


@pytest.mark.parametrize("busy", [False, True], ids=["quiet", "busy"])
@pytest.mark.parametrize("down", ["refused", "503"])
async def test_after_an_outage_the_engine_hears_the_current_state_within_2s(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, down: str, busy: bool
) -> None:
    """Two minutes of outage (virtual time) with the default retry settings.

    ``busy``: a client is refused every 0.25 s all along, so the state keeps changing;
    those changes must not start rounds of their own against the unreachable engine.
    """
    engine_up = False
    tried: list[float] = []  # worker_status tries while the engine is down
    accepted: list[tuple[float, dict[str, Any]]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if not engine_up:
            tried.append(trio.current_time())
            if down == "refused":
                raise httpx.ConnectError("connection refused", request=req)
            return httpx.Response(503)
        if req.url.path == STATUS:
            accepted.append((trio.current_time(), json.loads(req.content)))
        return httpx.Response(200, json={})

    config = make_config(
        "http://engine.test", engine_retry_s=0.5, engine_timeout_s=5.0, heartbeat_s=10.0
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(config, http=http)
        slot = ReservationSlot(
            max_reservation_s=1000.0, max_queue_time_s=0.0, observer=reporter.observe
        )
        start = trio.current_time()
        await nursery.start(reporter.run)
        reporter.set_ready(max_perf=100.0)
        refused = 0
        if busy:
            nursery.start_soon(hold, slot, 1000.0, 1)
            while trio.current_time() - start < 120.0:
                await trio.sleep(0.25)
                await hold(slot, 30.0, 100 + refused)  # the slot is held: rejected
                refused += 1
        else:
            await trio.sleep(120.0)
        engine_up = True
        back = trio.current_time()
        with trio.move_on_after(60.0):
            while not accepted:
                await trio.sleep(0.01)

    rate = len(tried) / (back - start)
    assert rate <= 1.5, f"{len(tried)} tries in {back - start:.0f} s"
    assert accepted, "nothing delivered within 60 s of the engine coming back"
    at, body = accepted[0]
    assert at - back <= 2.0
    # The current state, with everything that happened during the outage.
    assert body["max_perf"] == 100.0
    if busy:
        assert body["working_request_idxs"] == [1]
        assert body["rej_load"] == 100.0 * refused
        assert body["num_requests_recieved"] == 1 + refused


@pytest.mark.parametrize("down", ["closed", "500"])
async def test_a_real_engine_back_after_an_outage_hears_the_state_within_2s(
    make_recorder: MakeRecorder, nursery: trio.Nursery, down: str
) -> None:
    """The same over real sockets: a closed port (then an engine on it), or HTTP 500s."""
    outage_s = 5.0
    if down == "closed":
        addr = f"http://127.0.0.1:{reserved_port()}"  # an engine binds it later
    else:
        failing = await make_recorder(fail_all=True)
        addr = failing.url
    # A small engine_retry_s, so that a doubling backoff would outgrow 2 s within the
    # outage; the state changes just before the engine is back.
    reporter = EngineReporter(make_config(addr, engine_retry_s=0.01))
    slot = make_slot(reporter)
    await nursery.start(reporter.run)
    await trio.sleep(outage_s - 0.3)
    reporter.set_ready(max_perf=100.0)
    nursery.start_soon(hold, slot, 30.0, 77)
    await trio.sleep(0.3)

    if down == "closed":
        rec = await make_recorder(port=int(addr.rsplit(":", 1)[1]))
    else:
        rec = failing
        rec.fail_all = False
    back = trio.current_time()
    body = await rec.wait_status(lambda b: True, within_s=10.0)
    seen_after = next(r.at for r in rec.records if r.status == 200) - back
    assert seen_after <= 2.0
    assert body["max_perf"] == 100.0 and body["working_request_idxs"] == [77]
    slot.release()


async def test_a_worker_started_during_an_outage_is_ready_within_2s_of_the_engine(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, engine_key: Any
) -> None:
    """The key fetch of a worker that starts while the engine is down (virtual time)."""
    from nullworker.worker import Worker

    engine_up = False
    tried: dict[str, list[float]] = {STATUS: [], PUBKEY: []}
    seen_ready: list[float] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if not engine_up:
            tried.setdefault(req.url.path, []).append(trio.current_time())
            raise httpx.ConnectError("connection refused", request=req)
        if req.url.path == PUBKEY:
            return httpx.Response(200, text=public_key_pem(engine_key))
        if req.url.path == STATUS and json.loads(req.content)["max_perf"] > 0:
            seen_ready.append(trio.current_time())
        return httpx.Response(200, json={})

    config = make_config("http://engine.test", engine_retry_s=0.5, heartbeat_s=10.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        worker = Worker(config.replace(port=0, control_port=None))
        worker.reporter = EngineReporter(worker.config, http=http)
        start = trio.current_time()
        await nursery.start(worker.reporter.run)
        nursery.start_soon(worker._become_ready)  # what Worker.run starts
        await trio.sleep(60.0)
        assert not worker.ready.is_set()
        assert worker.error is not None and "public key" in worker.error
        engine_up = True
        back = trio.current_time()
        ready_at = math.inf
        with trio.move_on_after(120.0):
            await worker.ready.wait()
            ready_at = trio.current_time()
            while not seen_ready:
                await trio.sleep(0.01)

    assert ready_at - back <= 2.0
    assert seen_ready, "the engine did not hear of the readiness within 120 s"
    assert seen_ready[0] - back <= 2.0
    assert worker.public_key is not None and worker.error is None
    # Every request to the address (reports and key fetches together), not per path.
    counts = {path: len(times) for path, times in tried.items()}
    assert sum(counts.values()) / (back - start) <= 1.5, f"{counts} in {back - start:.0f} s"


async def test_an_address_that_cannot_be_connected_to_fails_fast(
    make_recorder: MakeRecorder, nursery: trio.Nursery
) -> None:
    """Opening a connection has its own short bound, inside engine_timeout_s.

    The first address listens but never accepts (its backlog is full, so connection
    attempts hang): nothing can reach an engine there, and the next address is used
    after the connect bound (2 s) rather than after a whole engine_timeout_s (10 s).
    """
    good = await make_recorder()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(3):  # fill the accept queue: later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            reporter = EngineReporter(
                make_config(
                    f"http://127.0.0.1:{port}", good.url, engine_tries=1, engine_timeout_s=10.0
                )
            )
            start = trio.current_time()
            await nursery.start(reporter.run)
            await good.wait_status(lambda b: True, within_s=15.0)
            first = next(r.at for r in good.records) - start
        finally:
            for filler in fillers:
                filler.close()
    assert first <= 6.0, f"the next address was tried after {first:.1f} s"
    stats = await settle(reporter, lambda st: st["reports_sent"] == 1)
    assert stats["report_failures"] == 0


# -- redirects are failed deliveries --------------------------------------------------------


@dataclass
class Front:
    """The real local engine behind a front that can answer every request with a 302."""

    engine: Any
    url: str = ""
    redirect: bool = False
    redirected: int = 0


@pytest.fixture
async def fronted_engine(nursery: trio.Nursery, engine_key: Any) -> Front:
    from nullworker.engine import Engine, create_engine_app

    engine = Engine(private_key=engine_key, master_token="s3cret-token")
    app = create_engine_app(engine)
    front = Front(engine)

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and front.redirect:
            # What an http -> https redirect in front of the engine answers; the query
            # stands for anything secret a redirect target may carry.
            front.redirected += 1
            location = f"https://engine.example{scope['path']}?token=s3cret-query"
            await send(
                {
                    "type": "http.response.start",
                    "status": 302,
                    "headers": [(b"location", location.encode()), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 0.1
    binds: list[str] = await nursery.start(hypercorn_serve, asgi, config)
    front.url = engine.url = binds[0]
    return front


async def test_a_redirect_is_a_failed_delivery_and_nothing_is_lost(
    fronted_engine: Front, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    front, engine = fronted_engine, fronted_engine.engine
    caplog.set_level(logging.INFO, logger="nullworker.reporter")
    reporter = EngineReporter(make_config(front.url, master_token="s3cret-token"))
    slot = make_slot(reporter)
    await nursery.start(reporter.run)
    reporter.set_ready(max_perf=100.0)
    await engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)

    front.redirect = True
    for idx in range(1, 6):  # five short reservations while the engine redirects
        await hold(slot, 0.05, idx)
    await settle(reporter, lambda st: st["report_failures"] >= 3, within_s=10.0)
    assert list(engine.finished) == []
    assert front.redirected >= 3
    stats = reporter.statistics()
    assert stats["reports_sent"] >= 1 and stats["pending_deletes"] == 5
    assert "HTTP 302" in stats["last_error"]

    front.redirect = False
    await engine.wait_for(lambda e: len(e.finished) >= 5, timeout=10.0)
    await settle(reporter, lambda st: st["pending_deletes"] == 0)
    # One more round after the healing one: nothing is sent twice.
    await hold(slot, 0.0, 6)
    await engine.wait_for(lambda e: any(f.request_idx == 6 for f in e.finished), timeout=10.0)
    assert sorted(f.request_idx for f in engine.finished) == [1, 2, 3, 4, 5, 6]
    assert all(f.success for f in engine.finished)
    assert reporter.statistics()["report_failures"] >= 3

    # One line when it starts failing (status and where to), one when it recovers.
    lines = [r.getMessage() for r in caplog.records if r.name == "nullworker.reporter"]
    failing = [line for line in lines if "HTTP 302" in line]
    assert len(failing) == 1, lines
    assert "https://engine.example/worker_status/" in failing[0]
    assert len([line for line in lines if "reachable again" in line]) == 1, lines
    assert "s3cret" not in caplog.text


async def test_the_pubkey_and_the_beacon_do_not_follow_redirects(
    fronted_engine: Front, nursery: trio.Nursery
) -> None:
    fronted_engine.redirect = True
    reporter = EngineReporter(make_config(fronted_engine.url))
    with pytest.raises(PubkeyUnavailable, match="HTTP 302"):
        await reporter.fetch_pubkey(backoff_s=())
    assert not await send_error_beacon(make_config(fronted_engine.url), "broken")
    assert fronted_engine.redirected == 2
    assert fronted_engine.engine.counters["worker_status"] == 0


# -- engine answers are read with a bound ----------------------------------------------------


#: What the streaming server offers at most (the bound on its loop).
HUGE_OFFER = 64 * 1024 * 1024
#: What it may have sent before the worker hung up: the bound read, plus what the loopback
#: socket buffers take in without anyone reading (a few MiB at most).
HUGE_SENT_MAX = 16 * 1024 * 1024


@dataclass
class HugeServer:
    """A raw HTTP/1.1 server on loopback: ``huge_path`` gets an endless 200 answer."""

    url: str
    huge_path: str
    sent: int = 0
    hung_up: bool = False
    done: trio.Event = field(default_factory=trio.Event)


async def _read_request(stream: trio.SocketStream) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return ""
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        rest += chunk
    return lines[0].split(" ")[1]


async def serve_huge(nursery: trio.Nursery, huge_path: str) -> HugeServer:
    server = HugeServer(url="", huge_path=huge_path)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            path = await _read_request(stream)
            if path != server.huge_path:
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
                )
                return
            # No Content-Length: the body runs until the server closes (or is cut off).
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
            )
            chunk = b"A" * 65536
            try:
                while server.sent < HUGE_OFFER:
                    await stream.send_all(chunk)
                    server.sent += len(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                server.hung_up = True
            finally:
                server.done.set()

    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
    )
    server.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    return server


@pytest.mark.parametrize("path", [PUBKEY, STATUS, DELETE, "beacon"])
async def test_an_endless_engine_answer_is_cut_off_with_a_clear_reason(
    nursery: trio.Nursery, path: str
) -> None:
    server = await serve_huge(nursery, STATUS if path == "beacon" else path)
    config = make_config(server.url, engine_tries=1, engine_timeout_s=10.0)
    if path == PUBKEY:
        reporter = EngineReporter(config)
        with pytest.raises(PubkeyUnavailable, match="answer over 65536 bytes"):
            await reporter.fetch_pubkey(backoff_s=())
    elif path == "beacon":
        assert not await send_error_beacon(config, "broken")
    else:
        reporter = EngineReporter(config)
        slot = make_slot(reporter)
        await nursery.start(reporter.run)
        await hold(slot, 0.0, 1)
        stats = await settle(reporter, lambda st: st["report_failures"] >= 1, within_s=10.0)
        assert f"{path} at {server.url}: answer over 4096 bytes" in stats["last_error"]
    with trio.fail_after(10):
        await server.done.wait()
    print(f"{path}: the server sent {server.sent} bytes before the worker hung up")
    assert server.hung_up
    assert server.sent <= HUGE_SENT_MAX
