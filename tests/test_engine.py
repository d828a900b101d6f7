"""Tests of the local engine emulator.

Most run over real sockets: ``serve_engine`` on an ephemeral loopback port, httpx as the
client, real RSA keys. Pure timing rules (lease and demand expiry, ``wait_for``
timeouts) drive the sans-IO core directly under ``autojump_clock``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nullworker.engine import Engine, EngineRequestError, serve_engine
from nullworker.engine.core import Consumer, Hold, LocalHoldView, Scaling
from nullworker.engine.view import COLUMNS, dashboard, render_table, span
from nullworker.vast.envelope import AUTH_KEYS, parse_envelope, signature_ok
from nullworker.vast.signing import (
    generate_private_key,
    load_public_key,
    public_key_pem,
    sign_url,
    verify_url,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def private_key() -> rsa.RSAPrivateKey:
    # One key for the whole run: RSA generation is the slowest thing here.
    return generate_private_key()


@pytest.fixture
async def engine(nursery: trio.Nursery, private_key: rsa.RSAPrivateKey) -> Engine:
    engine = Engine(private_key=private_key)
    await nursery.start(partial(serve_engine, engine))
    return engine


@pytest.fixture
async def http(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    assert engine.url is not None
    async with httpx.AsyncClient(base_url=engine.url, timeout=5.0) as client:
        yield client


def status_body(
    worker_id: int,
    url: str,
    *,
    working: list[int] | None = None,
    ready: bool = True,
    error_msg: str = "",
) -> dict[str, Any]:
    """A worker_status body (docs/protocol.md §6.2), vastai 1.9.1 shape (with ``disk_usage``)."""
    working = working or []
    return {
        "id": worker_id,
        "mtoken": "token",
        "version": "1.1.0",
        "loadtime": 1.5 if ready else 0.0,
        "new_load": 0.0,
        "cur_load": 100.0 * len(working),
        "rej_load": 0.0,
        "max_perf": 100.0 if ready else 0.0,
        "cur_perf": 0.0,
        "error_msg": error_msg,
        "num_requests_working": len(working),
        "num_requests_recieved": 0,
        "additional_disk_usage": 0.0,
        "disk_usage": 1.25,
        "working_request_idxs": working,
        "cur_capacity": 0,
        "max_capacity": 0,
        "url": url,
    }


def route_body(request_idx: Any = 0, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint": "dev",
        "api_key": "dev",
        "cost": 100,
        "request_idx": request_idx,
        "replay_timeout": 60.0,
        **extra,
    }


async def report(http: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await http.post("/worker_status/", json=body)
    assert response.status_code == 200, response.text


async def route(http: httpx.AsyncClient, request_idx: int = 0) -> dict[str, Any]:
    response = await http.post("/route/", json=route_body(request_idx))
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data, dict)
    return data


# -- /pubkey/ and signatures ------------------------------------------------------------


async def test_pubkey_verifies_sign_url(engine: Engine, http: httpx.AsyncClient) -> None:
    response = await http.get("/pubkey/")
    assert response.status_code == 200
    assert response.text.startswith("-----BEGIN PUBLIC KEY-----")
    key = load_public_key(response.text)
    url = "http://127.0.0.1:41234"
    assert verify_url(key, url, sign_url(engine.private_key, url))
    assert not verify_url(key, url, sign_url(generate_private_key(1024), url))


async def test_ready_reply_is_signed_for_the_reported_url(
    engine: Engine, http: httpx.AsyncClient
) -> None:
    url = "http://127.0.0.1:45001"
    await report(http, status_body(1, url))
    reply = await route(http)

    assert reply["url"] == url
    assert set(AUTH_KEYS) <= reply.keys()
    assert reply["endpoint"] == "dev"
    assert reply["cost"] == 100
    assert isinstance(reply["reqnum"], int)
    assert isinstance(reply["request_idx"], int) and reply["request_idx"] > 0

    key = load_public_key((await http.get("/pubkey/")).text)
    assert verify_url(key, url, reply["signature"])
    # What a worker does with the client's envelope:
    envelope = parse_envelope(json.dumps({"auth_data": reply, "payload": {}}).encode())
    assert signature_ok(envelope, key)
    tampered = parse_envelope(
        json.dumps(
            {"auth_data": {**reply, "url": "http://127.0.0.1:45002"}, "payload": {}}
        ).encode()
    )
    assert not signature_ok(tampered, key)
    assert not verify_url(key, url + "/", reply["signature"])


# -- /route/: demand, leases, busy workers -------------------------------------------------


async def test_route_without_workers_waits_and_polls_do_not_add_demand(
    engine: Engine, http: httpx.AsyncClient
) -> None:
    first = await route(http)
    assert "url" not in first
    assert first["status"] == "WAITING"
    idx = first["request_idx"]
    assert isinstance(idx, int) and idx > 0
    assert first["waiting"] == 1

    for _ in range(3):
        poll = await route(http, idx)
        assert "url" not in poll
        assert poll["request_idx"] == idx
        assert poll["waiting"] == 1
    assert engine.waiting == 1

    second = await route(http)
    assert second["request_idx"] != idx
    assert second["waiting"] == 2
    snapshot = (await http.get("/workers")).json()
    assert snapshot["waiting"] == 2
    assert {p["request_idx"] for p in snapshot["pending"]} == {idx, second["request_idx"]}


async def test_waiting_request_is_routed_when_a_worker_reports_ready(
    engine: Engine, http: httpx.AsyncClient
) -> None:
    waiting = await route(http)
    idx = waiting["request_idx"]
    await report(http, status_body(3, "http://127.0.0.1:45003", ready=False))
    assert "url" not in await route(http, idx)  # loading workers are not routed to

    await report(http, status_body(3, "http://127.0.0.1:45003"))
    ready = await route(http, idx)
    assert ready["url"] == "http://127.0.0.1:45003"
    assert ready["request_idx"] == idx
    assert engine.waiting == 0
    assert engine.ready_replies[-1].worker_id == 3


async def test_busy_and_errored_workers_are_not_routed_to(
    engine: Engine, http: httpx.AsyncClient
) -> None:
    await report(http, status_body(1, "http://127.0.0.1:45011", working=[77]))
    await report(http, status_body(2, "http://127.0.0.1:45012", error_msg="model died"))
    reply = await route(http)
    assert "url" not in reply
    assert reply["workers"] == {"busy": 1, "error": 1}

    await report(http, status_body(1, "http://127.0.0.1:45011"))
    assert (await route(http, reply["request_idx"]))["url"] == "http://127.0.0.1:45011"


async def test_lease_prevents_double_routing(engine: Engine, http: httpx.AsyncClient) -> None:
    url = "http://127.0.0.1:45021"
    await report(http, status_body(1, url))
    first, second = await route(http), await route(http)
    assert first["url"] == url
    assert "url" not in second

    # A stale "idle" report (sent before the client reached the worker) keeps the lease.
    await report(http, status_body(1, url))
    assert "url" not in await route(http, second["request_idx"])
    assert engine.snapshot()["workers"][0]["state"] == "leased"

    # The reservation shows up, then ends: the worker is free again.
    await report(http, status_body(1, url, working=[first["request_idx"]]))
    worker = engine.snapshot()["workers"][0]
    assert worker["state"] == "busy" and worker["reservation_age_s"] is not None
    await report(http, status_body(1, url))
    third = await route(http, second["request_idx"])
    assert third["url"] == url
    assert third["reqnum"] > first["reqnum"]


async def test_concurrent_routes_get_different_workers(
    engine: Engine, http: httpx.AsyncClient
) -> None:
    urls = {f"http://127.0.0.1:{45030 + i}" for i in range(3)}
    for i, url in enumerate(sorted(urls)):
        await report(http, status_body(10 + i, url))
    replies: list[dict[str, Any]] = []

    async def one() -> None:
        replies.append(await route(http))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    got = [r["url"] for r in replies if "url" in r]
    assert sorted(got) == sorted(urls)
    assert sum("url" not in r for r in replies) == 1
    assert len({r["reqnum"] for r in replies if "url" in r}) == 3


async def test_free_workers_are_used_least_recently_routed_first(
    engine: Engine, http: httpx.AsyncClient
) -> None:
    a, b = "http://127.0.0.1:45041", "http://127.0.0.1:45042"
    await report(http, status_body(1, a))
    await report(http, status_body(2, b))
    assert (await route(http))["url"] == a
    await report(http, status_body(1, a, working=[1]))
    await report(http, status_body(1, a))  # a is free again, but b was never used
    assert (await route(http))["url"] == b


async def test_on_demand_hook_is_called_when_no_worker_is_free(
    engine: Engine, http: httpx.AsyncClient
) -> None:
    calls: list[int] = []
    engine.on_demand = calls.append
    idx = (await route(http))["request_idx"]
    await route(http, idx)
    await route(http)
    assert calls == [1, 1, 2]

    await report(http, status_body(1, "http://127.0.0.1:45051"))
    assert "url" in await route(http, idx)
    assert calls == [1, 1, 2]


# -- /worker_status/ and /delete_requests/ -----------------------------------------------


async def test_worker_status_is_recorded(engine: Engine, http: httpx.AsyncClient) -> None:
    body = status_body(5, "http://127.0.0.1:45061")
    older = {k: v for k, v in body.items() if k != "disk_usage"}  # the pre-1.9.1 shape
    await report(http, body)
    await report(http, older)
    assert [r.body for r in engine.worker_status_reports] == [body, older]
    worker = engine.workers[5]
    assert worker.ready and worker.report_count == 2
    assert worker.url == "http://127.0.0.1:45061"

    # The start script's failure beacon carries only a few fields.
    beacon = {"id": 6, "mtoken": "", "version": "0", "error_msg": "boom", "url": ""}
    await report(http, beacon)
    assert engine.worker_state(6) == "error"


async def test_malformed_worker_status_is_refused_naming_the_field(
    engine: Engine, http: httpx.AsyncClient
) -> None:
    response = await http.post(
        "/worker_status/", json={**status_body(1, "http://x"), "num_requests_working": "two"}
    )
    assert response.status_code == 422
    assert response.json()["field"] == "num_requests_working"
    response = await http.post("/worker_status/", json={"url": "http://x"})
    assert response.status_code == 422 and response.json()["field"] == "id"
    assert not engine.worker_status_reports and not engine.workers


async def test_delete_requests_in_both_shapes(engine: Engine, http: httpx.AsyncClient) -> None:
    current = {
        "worker_id": 1,
        "mtoken": "token",
        "requests": [
            {
                "request_idx": 11,
                "success": True,
                "status": "Success",
                "entered_queue_at": 100.0,
                "work_started_at": 100.5,
                "work_completed_at": 160.5,
            },
            {
                "request_idx": 12,
                "success": True,
                "status": "Cancelled",
                "entered_queue_at": 101.0,
                "work_started_at": 0.0,
                "work_completed_at": 0.0,
            },
        ],
    }
    legacy = {"worker_id": 2, "mtoken": "token", "request_idxs": [21, 22], "success": False}
    for body in (current, legacy):
        response = await http.post("/delete_requests/", json=body)
        assert response.status_code == 200, response.text

    assert [r.body for r in engine.delete_requests_reports] == [current, legacy]
    finished = [(f.worker_id, f.request_idx, f.status, f.success) for f in engine.finished]
    assert finished == [
        (1, 11, "Success", True),
        (1, 12, "Cancelled", True),
        (2, 21, None, False),
        (2, 22, None, False),
    ]
    assert engine.finished[0].work_completed_at == 160.5
    view = (await http.get("/workers")).json()["finished"]
    assert [f["request_idx"] for f in view] == [22, 21, 12, 11]

    bad = await http.post(
        "/delete_requests/",
        json={"worker_id": 1, "requests": [{"request_idx": 1, "status": "Finished"}]},
    )
    assert bad.status_code == 422
    assert len(engine.delete_requests_reports) == 2


async def test_master_token_is_checked_when_configured(
    nursery: trio.Nursery, private_key: rsa.RSAPrivateKey
) -> None:
    engine = Engine(private_key=private_key, master_token="s3cret")
    url = await nursery.start(partial(serve_engine, engine))
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
        wrong = await http.post("/worker_status/", json=status_body(1, "http://x"))
        assert wrong.status_code == 401
        assert not engine.workers
        await report(http, {**status_body(1, "http://x"), "mtoken": "s3cret"})
        assert 1 in engine.workers
        gone = await http.post(
            "/delete_requests/", json={"worker_id": 1, "request_idxs": [1], "success": True}
        )
        assert gone.status_code == 401 and not engine.finished


# -- request validation, api keys, logging -----------------------------------------------


async def test_bodies_that_are_not_json_objects_are_refused(http: httpx.AsyncClient) -> None:
    for path in ("/route/", "/worker_status/", "/delete_requests/"):
        not_json = await http.post(path, content=b"{nope")
        assert not_json.status_code == 400 and "error" in not_json.json()
        a_list = await http.post(path, json=[1, 2])
        assert a_list.status_code == 400 and "error" in a_list.json()
    no_endpoint = await http.post("/route/", json={"api_key": "k", "request_idx": 0})
    assert no_endpoint.status_code == 422 and no_endpoint.json()["field"] == "endpoint"
    bad_idx = await http.post("/route/", json=route_body("seven"))
    assert bad_idx.status_code == 422 and bad_idx.json()["field"] == "request_idx"


async def test_api_key_is_required_when_configured(
    nursery: trio.Nursery, private_key: rsa.RSAPrivateKey
) -> None:
    engine = Engine(private_key=private_key, api_key="right")
    url = await nursery.start(partial(serve_engine, engine))
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
        wrong = await http.post("/route/", json=route_body(api_key="wrong"))
        assert wrong.status_code == 401 and "error" in wrong.json()
        missing = await http.post("/route/", json={"endpoint": "dev", "request_idx": 0})
        assert missing.status_code == 401
        assert engine.waiting == 0
        in_body = await http.post("/route/", json=route_body(api_key="right"))
        assert in_body.status_code == 200
        as_bearer = await http.post(
            "/route/",
            json={"endpoint": "dev", "request_idx": 0},
            headers={"Authorization": "Bearer right"},
        )
        assert as_bearer.status_code == 200
        assert engine.waiting == 2


async def test_access_log_has_one_line_per_request_without_query_or_key(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nullworker.engine.access")
    await http.post(
        "/route/", params={"api_key": "topsecret"}, json=route_body(api_key="topsecret")
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "nullworker.engine.access"]
    assert len(lines) == 1
    assert re.fullmatch(r"POST /route/ 200 [0-9.]+ms", lines[0]), lines
    assert "topsecret" not in caplog.text


# -- views ---------------------------------------------------------------------------------


async def test_workers_json_and_html_page(engine: Engine, http: httpx.AsyncClient) -> None:
    engine.register_worker(2, label="pid 4242")
    await report(http, status_body(1, "http://127.0.0.1:45071"))
    await route(http)
    waiting = await route(http)

    data = (await http.get("/workers")).json()
    by_id = {w["id"]: w for w in data["workers"]}
    one = by_id[1]
    assert one["url"] == "http://127.0.0.1:45071"
    assert one["ready"] and one["busy"] and not one["idle"]
    assert one["state"] == "leased"
    assert one["reservation_age_s"] >= 0
    assert one["last_report_age_s"] >= 0
    assert one["report_count"] == 1
    assert by_id[2]["state"] == "starting" and by_id[2]["label"] == "pid 4242"
    assert data["waiting"] == 1 and data["pending"][0]["request_idx"] == waiting["request_idx"]
    assert data["counters"]["route_ready"] == 1

    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # Server-rendered: the tables are there without any script running.
    assert "http://127.0.0.1:45071" in page.text and "leased" in page.text
    assert f"<td>{waiting['request_idx']}</td>" in page.text
    assert not re.search(r"<!--(summary|count:|table:)", page.text)
    # Self-contained: every script, style sheet and link is the engine's own.
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page.text)
    assert set(links) == {
        "static/dashboard.css",
        "static/dashboard.js",
        "workers",
        "timeline",
        "dashboard",
    }
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind, needle in [
        ("dashboard.js", "text/javascript", "fetch("),
        ("dashboard.css", "text/css", "--busy"),
    ]:
        asset = await http.get(f"/static/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(kind)
        assert needle in asset.text
    assert (await http.get("/static/index.html")).status_code == 404
    assert (await http.get("/static/missing.js")).status_code == 404


async def test_page_escapes_what_workers_report(engine: Engine, http: httpx.AsyncClient) -> None:
    await report(
        http, status_body(1, "http://127.0.0.1:45072", error_msg="<script>alert(1)</script>")
    )
    page = (await http.get("/")).text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_retired_workers_are_forgotten(engine: Engine, http: httpx.AsyncClient) -> None:
    await report(http, status_body(4, "http://127.0.0.1:45081"))
    engine.retire_worker(4)
    await report(http, status_body(4, "http://127.0.0.1:45081"))  # a last report in flight
    assert 4 not in engine.workers
    assert "url" not in await route(http)
    assert len(engine.worker_status_reports) == 2  # still recorded as received


async def test_wait_for_wakes_on_incoming_report(engine: Engine, http: httpx.AsyncClient) -> None:
    woke = trio.Event()

    async def waiter() -> None:
        await engine.wait_for(lambda e: 9 in e.workers and e.workers[9].ready, timeout=5)
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        await report(http, status_body(9, "http://127.0.0.1:45091", ready=False))
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        await report(http, status_body(9, "http://127.0.0.1:45091"))
    assert woke.is_set()


async def test_timeline_and_dashboard_endpoints(engine: Engine, http: httpx.AsyncClient) -> None:
    await report(http, status_body(1, "http://127.0.0.1:45073", working=[5]))
    await route(http)  # no free worker: one request waits
    engine.sample()
    timeline = (await http.get("/timeline")).json()
    assert timeline["series"] == ["t", "waiting", "busy", "idle", "starting", "unhealthy"]
    assert timeline["interval_s"] == 1.0 and timeline["keep_s"] == 600.0
    assert timeline["samples"]  # serve_engine's sampler took one at start, too
    assert timeline["samples"][-1][1:] == [1, 1, 0, 0, 0]
    last = timeline["samples"][-1][0]
    assert (await http.get("/timeline", params={"since": last})).json()["samples"] == []

    data = (await http.get("/dashboard", params={"since": last - 0.001})).json()
    assert [s[0] for s in data["timeline"]["samples"]] == [last]
    view = data["view"]
    assert view["counts"] == {"waiting": 1, "busy": 1, "idle": 0, "starting": 0, "unhealthy": 0}
    assert "1 worker: 1 busy" in view["summary"] and "1 request waiting" in view["summary"]
    (worker,) = view["tables"]["workers"]["rows"]
    assert worker["cells"][1] == {"text": "http://127.0.0.1:45073", "cls": "url"}
    assert worker["cells"][4]["text"].endswith("held (request 5)")
    (pending,) = view["tables"]["pending"]["rows"]
    assert pending["cells"][-1] == "no free worker (1 busy; this engine starts none)"

    for bad in ("soon", "nan"):
        refused = await http.get("/timeline", params={"since": bad})
        assert refused.status_code == 400, bad


async def test_the_sampler_samples_every_second(engine: Engine) -> None:
    with trio.fail_after(3):
        while len(engine.timeline) < 2:
            await trio.sleep(0.05)
    first, second = list(engine.timeline)[:2]
    assert second[0] - first[0] == pytest.approx(1.0, abs=0.3)


# -- the sans-IO core under a mock clock -----------------------------------------------------


def _core_engine(private_key: rsa.RSAPrivateKey, **options: Any) -> Engine:
    engine = Engine(private_key=private_key, **options)
    engine.worker_status(status_body(1, "http://127.0.0.1:45101"))
    return engine


async def test_lease_expires_when_no_report_shows_the_worker_busy(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    engine = _core_engine(private_key, lease_s=3.0)
    assert "url" in engine.route(route_body())
    waiting = engine.route(route_body())
    assert "url" not in waiting
    await trio.sleep(2.9)
    assert "url" not in engine.route(route_body(waiting["request_idx"]))
    await trio.sleep(0.2)
    assert engine.route(route_body(waiting["request_idx"]))["url"] == "http://127.0.0.1:45101"


async def test_unpolled_demand_expires(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    engine = Engine(private_key=private_key, demand_ttl_s=10.0)
    kept = engine.route(route_body())["request_idx"]
    engine.route(route_body())
    assert engine.waiting == 2
    for _ in range(3):
        await trio.sleep(6)
        engine.route(route_body(kept))
    assert engine.waiting == 1
    assert [p.request_idx for p in engine.pending.values()] == [kept]
    assert engine.counters["demand_expired"] == 1


async def test_silent_workers_go_stale_and_are_not_routed(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    engine = _core_engine(private_key, stale_after_s=35.0)
    await trio.sleep(36)
    assert engine.worker_state(1) == "stale"
    assert "url" not in engine.route(route_body())
    engine.worker_status(status_body(1, "http://127.0.0.1:45101"))
    assert engine.worker_state(1) == "idle"


async def test_idle_since_tracks_idle_time(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    engine = _core_engine(private_key)
    await trio.sleep(30)
    assert engine.snapshot()["workers"][0]["idle_age_s"] == pytest.approx(30, abs=0.5)
    engine.route(route_body())
    assert engine.snapshot()["workers"][0]["idle_age_s"] is None


async def test_wait_for_times_out(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    engine = Engine(private_key=private_key)
    with pytest.raises(trio.TooSlowError):
        await engine.wait_for(lambda e: bool(e.workers), timeout=5)


async def test_timeline_keeps_the_last_minutes(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    engine = Engine(private_key=private_key, timeline_s=5.0)
    engine.register_worker(1)  # starting
    engine.worker_status(status_body(2, "http://127.0.0.1:45111"))  # idle
    engine.worker_status(status_body(3, "http://127.0.0.1:45112", working=[9]))  # busy
    engine.worker_status(status_body(4, "http://127.0.0.1:45113", error_msg="boom"))
    engine.route(route_body())  # leases worker 2
    engine.route(route_body())  # waits
    for _ in range(7):
        engine.sample()
        await trio.sleep(1)
    # Five samples kept. The first shows worker 2 leased (busy), the last after the
    # 3 s lease expired (idle again).
    assert len(engine.timeline) == 5
    assert engine.timeline[0][1:] == (1, 2, 0, 1, 1)
    assert engine.timeline[-1][1:] == (1, 1, 1, 1, 1)


async def test_how_finished_holds_ended(private_key: rsa.RSAPrivateKey) -> None:
    engine = Engine(private_key=private_key)
    engine.worker_status(status_body(1, "http://127.0.0.1:45121", working=[1]))
    engine.worker_status(status_body(2, "http://127.0.0.1:45122", working=[3]))

    def entry(idx: int, status: str, held: float) -> dict[str, Any]:
        return {
            "request_idx": idx,
            "success": status in ("Success", "Cancelled"),
            "status": status,
            "entered_queue_at": 1000.0,
            "work_started_at": 1000.0 if held else 0.0,
            "work_completed_at": 1000.0 + held,
        }

    # What the worker's control listener said about the holds, as nullworker dev relays it.
    engine.set_hold(1, Hold(request_idx=1, duration_s=60.0, started_at=1000.0, ends_at=1060.0))
    engine.set_hold(2, Hold(request_idx=3, duration_s=60.0, started_at=1000.0, ends_at=1060.0))
    assert engine.snapshot()["workers"][0]["hold"]["duration_s"] == 60.0
    engine.set_hold(1, Hold(request_idx=2, duration_s=30.0, started_at=1000.0, ends_at=1030.0))
    entries = [
        entry(1, "Success", 60.02),  # the deadline: elapsed
        entry(2, "Success", 12.0),  # ended before it: POST /release
        entry(4, "Success", 5.0),  # never described: the engine cannot tell
        entry(5, "Cancelled", 3.0),  # the client closed its connection: a release
        entry(9, "Cancelled", 0.0),  # it went away while queued, before the hold began
        entry(6, "Rejected", 0.0),
        entry(7, "Error", 1.0),
    ]
    engine.delete_requests({"worker_id": 1, "requests": entries})
    engine.retire_worker(2, reason="idle for 60 s")
    engine.delete_requests({"worker_id": 2, "requests": [entry(3, "Cancelled", 20.0)]})
    engine.delete_requests({"worker_id": 1, "request_idxs": [8], "success": False})
    ended = {f.request_idx: f.ended for f in engine.finished}
    assert ended == {
        1: "elapsed",
        2: "released by consumer",
        4: "completed",
        5: "released by client",
        9: "client left before the hold began",
        6: "rejected: the worker stayed busy past its queue time",
        7: "failed on the worker",
        3: "worker shut down",
        8: "failed",
    }
    # A report that shows the worker idle forgets its hold.
    engine.worker_status(status_body(1, "http://127.0.0.1:45121"))
    assert engine.workers[1].hold is None

    rows = dashboard(engine)["tables"]["finished"]["rows"]
    by_request = {row["cells"][0]: row["cells"] for row in rows}
    assert by_request["2"][4] == "12 s"
    assert by_request["2"][5] == {
        "text": "released by consumer",
        "cls": "end-ok",
        "title": "POST /release on the worker's control listener",
    }
    assert by_request["2"][6] == {"text": "Success", "title": "success: true"}
    assert by_request["3"][5]["cls"] == "end-note"
    # Letting go is normal; only an end that cut something short is worth a look.
    assert by_request["5"][5]["cls"] == "end-ok"
    assert "scale-down" in by_request["5"][5]["title"]
    assert by_request["9"][5]["cls"] == "end-note"
    assert by_request["8"][6]["text"] == "failure"


async def test_why_requests_wait(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    def reasons(engine: Engine) -> list[str]:
        return [p["reason"] for p in engine.snapshot()["pending"]]

    plain = Engine(private_key=private_key)
    answer = plain.route(route_body())
    assert reasons(plain) == ["no worker has reported (this engine starts none)"]
    assert answer["reason"] == "no worker has reported (this engine starts none)"

    scaling = Scaling(min_workers=0, max_workers=2, idle_timeout_s=60.0)
    engine = Engine(private_key=private_key, scaling=scaling)
    engine.worker_status(status_body(1, "http://127.0.0.1:45131", working=[1]))
    # As nullworker dev does, the demand hook starts a worker before the answer is sent,
    # and the answer already says so.
    engine.on_demand = lambda waiting: engine.register_worker(2)
    first = engine.route(route_body())
    assert first["reason"] == "no ready worker yet: worker 2 is starting (0 s)"
    engine.on_demand = None
    await trio.sleep(2)
    engine.route(route_body(first["request_idx"]))
    await trio.sleep(1)
    second = engine.route(route_body())
    assert second["reason"] == "at --max-workers 2 (1 busy, 1 starting)"
    assert reasons(engine) == [
        "no ready worker yet: worker 2 is starting (3 s)",
        "at --max-workers 2 (1 busy, 1 starting)",
    ]
    engine.retire_worker(2, reason="exited on its own with code 3")
    scaling.paused_until = trio.current_time() + 4
    assert reasons(engine) == ["a worker failed: no new worker for 4 s"] * 2
    scaling.paused_until = None
    assert reasons(engine) == ["no free worker: starting one"] * 2

    rows = dashboard(engine)["tables"]["pending"]["rows"]
    assert [row["cells"][2] for row in rows] == ["3.0 s", "0.0 s"]


async def test_idle_countdown_and_recent_workers(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    scaling = Scaling(min_workers=1, max_workers=3, idle_timeout_s=60.0)
    engine = Engine(private_key=private_key, scaling=scaling)
    engine.register_worker(1, label="port 45141", log="/tmp/logs/worker-1.log")
    engine.set_pid(1, 4141)
    engine.worker_status(status_body(1, "http://127.0.0.1:45141"))
    await trio.sleep(20)
    engine.worker_status(status_body(2, "http://127.0.0.1:45142"))
    await trio.sleep(10)
    workers = {w["id"]: w for w in engine.snapshot()["workers"]}
    # Above --min-workers 1, the longest idle goes first; the other one stays.
    assert workers[1]["scale_down_in_s"] == pytest.approx(30)
    assert workers[2]["scale_down_in_s"] is None
    assert workers[1]["pid"] == 4141 and workers[1]["uptime_s"] == pytest.approx(30)

    rows = {row["cells"][0]: row["cells"] for row in dashboard(engine)["tables"]["workers"]["rows"]}
    assert rows["1"][5] == "idle 30 s, stops in 30 s"
    assert rows["2"][5] == "idle 10 s, kept (--min-workers 1)"
    assert rows["1"][8] == "4141"
    assert rows["1"][10]["text"] == "/tmp/logs/worker-1.log"

    engine.retire_worker(1, reason="stopped by dev: idle for 60 s")
    await trio.sleep(5)
    (stopped,) = engine.snapshot()["stopped"]
    assert stopped["id"] == 1 and stopped["reason"] == "stopped by dev: idle for 60 s"
    assert stopped["lived_s"] == pytest.approx(30) and stopped["stopped_ago_s"] == pytest.approx(5)
    (row,) = dashboard(engine)["tables"]["stopped"]["rows"]
    assert row["cells"][2:5] == ["30 s", "5.0 s ago", "stopped by dev: idle for 60 s"]


async def test_requests_that_stop_polling_are_listed_as_abandoned(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    engine = Engine(private_key=private_key, demand_ttl_s=10.0)
    idx = engine.route(route_body())["request_idx"]
    await trio.sleep(4)
    engine.route(route_body(idx))
    await trio.sleep(11)
    assert engine.waiting == 0
    (gone,) = engine.snapshot()["abandoned"]
    assert gone["request_idx"] == idx and gone["waited_s"] == pytest.approx(4)
    (row,) = dashboard(engine)["tables"]["finished"]["rows"]
    assert row["cells"][5]["text"] == "gave up after waiting 4.0 s"


def test_spans_read_as_people_say_them() -> None:
    assert [span(s) for s in (None, 0.04, 9.96, 12.4, 185, 3725)] == [
        "\u2014",
        "0.0 s",
        "10.0 s",
        "12 s",
        "3 min 05 s",
        "1 h 02 min",
    ]
    table = {"columns": ["a", "b"], "rows": [], "empty": "nothing <here>"}
    assert 'colspan="2">nothing &lt;here&gt;<' in render_table("t", table)


async def test_core_refuses_negative_request_idx(private_key: rsa.RSAPrivateKey) -> None:
    engine = Engine(private_key=private_key)
    with pytest.raises(EngineRequestError) as info:
        engine.route(route_body(-1))
    assert info.value.status == 422


# -- the command line ------------------------------------------------------------------------


def test_command_line_serves_the_given_key_and_stops_on_sigint(
    tmp_path: Path, private_key: rsa.RSAPrivateKey
) -> None:
    key_file = tmp_path / "engine.pem"
    key_file.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "nullworker.engine", "--port", "0", "--key-file", str(key_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert match, line
        pem = httpx.get(match.group(1) + "/pubkey/", timeout=5.0).text
        assert pem == public_key_pem(private_key)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_line_rejects_a_bad_key_file(tmp_path: Path) -> None:
    from nullworker.engine import main

    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    assert main(["--port", "0", "--key-file", str(bad)]) == 2


async def test_a_workers_local_holds_and_consumer_on_its_row(
    autojump_clock: trio.testing.MockClock, private_key: rsa.RSAPrivateKey
) -> None:
    """Only local holds keep the worker: the row names them by their labels."""
    engine = Engine(private_key=private_key)
    engine.register_worker(1, control_url="http://127.0.0.1:45200")
    # What a worker with local holds open and no reservation reports: busy, no request.
    held_locally = status_body(1, "http://127.0.0.1:45201")
    held_locally.update(num_requests_working=1, cur_load=100.0)
    engine.worker_status(held_locally)
    now = time.time()
    engine.set_local_holds(
        1,
        (
            LocalHoldView(id=4, label="job 5", started_at=now - 21.2, duration_s=3600.0),
            LocalHoldView(id=5, label="", started_at=now - 2.0, duration_s=None),
        ),
    )
    restart_at = trio.current_time() + 4.0
    engine.set_consumer(
        1, Consumer(state="restarting", pid=77, exit_code=1, restarts=2, restart_at=restart_at)
    )
    (worker,) = engine.snapshot()["workers"]
    assert worker["control_url"] == "http://127.0.0.1:45200"
    assert [h["label"] for h in worker["local_holds"]] == ["job 5", ""]
    assert worker["consumer"]["restart_in_s"] == 4.0

    (row,) = dashboard(engine)["tables"]["workers"]["rows"]
    cells = dict(zip(COLUMNS["workers"], row["cells"], strict=True))
    assert cells["state"]["text"] == "busy"
    assert cells["hold"]["text"] == "job 5 \u00b7 21 s + 1 more"
    assert "local hold 4 \u2018job 5\u2019: held 21 s" in cells["hold"]["title"]
    assert cells["consumer"] == {
        "text": "exited with code 1, restarting in 4.0 s, restarted 2 times",
        "cls": "c-warn",
    }
    assert cells["control"]["text"] == "http://127.0.0.1:45200"

    # A report that shows the worker idle: no hold keeps it any more.
    engine.worker_status(status_body(1, "http://127.0.0.1:45201"))
    assert engine.snapshot()["workers"][0]["local_holds"] == []
