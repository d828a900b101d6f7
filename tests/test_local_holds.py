"""Local holds: ``POST /hold``, the ``local_hold`` helper and ``nullworker hold -- CMD``.

The core runs on ``MockClock``; the rest against real workers (and the local engine
emulator) on loopback, with ``nullworker hold`` as a real process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio.testing

from nullworker import local_hold, release_reservation, wait_reserved
from nullworker.client.local_hold import LocalHoldFailed, control_url
from nullworker.errors import ShuttingDown
from nullworker.worker.config import WorkerConfig
from nullworker.worker.local_holds import (
    HoldOutcome,
    HoldRequestError,
    LocalHoldEvent,
    LocalHolds,
    parse_hold_request,
)
from nullworker.worker.server import ServeInfo, serve

from .conftest import StartWorker, envelope, runtime, vast_settings
from .helpers import closed_port, closed_url, wait_until
from .test_http import open_raw_reservation

# -- the core, in virtual time ---------------------------------------------------------


async def test_a_hold_without_a_duration_has_no_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Held until its holder goes away, however long: a week of virtual time here."""
    holds = LocalHolds()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        async with holds.open(None, label="job") as hold:
            assert hold.duration_s is None and holds.count == 1
            nursery.start_soon(trio.sleep, 7 * 24 * 3600.0)  # the job
            with trio.move_on_after(7 * 24 * 3600.0) as job:
                await hold.wait()
            assert job.cancelled_caught  # the week passed and the hold is still open
            assert holds.count == 1 and hold.outcome is None
            [shown] = holds.statistics().holds
            assert shown.duration_s is None and shown.remaining_s is None
            hold.end()  # the holder goes away
            assert await hold.wait() is HoldOutcome.DISCONNECTED
    assert trio.current_time() - start == pytest.approx(7 * 24 * 3600.0)
    assert holds.count == 0


async def test_a_hold_with_a_duration_elapses_on_the_trio_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    holds = LocalHolds()
    start = trio.current_time()
    async with holds.open(10_000.0) as hold:
        assert hold.duration_s == 10_000.0  # honoured: no cap
        assert holds.statistics().holds[0].remaining_s == pytest.approx(10_000.0)
        assert await hold.wait() is HoldOutcome.ELAPSED
    async with holds.open(5.0) as hold:
        await hold.wait()
    assert trio.current_time() - start == pytest.approx(10_005.0)
    assert holds.statistics().counts["duration_elapsed"] == 2
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            async with holds.open(bad):
                pass  # pragma: no cover


async def test_every_way_out_ends_a_hold_once_with_its_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    holds = LocalHolds()
    events: list[tuple[str, int, HoldOutcome | None]] = []
    holds.add_observer(lambda e: events.append((e.kind, e.hold.id, e.hold.outcome)))

    # Cancelled (the connection's task went away): disconnected, and Cancelled propagates.
    with trio.move_on_after(1.0):
        async with holds.open() as hold:
            await hold.wait()
    assert hold.outcome is HoldOutcome.DISCONNECTED
    # end(): what the HTTP layer calls when the client disconnects.
    async with holds.open() as hold:
        hold.end()
        assert await hold.wait() is HoldOutcome.DISCONNECTED
    # The block returned without waiting.
    async with holds.open() as hold:
        pass
    assert hold.outcome is HoldOutcome.RELEASED
    # An error in the block.
    with pytest.raises(RuntimeError):
        async with holds.open() as hold:
            raise RuntimeError("boom")
    assert hold.outcome is HoldOutcome.ERROR
    # Shutdown ends the open ones and refuses new ones.
    async with trio.open_nursery() as nursery:
        outcomes: list[HoldOutcome] = []

        async def holder() -> None:
            async with holds.open() as hold:
                outcomes.append(await hold.wait())

        for _ in range(3):
            nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        assert holds.count == 3
        holds.shutdown()
    assert outcomes == [HoldOutcome.SHUTDOWN] * 3
    with pytest.raises(ShuttingDown):
        async with holds.open():
            pass  # pragma: no cover
    kinds = [kind for kind, _, _ in events]
    assert kinds.count("started") == kinds.count("ended") == 7
    assert holds.count == 0
    with trio.move_on_after(0.1) as scope:
        await holds.wait_idle()
    assert not scope.cancelled_caught


