"""Tests of the reservation client (``nullworker.client``): library and CLI.

Three layers, like the module:

* client-side policy with ``httpx.MockTransport`` and an autojumping ``MockClock``: what
  is sent where, polling, bounded retries, the meaning of each worker answer, and that
  leaving the ``async with`` block cancels the in-flight request (no sockets);
* end to end over real sockets with the real worker (``nullworker.worker.server.serve``) and
  the real engine emulator (``nullworker.engine``);
* the command line, in-process for argument errors and as a subprocess for the rest
  (exit codes, output lines, SIGINT/SIGTERM), with its stdout a pipe or, for the status
  line redrawn in place, a pseudo-terminal.

A busy worker (429) needs an engine whose view is stale, which the real engine only
has for a moment. The tests make that moment last: the worker reports to engine A (its
``REPORT_ADDR``), while the client routes through engine B, which shares A's signing key
and was told once, from a real report the worker sent A, that the worker is idle.
"""

from __future__ import annotations

import json
import math
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from nullworker.client import ProgressEvent, Reservation, RouteTimeout, hold, main, reserve
from nullworker.client import reservation as client_module
from nullworker.client.cli import _Job, _status_line
from nullworker.client.reservation import EngineRefused
from nullworker.engine import Engine, serve_engine
from nullworker.engine.core import Scaling
from nullworker.errors import (
    ConfigError,
    EngineUnavailable,
    ReservationFailed,
    ReservationRejected,
)
from nullworker.worker.config import WorkerConfig
from nullworker.worker.server import ServeInfo, serve

from .conftest import StartWorker, envelope, runtime
from .helpers import Output, closed_port

ENGINE = "http://engine.test"
WORKER = "http://worker.test:4000"
KEY = "secret-key-123"

# -- helpers ---------------------------------------------------------------------------


def ready_reply(
    url: str = WORKER + "/", *, request_idx: int = 7, reqnum: int = 1
) -> dict[str, Any]:
    return {
        "url": url,
        "signature": "c2ln",
        "cost": 100,
        "endpoint": "ep",
        "reqnum": reqnum,
        "request_idx": request_idx,
    }


class FakeVast:
    """Routes MockTransport requests to an engine handler and a worker handler and keeps
    every request for the assertions."""

    def __init__(
        self,
        *,
        engine: Callable[[httpx.Request, int], httpx.Response] | None = None,
        worker: Callable[[httpx.Request, int], Any] | None = None,
    ) -> None:
        self.route_requests: list[httpx.Request] = []
        self.route_bodies: list[dict[str, Any]] = []
        self.route_times: list[float] = []
        self.worker_requests: list[httpx.Request] = []
        self.worker_bodies: list[dict[str, Any]] = []
        self.worker_cancelled = 0
        self._engine = engine or (lambda request, n: httpx.Response(200, json=ready_reply()))
        self._worker = worker

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "engine.test":
            self.route_requests.append(request)
            self.route_bodies.append(json.loads(await request.aread()))
            self.route_times.append(trio.current_time())
            return self._engine(request, len(self.route_requests))
        self.worker_requests.append(request)
        self.worker_bodies.append(json.loads(await request.aread()))
        assert self._worker is not None, "no worker handler"
        try:
            result = self._worker(request, len(self.worker_requests))
            if not isinstance(result, httpx.Response):
                result = await result
        except trio.Cancelled:
            self.worker_cancelled += 1
            raise
        assert isinstance(result, httpx.Response)
        return result

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


def answer_after(seconds: float, status: int, body: Any) -> Callable[[httpx.Request, int], Any]:
    async def worker(request: httpx.Request, n: int) -> httpx.Response:
        await trio.sleep(seconds)
        return httpx.Response(status, json=body)

    return worker


def answer_now(status: int, body: Any) -> Callable[[httpx.Request, int], httpx.Response]:
    return lambda request, n: httpx.Response(status, json=body)


@pytest.fixture
def events() -> list[ProgressEvent]:
    return []


def outcome_of(r: Reservation) -> str | None:
    return r.outcome


def kinds(events: list[ProgressEvent]) -> list[str]:
    return [e.kind for e in events]


# -- policy: what is sent -----------------------------------------------------------------


async def test_route_and_reserve_requests_follow_the_protocol(
    autojump_clock: trio.testing.MockClock, events: list[ProgressEvent]
) -> None:
    fake = FakeVast(worker=answer_after(5, 200, {"released": "duration_elapsed", "held": 5.0}))
    async with fake.client() as http:
        r = await hold(
            "ep",
            duration_s=5,
            api_key=KEY,
            engine_url=ENGINE + "/",
            http=http,
            on_progress=events.append,
        )
    assert r.outcome == "duration_elapsed"
    assert r.held_s == 5.0
    route = fake.route_requests[0]
    assert route.url == httpx.URL(ENGINE + "/route/")
    assert route.url.query == b""
    assert route.headers["authorization"] == f"Bearer {KEY}"
    assert fake.route_bodies[0] == {
        "endpoint": "ep",
        "api_key": KEY,
        "cost": 100.0,
        "request_idx": 0,
        "replay_timeout": 60.0,
    }
    # The worker gets the whole route reply as auth_data, and never the API key.
    work = fake.worker_requests[0]
    assert work.url == httpx.URL(WORKER + "/reserve")
    assert "authorization" not in work.headers
    assert KEY not in json.dumps(fake.worker_bodies[0]) and KEY not in str(work.url)
    assert fake.worker_bodies[0] == {"auth_data": ready_reply(), "payload": {"duration": 5.0}}
    assert kinds(events) == ["routing", "held", "ended"]
    assert events[1].worker_url == WORKER + "/" and events[1].request_idx == 7


