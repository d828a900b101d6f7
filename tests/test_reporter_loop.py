"""The report loop's use of the clock and the disk: in virtual time, on httpx's MockTransport.

No socket is involved, so ``autojump_clock`` cannot jump over I/O; the engine is a
handler that records what it is sent.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
import trio.testing

from nullworker.worker.config import WorkerConfig
from nullworker.worker.reporter import EngineReporter


def make_config(**overrides: Any) -> WorkerConfig:
    settings: dict[str, Any] = {
        "report_addrs": ("http://engine.test",),
        "container_id": 7,
        "master_token": "tok",
        "unsecured": False,
    }
    settings.update(overrides)
    return WorkerConfig(**settings)


async def test_the_disk_is_read_at_most_every_ten_seconds_not_every_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bodies: list[tuple[float, dict[str, Any]]] = []
    reads: list[float] = []
    disk = [1.0]

    def disk_usage() -> float:
        reads.append(trio.current_time())
        return disk[0]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/worker_status/":
            bodies.append((trio.current_time(), json.loads(request.content)))
        return httpx.Response(200, json={})

    config = make_config(heartbeat_s=1.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(config, http=http, disk_usage=disk_usage)
        async with trio.open_nursery() as nursery:
            await nursery.start(reporter.run)
            await trio.sleep(5.0)
            disk[0] = 2.0
            await trio.sleep(25.0)
            nursery.cancel_scope.cancel()
    # A heartbeat a second for 30 s, but the statvfs behind the figure only at start
    # and then once per 10 s of rounds.
    assert len(bodies) >= 25
    assert len(reads) <= 5, reads
    figures = [body["disk_usage"] for _, body in bodies]
    assert figures[0] == 1.0 and figures[-1] == 2.0
    assert sorted(figures) == figures  # the new figure, once read, stays


async def test_last_report_age_is_measured_on_the_trio_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        reporter = EngineReporter(make_config(heartbeat_s=1000.0), http=http)
        async with trio.open_nursery() as nursery:
            await nursery.start(reporter.run)
            with trio.fail_after(10):
                while reporter.statistics()["reports_sent"] < 1:
                    await trio.sleep(0.01)
            await trio.sleep(100.0)
            age = reporter.statistics()["last_report_age_s"]
            nursery.cancel_scope.cancel()
    assert 100.0 <= age < 101.0