def test_observer_errors_never_break_a_hold() -> None:
    def broken(event: LocalHoldEvent) -> None:
        raise RuntimeError("observer bug")

    async def main() -> None:
        holds = LocalHolds(observer=broken)
        async with holds.open(0.0) as hold:
            assert await hold.wait() is HoldOutcome.ELAPSED
        assert holds.count == 0

    trio.run(main)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{nope", None),
        (b"[1]", None),
        (b'{"duration": "5"}', "duration"),
        (b'{"duration": true}', "duration"),
        (b'{"duration": -1}', "duration"),
        (b'{"duration": 1' + b"0" * 400 + b"}", "duration"),
        (b'{"label": 5}', "label"),
        (b'{"label": "' + b"x" * 201 + b'"}', "label"),
        (b'{"label": "a\\nb"}', "label"),
        (b'{"durration": 5}', "durration"),
    ],
)
def test_bad_hold_requests_name_the_field(body: bytes, field: str | None) -> None:
    with pytest.raises(HoldRequestError) as info:
        parse_hold_request(body)
    assert info.value.detail["error"]
    assert info.value.detail.get("field") == field


def test_good_hold_requests() -> None:
    assert parse_hold_request(b"").duration_s is None
    assert parse_hold_request(b"{}").label == ""
    request = parse_hold_request(b'{"duration": 2, "label": "job 17"}')
    assert (request.duration_s, request.label) == (2.0, "job 17")
    assert parse_hold_request(b'{"duration": null, "label": null}').duration_s is None


# -- POST /hold over HTTP ----------------------------------------------------------------