async def test_no_duration_sends_an_empty_payload(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeVast(worker=answer_after(1, 200, {"released": "duration_elapsed"}))
    async with fake.client() as http:
        await hold("ep", api_key=KEY, engine_url=ENGINE, http=http)
    assert fake.worker_bodies[0]["payload"] == {}


async def test_api_key_and_engine_url_come_from_the_environment(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAST_API_KEY", "from-env")
    monkeypatch.setenv("VAST_ENGINE_URL", ENGINE)
    fake = FakeVast(worker=answer_after(1, 200, {"released": "duration_elapsed"}))
    async with fake.client() as http:
        await hold("ep", duration_s=1, http=http)
    assert fake.route_requests[0].headers["authorization"] == "Bearer from-env"
    assert fake.route_bodies[0]["api_key"] == "from-env"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"duration_s": -1},
        {"duration_s": math.nan},
        {"duration_s": math.inf},
        {"max_rejections": -1},
        {"cost": math.nan},
        {"route_timeout_s": 0},
    ],
)
async def test_invalid_options_raise_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        reserve("ep", api_key=KEY, engine_url=ENGINE, **kwargs)


async def test_missing_api_key_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="VAST_API_KEY"):
        reserve("ep", engine_url=ENGINE)


# -- policy: the engine ------------------------------------------------------------------


async def test_waiting_polls_reuse_the_request_idx_and_report_progress(
    autojump_clock: trio.testing.MockClock, events: list[ProgressEvent]
) -> None:
    def engine(request: httpx.Request, n: int) -> httpx.Response:
        if n <= 4:
            return httpx.Response(200, json={"status": "WAITING", "request_idx": 42})
        return httpx.Response(200, json=ready_reply(request_idx=42))

    fake = FakeVast(engine=engine, worker=answer_after(1, 200, {"released": "duration_elapsed"}))
    async with fake.client() as http:
        r = await hold(
            "ep", duration_s=1, api_key=KEY, engine_url=ENGINE, http=http, on_progress=events.append
        )
    assert [b["request_idx"] for b in fake.route_bodies] == [0, 42, 42, 42, 42]
    assert r.request_idx == 42
    gaps = [b - a for a, b in zip(fake.route_times, fake.route_times[1:], strict=False)]
    # ~1 s at first, growing, capped at a few seconds (with +-20 % jitter).
    assert all(0.75 <= gap <= 3.0 * 1.25 for gap in gaps), gaps
    waiting = [e for e in events if e.kind == "waiting"]
    assert len(waiting) == 4
    assert [e.waited_s for e in waiting] == sorted(e.waited_s for e in waiting)
    assert waiting[-1].waited_s > 2.0
    assert "waiting for a worker" in waiting[-1].message
    assert waiting[-1].message.endswith("(the engine has no free worker)")
    assert all(e.reason is None for e in waiting)


async def test_the_engines_reason_for_waiting_is_passed_on(
    autojump_clock: trio.testing.MockClock, events: list[ProgressEvent]
) -> None:
    reasons = ["no ready worker yet: worker 1 is starting (0 s)", "at --max-workers 1 (1 busy)"]

    def engine(request: httpx.Request, n: int) -> httpx.Response:
        reason = reasons[min(n, 2) - 1]
        return httpx.Response(200, json={"status": "WAITING", "request_idx": 9, "reason": reason})

    fake = FakeVast(engine=engine)
    async with fake.client() as http:
        with pytest.raises(RouteTimeout) as caught:
            await hold(
                "ep",
                api_key=KEY,
                engine_url=ENGINE,
                http=http,
                route_timeout_s=5,
                on_progress=events.append,
            )
    waiting = [e for e in events if e.kind == "waiting"]
    assert waiting[0].reason == reasons[0]
    assert waiting[-1].reason == reasons[1]
    assert waiting[-1].message.endswith("(engine: at --max-workers 1 (1 busy))")
    assert caught.value.reason == reasons[1] and caught.value.timeout_s == 5
    assert str(caught.value) == (
        "no worker became free within 5 s (endpoint 'ep'; the engine said: "
        "at --max-workers 1 (1 busy))"
    )


@pytest.mark.parametrize(
    ("reason", "shown"),
    [
        ("", None),
        (42, None),
        ("  at --max-workers 3\n(3 busy) ", "at --max-workers 3 (3 busy)"),
        ("x" * 500, "x" * 197 + "..."),
        ("at\x1b[2J --max-workers 1\x07", "at [2J --max-workers 1"),
    ],
)
async def test_a_waiting_reason_is_one_short_line_or_none(
    autojump_clock: trio.testing.MockClock, reason: Any, shown: str | None
) -> None:
    events: list[ProgressEvent] = []
    reply = {"status": "WAITING", "request_idx": 9, "reason": reason}
    fake = FakeVast(engine=lambda request, n: httpx.Response(200, json=reply))
    async with fake.client() as http:
        with pytest.raises(RouteTimeout):
            await hold(
                "ep",
                api_key=KEY,
                engine_url=ENGINE,
                http=http,
                route_timeout_s=2,
                on_progress=events.append,
            )
    assert next(e.reason for e in events if e.kind == "waiting") == shown


@pytest.mark.parametrize("status", [401, 404, 500, 503])
async def test_engine_http_error_is_final(
    autojump_clock: trio.testing.MockClock, status: int
) -> None:
    fake = FakeVast(engine=lambda request, n: httpx.Response(status, json={"error": "nope"}))
    async with fake.client() as http:
        with pytest.raises(EngineRefused, match=f"HTTP {status}: nope") as caught:
            await hold("ep", api_key=KEY, engine_url=ENGINE, http=http)
    assert len(fake.route_requests) == 1
    assert isinstance(caught.value, EngineUnavailable)
    assert caught.value.status == status
    assert caught.value.api_key_refused == (status == 401)
    assert ("refused the API key" in str(caught.value)) == (status == 401)


