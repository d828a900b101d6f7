"""``GET /reservation``: a consumer takes a job only while its worker is reserved.

A real worker (Hypercorn on loopback), real HTTP: the control listener's long-poll, the
library's :func:`nullworker.wait_reserved` and ``nullworker wait-reserved``. What a
waiter saw is checked against the order of events on the worker (the slot's observer),
never against a wall clock.
"""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import nullworker
from nullworker import LocalHoldFailed, ShuttingDown, wait_reserved
from nullworker.worker.reservations import ActiveInfo, ReservationEvent, ReservationSlot
from nullworker.worker.server import ServeInfo

from .conftest import StartWorker, runtime
from .helpers import closed_url, wait_until
from .test_local_holds import run_command
from .test_release import Reserved


async def waiters(http: httpx.AsyncClient, info: ServeInfo) -> int:
    """How many long-polls the worker has parked, as ``GET /status`` says."""
    count: int = (await http.get(f"{info.control_url}/status")).json()["reservation_waiters"]
    return count


async def wait_waiters(http: httpx.AsyncClient, info: ServeInfo, count: int) -> None:
    with trio.fail_after(10):
        while await waiters(http, info) != count:
            await trio.sleep(0.01)


# -- the core, in virtual time -----------------------------------------------------------


async def test_the_slot_wakes_its_held_waiters_at_a_start_and_at_shutdown(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    slot = ReservationSlot(max_reservation_s=60.0, max_queue_time_s=10.0)
    got: list[ActiveInfo | str] = []

    async def waiter() -> None:
        try:
            got.append(await slot.wait_held())
        except ShuttingDown:
            got.append("shutdown")

    nursery.start_soon(waiter)
    nursery.start_soon(waiter)
    await trio.testing.wait_all_tasks_blocked()
    assert got == [] and slot.statistics().held_waiters == 2
    nursery.start_soon(slot.hold, 30.0)
    await trio.testing.wait_all_tasks_blocked()
    assert [info.id for info in got if isinstance(info, ActiveInfo)] == [1, 1]
    assert slot.statistics().held_waiters == 0
    held = await slot.wait_held()  # held already: at once
    assert held.id == 1 and held.duration_s == 30.0
    # Released: not held any more, even before its holder has run.
    slot.release(id=1)
    with trio.move_on_after(5) as waited:
        await slot.wait_held()
    assert waited.cancelled_caught and slot.statistics().held_waiters == 0
    # A shutdown answers the waiters, and every later wait.
    got.clear()
    nursery.start_soon(waiter)
    await trio.testing.wait_all_tasks_blocked()
    slot.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    assert got == ["shutdown"]
    with pytest.raises(ShuttingDown):
        await slot.wait_held()


# -- the control listener ----------------------------------------------------------------


async def test_a_held_reservation_is_answered_at_once(
    start_worker: StartWorker, http: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    info = await start_worker()
    url = f"{info.control_url}/reservation"
    assert (await http.get(url)).json() == {"reserved": False}  # wait=0: answer now
    held = Reserved()
    nursery.start_soon(held.run, http, info, 60.0)
    await wait_until(lambda: runtime(info).slot.busy)
    for query in ("", "?wait=0", "?wait=300"):
        response = await http.get(url + query)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["reserved"] is True
        shown = answer["reservation"]
        assert shown["request_idx"] == held.request_idx and shown["duration"] == 60.0
        assert shown["id"] == 1 and shown["ends_at"] == shown["started_at"] + 60.0
    # Released: not reserved any more.
    await nullworker.release_reservation(id=1, control_url=info.control_url, http=http)
    await held.done.wait()
    assert (await http.get(url)).json() == {"reserved": False}


async def test_a_waiter_is_answered_when_a_reservation_starts(
    start_worker: StartWorker, http: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    info = await start_worker()
    order: list[str] = []

    def observe(event: ReservationEvent) -> None:
        order.append(f"{event.kind} {event.reservation.id}")

    runtime(info).slot.add_observer(observe)
    answers: list[dict[str, Any]] = []

    async def waiter() -> None:
        response = await http.get(f"{info.control_url}/reservation", params={"wait": "60"})
        assert response.status_code == 200, response.text
        order.append("answered")
        answers.append(response.json())

    nursery.start_soon(waiter)
    nursery.start_soon(waiter)
    await wait_waiters(http, info, 2)
    assert order == []  # nobody answered before a reservation
    held = Reserved()
    nursery.start_soon(held.run, http, info, 60.0)
    await wait_until(lambda: len(answers) == 2, within_s=10)
    assert order == ["queued 1", "started 1", "answered", "answered"]
    for answer in answers:
        assert answer["reserved"] is True
        assert answer["reservation"]["request_idx"] == held.request_idx
    assert await waiters(http, info) == 0


async def test_not_reserved_when_the_wait_passes(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    response = await http.get(f"{info.control_url}/reservation", params={"wait": "0.2"})
    assert response.status_code == 200 and response.json() == {"reserved": False}
    assert await waiters(http, info) == 0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("wait=-1", "wait"),
        ("wait=nan", "wait"),
        ("wait=inf", "wait"),
        ("wait=1e999", "wait"),
        ("wait=soon", "wait"),
        ("wait=", "wait"),
        ("wait=300.5", "wait"),
        ("wait=1&wait=2", "wait"),
        ("wiat=1", "wiat"),
        ("wait=1&id=3", "id"),
    ],
)
async def test_a_bad_wait_is_refused_naming_the_field(
    start_worker: StartWorker, http: httpx.AsyncClient, query: str, field: str
) -> None:
    info = await start_worker()
    response = await http.get(f"{info.control_url}/reservation?{query}")
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["field"] == field
    assert field in response.json()["error"]
    # The listener is still there, answering.
    assert (await http.get(f"{info.control_url}/reservation")).json() == {"reserved": False}


async def test_shutdown_answers_the_waiters_503(
    start_worker: StartWorker, http: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    info = await start_worker()
    answers: list[httpx.Response] = []

    async def waiter() -> None:
        answers.append(await http.get(f"{info.control_url}/reservation?wait=300"))

    nursery.start_soon(waiter)
    await wait_waiters(http, info, 1)
    runtime(info).begin_shutdown()
    await wait_until(lambda: len(answers) == 1, within_s=10)
    [answer] = answers
    assert answer.status_code == 503 and answer.json() == {"error": "shutting down"}
    response = await http.get(f"{info.control_url}/reservation?wait=300")
    assert response.status_code == 503 and response.json() == {"error": "shutting down"}


async def test_a_waiter_that_goes_away_leaves_nothing_behind(
    start_worker: StartWorker, http: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    info = await start_worker()
    gone = trio.CancelScope()

    async def waiter() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as own:
            with gone:
                await own.get(f"{info.control_url}/reservation?wait=300")

    nursery.start_soon(waiter)
    await wait_waiters(http, info, 1)
    gone.cancel()  # the client closes its connection mid-wait
    await wait_waiters(http, info, 0)
    assert runtime(info).slot.statistics().held_waiters == 0
    # A reservation that starts later is nobody's business: the worker is as before.
    held = Reserved()
    nursery.start_soon(held.run, http, info, 60.0)
    await wait_until(lambda: runtime(info).slot.busy)
    assert (await http.get(f"{info.control_url}/reservation")).json()["reserved"] is True


# -- the library ---------------------------------------------------------------------


async def test_wait_reserved_returns_the_reservation_once_held(
    start_worker: StartWorker, http: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    info = await start_worker()
    assert nullworker.client.wait_reserved is wait_reserved
    assert await wait_reserved(0, control_url=info.control_url) is None
    assert await wait_reserved(0.2, control_url=info.control_url) is None
    got: list[dict[str, Any] | None] = []

    async def consumer() -> None:
        got.append(await wait_reserved(control_url=info.control_url))

    nursery.start_soon(consumer)
    await wait_waiters(http, info, 1)
    held = Reserved()
    nursery.start_soon(held.run, http, info, 60.0)
    await wait_until(lambda: len(got) == 1, within_s=10)
    [shown] = got
    assert shown is not None and shown["request_idx"] == held.request_idx
    # Held already: answered at once, whatever the timeout.
    again = await wait_reserved(0, control_url=info.control_url, http=http)
    assert again is not None and again["id"] == shown["id"]


async def test_wait_reserved_says_when_the_worker_cannot_answer(
    start_worker: StartWorker,
) -> None:
    with pytest.raises(LocalHoldFailed) as unreachable:
        await wait_reserved(control_url=closed_url())
    assert unreachable.value.status is None and "cannot reach" in str(unreachable.value)
    assert "NULLWORKER_CONTROL_URL" in str(unreachable.value)
    with pytest.raises(ValueError, match="timeout_s"):
        await wait_reserved(-1, control_url=closed_url())
    info = await start_worker()
    runtime(info).begin_shutdown()
    with pytest.raises(LocalHoldFailed) as stopping:
        await wait_reserved(control_url=info.control_url)
    assert stopping.value.status == 503 and "shutting down" in str(stopping.value)


# -- nullworker wait-reserved ---------------------------------------------------------


async def run_wait_reserved(
    *args: str, control_url: str | None
) -> subprocess.CompletedProcess[bytes]:
    return await run_command("wait-reserved", *args, control_url=control_url)


async def test_wait_reserved_cli_exit_codes(
    start_worker: StartWorker, http: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    info = await start_worker()
    result = await run_wait_reserved("--timeout", "0.2", control_url=info.control_url)
    assert result.returncode == 1, result.stderr
    assert b"not reserved within 0.2 s" in result.stderr
    held = Reserved()
    nursery.start_soon(held.run, http, info, 60.0)
    await wait_until(lambda: runtime(info).slot.busy)
    # The URL from the environment; the reservation on stdout.
    result = await run_wait_reserved(control_url=info.control_url)
    assert result.returncode == 0, result.stderr
    assert f'"request_idx":{held.request_idx}'.encode() in result.stdout
    result = await run_wait_reserved("--control-url", closed_url(), control_url=None)
    assert result.returncode == 3 and b"cannot reach" in result.stderr
    for bad in (["--timeout", "-1"], ["--timeout", "nan"], ["--control-url", "ftp://x"], ["x"]):
        result = await run_wait_reserved(*bad, control_url=info.control_url)
        assert result.returncode == 2, (bad, result.stderr)