async def test_hold_answers_headers_at_once_and_its_body_at_the_end(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    url = f"{info.control_url}/hold"
    async with http.stream("POST", url, json={"duration": 0.5, "label": "job 1"}) as response:
        # The headers are here while the hold is open: that is the "accepted" signal.
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        hold_id = int(response.headers["nullworker-hold-id"])
        assert float(response.headers["nullworker-hold-duration"]) == 0.5
        status = (await http.get(f"{info.control_url}/status")).json()
        assert status["busy"] is True
        assert status["active"] is None  # no reservation: the slot is free
        assert status["local_holds"]["count"] == 1
        [shown] = status["local_holds"]["holds"]
        assert shown["id"] == hold_id and shown["label"] == "job 1"
        assert 0 <= shown["age_s"] < 0.5 and 0 < shown["remaining_s"] <= 0.5
        for base in (info.url, info.control_url):
            assert (await http.get(f"{base}/health")).json() == {"ready": True, "busy": True}
        answer = json.loads(await response.aread())
    assert answer["released"] == "duration_elapsed"
    assert answer["label"] == "job 1" and answer["id"] == hold_id
    assert 0.5 <= answer["held"] < 5
    status = (await http.get(f"{info.control_url}/status")).json()
    assert status["busy"] is False and status["local_holds"]["count"] == 0
    assert (await http.get(f"{info.url}/health")).json()["busy"] is False


async def test_hold_refusals_are_json_and_name_the_field(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    url = f"{info.control_url}/hold"
    response = await http.post(url, json={"duration": "soon"})
    assert response.status_code == 422
    assert response.json()["field"] == "duration"
    response = await http.post(url, json={"label": "x" * 500})
    assert response.status_code == 422 and response.json()["field"] == "label"
    response = await http.post(url, content=b"{" * 10)
    assert response.status_code == 422 and response.json()["error"] == "invalid JSON"
    response = await http.post(url, content=b" " * 5000)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    response = await http.get(url)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["status"] == 405
    # The main port has no /hold: local holds are for the instance only.
    assert (await http.post(f"{info.url}/hold", json={})).status_code == 404
    runtime(info).begin_shutdown()
    response = await http.post(url, json={})
    assert response.status_code == 503 and response.json()["released"] == "shutdown"


async def test_shutdown_answers_local_holders_200_shutdown(nursery: trio.Nursery) -> None:
    stop = trio.Event()
    config = WorkerConfig(port=0, control_port=0, graceful_timeout_s=2.0)
    info: ServeInfo = await nursery.start(
        lambda task_status: serve(config, shutdown_trigger=stop.wait, task_status=task_status)
    )
    await info.wait_ready()
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
        async with client.stream("POST", f"{info.control_url}/hold", json={}) as response:
            assert response.status_code == 200
            stop.set()
            answer = json.loads(await response.aread())
    assert answer["released"] == "shutdown"


async def test_a_disconnect_ends_the_hold_at_once(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    async with http.stream("POST", f"{info.control_url}/hold", json={}) as response:
        assert response.status_code == 200
        assert runtime(info).local_holds.count == 1
    # At once, not when TCP keepalive would notice (about 30 s): generous for a busy machine.
    closed = time.monotonic()
    await wait_until(lambda: runtime(info).local_holds.count == 0, within_s=10.0)
    assert time.monotonic() - closed < 10.0
    counts = runtime(info).local_holds.statistics().counts
    assert counts["disconnected"] == 1


async def test_local_holds_and_a_reservation_coexist(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    """A local hold takes no slot: a reservation is held beside it, and vice versa."""
    info = await start_worker(max_queue_time_s=0)
    async with (
        local_hold(control_url=info.control_url, label="a"),
        local_hold(control_url=info.control_url, label="b"),
    ):
        response = await http.post(
            f"{info.url}/reserve", json=envelope("http://x", payload={"duration": 0.1})
        )
        assert response.status_code == 200  # not 429: the slot was free
        assert response.json()["released"] == "duration_elapsed"
        holder = await open_raw_reservation(info, {"duration": 30})
        await wait_until(lambda: runtime(info).slot.statistics().busy)
        async with local_hold(control_url=info.control_url) as third:
            assert third.held and runtime(info).local_holds.count == 3
        await holder.aclose()
    await wait_until(lambda: not runtime(info).busy)


async def test_a_hold_without_a_duration_outlasts_max_reservation_seconds(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    """The cap is for reservations: a local hold stays until its holder goes away."""
    cap = 0.3
    info = await start_worker(max_reservation_s=cap)
    async with http.stream("POST", f"{info.control_url}/hold", json={"label": "long"}) as response:
        assert response.status_code == 200
        assert "nullworker-hold-duration" not in response.headers  # no duration: no end
        [shown] = (await http.get(f"{info.control_url}/status")).json()["local_holds"]["holds"]
        assert shown["duration"] is None and shown["remaining_s"] is None
        await trio.sleep(3 * cap)
        assert runtime(info).local_holds.count == 1
        assert (await http.get(f"{info.control_url}/health")).json()["busy"] is True
    await wait_until(lambda: runtime(info).local_holds.count == 0, within_s=1.0)
    counts = runtime(info).local_holds.statistics().counts
    assert counts["disconnected"] == 1 and counts["duration_elapsed"] == 0
    # An explicit duration is honoured, past the cap too.
    response = await http.post(f"{info.control_url}/hold", json={"duration": 2 * cap})
    answer = response.json()
    assert answer["released"] == "duration_elapsed" and answer["duration"] == 2 * cap
    assert answer["held"] >= 2 * cap


# -- the engine's view -------------------------------------------------------------------


async def test_a_local_hold_keeps_the_engines_view_busy_after_the_reservation(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    # Reports paced faster than the default (1 a second after a burst of 2), so the
    # engine hears of a short reservation while it is held.
    info = await start_worker(**vast_settings(vast_engine, report_interval_s=0.05))
    await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    url = info.public_url or ""
    signed = envelope(url, key=vast_engine.private_key, request_idx=4242, payload={"duration": 0.3})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial_post(http, f"{info.url}/reserve", signed))
        await vast_engine.wait_for(lambda e: 4242 in e.workers[7].working_request_idxs)
        async with local_hold(control_url=info.control_url, label="job") as hold:
            assert hold.held
            # The reservation elapses and is deleted; the worker stays busy.
            await vast_engine.wait_for(lambda e: any(f.request_idx == 4242 for f in e.finished))
            ended_at = len(vast_engine.worker_status_reports)
            await trio.sleep(0.3)
            after = list(vast_engine.worker_status_reports)[ended_at - 1 :]
            assert after, "no report after the reservation ended"
            for report in after:
                body = report.body
                assert body["cur_load"] == body["max_perf"] == 100.0, body
                assert body["num_requests_working"] == 1
                assert body["working_request_idxs"] == []  # no invented request
            assert vast_engine.workers[7].busy
        # The hold's end is reported by itself: no heartbeat (10 s) needed.
        await vast_engine.wait_for(lambda e: e.workers[7].cur_load == 0.0, timeout=5.0)
    assert not vast_engine.workers[7].busy
    last = vast_engine.worker_status_reports[-1].body
    assert last["num_requests_working"] == 0 and last["cur_load"] == 0.0
    # Only the reservation reached /delete_requests/, and new_load counted it once.
    assert [f.request_idx for f in vast_engine.finished] == [4242]
    assert sum(r.body["new_load"] for r in vast_engine.worker_status_reports) == 100.0


#: MAX_RESERVATION_SECONDS for the long-job tests; each job lasts three times as long.
CAP_S = 0.5


async def start_long_job_worker(
    start_worker: StartWorker, engine: Any, **overrides: Any
) -> ServeInfo:
    """A Vast-mode worker with MAX_RESERVATION_SECONDS = CAP_S that reports every 0.1 s."""
    settings = vast_settings(
        engine, max_reservation_s=CAP_S, heartbeat_s=0.1, report_interval_s=0.05
    )
    info = await start_worker(**settings, **overrides)
    await engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    return info


def assert_busy_in_every_report(engine: Any, since: float, until: float) -> None:
    """Every report the engine received between ``since`` and ``until`` (wall clock) says
    busy: the whole worker's load, one request working (the local hold)."""
    during = [r.body for r in engine.worker_status_reports if since <= r.received_at <= until]
    assert len(during) >= 2, during  # heartbeats every 0.1 s over the job
    for body in during:
        assert body["cur_load"] == 100.0 and body["num_requests_working"] == 1, body


async def test_a_library_hold_covers_a_job_three_times_the_cap(
    start_worker: StartWorker, vast_engine: Any
) -> None:
    info = await start_long_job_worker(start_worker, vast_engine)
    async with local_hold(control_url=info.control_url, label="long job") as hold:
        await vast_engine.wait_for(lambda e: e.workers[7].busy)
        since = time.time()
        await trio.sleep(3 * CAP_S)  # the job
        until = time.time()
        assert hold.held and hold.holds == 1  # one hold, never renewed
        assert hold.held_for_s is None
    assert_busy_in_every_report(vast_engine, since, until)
    await vast_engine.wait_for(lambda e: not e.workers[7].busy)
    counts = runtime(info).local_holds.statistics().counts
    assert counts["started"] == 1 and counts["duration_elapsed"] == 0


async def test_the_hold_cli_covers_a_job_three_times_the_cap_on_another_port(
    start_worker: StartWorker, vast_engine: Any, tmp_path: Path
) -> None:
    """``nullworker hold`` finds the worker from NULLWORKER_CONTROL_PORT alone."""
    info = await start_long_job_worker(start_worker, vast_engine, control_port=0)
    assert info.control_url is not None
    port = urlsplit(info.control_url).port
    done = tmp_path / "done"
    env = _hold_env(None) | {"NULLWORKER_CONTROL_PORT": str(port)}
    command = ["sh", "-c", f"sleep {3 * CAP_S}; touch {done}"]
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "nullworker", "hold", "--", *command],
            env=env,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert f"local hold 1 on http://127.0.0.1:{port}".encode() in result.stderr
    assert b"warning" not in result.stderr  # the hold never ended under the command
    reports = vast_engine.worker_status_reports
    held_since = min(r.received_at for r in reports if r.body["cur_load"])
    assert_busy_in_every_report(vast_engine, held_since, done.stat().st_mtime)
    counts = runtime(info).local_holds.statistics().counts
    assert counts["started"] == 1 and counts["duration_elapsed"] == 0


def partial_post(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Any:
    async def post() -> None:
        response = await http.post(url, json=body)
        assert response.status_code == 200, response.text

    return post


async def test_many_concurrent_holds_then_idle(start_worker: StartWorker, vast_engine: Any) -> None:
    info = await start_worker(**vast_settings(vast_engine))
    await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    count = 200
    opened = trio.Event()
    release = trio.Event()
    held = 0
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0, read=None)) as client:

        async def one(i: int) -> None:
            nonlocal held
            async with local_hold(control_url=info.control_url, label=f"job {i}", http=client):
                held += 1
                if held == count:
                    opened.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
            with trio.fail_after(20):
                await opened.wait()
            assert runtime(info).local_holds.count == count
            status = (await client.get(f"{info.control_url}/status")).json()
            assert status["local_holds"]["count"] == count
            assert len({h["label"] for h in status["local_holds"]["holds"]}) == count
            await vast_engine.wait_for(lambda e: e.workers[7].busy)
            assert vast_engine.workers[7].cur_load == 100.0  # one busy worker, not 200
            release.set()
    await wait_until(lambda: runtime(info).local_holds.count == 0, within_s=5.0)
    await vast_engine.wait_for(lambda e: not e.workers[7].busy and e.workers[7].cur_load == 0.0)
    assert runtime(info).local_holds.statistics().counts["disconnected"] == count
    assert not runtime(info).busy


# -- the helper --------------------------------------------------------------------------


async def test_local_hold_is_one_hold_past_the_cap_and_holds_again_after_a_worker_restart(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The first worker binds a control port of its own; the restarted one takes it over.
    control_port = 0

    async def start() -> tuple[ServeInfo, trio.CancelScope]:
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[ServeInfo]) -> None:
            with scope:
                config = WorkerConfig(
                    port=0,
                    control_port=control_port,
                    max_reservation_s=0.2,
                    graceful_timeout_s=0.5,
                    lock_dir=str(tmp_path),
                )
                await serve(config, task_status=task_status)

        info: ServeInfo = await nursery.start(run)
        await info.wait_ready()
        return info, scope

    first, first_scope = await start()
    assert first.control_url is not None
    control_port = urlsplit(first.control_url).port or 0
    async with local_hold(control_url=first.control_url, label="long job") as hold:
        assert hold.held and hold.duration_s is None
        await trio.sleep(0.7)
        assert hold.holds == 1  # one hold past the 0.2 s cap: nothing to renew
        assert runtime(first).local_holds.count == 1
        assert runtime(first).local_holds.statistics().counts["duration_elapsed"] == 0
        first_scope.cancel()  # the worker goes away (a crash, a restart)
        await wait_until(lambda: not hold.held, within_s=3.0)
        second, _ = await start()
        await wait_until(lambda: hold.held, within_s=3.0)  # back within the 1 s retry
        assert runtime(second).local_holds.count == 1
        assert not hold.ended.is_set()
    await wait_until(lambda: runtime(second).local_holds.count == 0, within_s=1.0)
    assert hold.ended.is_set() and hold.outcome == "client_released"


async def test_local_hold_with_a_duration_reports_its_end(start_worker: StartWorker) -> None:
    info = await start_worker()
    async with local_hold(0.2, control_url=info.control_url) as hold:
        assert hold.held_for_s == 0.2
        with trio.fail_after(3):
            await hold.ended.wait()
        assert hold.outcome == "duration_elapsed" and not hold.held
        assert runtime(info).local_holds.count == 0
    assert hold.outcome == "duration_elapsed"


async def test_local_hold_raises_when_the_worker_cannot_be_reached_or_refuses(
    start_worker: StartWorker,
) -> None:
    with pytest.raises(LocalHoldFailed) as info:
        async with local_hold(control_url=closed_url()):
            pass  # pragma: no cover
    assert info.value.status is None and "cannot reach" in str(info.value)
    for named in ("NULLWORKER_CONTROL_URL", "NULLWORKER_CONTROL_PORT", "http://127.0.0.1:"):
        assert named in str(info.value)
    worker = await start_worker()
    runtime(worker).begin_shutdown()
    with pytest.raises(LocalHoldFailed) as info:
        async with local_hold(control_url=worker.control_url):
            pass  # pragma: no cover
    assert info.value.status == 503
    with pytest.raises(ValueError):
        async with local_hold(-1.0, control_url=worker.control_url):
            pass  # pragma: no cover


async def test_local_hold_reads_the_control_url_from_the_environment(
    start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = await start_worker()
    assert info.control_url is not None
    monkeypatch.setenv("NULLWORKER_CONTROL_URL", info.control_url)
    async with local_hold(label="from env") as hold:
        assert hold.control_url == info.control_url
        assert runtime(info).local_holds.statistics().holds[0].label == "from env"


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "http://127.0.0.1:18999"),
        ({"NULLWORKER_CONTROL_PORT": "19001"}, "http://127.0.0.1:19001"),
        ({"NULL_CONTROL_PORT": "19002"}, "http://127.0.0.1:19002"),
        (
            {"NULLWORKER_CONTROL_PORT": "19001", "NULL_CONTROL_PORT": "19002"},
            "http://127.0.0.1:19001",
        ),
        ({"NULLWORKER_CONTROL_PORT": " ", "NULL_CONTROL_PORT": "19002"}, "http://127.0.0.1:18999"),
        (
            {"NULLWORKER_CONTROL_URL": "http://127.0.0.1:7/", "NULLWORKER_CONTROL_PORT": "19001"},
            "http://127.0.0.1:7",
        ),
    ],
)
def test_control_url_is_where_the_worker_listens(env: dict[str, str], url: str) -> None:
    """The client finds the port the worker reads from the same environment."""
    assert control_url(env) == url
    if "NULLWORKER_CONTROL_URL" not in env:
        assert url == f"http://127.0.0.1:{WorkerConfig.from_env(env).control_port}"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"NULLWORKER_CONTROL_PORT": "off"}, "NULLWORKER_CONTROL_PORT"),
        ({"NULL_CONTROL_PORT": "0"}, "NULL_CONTROL_PORT"),
        ({"NULLWORKER_CONTROL_PORT": "port"}, "NULLWORKER_CONTROL_PORT"),
        ({"NULLWORKER_CONTROL_PORT": "70000"}, "NULLWORKER_CONTROL_PORT"),
        ({"NULLWORKER_CONTROL_URL": "127.0.0.1:7"}, "NULLWORKER_CONTROL_URL"),
    ],
)
def test_control_url_names_the_setting_that_leads_nowhere(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        control_url(env)


@pytest.mark.parametrize("variable", ["NULLWORKER_CONTROL_PORT", "NULL_CONTROL_PORT"])
async def test_local_hold_finds_a_worker_on_another_control_port(
    start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    info = await start_worker(control_port=0)
    assert info.control_url is not None
    port = urlsplit(info.control_url).port
    monkeypatch.delenv("NULLWORKER_CONTROL_URL", raising=False)
    monkeypatch.delenv("NULLWORKER_CONTROL_PORT", raising=False)
    monkeypatch.setenv(variable, str(port))
    async with local_hold(label="on another port") as hold:
        assert hold.control_url == f"http://127.0.0.1:{port}"
        assert runtime(info).local_holds.statistics().holds[0].label == "on another port"


async def test_an_unreachable_port_from_the_environment_is_named(tmp_path: Path) -> None:
    port = closed_port()  # nothing listens there
    env = _hold_env(None) | {"NULLWORKER_CONTROL_PORT": str(port)}
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "nullworker", "hold", "--", "touch", str(tmp_path / "ran")],
            env=env,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 3
    message = result.stderr.decode()
    assert f"http://127.0.0.1:{port}/hold" in message, message
    assert "NULLWORKER_CONTROL_URL" in message and "NULLWORKER_CONTROL_PORT" in message
    assert not (tmp_path / "ran").exists()
    env["NULLWORKER_CONTROL_PORT"] = "off"
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "nullworker", "hold", "--", "true"],
            env=env,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 3
    assert b"NULLWORKER_CONTROL_PORT=off" in result.stderr


