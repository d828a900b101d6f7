"""The worker over real HTTP: Hypercorn on 127.0.0.1, httpx and raw sockets as clients.

These run the worker standalone (unsecured, not reporting); signatures and engine
reports are covered in test_vast.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio.testing

from nullworker.worker.config import WorkerConfig
from nullworker.worker.server import ServeInfo, serve

from .conftest import StartMemoryWorker, StartWorker, body, envelope, runtime, vast_settings
from .helpers import wait_until

URL = "http://127.0.0.1:1"  # any url: unsecured workers do not check it

#: A fresh request_idx for each reservation: one request_idx is held or queued only once.
_REQUEST_IDX = itertools.count(10_000)


async def reserve(http: httpx.AsyncClient, info: ServeInfo, **payload: Any) -> httpx.Response:
    signed = envelope(URL, payload=payload, request_idx=next(_REQUEST_IDX))
    return await http.post(f"{info.url}/reserve", json=signed)


async def open_raw_reservation(
    info: ServeInfo, payload: dict[str, Any], *, signed: dict[str, Any] | None = None
) -> trio.SocketStream:
    """Send a /reserve request on a raw socket and leave it open, as a holding client does.

    ``signed`` is a complete envelope to send instead of an unsigned one around ``payload``.
    """
    parts = urlsplit(info.url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    if signed is None:
        signed = envelope(URL, payload=payload, request_idx=next(_REQUEST_IDX))
    data = body(signed)
    head = (
        f"POST /reserve HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    await stream.send_all(head.encode() + data)
    return stream


async def test_reserve_elapses_with_200_body(
    start_memory_worker: StartMemoryWorker, autojump_clock: trio.testing.MockClock
) -> None:
    served = await start_memory_worker()
    info, http = served.info, served.http
    response = await reserve(http, info, duration=0.2)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert data["released"] == "duration_elapsed"
    assert data["duration"] == 0.2
    assert 0.2 <= data["held"] < 5
    assert not runtime(info).slot.statistics().busy


async def test_each_response_is_written_in_one_piece(
    start_worker: StartWorker, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every write of the process (the server's and the client's) goes through here.
    writes: list[bytes] = []
    send_all = trio.SocketStream.send_all

    async def recording(self: trio.SocketStream, data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recording)
    info = await start_worker()
    assert (await reserve(http, info, duration=0)).status_code == 200
    assert (await http.get(f"{info.url}/health")).status_code == 200
    assert (await http.post(f"{info.url}/reserve", content=b"{")).status_code == 422
    assert (await http.get(f"{info.url}/no-such-page")).status_code == 404
    answers = [w for w in writes if w.startswith(b"HTTP/1.1 ")]
    assert [int(w.split(b" ", 2)[1]) for w in answers] == [200, 200, 422, 404]
    for answer in answers:
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        assert length is not None, head
        assert len(rest) == int(length.group(1)) > 0, answer  # head and body together


def _count_tasks() -> int:
    """Every task of this trio run (a walk of the task tree from the root)."""
    tasks = [trio.lowlevel.current_root_task()]
    count = 0
    while tasks:
        task = tasks.pop()
        count += 1
        for nursery in task.child_nurseries:
            tasks.extend(nursery.child_tasks)
    return count


async def test_an_open_queued_reservation_costs_three_tasks(start_worker: StartWorker) -> None:
    # Memory per waiting request is mostly per-task state (coroutine frames, cancel
    # status, context): the connection's reader, the app's task and Quart-Trio's
    # message reader. No idle timer per connection, no second task per request.
    info = await start_worker(max_queue_time_s=60.0)
    slot = runtime(info).slot
    holder = await open_raw_reservation(info, {"duration": 600})
    await wait_until(lambda: slot.busy and slot.statistics().busy)
    before = _count_tasks()
    queued = [await open_raw_reservation(info, {"duration": 600}) for _ in range(20)]
    await wait_until(lambda: slot.statistics().waiting == 20)
    await trio.testing.wait_all_tasks_blocked()
    assert _count_tasks() - before == 3 * 20
    for stream in [holder, *queued]:
        await stream.aclose()
    await wait_until(lambda: not slot.busy and slot.statistics().waiting == 0)
    await wait_until(lambda: _count_tasks() == before - 3)


async def test_an_early_answer_says_close_and_the_rest_of_the_body_is_drained(
    start_worker: StartWorker,
) -> None:
    # A body over the limit gets its 413 before it is all sent. The answer must say
    # the connection closes (or a client reuses it and loses its next request), and
    # the server must keep reading what the client still sends for a while (closing
    # at once answers those bytes with a RST, which can destroy the 413 itself).
    info = await start_worker()
    parts = urlsplit(info.url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    head = (
        f"POST /reserve HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    )
    await stream.send_all(head.encode() + b"x" * 70_000)
    answer = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            answer += chunk  # up to the server's half-close
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413"), answer[:200]
    headers = rest.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nconnection: close" in b"\r\n" + headers, answer[:400]
    # Still being read and dropped: more of the body goes through without a reset.
    for _ in range(3):
        await trio.sleep(0.1)
        await stream.send_all(b"x" * 65536)
    await stream.aclose()
    # And the worker serves on.
    async with httpx.AsyncClient() as http:
        assert (await reserve(http, info, duration=0)).status_code == 200


async def test_duration_is_capped_by_max_reservation_seconds(
    start_memory_worker: StartMemoryWorker, autojump_clock: trio.testing.MockClock
) -> None:
    served = await start_memory_worker(max_reservation_s=0.2)
    info, http = served.info, served.http
    response = await reserve(http, info, duration=1000)
    assert response.json()["duration"] == 0.2
    response = await reserve(http, info)  # omitted: the cap
    assert response.status_code == 200
    assert response.json()["duration"] == 0.2


async def test_client_disconnect_frees_the_slot_for_the_next_in_queue(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    slot = runtime(info).slot
    holder = await open_raw_reservation(info, {"duration": 600})
    await wait_until(lambda: slot.statistics().busy)

    result: dict[str, Any] = {}

    async def queued() -> None:
        response = await reserve(http, info, duration=0)
        result["status"] = response.status_code
        result["body"] = response.json()
        result["at"] = time.monotonic()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(queued)
        await wait_until(lambda: slot.statistics().waiting == 1)
        closed_at = time.monotonic()
        await holder.aclose()  # a real FIN: the client went away
    assert result["status"] == 200
    assert result["body"]["released"] == "duration_elapsed"
    counts = slot.statistics().counts
    assert counts["cancelled"] == 1
    assert counts["duration_elapsed"] == 1
    # Liveness only (the measured figure lives in bench/): the queued reservation
    # started when the socket closed, not at the 600 s cap.
    assert result["at"] - closed_at < 5


async def test_busy_worker_answers_429_after_max_queue_time(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker(max_queue_time_s=0.3)
    async with trio.open_nursery() as nursery:
        first: dict[str, Any] = {}

        async def hold() -> None:
            first["response"] = await reserve(http, info, duration=30)

        nursery.start_soon(hold)
        await wait_until(lambda: runtime(info).slot.statistics().busy)
        start = time.monotonic()
        response = await reserve(http, info, duration=1)
        waited = time.monotonic() - start
        assert response.status_code == 429
        assert "busy" in response.json()["error"]
        assert 1 <= int(response.headers["retry-after"]) <= 30
        assert waited >= 0.3  # it really waited in the queue first
        # The worker keeps serving: the consumer releases the first reservation.
        assert info.control_url is not None
        released = await http.post(
            f"{info.control_url}/release", json={"started_before": time.time()}
        )
        assert released.json()["released"] is True
    assert first["response"].status_code == 200
    assert first["response"].json()["released"] == "explicit"
    assert runtime(info).slot.statistics().counts["rejected"] == 1


async def test_max_queue_time_zero_rejects_at_once(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker(max_queue_time_s=0)
    holder = await open_raw_reservation(info, {"duration": 30})
    await wait_until(lambda: runtime(info).slot.statistics().busy)
    response = await reserve(http, info, duration=1)
    assert response.status_code == 429
    await holder.aclose()
    await wait_until(lambda: not runtime(info).slot.statistics().busy)
    response = await reserve(http, info, duration=0)
    assert response.status_code == 200


async def test_release_with_nothing_held(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    response = await http.post(f"{info.control_url}/release", json={"id": 1})
    assert response.status_code == 200
    assert response.json() == {"released": False, "reason": "no active reservation"}


async def test_control_listener_binds_loopback_only(start_worker: StartWorker) -> None:
    info = await start_worker()
    assert info.control_url is not None
    assert urlsplit(info.control_url).hostname == "127.0.0.1"


async def test_health_and_status(start_worker: StartWorker, http: httpx.AsyncClient) -> None:
    info = await start_worker()
    for base in (info.url, info.control_url):
        response = await http.get(f"{base}/health")
        assert response.status_code == 200
        assert response.json()["ready"] is True
    holder = await open_raw_reservation(info, {"duration": 30})
    await wait_until(lambda: runtime(info).slot.statistics().busy)
    status = (await http.get(f"{info.control_url}/status")).json()
    assert status["ready"] is True
    assert status["busy"] is True
    assert status["active"]["duration"] == 30
    assert status["active"]["ends_at"] == pytest.approx(status["active"]["started_at"] + 30)
    assert status["queue_length"] == 0
    assert status["mode"] == "standalone"
    await holder.aclose()
    await wait_until(lambda: not runtime(info).slot.statistics().busy)
    status = (await http.get(f"{info.control_url}/status")).json()
    assert status["counts"]["cancelled"] == 1
    assert status["active"] is None


BAD_INPUTS: list[tuple[str, bytes, int, str]] = [
    ("not json", b"{nope", 422, "invalid JSON"),
    ("json but not an object", b"[1, 2]", 422, "JSON object"),
    ("no auth_data", body({"payload": {}}), 422, "auth_data"),
    ("auth_data not an object", body({"auth_data": 5, "payload": {}}), 422, "auth_data"),
    (
        "auth_data key missing",
        body({"auth_data": {"url": "x", "cost": 1}, "payload": {}}),
        422,
        "signature",
    ),
    ("payload not an object", body(envelope(URL) | {"payload": [1]}), 422, "payload"),
    ("duration a string", body(envelope(URL, payload={"duration": "5"})), 422, "duration"),
    ("duration a bool", body(envelope(URL, payload={"duration": True})), 422, "duration"),
    ("duration negative", body(envelope(URL, payload={"duration": -1})), 422, "duration"),
    (
        "duration NaN",
        json.dumps(envelope(URL, payload={"duration": float("nan")})).encode(),
        422,
        "duration",
    ),
    (
        "duration huge int",
        b'{"auth_data": %s, "payload": {"duration": 1%s}}'
        % (json.dumps(envelope(URL)["auth_data"]).encode(), b"0" * 400),
        422,
        "duration",
    ),
    ("session id", body(envelope(URL) | {"session_id": "abc"}), 410, "session"),
    ("deeply nested", b"[" * 60_000, 422, "invalid JSON"),
    ("body over 64 KiB", body(envelope(URL, payload={"pad": "x" * 70_000})), 413, "large"),
]


@pytest.mark.parametrize(
    ("case", "data", "status", "needle"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
async def test_bad_input_gets_a_clear_4xx_and_the_worker_keeps_serving(
    start_memory_worker: StartMemoryWorker,
    case: str,
    data: bytes,
    status: int,
    needle: str,
) -> None:
    served = await start_memory_worker()
    info, http = served.info, served.http
    response = await http.post(
        f"{info.url}/reserve", content=data, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert needle.lower() in response.text.lower()
    assert not runtime(info).slot.statistics().busy
    ok = await reserve(http, info, duration=0)
    assert ok.status_code == 200


# -- the bare payload (standalone only) -------------------------------------------------


@pytest.mark.parametrize(
    ("data", "duration"),
    [
        (b'{"duration": 0.2}', 0.2),
        (b'{"duration": 0.2, "note": "extra fields are ignored"}', 0.2),
        (b'{"duration": null}', 0.3),
        (b"{}", 0.3),
        (b"", 0.3),
        (b" \r\n", 0.3),
    ],
    ids=["duration", "extra field", "null", "empty object", "empty body", "blank body"],
)
async def test_standalone_reserve_takes_the_bare_payload(
    start_memory_worker: StartMemoryWorker,
    autojump_clock: trio.testing.MockClock,
    data: bytes,
    duration: float,
) -> None:
    served = await start_memory_worker(max_reservation_s=0.3)
    info, http = served.info, served.http
    seen: list[dict[str, Any]] = []
    runtime(info).slot.add_observer(lambda event: seen.append(dict(event.reservation.tag)))
    response = await http.post(f"{info.url}/reserve", content=data)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["released"] == "duration_elapsed"
    assert answer["duration"] == duration
    assert seen and all(tag == {"request_idx": None, "reqnum": None} for tag in seen)
    assert runtime(info).slot.statistics().counts["duration_elapsed"] == 1


async def test_bare_payloads_are_told_apart_by_id_in_status_and_release(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    # No request_idx, so no replay check: two identical bodies queue one after the other,
    # and /status and /release know each by the worker's own id.
    info = await start_worker(max_queue_time_s=30)
    answers: list[httpx.Response] = []

    async def hold() -> None:
        answers.append(await http.post(f"{info.url}/reserve", content=b'{"duration": 30}'))

    async with trio.open_nursery() as inner:
        inner.start_soon(hold)
        await wait_until(lambda: runtime(info).slot.statistics().busy)
        inner.start_soon(hold)
        await wait_until(lambda: runtime(info).slot.statistics().waiting == 1)
        for expected_id in (1, 2):
            status = (await http.get(f"{info.control_url}/status")).json()
            assert status["active"]["id"] == expected_id
            assert status["active"]["request_idx"] is None
            assert status["active"]["duration"] == 30
            released = await http.post(f"{info.control_url}/release", json={"id": expected_id})
            assert released.status_code == 200, released.text
            await wait_until(partial(lambda n: len(answers) == n, expected_id))
            if expected_id == 1:
                await wait_until(lambda: runtime(info).slot.statistics().busy)
    assert [a.json()["released"] for a in answers] == ["explicit", "explicit"]
    assert runtime(info).slot.statistics().counts["explicit"] == 2


BAD_BARE_DURATIONS = [b'{"duration": "5"}', b'{"duration": -1}', b'{"duration": true}']


@pytest.mark.parametrize("data", BAD_BARE_DURATIONS, ids=lambda d: d.decode())
async def test_a_bad_duration_in_a_bare_payload_gets_422_naming_duration(
    start_memory_worker: StartMemoryWorker, data: bytes
) -> None:
    served = await start_memory_worker()
    info, http = served.info, served.http
    response = await http.post(f"{info.url}/reserve", content=data)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"duration"}
    assert runtime(info).slot.statistics().counts["started"] == 0
    ok = await http.post(f"{info.url}/reserve", json={"duration": 0})
    assert ok.status_code == 200, ok.text


async def test_an_envelope_wins_over_a_bare_payload_in_the_same_body(
    start_memory_worker: StartMemoryWorker,
) -> None:
    served = await start_memory_worker()
    info, http = served.info, served.http
    seen: list[dict[str, Any]] = []
    runtime(info).slot.add_observer(lambda event: seen.append(dict(event.reservation.tag)))
    both = envelope(URL, payload={"duration": 0}, request_idx=77) | {"duration": 600}
    response = await http.post(f"{info.url}/reserve", json=both)
    assert response.status_code == 200, response.text
    assert response.json()["duration"] == 0
    assert seen and all(tag["request_idx"] == 77 for tag in seen)
    # A body with an envelope key is checked as an envelope, never taken for a payload.
    for data in ({"payload": {}, "duration": 0}, {"session_id": None, "duration": 0}):
        refused = await http.post(f"{info.url}/reserve", json=data)
        assert refused.status_code == 422, refused.text
        assert "auth_data" in refused.json()


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (b'{"duration": 5}', {"auth_data": "field missing"}),
        (b"{}", {"auth_data": "field missing"}),
        (b"", {"error": "invalid JSON"}),
    ],
    ids=["duration", "empty object", "empty body"],
)
async def test_a_vast_worker_still_requires_the_envelope(
    start_worker: StartWorker,
    vast_engine: Any,
    http: httpx.AsyncClient,
    data: bytes,
    answer: dict[str, Any],
) -> None:
    # Unsecured too: the engine needs each hold's request_idx to be told it ended.
    info = await start_worker(**vast_settings(vast_engine, unsecured=True))
    response = await http.post(f"{info.url}/reserve", content=data)
    assert response.status_code == 422, response.text
    assert response.json() == answer
    assert runtime(info).slot.statistics().counts["started"] == 0


async def test_wrong_method_unknown_route_and_sessions_get_json_errors(
    start_memory_worker: StartMemoryWorker,
) -> None:
    served = await start_memory_worker()
    info, http = served.info, served.http
    response = await http.get(f"{info.url}/reserve")
    assert response.status_code == 405
    assert "POST" in response.headers["allow"]
    assert response.json()["status"] == 405
    response = await http.post(f"{info.url}/nowhere")
    assert response.status_code == 404
    assert response.json()["status"] == 404
    for route in ("/session/create", "/session/end", "/session/get"):
        response = await http.post(f"{info.url}{route}", json={})
        assert response.status_code == 404
        assert "reservations, not sessions" in response.json()["error"]


async def test_pyworker_update_needs_the_master_token(
    start_worker: StartWorker,
    http: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "force_update"
    open_worker = await start_worker(force_update_path=str(marker))
    response = await http.post(
        f"{open_worker.url}/pyworker/update", headers={"Authorization": "Bearer x"}
    )
    assert response.status_code == 401  # an empty MASTER_TOKEN never opens the door
    assert not marker.exists()

    info = await start_worker(master_token="s3cret", force_update_path=str(marker))
    for header in ("Bearer wrong", "", "s3cre"):
        response = await http.post(f"{info.url}/pyworker/update", headers={"Authorization": header})
        assert response.status_code == 401
        assert response.json() == {"error": "unauthorized"}
    assert not marker.exists()
    response = await http.post(
        f"{info.url}/pyworker/update", headers={"Authorization": "Bearer s3cret"}
    )
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert marker.exists()
    marker.unlink()
    response = await http.post(f"{info.url}/pyworker/update", headers={"Authorization": "s3cret"})
    assert response.status_code == 200
    assert marker.exists()


async def test_pyworker_update_refusals_are_logged_rate_limited_and_answered_429(
    start_worker: StartWorker,
    http: httpx.AsyncClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    marker = tmp_path / "force_update"
    master = "master-Token-0123456789"
    info = await start_worker(master_token=master, force_update_path=str(marker))
    update = f"{info.url}/pyworker/update"
    guesses = [f"guess-{i:02d}-Zq" for i in range(10)]
    for guess in guesses:  # 10 failures within the 60 s window
        response = await http.post(update, headers={"Authorization": f"Bearer {guess}"})
        assert response.status_code == 401
    # The 11th from that address is refused without looking at the token: the right one too.
    for header in ("Bearer another-guess-Zq", f"Bearer {master}"):
        response = await http.post(update, headers={"Authorization": header})
        assert response.status_code == 429, response.text
        assert response.headers["content-type"] == "application/json"
        assert "too many failed attempts" in response.json()["error"]
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert response.json()["retry_after"] == int(response.headers["retry-after"])
    assert not marker.exists()

    # Another address is not affected: the engine's signal still gets through.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(transport=transport, timeout=10) as other:
        response = await other.post(update, headers={"Authorization": f"Bearer {master}"})
    assert response.status_code == 200
    assert marker.exists()
    # The worker keeps serving everything else.
    assert (await reserve(http, info, duration=0)).status_code == 200

    lines = [r.getMessage() for r in caplog.records if "/pyworker/update from" in r.getMessage()]
    # 12 refusals, 2 lines: the first refusal, and the one that blocked the address.
    assert len(lines) == 2, lines
    assert all("127.0.0.1" in line for line in lines)
    assert "1 request(s) refused" in lines[0]
    assert "9 request(s) refused" in lines[1] and "answering 429" in lines[1]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.getMessage() in lines)
    everything = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert master not in everything
    assert "-Zq" not in everything  # no given token either


async def test_shutdown_answers_holders_with_503(
    http: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    stop = trio.Event()
    config = WorkerConfig(port=0, control_port=None, graceful_timeout_s=2.0)
    info: ServeInfo = await nursery.start(partial(serve, config, shutdown_trigger=stop.wait))
    await info.wait_ready()
    results: dict[str, httpx.Response] = {}

    async def hold() -> None:
        results["held"] = await reserve(http, info, duration=600)

    async with trio.open_nursery() as inner:
        inner.start_soon(hold)
        await wait_until(lambda: runtime(info).slot.statistics().busy)
        stop.set()
    response = results["held"]
    assert response.status_code == 503
    assert response.json()["released"] == "shutdown"
    assert runtime(info).slot.statistics().counts["shutdown"] == 1


async def test_cancelling_serve_cancels_holds_cleanly(nursery: trio.Nursery) -> None:
    config = WorkerConfig(port=0, control_port=None)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            info: ServeInfo = await inner.start(serve, config)
            await info.wait_ready()
            holder = await open_raw_reservation(info, {"duration": 600})
            await wait_until(lambda: runtime(info).slot.statistics().busy)
            scope.cancel()
    assert scope.cancelled_caught
    assert not runtime(info).slot.statistics().busy
    counts = runtime(info).slot.statistics().counts
    assert counts["cancelled"] + counts["shutdown"] == 1
    await holder.aclose()


async def test_two_workers_cannot_share_a_port(nursery: trio.Nursery) -> None:
    info: ServeInfo = await nursery.start(serve, WorkerConfig(port=0, control_port=None))
    port = urlsplit(info.url).port
    with pytest.raises(OSError, match="cannot listen"):
        await serve(WorkerConfig(port=port, control_port=None))


MAX_ID = 2**63 - 1
BAD_IDS: list[object] = [
    None,
    True,
    False,
    1.5,
    3.0,
    "abc",
    "",
    "7x",
    "--5",
    "\u00b2",
    "1" * 40,
    -5,
    "-5",
    MAX_ID + 1,
    str(MAX_ID + 1),
    10**100,
    [1],
    {"n": 1},
]


@pytest.mark.parametrize("field", ["request_idx", "reqnum"])
@pytest.mark.parametrize("value", BAD_IDS, ids=lambda v: repr(v)[:24])
async def test_engine_ids_outside_the_engines_range_get_422_naming_the_field(
    start_memory_worker: StartMemoryWorker, field: str, value: object
) -> None:
    served = await start_memory_worker()
    info, http = served.info, served.http
    response = await http.post(
        f"{info.url}/reserve", json=envelope(URL, payload={"duration": 0}, **{field: value})
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "auth_data": {field: f"{field} must be an integer from 0 to {MAX_ID}"}
    }
    assert runtime(info).slot.statistics().counts["started"] == 0
    ok = await reserve(http, info, duration=0)
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("value", "as_int"),
    [(0, 0), (7, 7), ("42", 42), (" 8 ", 8), (MAX_ID, MAX_ID), (str(MAX_ID), MAX_ID)],
)
async def test_engine_ids_in_range_are_accepted_as_ints(
    start_memory_worker: StartMemoryWorker, value: object, as_int: int
) -> None:
    served = await start_memory_worker()
    info, http = served.info, served.http
    seen: list[dict[str, Any]] = []
    runtime(info).slot.add_observer(lambda event: seen.append(dict(event.reservation.tag)))
    response = await http.post(
        f"{info.url}/reserve",
        json=envelope(URL, payload={"duration": 0}, request_idx=value, reqnum=value),
    )
    assert response.status_code == 200, response.text
    assert seen and all(tag == {"request_idx": as_int, "reqnum": as_int} for tag in seen)
    assert all(type(tag["request_idx"]) is int for tag in seen)
