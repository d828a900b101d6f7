"""``POST /release`` names what it ends: a real worker, real HTTP on loopback.

A consumer decides to release from what it saw a moment before; meanwhile the
reservation it meant may have ended and the next one started. The release names the
reservation (``{"id": N}``, or ``{"started_before": T}`` for the moment of the decision)
and the worker ends it only if it is the one held now (409 otherwise). These tests replay
that race against the real worker and check what each release ended.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

import httpx
import trio

from nullworker import release_reservation
from nullworker.worker.server import ServeInfo

from .conftest import StartWorker, envelope, runtime
from .helpers import wait_until

URL = "http://127.0.0.1:1"  # any url: unsecured workers do not check it
_REQUEST_IDX = itertools.count(70_000)


class Reserved:
    """One ``POST /reserve`` in the background; ``answer`` once the worker answered."""

    def __init__(self) -> None:
        self.request_idx = next(_REQUEST_IDX)
        self.answer: dict[str, Any] | None = None
        self.done = trio.Event()

    async def run(self, http: httpx.AsyncClient, info: ServeInfo, duration: float) -> None:
        body = envelope(URL, payload={"duration": duration}, request_idx=self.request_idx)
        response = await http.post(f"{info.url}/reserve", json=body)
        assert response.status_code == 200, response.text
        self.answer = response.json()
        self.done.set()


async def active(http: httpx.AsyncClient, info: ServeInfo) -> dict[str, Any] | None:
    """``GET /status``'s ``active``: what a consumer reads to name a reservation."""
    status = (await http.get(f"{info.control_url}/status")).json()
    shown: dict[str, Any] | None = status["active"]
    return shown