async def test_engine_unreachable_is_retried_a_few_times_then_raises(
    autojump_clock: trio.testing.MockClock, events: list[ProgressEvent]
) -> None:
    calls = 0

    def engine(request: httpx.Request, n: int) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused", request=request)

    fake = FakeVast(engine=engine)
    async with fake.client() as http:
        with pytest.raises(EngineUnavailable, match="cannot reach the engine") as info:
            await hold("ep", api_key=KEY, engine_url=ENGINE, http=http, on_progress=events.append)
    assert calls == 3
    assert kinds(events) == ["routing", "engine_retry", "engine_retry"]
    assert KEY not in str(info.value)


async def test_engine_answer_that_is_not_an_object_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeVast(engine=lambda request, n: httpx.Response(200, text="<html>"))
    async with fake.client() as http:
        with pytest.raises(EngineUnavailable, match="JSON object"):
            await hold("ep", api_key=KEY, engine_url=ENGINE, http=http)


async def test_route_timeout(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeVast(engine=lambda request, n: httpx.Response(200, json={"request_idx": 3}))
    async with fake.client() as http:
        start = trio.current_time()
        with pytest.raises(RouteTimeout, match=r"^no worker became free within 30 s") as caught:
            await hold("ep", api_key=KEY, engine_url=ENGINE, http=http, route_timeout_s=30)
    assert 30 <= trio.current_time() - start < 31
    assert caught.value.reason is None
    assert isinstance(RouteTimeout("x"), EngineUnavailable)


# -- policy: the worker's answers ----------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 410, 413, 422, 500])
async def test_worker_refusal_raises_reservation_failed_without_retry(
    autojump_clock: trio.testing.MockClock, status: int
) -> None:
    fake = FakeVast(worker=answer_now(status, {"error": "bad thing"}))
    async with fake.client() as http:
        with pytest.raises(ReservationFailed, match="bad thing") as info:
            await hold("ep", api_key=KEY, engine_url=ENGINE, http=http)
    assert info.value.status == status
    assert len(fake.worker_requests) == 1 and len(fake.route_requests) == 1


async def test_busy_worker_reroutes_with_the_same_request_idx_then_gives_up(
    autojump_clock: trio.testing.MockClock, events: list[ProgressEvent]
) -> None:
    fake = FakeVast(worker=answer_now(429, {"error": "busy"}))
    async with fake.client() as http:
        with pytest.raises(ReservationRejected, match="3 refusal"):
            await hold(
                "ep",
                api_key=KEY,
                engine_url=ENGINE,
                http=http,
                max_rejections=2,
                on_progress=events.append,
            )
    assert len(fake.worker_requests) == 3
    assert [b["request_idx"] for b in fake.route_bodies] == [0, 7, 7]
    rerouting = [e for e in events if e.kind == "rerouting"]
    assert [e.attempt for e in rerouting] == [1, 2]
    assert "busy" in rerouting[0].message


async def test_unavailable_or_unreachable_worker_is_rerouted_then_held(
    autojump_clock: trio.testing.MockClock, events: list[ProgressEvent]
) -> None:
    def engine(request: httpx.Request, n: int) -> httpx.Response:
        return httpx.Response(200, json=ready_reply(f"http://w{n}.test", reqnum=n))

    async def worker(request: httpx.Request, n: int) -> httpx.Response:
        if n == 1:
            return httpx.Response(503, json={"error": "not ready yet"})
        if n == 2:
            raise httpx.ConnectError("refused", request=request)
        await trio.sleep(2)
        return httpx.Response(200, json={"released": "explicit"})

    fake = FakeVast(engine=engine, worker=worker)
    async with fake.client() as http:
        r = await hold("ep", api_key=KEY, engine_url=ENGINE, http=http, on_progress=events.append)
    assert r.worker_url == "http://w3.test" and r.outcome == "explicit"
    assert kinds(events).count("rerouting") == 2
    assert [b["request_idx"] for b in fake.route_bodies] == [0, 7, 7]


@pytest.mark.parametrize(
    ("body", "outcome", "inner"),
    [
        (
            {"result": {"ok": {"released": "duration_elapsed", "held": 3}}},
            "duration_elapsed",
            {"released": "duration_elapsed", "held": 3},
        ),
        ({"result": {"released": "explicit"}}, "explicit", {"released": "explicit"}),
        ({"result": {"err": "boom"}}, "error", {"error": "boom"}),
        ({"result": 5}, "completed", 5),
        (
            {"released": "duration_elapsed", "result": 1},
            "duration_elapsed",
            {"released": "duration_elapsed", "result": 1},
        ),
    ],
)
async def test_sdk_result_shapes_are_unwrapped(
    autojump_clock: trio.testing.MockClock, body: Any, outcome: str, inner: Any
) -> None:
    fake = FakeVast(worker=answer_after(3, 200, body))
    async with fake.client() as http:
        r = await hold("ep", duration_s=3, api_key=KEY, engine_url=ENGINE, http=http)
    assert r.outcome == outcome
    assert r.body == inner


async def test_worker_ending_the_hold_sets_ended_inside_the_block(
    autojump_clock: trio.testing.MockClock, events: list[ProgressEvent]
) -> None:
    fake = FakeVast(worker=answer_after(10, 200, {"released": "explicit", "held": 10.0}))
    async with fake.client() as http:
        async with reserve(
            "ep", api_key=KEY, engine_url=ENGINE, http=http, on_progress=events.append
        ) as r:
            assert outcome_of(r) is None and not r.ended.is_set()
            held_at = trio.current_time()
            await r.ended.wait()
            assert trio.current_time() - held_at == pytest.approx(10 - 0.3, abs=0.01)
            assert r.outcome == "explicit" and r.status == 200
    assert r.outcome == "explicit"  # leaving afterwards changes nothing
    assert fake.worker_cancelled == 0
    assert events[-1].kind == "ended" and events[-1].outcome == "explicit"
    assert "released by the worker" in events[-1].message


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (503, {"released": "shutdown", "duration": 60, "held": 4}, "shutdown"),
        (503, {"error": "stopping"}, "shutdown"),
        (429, {"error": "busy: queued too long"}, "rejected"),
        (500, "", "error"),
    ],
)
async def test_late_answers_become_outcomes(
    autojump_clock: trio.testing.MockClock, status: int, body: Any, outcome: str
) -> None:
    fake = FakeVast(worker=answer_after(4, status, body))
    async with fake.client() as http:
        r = await hold("ep", api_key=KEY, engine_url=ENGINE, http=http)
    assert r.outcome == outcome and r.status == status


