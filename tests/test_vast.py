"""The worker in Vast mode against the local engine emulator: signatures, reports, outcomes.

Everything is real: the engine signs with an RSA key made for the session, the worker
fetches its public key over HTTP, and every report travels over loopback sockets.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from nullworker.vast import signing
from nullworker.vast.signing import generate_private_key, sign_url, verify_url
from nullworker.worker.server import ServeInfo

from .conftest import STATUS_FIELDS, StartWorker, envelope, runtime, vast_settings
from .helpers import wait_until
from .test_http import open_raw_reservation


async def route(http: httpx.AsyncClient, engine: Any) -> dict[str, Any]:
    response = await http.post(
        f"{engine.url}/route/",
        json={"endpoint": "test", "api_key": "k", "cost": 100, "request_idx": 0},
    )
    response.raise_for_status()
    reply: dict[str, Any] = response.json()
    assert "url" in reply, reply
    return reply


async def start_ready(start_worker: StartWorker, engine: Any, **overrides: Any) -> ServeInfo:
    info = await start_worker(**vast_settings(engine, **overrides))
    await engine.wait_for(lambda e: any(w.ready for w in e.workers.values()))
    return info


def last_report(engine: Any) -> dict[str, Any]:
    body: dict[str, Any] = engine.worker_status_reports[-1].body
    return body


async def test_ready_report_has_every_field(start_worker: StartWorker, vast_engine: Any) -> None:
    info = await start_ready(start_worker, vast_engine)
    report = last_report(vast_engine)
    for name, kind in STATUS_FIELDS.items():
        assert name in report, name
        assert isinstance(report[name], kind), (name, report[name])
    assert report["id"] == 7
    assert report["mtoken"] == "tok"
    assert report["version"] == "1.1.0"
    assert report["max_perf"] == 100.0
    assert 0 < report["loadtime"] < 30
    assert report["error_msg"] == ""
    assert report["url"] == info.public_url
    assert report["num_requests_working"] == 0
    assert runtime(info).public_key is not None


async def test_routed_reservation_is_signed_reported_busy_then_idle_and_finished(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    info = await start_ready(start_worker, vast_engine)
    auth = await route(http, vast_engine)
    assert auth["url"] == info.public_url
    idx = auth["request_idx"]
    seen: dict[str, float] = {}

    async def watch() -> None:
        await vast_engine.wait_for(lambda e: e.workers[7].busy)
        seen["busy"] = time.monotonic()
        report = last_report(vast_engine)
        assert report["working_request_idxs"] == [idx]
        assert report["cur_load"] == 100.0
        await vast_engine.wait_for(lambda e: not e.workers[7].busy)
        seen["idle"] = time.monotonic()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        sent = time.monotonic()
        response = await http.post(
            f"{info.url}/reserve", json={"auth_data": auth, "payload": {"duration": 0.3}}
        )
        returned = time.monotonic()
    assert response.status_code == 200, response.text
    assert response.json()["released"] == "duration_elapsed"
    # Liveness bounds only; the measured latencies are in bench/.
    assert seen["busy"] - sent < 1.0
    assert seen["idle"] - returned < 1.0
    await vast_engine.wait_for(lambda e: any(f.request_idx == idx for f in e.finished))
    finished = [f for f in vast_engine.finished if f.request_idx == idx]
    assert len(finished) == 1
    assert finished[0].status == "Success" and finished[0].success is True
    assert finished[0].work_started_at and finished[0].work_completed_at
    assert finished[0].work_completed_at - finished[0].work_started_at >= 0.3


async def test_tampered_or_foreign_signatures_get_401_and_leave_no_trace(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    info = await start_ready(start_worker, vast_engine)
    auth = await route(http, vast_engine)
    other_key: rsa.RSAPrivateKey = generate_private_key()
    cases = {
        "tampered signature": auth | {"signature": auth["signature"][:-8] + "AAAAAAA="},
        "another key": auth | {"signature": sign_url(other_key, auth["url"])},
        "not base64": auth | {"signature": "!!!"},
        "another worker's url": auth
        | {
            "url": "http://10.0.0.1:1",
            "signature": sign_url(vast_engine.private_key, "http://10.0.0.1:1"),
        },
    }
    # A genuine envelope first: its signature is then remembered as good, and the bad
    # ones below must still be refused.
    first = auth | {"request_idx": 998_999}
    response = await http.post(
        f"{info.url}/reserve", json={"auth_data": first, "payload": {"duration": 0}}
    )
    assert response.status_code == 200
    for case, bad in cases.items():
        bad = bad | {"request_idx": 999_000}
        response = await http.post(
            f"{info.url}/reserve", json={"auth_data": bad, "payload": {"duration": 0}}
        )
        assert response.status_code == 401, case
        assert response.json()["error"], case
    # The worker keeps serving, and the genuine envelope is accepted.
    response = await http.post(
        f"{info.url}/reserve", json={"auth_data": auth, "payload": {"duration": 0}}
    )
    assert response.status_code == 200
    idx = auth["request_idx"]
    await vast_engine.wait_for(lambda e: any(f.request_idx == idx for f in e.finished))
    assert not any(f.request_idx == 999_000 for f in vast_engine.finished)
    assert all(
        999_000 not in r.body.get("working_request_idxs", [])
        for r in vast_engine.worker_status_reports
    )


def test_a_remembered_good_signature_vouches_for_nothing_else() -> None:
    key = generate_private_key()
    public = key.public_key()
    url = "http://10.0.0.2:5000"
    good = sign_url(key, url)
    assert verify_url(public, url, good)
    assert signing._verified.get((id(public), url, good)) is public
    assert verify_url(public, url, good)  # answered from the table
    other = generate_private_key().public_key()
    assert not verify_url(other, url, good)
    assert not verify_url(public, "http://10.0.0.2:5001", good)
    assert not verify_url(public, url, good[:-8] + "AAAAAAA=")
    assert not verify_url(public, url, "!!!")
    # Failures are not remembered, and the table stays bounded.
    assert all(memo[0] != id(other) for memo in signing._verified)
    for port in range(signing._VERIFIED_MAX + 5):
        peer = f"http://10.0.0.3:{port}"
        assert verify_url(public, peer, sign_url(key, peer))
    assert len(signing._verified) <= signing._VERIFIED_MAX


async def test_disconnect_is_reported_cancelled_and_next_in_queue_runs(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    info = await start_ready(start_worker, vast_engine)
    url = info.public_url or ""
    first = envelope(url, key=vast_engine.private_key, request_idx=501, payload={"duration": 600})
    stream = await open_raw_reservation(info, {}, signed=first)
    await vast_engine.wait_for(lambda e: 501 in e.workers[7].working_request_idxs)
    second = envelope(url, key=vast_engine.private_key, request_idx=502, payload={"duration": 0})
    async with trio.open_nursery() as nursery:
        result: dict[str, httpx.Response] = {}

        async def queued() -> None:
            result["r"] = await http.post(f"{info.url}/reserve", json=second)

        nursery.start_soon(queued)
        await wait_until(lambda: runtime(info).slot.statistics().waiting == 1)
        await stream.aclose()
    assert result["r"].status_code == 200
    await vast_engine.wait_for(lambda e: {501, 502} <= {f.request_idx for f in e.finished})
    statuses = {f.request_idx: f.status for f in vast_engine.finished}
    assert statuses[501] == "Cancelled"
    assert statuses[502] == "Success"
    await vast_engine.wait_for(lambda e: not e.workers[7].busy)


async def test_queue_timeout_is_reported_rejected(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    info = await start_ready(start_worker, vast_engine, max_queue_time_s=0.2)
    url = info.public_url or ""
    async with trio.open_nursery() as nursery:
        first = envelope(url, key=vast_engine.private_key, request_idx=601, payload={"duration": 1})
        nursery.start_soon(partial(http.post, f"{info.url}/reserve", json=first))
        await wait_until(lambda: runtime(info).slot.statistics().busy)
        response = await http.post(
            f"{info.url}/reserve",
            json=envelope(
                url, key=vast_engine.private_key, request_idx=602, payload={"duration": 1}
            ),
        )
        assert response.status_code == 429
        await vast_engine.wait_for(lambda e: any(f.request_idx == 602 for f in e.finished))
    statuses = {f.request_idx: (f.status, f.success) for f in vast_engine.finished}
    assert statuses[602] == ("Rejected", False)
    assert any(r.body["rej_load"] > 0 for r in vast_engine.worker_status_reports)


async def test_queued_reservation_counts_as_load(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    info = await start_ready(start_worker, vast_engine)
    url = info.public_url or ""
    async with trio.open_nursery() as nursery:
        for idx in (701, 702):
            signed = envelope(
                url, key=vast_engine.private_key, request_idx=idx, payload={"duration": 0.5}
            )
            nursery.start_soon(partial(http.post, f"{info.url}/reserve", json=signed))
        # One held and one queued: the engine sees twice the load of one worker,
        # which is what makes it provision another.
        await vast_engine.wait_for(lambda e: e.workers[7].num_requests_working == 2)
        assert last_report(vast_engine)["cur_load"] == 200.0


def rotate_key(engine: Any) -> rsa.RSAPrivateKey:
    """Give the engine a new signing key, as a real engine's rotation does."""
    from nullworker.vast.signing import public_key_pem

    new_key = generate_private_key()
    engine.private_key = new_key
    engine.public_key_pem = public_key_pem(new_key)
    return new_key