async def test_an_exception_in_the_block_propagates_and_ends_the_hold(
    start_worker: StartWorker,
) -> None:
    info = await start_worker()
    with pytest.raises(KeyError):
        async with local_hold(control_url=info.control_url):
            raise KeyError("job failed")
    await wait_until(lambda: runtime(info).local_holds.count == 0, within_s=1.0)


# -- nullworker hold -- CMD --------------------------------------------------------------


def _hold_env(control_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NULLWORKER_CONTROL_URL"}
    if control_url is not None:
        env["NULLWORKER_CONTROL_URL"] = control_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_hold(*args: str, control_url: str | None) -> subprocess.CompletedProcess[bytes]:
    return await run_command("hold", *args, control_url=control_url)


async def run_command(
    command: str, *args: str, control_url: str | None
) -> subprocess.CompletedProcess[bytes]:
    """``nullworker COMMAND ARGS`` with the control URL in the environment; its result."""
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "nullworker", command, *args],
            env=_hold_env(control_url),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_hold_cli_exits_with_the_commands_status(start_worker: StartWorker) -> None:
    info = await start_worker()
    result = await run_hold("--", "sh", "-c", "exit 3", control_url=info.control_url)
    assert result.returncode == 3, result.stderr
    assert b"local hold 1" in result.stderr
    assert runtime(info).local_holds.statistics().counts["started"] == 1
    result = await run_hold("--quiet", "--", "sh", "-c", "echo out", control_url=info.control_url)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"out\n", b"")
    result = await run_hold("--", "sh", "-c", "kill -TERM $$", control_url=info.control_url)
    assert result.returncode == 128 + signal.SIGTERM
    result = await run_hold("--", "no-such-command-here", control_url=info.control_url)
    assert result.returncode == 127
    result = await run_hold("--duration", "-1", "--", "true", control_url=info.control_url)
    assert result.returncode == 2
    result = await run_hold(control_url=info.control_url)
    assert result.returncode == 2 and b"command is required" in result.stderr
    assert runtime(info).local_holds.count == 0