async def test_connection_lost_mid_hold(autojump_clock: trio.testing.MockClock) -> None:
    async def worker(request: httpx.Request, n: int) -> httpx.Response:
        await trio.sleep(5)
        raise httpx.ReadError("connection reset", request=request)

    fake = FakeVast(worker=worker)
    async with fake.client() as http:
        r = await hold("ep", api_key=KEY, engine_url=ENGINE, http=http)
    assert r.outcome == "connection_lost" and r.status is None


async def test_immediate_success_is_handed_out_already_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeVast(worker=answer_now(200, {"released": "duration_elapsed", "held": 0}))
    async with fake.client() as http:
        async with reserve("ep", duration_s=0, api_key=KEY, engine_url=ENGINE, http=http) as r:
            assert r.ended.is_set() and r.outcome == "duration_elapsed"


async def test_a_failing_progress_callback_does_not_break_the_hold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("display bug")

    fake = FakeVast(worker=answer_after(2, 200, {"released": "duration_elapsed"}))
    async with fake.client() as http:
        r = await hold("ep", api_key=KEY, engine_url=ENGINE, http=http, on_progress=broken)
    assert r.outcome == "duration_elapsed"


# -- policy: leaving the block cancels the request (pure Trio, no sockets) -------------------


async def test_exception_in_block_cancels_the_request_and_propagates_unwrapped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeVast(worker=answer_after(3600, 200, {"released": "duration_elapsed"}))
    async with fake.client() as http:
        with pytest.raises(ValueError, match="job failed") as info:
            async with reserve("ep", api_key=KEY, engine_url=ENGINE, http=http) as r:
                await trio.sleep(5)
                raise ValueError("job failed")
    assert type(info.value) is ValueError
    assert fake.worker_cancelled == 1
    assert r.outcome == "client_released" and r.ended.is_set()


