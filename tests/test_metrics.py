"""``GET /metrics`` on the control listener, read with prometheus-client's own text parser.

Every figure is checked against a real worker on loopback: a reservation's life (held,
queued, rejected, ended), local holds, and engine reports (delivered and failed).
"""

from __future__ import annotations

from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from nullworker.worker.server import ServeInfo

from .conftest import StartWorker, envelope, runtime, vast_settings
from .helpers import closed_url, wait_until
from .test_http import open_raw_reservation, reserve

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: Every metric the worker serves, with its type as the parser reads it.
METRICS = {
    "nullworker_ready": "gauge",
    "nullworker_busy": "gauge",
    "nullworker_reservation_held": "gauge",
    "nullworker_queue_length": "gauge",
    "nullworker_local_holds": "gauge",
    "nullworker_reservations_ended": "counter",
    "nullworker_rejected": "counter",
    "nullworker_local_holds_ended": "counter",
    "nullworker_hold_seconds": "histogram",
    "nullworker_queue_wait_seconds": "histogram",
    "nullworker_local_hold_seconds": "histogram",
    "nullworker_engine_reports_sent": "counter",
    "nullworker_engine_reports_failed": "counter",
}


async def scrape(http: httpx.AsyncClient, info: ServeInfo) -> Samples:
    response = await http.get(f"{info.control_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_every_metric_is_served_with_its_type(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    response = await http.get(f"{info.control_url}/metrics")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    for name, kind in METRICS.items():
        assert families.get(name) == kind, (name, families.get(name))
    samples = await scrape(http, info)
    assert value(samples, "nullworker_ready") == 1.0
    # Standalone: no engine, so no age of the last report.
    assert not any(name == "nullworker_seconds_since_last_report" for name, _ in samples)
    # The main port, open to the internet, has no metrics.
    assert (await http.get(f"{info.url}/metrics")).status_code == 404


async def test_values_follow_a_reservations_life(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker(max_queue_time_s=0.3)
    before = await scrape(http, info)
    assert value(before, "nullworker_reservation_held") == 0.0
    assert value(before, "nullworker_hold_seconds_count") == 0.0
    ended_before = value(before, "nullworker_reservations_ended_total", outcome="duration_elapsed")

    async with trio.open_nursery() as nursery:
        result: dict[str, httpx.Response] = {}

        async def first() -> None:
            result["first"] = await reserve(http, info, duration=1.0)

        async def second() -> None:
            result["second"] = await reserve(http, info, duration=0)

        nursery.start_soon(first)
        await wait_until(lambda: runtime(info).slot.statistics().busy)
        held = await scrape(http, info)
        assert value(held, "nullworker_reservation_held") == 1.0
        assert value(held, "nullworker_busy") == 1.0
        assert value(held, "nullworker_queue_length") == 0.0
        # A second one queues behind it, then gets 429 after MAX_QUEUE_TIME (0.3 s).
        nursery.start_soon(second)
        await wait_until(lambda: runtime(info).slot.statistics().waiting == 1)
        queued = await scrape(http, info)
        assert value(queued, "nullworker_queue_length") == 1.0
        await wait_until(lambda: "second" in result)
        assert result["second"].status_code == 429
        rejected = await scrape(http, info)
        assert value(rejected, "nullworker_rejected_total") == 1.0
        assert value(rejected, "nullworker_reservations_ended_total", outcome="rejected") == 1.0
        assert value(rejected, "nullworker_queue_length") == 0.0
        waited = value(rejected, "nullworker_queue_wait_seconds_sum")
        assert 0.3 <= waited < 2.0
    assert result["first"].json()["released"] == "duration_elapsed"

    after = await scrape(http, info)
    assert value(after, "nullworker_reservation_held") == 0.0
    assert value(after, "nullworker_busy") == 0.0
    assert (
        value(after, "nullworker_reservations_ended_total", outcome="duration_elapsed")
        == ended_before + 1
    )
    assert value(after, "nullworker_hold_seconds_count") == 1.0
    assert 1.0 <= value(after, "nullworker_hold_seconds_sum") < 3.0
    assert value(after, "nullworker_hold_seconds_bucket", le="5.0") == 1.0
    assert value(after, "nullworker_hold_seconds_bucket", le="1.0") == 0.0
    # Two left the queue: the first at once (it started), the second by its 429.
    assert value(after, "nullworker_queue_wait_seconds_count") == 2.0


async def test_a_disconnect_counts_as_cancelled(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    holder = await open_raw_reservation(info, {"duration": 30})
    await wait_until(lambda: runtime(info).slot.statistics().busy)
    await holder.aclose()
    await wait_until(lambda: not runtime(info).slot.statistics().busy)
    samples = await scrape(http, info)
    assert value(samples, "nullworker_reservations_ended_total", outcome="cancelled") == 1.0
    assert value(samples, "nullworker_hold_seconds_count") == 1.0


async def test_local_holds_are_counted(start_worker: StartWorker, http: httpx.AsyncClient) -> None:
    info = await start_worker()
    async with http.stream("POST", f"{info.control_url}/hold", json={"label": "a"}) as one:
        assert one.status_code == 200
        async with http.stream("POST", f"{info.control_url}/hold", json={}) as two:
            assert two.status_code == 200
            samples = await scrape(http, info)
            assert value(samples, "nullworker_local_holds") == 2.0
            assert value(samples, "nullworker_busy") == 1.0
            assert value(samples, "nullworker_reservation_held") == 0.0
    await wait_until(lambda: runtime(info).local_holds.count == 0, within_s=1.0)
    response = await http.post(f"{info.control_url}/hold", json={"duration": 0.05})
    assert response.json()["released"] == "duration_elapsed"
    samples = await scrape(http, info)
    assert value(samples, "nullworker_local_holds") == 0.0
    assert value(samples, "nullworker_busy") == 0.0
    assert value(samples, "nullworker_local_holds_ended_total", outcome="disconnected") == 2.0
    assert value(samples, "nullworker_local_holds_ended_total", outcome="duration_elapsed") == 1.0
    assert value(samples, "nullworker_local_hold_seconds_count") == 3.0


async def test_engine_reports_delivered(
    start_worker: StartWorker, vast_engine: Any, http: httpx.AsyncClient
) -> None:
    info = await start_worker(**vast_settings(vast_engine))
    await vast_engine.wait_for(lambda e: 7 in e.workers and e.workers[7].ready)
    signed = envelope(info.public_url or "", key=vast_engine.private_key, payload={"duration": 0})
    assert (await http.post(f"{info.url}/reserve", json=signed)).status_code == 200
    await vast_engine.wait_for(lambda e: len(e.finished) == 1)
    samples = await scrape(http, info)
    sent = value(samples, "nullworker_engine_reports_sent_total")
    assert sent >= 2  # ready, then busy/idle (coalesced or not)
    assert sent == runtime(info).reporter.statistics()["reports_sent"]  # type: ignore[union-attr]
    assert value(samples, "nullworker_engine_reports_failed_total") == 0.0
    assert 0.0 <= value(samples, "nullworker_seconds_since_last_report") < 5.0


async def test_engine_reports_failing(start_worker: StartWorker, http: httpx.AsyncClient) -> None:
    # An engine address that refuses connections; unsecured, so the worker gets ready
    # without the engine's key and keeps failing to report.
    dead = closed_url()
    info = await start_worker(
        report_addrs=(dead,),
        container_id=7,
        unsecured=True,
        engine_retry_s=0.05,
        engine_timeout_s=0.5,
    )
    await wait_until(
        lambda: (
            runtime(info).reporter is not None
            and runtime(info).reporter.statistics()["report_failures"] >= 2
        )
    )
    samples = await scrape(http, info)
    assert value(samples, "nullworker_engine_reports_sent_total") == 0.0
    assert value(samples, "nullworker_engine_reports_failed_total") >= 2.0
    # Never delivered: the age counts from the worker's start.
    assert value(samples, "nullworker_seconds_since_last_report") > 0.0
    later = await scrape(http, info)
    assert value(later, "nullworker_seconds_since_last_report") >= value(
        samples, "nullworker_seconds_since_last_report"
    )


async def test_each_worker_has_its_own_registry(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    one = await start_worker()
    two = await start_worker()
    assert (await reserve(http, one, duration=0)).status_code == 200
    first, second = await scrape(http, one), await scrape(http, two)
    assert value(first, "nullworker_hold_seconds_count") == 1.0
    assert value(second, "nullworker_hold_seconds_count") == 0.0
    assert runtime(one).metrics.registry is not runtime(two).metrics.registry


async def test_ready_is_zero_while_shutting_down(
    start_worker: StartWorker, http: httpx.AsyncClient
) -> None:
    info = await start_worker()
    runtime(info).begin_shutdown()
    samples = await scrape(http, info)
    assert value(samples, "nullworker_ready") == 0.0