async def test_hold_cli_holds_while_the_command_runs_with_its_label(
    start_worker: StartWorker, tmp_path: Path
) -> None:
    info = await start_worker()
    seen: dict[str, Any] = {}
    marker = tmp_path / "running"
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            seen["result"] = await run_hold(
                "--label",
                "job 9",
                "--",
                "sh",
                "-c",
                f"touch {marker}; sleep 0.5",
                control_url=info.control_url,
            )

        nursery.start_soon(run)
        await wait_until(marker.exists, within_s=10)
        # The hold was taken before the command started.
        holds = runtime(info).local_holds.statistics().holds
        assert [h.label for h in holds] == ["job 9"]
    assert seen["result"].returncode == 0
    await wait_until(lambda: runtime(info).local_holds.count == 0, within_s=1.0)


async def test_killing_the_hold_process_ends_the_hold_at_once(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "nullworker", "hold", "--quiet", "--", "sleep", "1"],
        env=_hold_env(info.control_url),
        start_new_session=True,  # so the orphaned sleep can be reaped with the group
    )
    try:
        await wait_until(lambda: runtime(info).local_holds.count == 1, within_s=10)
        process.kill()  # SIGKILL: no cleanup of any kind runs in the hold process
        killed = time.monotonic()
        await process.wait()
        # At once, not when TCP keepalive would notice (about 30 s).
        await wait_until(lambda: runtime(info).local_holds.count == 0, within_s=10.0)
        assert time.monotonic() - killed < 10.0
        status = (await http.get(f"{info.control_url}/status")).json()
        assert status["local_holds"]["count"] == 0 and status["busy"] is False
    finally:
        with trio.CancelScope(shield=True):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await process.wait()