async def test_cancellation_cancels_the_request(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeVast(worker=answer_after(3600, 200, {"released": "duration_elapsed"}))
    async with fake.client() as http:
        with trio.move_on_after(10) as scope:
            async with reserve("ep", api_key=KEY, engine_url=ENGINE, http=http) as r:
                await trio.sleep_forever()
    assert scope.cancelled_caught
    assert fake.worker_cancelled == 1
    assert r.outcome == "client_released"


async def test_cancellation_while_waiting_for_a_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeVast(engine=lambda request, n: httpx.Response(200, json={"request_idx": 3}))
    async with fake.client() as http:
        with trio.move_on_after(10) as scope:
            await hold("ep", api_key=KEY, engine_url=ENGINE, http=http)
    assert scope.cancelled_caught
    assert fake.worker_requests == []


async def test_client_errors_propagate_unwrapped(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeVast(worker=answer_now(401, {"error": "invalid signature"}))
    async with fake.client() as http:
        with pytest.raises(ReservationFailed) as info:
            async with reserve("ep", api_key=KEY, engine_url=ENGINE, http=http):
                pytest.fail("the block must not run")  # pragma: no cover
    assert type(info.value) is ReservationFailed and info.value.status == 401


# -- end to end: real engine, real workers, real sockets ----------------------------------------


@pytest.fixture
async def engine(nursery: trio.Nursery) -> Engine:
    e = Engine()
    await nursery.start(partial(serve_engine, e))
    return e


async def start_vast_worker(
    start_worker: StartWorker, engine: Engine, container_id: int, **overrides: Any
) -> ServeInfo:
    assert engine.url is not None
    info = await start_worker(
        report_addrs=(engine.url,), container_id=container_id, unsecured=False, **overrides
    )
    await engine.wait_for(lambda e: e.worker_state(container_id) == "idle", timeout=5)
    return info


def finished_status(engine: Engine, request_idx: int | None) -> str | None:
    for f in engine.finished:
        if f.request_idx == request_idx:
            return f.status
    return None


async def test_reserve_duration_elapsed_end_to_end(
    engine: Engine, start_worker: StartWorker, events: list[ProgressEvent]
) -> None:
    info = await start_vast_worker(start_worker, engine, 1)
    assert engine.url is not None
    r = await hold(
        "ep", duration_s=1, api_key=KEY, engine_url=engine.url, on_progress=events.append
    )
    assert r.outcome == "duration_elapsed"
    assert r.worker_url == info.public_url
    assert r.body["released"] == "duration_elapsed" and r.body["duration"] == 1.0
    assert 0.9 <= r.held_s < 3
    assert kinds(events) == ["routing", "held", "ended"]
    await engine.wait_for(lambda e: finished_status(e, r.request_idx) == "Success", timeout=5)


async def assert_released_promptly(engine: Engine, info: ServeInfo, r: Reservation) -> None:
    """The worker frees its slot and the engine hears of it within a few seconds."""
    with trio.fail_after(3):
        await runtime(info).slot.wait_idle()
    await engine.wait_for(lambda e: finished_status(e, r.request_idx) == "Cancelled", timeout=10)
    await engine.wait_for(lambda e: e.worker_state(1) == "idle", timeout=10)


async def test_leaving_the_block_by_exception_frees_the_worker(
    engine: Engine, start_worker: StartWorker
) -> None:
    info = await start_vast_worker(start_worker, engine, 1)
    assert engine.url is not None
    with pytest.raises(KeyError):
        async with reserve("ep", duration_s=60, api_key=KEY, engine_url=engine.url) as r:
            assert runtime(info).slot.statistics().busy
            raise KeyError("the job crashed")
    await assert_released_promptly(engine, info, r)


async def test_cancelling_the_holder_frees_the_worker(
    engine: Engine, start_worker: StartWorker
) -> None:
    info = await start_vast_worker(start_worker, engine, 1)
    assert engine.url is not None
    holding = trio.Event()
    box: list[Reservation] = []

    async def holder() -> None:
        async with reserve("ep", duration_s=60, api_key=KEY, engine_url=engine.url) as r:
            box.append(r)
            holding.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        with trio.fail_after(5):
            await holding.wait()
        assert runtime(info).slot.statistics().busy
        nursery.cancel_scope.cancel()
    await assert_released_promptly(engine, info, box[0])
    # And the next client gets the worker.
    r2 = await hold("ep", duration_s=0.2, api_key=KEY, engine_url=engine.url)
    assert r2.outcome == "duration_elapsed" and r2.worker_url == info.public_url


async def test_worker_shutdown_mid_hold_ends_the_reservation(
    engine: Engine, nursery: trio.Nursery
) -> None:
    assert engine.url is not None
    stop = trio.Event()
    config = WorkerConfig(
        port=0,
        control_port=None,
        report_addrs=(engine.url,),
        container_id=5,
        unsecured=False,
        graceful_timeout_s=1.0,
    )
    await nursery.start(partial(serve, config, shutdown_trigger=stop.wait))
    await engine.wait_for(lambda e: e.worker_state(5) == "idle", timeout=5)
    async with reserve("ep", duration_s=60, api_key=KEY, engine_url=engine.url) as r:
        stop.set()
        with trio.fail_after(3):
            await r.ended.wait()
    assert r.outcome == "shutdown" and r.status == 503


async def test_worker_gone_mid_hold_is_connection_lost(
    engine: Engine, nursery: trio.Nursery
) -> None:
    assert engine.url is not None
    config = WorkerConfig(
        port=0, control_port=None, report_addrs=(engine.url,), container_id=6, unsecured=False
    )
    worker_scope = trio.CancelScope()

    async def run_worker(*, task_status: trio.TaskStatus[ServeInfo]) -> None:
        with worker_scope:
            await serve(config, task_status=task_status)

    await nursery.start(run_worker)
    await engine.wait_for(lambda e: e.worker_state(6) == "idle", timeout=5)
    async with reserve("ep", duration_s=60, api_key=KEY, engine_url=engine.url) as r:
        worker_scope.cancel()  # the worker process is gone without answering
        with trio.fail_after(3):
            await r.ended.wait()
    assert r.outcome == "connection_lost" and r.status is None


async def test_waiting_client_is_one_unit_of_demand(engine: Engine) -> None:
    assert engine.url is not None
    seen: list[int] = []

    def on_progress(event: ProgressEvent) -> None:
        if event.kind == "waiting":
            seen.append(engine.waiting)

    with pytest.raises(RouteTimeout):
        await hold(
            "ep", api_key=KEY, engine_url=engine.url, route_timeout_s=1.6, on_progress=on_progress
        )
    assert len(seen) >= 2 and set(seen) == {1}
    assert engine.counters["route_waiting"] == len(seen)


async def test_engine_down_raises_engine_unavailable(
    monkeypatch: pytest.MonkeyPatch, events: list[ProgressEvent]
) -> None:
    monkeypatch.setattr(client_module, "_ENGINE_RETRY_S", (0.01, 0.01))
    with pytest.raises(EngineUnavailable, match="cannot reach the engine"):
        await hold(
            "ep",
            api_key=KEY,
            engine_url=f"http://127.0.0.1:{closed_port()}",
            on_progress=events.append,
        )
    assert kinds(events).count("engine_retry") == 2


@pytest.fixture
async def busy_setup(
    engine: Engine, start_worker: StartWorker, nursery: trio.Nursery
) -> tuple[Engine, ServeInfo]:
    """A worker held by someone else (it answers 429 at once), and a routing engine B
    that still believes it idle. Returns (engine B, the busy worker)."""
    return await occupied_worker(engine, start_worker, nursery, max_queue_time_s=0.0)


async def occupied_worker(
    engine: Engine, start_worker: StartWorker, nursery: trio.Nursery, *, max_queue_time_s: float
) -> tuple[Engine, ServeInfo]:
    info = await start_vast_worker(start_worker, engine, 1, max_queue_time_s=max_queue_time_s)
    idle_report = next(
        r.body
        for r in reversed(engine.worker_status_reports)
        if r.body["id"] == 1 and r.body["num_requests_working"] == 0 and r.body["loadtime"] > 0
    )
    url = info.public_url
    assert url is not None

    async def occupy() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as http:
            await http.post(
                url + "/reserve",
                json=envelope(
                    url, key=engine.private_key, payload={"duration": 60}, request_idx=999
                ),
            )

    nursery.start_soon(occupy)
    await engine.wait_for(lambda e: e.worker_state(1) == "busy", timeout=5)
    stale = Engine(private_key=engine.private_key, lease_s=0.0)
    await nursery.start(partial(serve_engine, stale))
    stale.worker_status(idle_report)
    return stale, info


async def test_busy_worker_is_rerouted_with_the_same_request_idx_then_rejected(
    busy_setup: tuple[Engine, ServeInfo], events: list[ProgressEvent]
) -> None:
    stale, info = busy_setup
    assert stale.url is not None
    with pytest.raises(ReservationRejected, match="busy"):
        await hold(
            "ep",
            duration_s=1,
            api_key=KEY,
            engine_url=stale.url,
            max_rejections=2,
            on_progress=events.append,
        )
    assert kinds(events).count("rerouting") == 2
    idxs = [r.request_idx for r in stale.ready_replies]
    assert len(idxs) == 3 and len(set(idxs)) == 1
    # The holder that was there first is untouched.
    active = runtime(info).slot.statistics().active
    assert active is not None and active.tag["request_idx"] == 999


async def test_busy_worker_then_a_free_one(
    busy_setup: tuple[Engine, ServeInfo], engine: Engine, start_worker: StartWorker
) -> None:
    stale, busy = busy_setup
    free = await start_vast_worker(start_worker, engine, 2)
    report = next(r.body for r in reversed(engine.worker_status_reports) if r.body["id"] == 2)
    stale.worker_status(report)
    assert stale.url is not None
    # Engine B routes to worker 1 first (lower id, both never routed): 429, then worker 2.
    r = await hold("ep", duration_s=0.5, api_key=KEY, engine_url=stale.url)
    assert r.outcome == "duration_elapsed" and r.worker_url == free.public_url
    assert [x.worker_id for x in stale.ready_replies] == [1, 2]
    assert len({x.request_idx for x in stale.ready_replies}) == 1
    assert runtime(busy).slot.statistics().active is not None


# -- command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "5"], "--endpoint"),
        (["--endpoint", "ep", "--duration", "-1"], "--duration"),
        (["--endpoint", "ep", "--duration", "nan"], "--duration"),
        (["--endpoint", "ep", "--duration", "inf"], "--duration"),
        (["--endpoint", "ep", "--duration", "soon"], "--duration"),
        (["--endpoint", "ep", "--count", "0"], "--count"),
        (["--endpoint", "ep", "--max-rejections", "-2"], "--max-rejections"),
        (["--endpoint", "ep", "--route-timeout", "0"], "--route-timeout"),
        (["--endpoint", "ep", "--engine-url", "ftp://x"], "--engine-url"),
        (["--endpoint", "ep", "--bogus"], "--bogus"),
    ],
)
def test_cli_invalid_arguments_exit_2(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAST_API_KEY", KEY)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_requires_an_api_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    assert main(["--endpoint", "ep", "--engine-url", "http://127.0.0.1:1"]) == 2
    assert "VAST_API_KEY" in capsys.readouterr().err


def test_cli_engine_down_exits_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "_ENGINE_RETRY_S", (0.01, 0.01))
    argv = [
        "--endpoint",
        "ep",
        "--api-key",
        KEY,
        "--engine-url",
        f"http://127.0.0.1:{closed_port()}",
    ]
    assert main(argv) == 3
    captured = capsys.readouterr()
    assert "engine unavailable: cannot reach the engine" in captured.err
    assert KEY not in captured.err + captured.out