async def test_a_rotated_engine_key_is_refetched_and_the_failing_request_accepted(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    info = await start_ready(start_worker, vast_engine, key_refresh_min_s=0.0)
    old = runtime(info).public_key
    rotate_key(vast_engine)
    auth = await route(http, vast_engine)
    # Signed with a key the worker does not know yet: it refetches and checks again.
    first = await http.post(
        f"{info.url}/reserve", json={"auth_data": auth, "payload": {"duration": 0}}
    )
    assert first.status_code == 200, first.text
    assert runtime(info).public_key is not old


async def test_an_attackers_bad_signature_does_not_delay_valid_requests_after_a_rotation(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    """The refetch a bad signature starts is one valid requests use, not one they lose."""
    min_s = 1.0
    info = await start_ready(start_worker, vast_engine, key_refresh_min_s=min_s)
    url = info.public_url or ""
    idx = iter(range(900, 1000))

    async def send(key: rsa.RSAPrivateKey) -> int:
        body = envelope(url, key=key, request_idx=next(idx), payload={"duration": 0})
        return (await http.post(f"{info.url}/reserve", json=body)).status_code

    attacker = generate_private_key()
    await trio.sleep(min_s + 0.2)  # the start-up fetch is at least min_s old
    fetches = vast_engine.counters["pubkey"]

    # A rotation, then the attacker's request: its refetch brings the new key.
    key = rotate_key(vast_engine)
    assert await send(attacker) == 401
    assert await send(key) == 200
    assert vast_engine.counters["pubkey"] - fetches == 1

    # The attacker's request before a rotation fetches the old key again...
    await trio.sleep(min_s + 0.2)
    assert await send(attacker) == 401
    assert vast_engine.counters["pubkey"] - fetches == 2
    key = rotate_key(vast_engine)
    # ...so within min_s a valid request is refused (no refetch: the bound holds)...
    assert await send(key) == 401
    assert vast_engine.counters["pubkey"] - fetches == 2
    # ...and after it the first valid request refetches, waits and is accepted.
    await trio.sleep(min_s + 0.2)
    assert await send(key) == 200
    assert vast_engine.counters["pubkey"] - fetches == 3


async def test_a_flood_of_bad_signatures_fetches_the_key_a_bounded_number_of_times(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    min_s = 0.05
    info = await start_ready(start_worker, vast_engine, key_refresh_min_s=min_s)
    url = info.public_url or ""
    forged = envelope(url, key=generate_private_key(), request_idx=950, payload={"duration": 0})
    await trio.sleep(min_s + 0.1)  # the start-up fetch is at least min_s old
    new_key = rotate_key(vast_engine)
    fetches = vast_engine.counters["pubkey"]
    started = trio.current_time()
    statuses: list[int] = []
    valid: list[int] = []

    async def attacker() -> None:
        for _ in range(20):
            statuses.append((await http.post(f"{info.url}/reserve", json=forged)).status_code)

    async def client() -> None:
        for i in range(5):  # valid requests in the middle of the flood
            body = envelope(url, key=new_key, request_idx=960 + i, payload={"duration": 0})
            valid.append((await http.post(f"{info.url}/reserve", json=body)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(10):  # 10 connections x 20 requests
            nursery.start_soon(attacker)
        nursery.start_soon(client)
    elapsed = trio.current_time() - started
    flood_fetches = vast_engine.counters["pubkey"] - fetches
    assert statuses == [401] * 200
    assert valid == [200] * 5
    # At most one GET /pubkey/ per min_s, however many bad signatures came.
    assert 1 <= flood_fetches <= 1 + elapsed / min_s, (flood_fetches, elapsed)
    print(f"200 bad signatures in {elapsed:.2f} s: {flood_fetches} key fetches")


def reporting_bug(monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """Every engine report round raises ``RuntimeError("boom")`` once the returned event
    is set: a reporting bug that shows only after start-up, for the tests of how a
    worker stops when its background work fails."""
    from nullworker.worker.reporter import EngineReporter

    original = EngineReporter._round
    armed = trio.Event()

    async def flaky_round(self: EngineReporter, *args: Any, **kwargs: Any) -> bool:
        if armed.is_set():
            raise RuntimeError("boom")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(EngineReporter, "_round", flaky_round)
    return armed


async def test_a_background_failure_stops_serve_reports_it_and_answers_holders(
    vast_engine: Any, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose reporting broke must stop, not go on looking alive (and idle)."""
    from nullworker.errors import WorkerFailed
    from nullworker.worker.config import WorkerConfig
    from nullworker.worker.server import serve

    armed = reporting_bug(monkeypatch)
    config = WorkerConfig(
        port=0, control_port=None, graceful_timeout_s=1.0, **vast_settings(vast_engine)
    )
    held: dict[str, httpx.Response] = {}
    failures: list[WorkerFailed] = []
    try:
        async with trio.open_nursery() as nursery:
            info: ServeInfo = await nursery.start(serve, config)
            await info.wait_ready()
            url = info.public_url or ""

            async def hold() -> None:
                signed = envelope(url, key=vast_engine.private_key, payload={"duration": 600})
                held["response"] = await http.post(f"{info.url}/reserve", json=signed)

            nursery.start_soon(hold)
            await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].busy)
            armed.set()
            assert runtime(info).reporter is not None
            runtime(info).reporter.set_ready(max_perf=100.0)  # any change starts a round
    except* WorkerFailed as group:
        failures.extend(e for e in group.exceptions if isinstance(e, WorkerFailed))
    assert len(failures) == 1 and "boom" in str(failures[0])
    assert held["response"].status_code == 503
    assert held["response"].json()["released"] == "shutdown"
    await vast_engine.wait_for(lambda e: "boom" in e.workers[7].error_msg)
    assert "worker failed" in vast_engine.workers[7].error_msg


async def test_a_replayed_envelope_gets_409_while_held_or_queued_and_is_reported_once(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    info = await start_ready(start_worker, vast_engine, max_queue_time_s=30.0)
    url = info.public_url or ""
    slot = runtime(info).slot
    held = envelope(url, key=vast_engine.private_key, request_idx=901, payload={"duration": 600})
    queued = envelope(url, key=vast_engine.private_key, request_idx=902, payload={"duration": 0})
    stream = await open_raw_reservation(info, {}, signed=held)
    await wait_until(lambda: slot.statistics().busy)
    async with trio.open_nursery() as nursery:
        result: dict[str, httpx.Response] = {}

        async def queue() -> None:
            result["queued"] = await http.post(f"{info.url}/reserve", json=queued)

        nursery.start_soon(queue)
        await wait_until(lambda: slot.statistics().waiting == 1)
        await vast_engine.wait_for(lambda e: e.workers[7].working_request_idxs == (901, 902))
        for idx, replay in ((901, held), (902, queued)):
            with trio.fail_after(5):  # refused at once, never queued
                response = await http.post(f"{info.url}/reserve", json=replay)
            assert response.status_code == 409, response.text
            assert response.headers["content-type"] == "application/json"
            assert response.json() == {
                "error": f"request_idx {idx} is already held or queued on this worker",
                "request_idx": idx,
            }
        assert slot.statistics().waiting == 1
        assert runtime(info).reporter is not None
        assert runtime(info).reporter.statistics()["num_requests_working"] == 2
        await stream.aclose()  # the holder goes away: 901 Cancelled, then 902 runs
    assert result["queued"].status_code == 200
    await vast_engine.wait_for(
        lambda e: {901, 902} <= {f.request_idx for f in e.finished} and not e.workers[7].busy
    )
    # Exactly one delete entry per request_idx: none for the two refused replays.
    assert sorted((f.request_idx, f.status) for f in vast_engine.finished) == [
        (901, "Cancelled"),
        (902, "Success"),
    ]

    # A replay after the first one ended is a new reservation, and is allowed.
    again = held | {"payload": {"duration": 0}}
    response = await http.post(f"{info.url}/reserve", json=again)
    assert response.status_code == 200, response.text
    await vast_engine.wait_for(
        lambda e: [f.request_idx for f in e.finished].count(901) == 2 and not e.workers[7].busy
    )
    statuses = [(f.request_idx, f.status) for f in vast_engine.finished]
    # One delete entry per reservation that ran.
    assert sorted(statuses) == [(901, "Cancelled"), (901, "Success"), (902, "Success")]
    reports = [r.body for r in vast_engine.worker_status_reports if r.body["id"] == 7]
    assert max(r["num_requests_working"] for r in reports) == 2
    for report in reports:
        idxs = report["working_request_idxs"]
        assert len(idxs) == len(set(idxs)), idxs


async def test_a_signed_envelope_with_a_bad_request_idx_gets_422_and_leaves_no_trace(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    info = await start_ready(start_worker, vast_engine)
    url = info.public_url or ""
    # Only auth_data.url is signed: these envelopes carry a valid signature.
    for bad in (1.5, "abc", -5, 10**100):
        signed = envelope(url, key=vast_engine.private_key, request_idx=bad, payload={})
        response = await http.post(f"{info.url}/reserve", json=signed)
        assert response.status_code == 422, (bad, response.text)
        assert "request_idx" in response.json()["auth_data"]
    good = envelope(url, key=vast_engine.private_key, request_idx="903", payload={"duration": 0})
    response = await http.post(f"{info.url}/reserve", json=good)
    assert response.status_code == 200
    await vast_engine.wait_for(lambda e: any(f.request_idx == 903 for f in e.finished))
    assert [f.request_idx for f in vast_engine.finished] == [903]  # the string, as an int
    reports = [r.body for r in vast_engine.worker_status_reports if r.body["id"] == 7]
    assert sum(r["new_load"] for r in reports) == 100.0


@pytest.mark.parametrize(
    ("own", "signed"),
    [
        ("http://127.0.0.1:41234", "HTTP://127.0.0.1:41234/"),
        ("https://worker.example", "https://WORKER.Example:443/"),
        ("https://worker.example:443", "https://worker.example"),
        ("http://worker.example:80/", "http://worker.example"),
        ("http://[2001:db8::1]:8080", "http://[2001:DB8:0:0::1]:8080/"),
    ],
)
async def test_equivalent_forms_of_the_workers_url_are_accepted(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient, own: str, signed: str
) -> None:
    info = await start_ready(start_worker, vast_engine, public_url=own)
    body = envelope(signed, key=vast_engine.private_key, payload={"duration": 0})
    response = await http.post(f"{info.url}/reserve", json=body)
    assert response.status_code == 200, response.text


async def test_another_workers_url_is_refused_and_logged_once_per_episode(
    start_worker: StartWorker,
    vast_engine: Any,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    own = "http://10.1.2.3:41234"
    info = await start_ready(start_worker, vast_engine, public_url=own)
    key = vast_engine.private_key
    caplog.set_level(logging.INFO, logger="nullworker")

    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "auth_data.url" in r.getMessage()
        ]

    others = ["http://10.1.2.3:41235", "https://10.1.2.3:41234", "http://10.1.2.4:41234"]
    for i in range(60):  # a flood of misaddressed requests, each validly signed
        body = envelope(others[i % 3], key=key, request_idx=1000 + i, payload={"duration": 0})
        response = await http.post(f"{info.url}/reserve", json=body)
        assert response.status_code == 401
        assert response.json() == {"error": "auth_data.url names another worker"}
    assert len(warnings()) == 1
    assert "http://10.1.2.3:41235" in warnings()[0] and own in warnings()[0]
    # A request for this worker ends the episode; the next mismatch is said again.
    ok = envelope(own, key=key, request_idx=1100, payload={"duration": 0})
    assert (await http.post(f"{info.url}/reserve", json=ok)).status_code == 200
    assert any("after 60 refused request(s)" in r.getMessage() for r in caplog.records)
    bad = envelope(others[2], key=key, request_idx=1101, payload={"duration": 0})
    assert (await http.post(f"{info.url}/reserve", json=bad)).status_code == 401
    assert len(warnings()) == 2 and "http://10.1.2.4:41234" in warnings()[1]


async def test_serve_runs_the_runtime_and_both_listeners_in_its_one_nursery(
    vast_engine: Any, tmp_path: Any
) -> None:
    """The task tree of a running worker: ``serve`` owns one nursery, and the runtime,
    the control listener and the main port are its children (not the app's lifespan)."""
    from nullworker.worker.config import WorkerConfig
    from nullworker.worker.server import serve

    config = WorkerConfig(
        port=0, control_port=0, lock_dir=str(tmp_path), **vast_settings(vast_engine)
    )
    async with trio.open_nursery() as nursery:
        info: ServeInfo = await nursery.start(serve, config)
        await info.wait_ready()
        [serve_task] = nursery.child_tasks
        assert serve_task.name == "nullworker.worker.server.serve"
        [own] = serve_task.child_nurseries
        assert sorted(task.name for task in own.child_tasks) == [
            "nullworker.worker.app.serve_control",
            "nullworker.worker.runtime.Worker.run",
            "nullworker.worker.server._serve_main",
        ]
        # What a program that embeds the worker sees: where it listens and read-only views.
        status = info.status()
        assert status["ready"] and not status["busy"] and status["mode"] == "vast"
        status["counts"]["started"] = 99  # a snapshot: changing it changes nothing
        assert info.status()["counts"]["started"] == 0
        assert not hasattr(info, "worker") and "_runtime" not in repr(info)
        nursery.cancel_scope.cancel()


async def test_a_runtime_failure_propagates_out_of_serve_with_its_cause_and_no_signal(
    vast_engine: Any, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library caller catches the runtime's failure from ``await serve(...)`` itself,
    with the original error as its cause; no SIGTERM is sent to the process."""
    import signal

    from nullworker.errors import WorkerFailed
    from nullworker.worker.config import WorkerConfig
    from nullworker.worker.server import serve

    armed = reporting_bug(monkeypatch)
    config = WorkerConfig(
        port=0, control_port=0, graceful_timeout_s=1.0, **vast_settings(vast_engine)
    )
    signals: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: signals.append(signum))
    caught: list[WorkerFailed] = []

    async def library_caller(*, task_status: trio.TaskStatus[ServeInfo]) -> None:
        try:
            await serve(config, task_status=task_status)
        except WorkerFailed as exc:  # on its own: no exception group to look into
            caught.append(exc)

    held: dict[str, httpx.Response] = {}
    try:
        async with trio.open_nursery() as nursery:
            info: ServeInfo = await nursery.start(library_caller)
            await info.wait_ready()

            async def hold() -> None:
                signed = envelope(
                    info.public_url or "", key=vast_engine.private_key, payload={"duration": 600}
                )
                held["response"] = await http.post(f"{info.url}/reserve", json=signed)

            nursery.start_soon(hold)
            await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].busy)
            armed.set()
            # Any change starts a report round; a local hold is one the public surface makes.
            assert info.control_url is not None
            with trio.move_on_after(30):
                try:
                    await http.post(f"{info.control_url}/hold", json={"duration": 0.5})
                except httpx.TransportError:
                    pass  # the failure may stop the control listener first: either is fine
        with trio.fail_after(10):
            await vast_engine.wait_for(lambda e: "boom" in e.workers[7].error_msg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(caught) == 1 and "RuntimeError: boom" in str(caught[0])
    assert isinstance(caught[0].__cause__, RuntimeError)
    assert signals == []
    assert held["response"].status_code == 503
    assert held["response"].json()["released"] == "shutdown"


def _shut_down_listener(port: int) -> None:
    """``shutdown()`` this process's socket listening on 127.0.0.1:``port``: its next
    ``accept()`` fails (EINVAL), as a listener that broke under the server would."""
    import os
    import socket

    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket
        with sock:
            try:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                address = sock.getsockname()
            except OSError:
                continue
            if listening and address == ("127.0.0.1", port):
                sock.shutdown(socket.SHUT_RDWR)
                return
    raise AssertionError(f"no listener on port {port}")


async def test_a_listener_failing_after_start_up_stops_serve_as_a_worker_failure(
    vast_engine: Any,
) -> None:
    """The control listener is a child of ``serve``'s nursery like the runtime: when it
    breaks, the engine hears why and the caller gets :class:`WorkerFailed`, no signal."""
    import signal
    from urllib.parse import urlsplit

    from nullworker.errors import WorkerFailed
    from nullworker.worker.config import WorkerConfig
    from nullworker.worker.server import serve

    config = WorkerConfig(
        port=0, control_port=0, graceful_timeout_s=1.0, **vast_settings(vast_engine)
    )
    signals: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: signals.append(signum))
    caught: list[WorkerFailed] = []

    async def library_caller(*, task_status: trio.TaskStatus[ServeInfo]) -> None:
        try:
            await serve(config, task_status=task_status)
        except WorkerFailed as exc:
            caught.append(exc)

    try:
        async with trio.open_nursery() as nursery:
            info: ServeInfo = await nursery.start(library_caller)
            await info.wait_ready()
            await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
            control_port = urlsplit(info.control_url or "").port
            assert control_port is not None
            _shut_down_listener(control_port)
        with trio.fail_after(10):
            await vast_engine.wait_for(lambda e: "worker failed" in e.workers[7].error_msg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(caught) == 1 and "OSError" in str(caught[0]), caught
    assert isinstance(caught[0].__cause__, OSError)
    assert signals == []
    assert not vast_engine.workers[7].ready  # told: it no longer counts as ready