async def test_sigterm_is_passed_on_to_the_command(start_worker: StartWorker) -> None:
    info = await start_worker()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "nullworker", "hold", "--quiet", "--", "sleep", "30"],
        env=_hold_env(info.control_url),
        stdin=subprocess.DEVNULL,
    )
    try:
        await wait_until(lambda: runtime(info).local_holds.count == 1, within_s=10)
        await trio.sleep(0.2)  # the command runs
        process.terminate()
        with trio.fail_after(5):
            await process.wait()
        assert process.returncode == 128 + signal.SIGTERM
        await wait_until(lambda: runtime(info).local_holds.count == 0, within_s=1.0)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_an_unreachable_worker_stops_the_command_unless_best_effort(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    dead = closed_url()
    result = await run_hold("--", "touch", str(marker), control_url=dead)
    assert result.returncode == 3
    assert b"cannot reach" in result.stderr and b"not running the command" in result.stderr
    assert not marker.exists()
    result = await run_hold("--best-effort", "--", "touch", str(marker), control_url=dead)
    assert result.returncode == 0
    assert b"without a hold" in result.stderr
    assert marker.exists()


async def test_hold_cli_json_lines_say_each_refusal_and_warning_as_an_event(
    tmp_path: Path,
) -> None:
    dead = closed_url()
    json_lines = ("--log-format", "json")
    cases = [
        (("--", "true"), 3, [("unavailable", "ERROR")]),
        (("--best-effort", "--", "true"), 0, [("unprotected", "WARNING")]),
        (("--", str(tmp_path / "missing")), 127, [("not_found", "ERROR")]),
    ]
    for args, status, events in cases:
        result = await run_hold(*json_lines, *args, control_url=dead)
        assert result.returncode == status, result.stderr
        said = [json.loads(line) for line in result.stderr.decode().splitlines()]
        assert [(e["event"], e["level"]) for e in said] == events, said
        assert all(e["logger"] == "nullworker.hold" for e in said)
        assert not any(e["message"].startswith("nullworker hold:") for e in said)


async def test_the_control_listener_is_never_reached_through_a_proxy_from_the_environment(
    start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image may set ``http_proxy`` for its downloads: the hold, the release and the
    reservation wait still go straight to the worker on loopback."""
    info = await start_worker()
    assert info.control_url is not None
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, closed_url())
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with local_hold(control_url=info.control_url, label="behind a proxy") as hold:
        assert runtime(info).local_holds.count == 1 and hold.id is not None
    assert await wait_reserved(0, control_url=info.control_url) is None
    answer = await release_reservation(started_before=time.time(), control_url=info.control_url)
    assert answer["released"] is False