# -- the status line ---------------------------------------------------------------------


def held_job(number: int, since: float) -> _Job:
    return _Job(number, state="held", held_since=since)


def waiting_job(number: int, since: float, reason: str | None = None) -> _Job:
    return _Job(number, state="waiting", waiting_since=since, reason=reason)


@pytest.mark.parametrize(
    ("jobs", "duration", "line"),
    [
        ([_Job(1)], 60, ""),
        ([_Job(1, state="done")], 60, ""),
        ([held_job(1, 100.0)], 300, "held for 0:05, 4:55 remaining, Ctrl-C to release"),
        ([held_job(1, 100.0)], None, "held for 0:05, Ctrl-C to release"),
        ([held_job(1, 100.0)], 2, "held for 0:05, 0:00 remaining, Ctrl-C to release"),
        (
            [held_job(1, 105.0 - 3725.4)],
            7200,
            "held for 1:02:05, 57:55 remaining, Ctrl-C to release",
        ),
        (
            [waiting_job(1, 93.0)],
            60,
            "waiting for a worker... 12 s (no free worker), Ctrl-C to give up",
        ),
        (
            [waiting_job(1, 93.0, "at --max-workers 3 (3 busy)")],
            60,
            "waiting for a worker... 12 s (engine: at --max-workers 3 (3 busy)), Ctrl-C to give up",
        ),
        (
            [held_job(1, 40.0), held_job(2, 90.0), waiting_job(3, 95.0, "at --max-workers 2")],
            600,
            "2/3 held for 1:05, 8:55 remaining, 1 waiting for a worker... 10 s "
            "(engine: at --max-workers 2), Ctrl-C to release",
        ),
    ],
)
def test_status_line(jobs: list[_Job], duration: float | None, line: str) -> None:
    assert _status_line(jobs, now=105.0, duration_s=duration, width=200) == line


def test_status_line_fits_the_terminal() -> None:
    job = waiting_job(1, 0.0, "at --max-workers 3 " + "(3 busy) " * 20)
    line = _status_line([job], now=1.0, duration_s=None, width=50)
    assert len(line) == 50 and line.endswith("...")


# -- command line: the messages ------------------------------------------------------------


class Cli(Output):
    """``python -m nullworker.client`` as a child process, its output read as it comes."""

    async def wait_for_output(self, text: str, *, count: int = 1, within_s: float = 5) -> None:
        await self.wait_until(lambda: self.out.count(text) >= count, within_s=within_s)

    async def wait(self, *, within_s: float = 10) -> int:
        with trio.fail_after(within_s):
            return await self.process.wait()