async def test_a_release_must_name_what_it_ends(
    start_worker: StartWorker, http: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    info = await start_worker()
    url = f"{info.control_url}/release"
    held = Reserved()
    nursery.start_soon(held.run, http, info, 60.0)
    await wait_until(lambda: runtime(info).slot.busy)
    shown = await active(http, info)
    assert shown is not None and shown["request_idx"] == held.request_idx

    # Naming nothing: refused (428), and nothing ended.
    for bare in ({"content": b""}, {"json": {}}):
        response = await http.post(url, **bare)  # type: ignore[arg-type]
        assert response.status_code == 428, response.text
        assert response.json()["released"] is False
        assert '{"id": N}' in response.json()["error"]
    response = await http.post(url, json={"id": "1"})
    assert response.status_code == 422 and response.json()["field"] == "id"
    response = await http.post(url, json={"started_before": "now"})
    assert response.status_code == 422 and response.json()["field"] == "started_before"
    response = await http.post(url, content=b" " * 5000)
    assert response.status_code == 413 and "limit" in response.json()["error"]

    # Another reservation named: 409 with the one held now, which stays held.
    response = await http.post(url, json={"id": shown["id"] + 1})
    assert response.status_code == 409, response.text
    conflict = response.json()
    assert conflict["released"] is False and conflict["error"]
    assert conflict["active"]["id"] == shown["id"]
    assert conflict["active"]["request_idx"] == held.request_idx
    response = await http.post(url, json={"started_before": shown["started_at"]})
    assert response.status_code == 409  # started at, not before
    assert runtime(info).slot.busy and not held.done.is_set()

    # Named: ended at once.
    response = await http.post(url, json={"id": shown["id"]})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["released"] is True and answer["reservation"] == shown["id"]
    assert answer["request_idx"] == held.request_idx
    with trio.fail_after(5):
        await held.done.wait()
    assert held.answer is not None and held.answer["released"] == "explicit"
    response = await http.post(url, json={"id": shown["id"]})
    assert response.json() == {"released": False, "reason": "no active reservation"}


async def test_a_release_racing_the_next_reservation_never_ends_it(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    """100 rounds: reservation A (100 ms) is held and B queues behind it; the consumer
    reads A's id, decides, and its release lands anywhere from before A ends to after B
    started (every fourth round: surely after). Whatever the timing, the release ends A
    or nothing, never B."""
    info = await start_worker(max_queue_time_s=10.0)
    url = f"{info.control_url}/release"
    rng = random.Random(1234)
    outcomes: dict[str, int] = {"released A": 0, "conflict with B": 0, "nothing held": 0}
    round_no = slow_looks = 0
    while round_no < 100:
        a, b = Reserved(), Reserved()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run, http, info, 0.1)
            await wait_until(lambda: runtime(info).slot.busy)
            nursery.start_soon(b.run, http, info, 30.0)
            # B queues behind A, unless A (100 ms) ended before B came (a loaded machine):
            # then B is held at once, and the round is played again below.
            await wait_until(
                lambda a=a: runtime(info).slot.statistics().waiting == 1 or a.done.is_set()
            )
            if a.done.is_set():
                await wait_until(lambda: runtime(info).slot.busy)
            seen = await active(http, info)
            assert seen is not None
            if seen["request_idx"] != a.request_idx:
                # A ended before the consumer looked (a loaded machine): no race to
                # replay in this round. End B and play the round again.
                assert seen["request_idx"] == b.request_idx
                await http.post(url, json={"id": seen["id"]})
                slow_looks += 1
                assert slow_looks <= 200, "the machine never let a round start in time"
                continue
            decided_at = time.time()
            if round_no % 4 == 0:
                await a.done.wait()  # A's own release comes after A ended and B started
                await wait_until(lambda: runtime(info).slot.statistics().waiting == 0)
            else:
                await trio.sleep(rng.uniform(0.0, 0.2))
            named = {"id": seen["id"]} if round_no % 2 else {"started_before": decided_at}
            response = await http.post(url, json=named)
            answer = response.json()
            if response.status_code == 409:
                assert answer["active"]["request_idx"] == b.request_idx, answer
                outcomes["conflict with B"] += 1
            else:
                assert response.status_code == 200, response.text
                if answer["released"]:
                    assert answer["request_idx"] == a.request_idx, (round_no, answer)
                    outcomes["released A"] += 1
                else:
                    outcomes["nothing held"] += 1
            # B is held, untouched, until we end it by name.
            await wait_until(lambda: runtime(info).slot.statistics().waiting == 0)
            await a.done.wait()
            shown = await active(http, info)
            assert shown is not None and shown["request_idx"] == b.request_idx, round_no
            assert not b.done.is_set()
            response = await http.post(url, json={"id": shown["id"]})
            assert response.json()["released"] is True
        assert a.answer is not None and b.answer is not None
        expected_a = (
            "explicit" if answer.get("request_idx") == a.request_idx else "duration_elapsed"
        )
        assert a.answer["released"] == expected_a
        assert b.answer["released"] == "explicit"
        round_no += 1
    assert sum(outcomes.values()) == 100
    # The rounds whose release surely came after B started.
    assert outcomes["conflict with B"] >= 25, outcomes
    counts = runtime(info).slot.statistics().counts
    assert counts["explicit"] == 100 + outcomes["released A"] + slow_looks


async def test_release_reservation_names_the_decision(
    start_worker: StartWorker, http: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    """The library's release: by default only what started before the call."""
    info = await start_worker()
    decided_at = time.time()
    held = Reserved()
    nursery.start_soon(held.run, http, info, 60.0)
    await wait_until(lambda: runtime(info).slot.busy)
    late = await release_reservation(started_before=decided_at, control_url=info.control_url)
    assert late["released"] is False and late["active"]["request_idx"] == held.request_idx
    assert runtime(info).slot.busy
    answer = await release_reservation(control_url=info.control_url)
    assert answer["released"] is True and answer["request_idx"] == held.request_idx
    with trio.fail_after(5):
        await held.done.wait()
    assert held.answer is not None and held.answer["released"] == "explicit"