@pytest.fixture
async def run_cli(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    """Start the client with ``args``; ``terminal=True`` gives it a pseudo-terminal
    (100 columns) as stdout instead of a pipe. ``VAST_API_KEY`` is ``KEY`` unless
    ``api_key`` says otherwise."""
    started: list[trio.Process] = []

    async def run(*args: str, terminal: bool = False, api_key: str = KEY) -> Cli:
        env = dict(os.environ, VAST_API_KEY=api_key, COLUMNS="100")
        if not terminal:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "nullworker.client", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            stdout: trio.abc.ReceiveStream | None = process.stdout
        else:
            controller, terminal_fd = pty.openpty()
            try:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "nullworker.client", *args],
                    stdin=subprocess.DEVNULL,
                    stdout=terminal_fd,
                    stderr=subprocess.PIPE,
                    env=env,
                )
            finally:
                os.close(terminal_fd)
            stdout = _PtyReader(controller)
        started.append(process)
        cli = Cli(process)
        assert stdout is not None and process.stderr is not None
        nursery.start_soon(cli.pump, stdout, "out")
        nursery.start_soon(cli.pump, process.stderr, "err")
        return cli

    yield run
    for process in started:  # a failed test must not leave a child behind
        if process.returncode is None:
            process.kill()


class _PtyReader(trio.abc.ReceiveStream):
    """The controlling side of a pseudo-terminal, read until the child side is closed
    (Linux then answers EIO, which ends the stream here)."""

    def __init__(self, fd: int) -> None:
        self._stream = trio.lowlevel.FdStream(fd)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, OSError):
            return b""

    async def aclose(self) -> None:
        await self._stream.aclose()


async def test_cli_duration_1_exits_0(
    engine: Engine, start_worker: StartWorker, run_cli: Any
) -> None:
    info = await start_vast_worker(start_worker, engine, 1)
    assert engine.url is not None
    cli: Cli = await run_cli("--endpoint", "ep", "--duration", "1", "--engine-url", engine.url)
    assert await cli.wait() == 0, cli.err
    assert f"held: {info.public_url} (reservation 1/1)" in cli.out
    assert "elapsed after 1 s" in cli.out
    assert KEY not in cli.out + cli.err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_cli_signal_mid_hold_releases_at_once(
    engine: Engine, start_worker: StartWorker, run_cli: Any, signum: int, code: int
) -> None:
    info = await start_vast_worker(start_worker, engine, 1)
    assert engine.url is not None
    cli: Cli = await run_cli("--endpoint", "ep", "--duration", "60", "--engine-url", engine.url)
    await cli.wait_for_output("held:")
    assert runtime(info).slot.statistics().busy
    cli.process.send_signal(signum)
    assert await cli.wait(within_s=5) == code, cli.err
    assert "interrupted: released 1 worker(s)" in cli.out
    with trio.fail_after(10):
        await runtime(info).slot.wait_idle()
    await engine.wait_for(lambda e: e.worker_state(1) == "idle", timeout=10)
    r = await hold("ep", duration_s=0.2, api_key=KEY, engine_url=engine.url)
    assert r.outcome == "duration_elapsed" and r.worker_url == info.public_url


async def test_cli_count_2_holds_two_workers(
    engine: Engine, start_worker: StartWorker, run_cli: Any
) -> None:
    one = await start_vast_worker(start_worker, engine, 1)
    two = await start_vast_worker(start_worker, engine, 2)
    assert engine.url is not None
    cli: Cli = await run_cli(
        "--endpoint", "ep", "--duration", "1.5", "--count", "2", "--engine-url", engine.url
    )
    await cli.wait_for_output("held:", count=2)
    assert runtime(one).slot.statistics().busy and runtime(two).slot.statistics().busy
    assert await cli.wait() == 0, cli.err
    held = sorted(line for line in cli.out.splitlines() if line.startswith("held:"))
    assert held == sorted(
        [f"held: {one.public_url} (reservation 1/2)", f"held: {two.public_url} (reservation 2/2)"]
    ) or held == sorted(
        [f"held: {one.public_url} (reservation 2/2)", f"held: {two.public_url} (reservation 1/2)"]
    )
    assert cli.out.count("elapsed after") == 2


async def test_cli_busy_worker_exits_4(busy_setup: tuple[Engine, ServeInfo], run_cli: Any) -> None:
    stale, _ = busy_setup
    assert stale.url is not None
    cli: Cli = await run_cli("--endpoint", "ep", "--engine-url", stale.url, "--max-rejections", "1")
    assert await cli.wait() == 4, cli.err
    assert "rejected: gave up after 2 refusal(s)" in cli.err
    assert cli.out.count("asking the engine again") == 1


async def test_cli_late_429_after_queueing_exits_4(
    engine: Engine, start_worker: StartWorker, nursery: trio.Nursery, run_cli: Any
) -> None:
    # The worker queues us for 0.8 s (past the client's 0.3 s accept window), then
    # answers 429: the client said "held", but the outcome is a rejection all the same.
    stale, _ = await occupied_worker(engine, start_worker, nursery, max_queue_time_s=0.8)
    assert stale.url is not None
    cli: Cli = await run_cli("--endpoint", "ep", "--engine-url", stale.url)
    assert await cli.wait() == 4, cli.out + cli.err
    assert "held:" in cli.out


async def test_cli_worker_refusal_exits_4(
    engine: Engine, start_worker: StartWorker, nursery: trio.Nursery, run_cli: Any
) -> None:
    """An engine whose key the worker does not trust: the worker answers 401."""
    await start_vast_worker(start_worker, engine, 1)
    report = next(r.body for r in reversed(engine.worker_status_reports) if r.body["id"] == 1)
    impostor = Engine()
    await nursery.start(partial(serve_engine, impostor))
    impostor.worker_status(report)
    assert impostor.url is not None
    cli: Cli = await run_cli("--endpoint", "ep", "--engine-url", impostor.url)
    assert await cli.wait() == 4, cli.err
    assert "rejected:" in cli.err and "HTTP 401" in cli.err


async def test_cli_wrong_api_key_says_so_and_exits_3(nursery: trio.Nursery, run_cli: Any) -> None:
    keyed = Engine(api_key="the-right-key")
    await nursery.start(partial(serve_engine, keyed))
    assert keyed.url is not None
    cli: Cli = await run_cli("--endpoint", "ep", "--engine-url", keyed.url)
    assert await cli.wait() == 3, cli.err
    assert cli.err.startswith("the engine refused the API key (HTTP 401)"), cli.err
    assert "engine unavailable" not in cli.err
    assert KEY not in cli.out + cli.err and "the-right-key" not in cli.out + cli.err


@pytest.fixture
async def engine_at_max_workers(
    start_worker: StartWorker, nursery: trio.Nursery
) -> AsyncIterator[Engine]:
    """An engine told that no more than one worker may run (as ``nullworker dev
    --max-workers 1`` tells it), with its one worker held by another client."""
    engine = Engine(scaling=Scaling(min_workers=0, max_workers=1, idle_timeout_s=60.0))
    await nursery.start(partial(serve_engine, engine))
    await start_vast_worker(start_worker, engine, 1)
    assert engine.url is not None
    url = engine.url

    async def occupy(*, task_status: trio.TaskStatus[None]) -> None:
        async with reserve("ep", duration_s=60, api_key=KEY, engine_url=url):
            task_status.started()
            await trio.sleep_forever()

    await nursery.start(occupy)
    await engine.wait_for(lambda e: e.worker_state(1) == "busy", timeout=5)
    yield engine


async def test_cli_route_timeout_says_no_worker_became_free_and_why(
    engine_at_max_workers: Engine, run_cli: Any
) -> None:
    """The engine answers WAITING until --route-timeout, saying why. On a pipe, the
    waiting lines are plain lines: no status line, no terminal codes."""
    engine = engine_at_max_workers
    assert engine.url is not None
    cli: Cli = await run_cli(
        "--endpoint", "ep", "--engine-url", engine.url, "--route-timeout", "1.5"
    )
    assert await cli.wait() == 3, cli.err
    assert cli.err == (
        "no worker became free within 1.5 s; the engine said: at --max-workers 1 (1 busy)\n"
    )
    assert "waiting for a worker... 0 s (engine: at --max-workers 1 (1 busy))\n" in cli.out
    assert "\r" not in cli.out and "\x1b" not in cli.out and "Ctrl-C" not in cli.out


async def test_cli_on_a_terminal_redraws_a_status_line_while_it_holds(
    engine: Engine, start_worker: StartWorker, run_cli: Any
) -> None:
    info = await start_vast_worker(start_worker, engine, 1)
    assert engine.url is not None
    cli: Cli = await run_cli(
        "--endpoint", "ep", "--duration", "2.5", "--engine-url", engine.url, terminal=True
    )
    await cli.wait_for_output("remaining, Ctrl-C to release")
    assert await cli.wait() == 0, cli.err
    out = cli.out.replace("\r\n", "\n")  # the terminal's own line ends
    assert f"held: {info.public_url} (reservation 1/1)\n" in out
    # Drawn in place: each status line erases the previous one, from 0:03 left down.
    drawn = [part.split("\n")[0] for part in out.split("\r\x1b[K")[1:]]
    assert drawn[0] == "held for 0:00, 0:03 remaining, Ctrl-C to release"
    later = {
        line for line in drawn if re.fullmatch(r"held for 0:0[12], 0:0[12] remaining, .*", line)
    }
    assert later, drawn  # redrawn as the hold went on
    # The status line is erased before the last line, which stands alone.
    assert out.endswith("\r\x1b[Kelapsed after 2 s\n") or out.endswith(
        "\r\x1b[Kelapsed after 3 s\n"
    ), repr(out[-200:])


async def test_cli_on_a_terminal_shows_the_wait_and_why_in_the_status_line(
    engine_at_max_workers: Engine, run_cli: Any
) -> None:
    engine = engine_at_max_workers
    assert engine.url is not None
    cli: Cli = await run_cli(
        "--endpoint", "ep", "--engine-url", engine.url, "--route-timeout", "1.5", terminal=True
    )
    await cli.wait_for_output(
        "\r\x1b[Kwaiting for a worker... 1 s (engine: at --max-workers 1 (1 busy)), "
        "Ctrl-C to give up"
    )
    assert await cli.wait() == 3, cli.err
    # The wait is on the status line only, not printed once per poll, and the status
    # line is erased at the end.
    assert "(engine: at --max-workers 1 (1 busy))\r\n" not in cli.out
    assert cli.out.endswith("\r\x1b[K"), repr(cli.out[-100:])
    assert cli.err.startswith("no worker became free within 1.5 s")


async def test_cli_quiet_on_a_terminal_draws_no_status_line(
    engine: Engine, start_worker: StartWorker, run_cli: Any
) -> None:
    await start_vast_worker(start_worker, engine, 1)
    assert engine.url is not None
    cli: Cli = await run_cli(
        "--endpoint", "ep", "--duration", "1", "--engine-url", engine.url, "--quiet", terminal=True
    )
    assert await cli.wait() == 0, cli.err
    assert "\x1b" not in cli.out and "Ctrl-C" not in cli.out
    assert "held:" in cli.out and "elapsed after 1 s" in cli.out


async def test_an_exception_group_from_the_block_comes_out_unchanged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeVast(worker=answer_after(3600, 200, {"released": "duration_elapsed"}))
    group = ExceptionGroup("from the caller's own nursery", [ValueError("one")])
    async with fake.client() as http:
        with pytest.raises(ExceptionGroup) as info:
            async with reserve("ep", api_key=KEY, engine_url=ENGINE, http=http):
                raise group
    # Trio may rebuild the group object on the way out; its message and members are
    # the caller's, not flattened into the lone ValueError.
    assert info.value.message == group.message
    assert info.value.exceptions == group.exceptions
    assert fake.worker_cancelled == 1
