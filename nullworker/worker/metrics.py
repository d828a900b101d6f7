"""The worker's Prometheus metrics, served as ``GET /metrics`` on the control listener.

=========================================  =========  ==============================================
Metric                                     Type       Meaning
=========================================  =========  ==============================================
``nullworker_ready``                       gauge      1 once ready (and not shutting down, nor the
                                                      consumer health check failing), else 0
``nullworker_busy``                        gauge      1 while the engine hears "busy": a reservation
                                                      held or a local hold open
``nullworker_reservation_held``            gauge      1 while a reservation holds the slot
``nullworker_queue_length``                gauge      reservations waiting for the slot
``nullworker_local_holds``                 gauge      local holds open now
``nullworker_reservations_ended_total``    counter    reservations ended, by ``outcome``
``nullworker_rejected_total``              counter    reservations answered 429 (queue time over)
``nullworker_local_holds_ended_total``     counter    local holds ended, by ``outcome``
``nullworker_hold_seconds``                histogram  how long each reservation was held
``nullworker_queue_wait_seconds``          histogram  how long each reservation waited for the slot
``nullworker_local_hold_seconds``          histogram  how long each local hold lasted
``nullworker_engine_reports_sent_total``   counter    ``/worker_status/`` reports the engine took
``nullworker_engine_reports_failed_total`` counter    report rounds no engine address took
``nullworker_seconds_since_last_report``   gauge      since the last delivered report (since start
                                                      when none was); Vast mode only
=========================================  =========  ==============================================

Concurrency invariants
----------------------
* Each :class:`WorkerMetrics` has a private ``CollectorRegistry``: several workers can
  run in one process (the tests do), and the process-wide default registry is left
  alone.
* Gauges and counters are not copied into metric objects as they change: the collector
  builds them at scrape time from one :class:`MetricsSnapshot`, so one scrape is
  consistent with itself. Scrapes happen in the Trio run (the control listener's
  handler), so the snapshot reads the worker's state without locks.
* Histograms need each duration as it happens: :meth:`WorkerMetrics.observe` and
  :meth:`WorkerMetrics.observe_local` are the slot's and the local holds' observers
  (synchronous, never blocking, never raising into the slot).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .local_holds import LocalHoldEvent
from .reservations import Outcome, ReservationEvent

__all__ = ["CONTENT_TYPE", "MetricsSnapshot", "WorkerMetrics"]

#: The ``Content-Type`` of ``GET /metrics``: the classic text format that
#: ``generate_latest`` writes, which every Prometheus version reads (newer
#: ``prometheus-client`` releases name 1.0.0 as their "latest").
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Reservations last up to ``MAX_RESERVATION_SECONDS`` (3600 s by default), jobs longer.
HOLD_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
#: The wait is bounded by ``MAX_QUEUE_TIME`` (30 s by default).
QUEUE_WAIT_BUCKETS_S = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class MetricsSnapshot:
    """The worker's state at one scrape (the runtime builds it)."""

    ready: bool
    reservation_held: bool
    queue_length: int
    local_holds: int
    #: Reservations ended so far, by outcome value.
    reservations_ended: Mapping[str, int]
    #: Local holds ended so far, by outcome value.
    local_holds_ended: Mapping[str, int]
    #: Vast mode: there is an engine to report to.
    reporting: bool
    reports_sent: int
    reports_failed: int
    seconds_since_last_report: float | None


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield _gauge("ready", "1 once the worker is ready and not shutting down.", snap.ready)
        yield _gauge(
            "busy",
            "1 while the engine hears busy: a reservation held or a local hold open.",
            snap.reservation_held or snap.local_holds > 0,
        )
        yield _gauge(
            "reservation_held", "1 while a reservation holds the slot.", snap.reservation_held
        )
        yield _gauge("queue_length", "Reservations waiting for the slot.", snap.queue_length)
        yield _gauge("local_holds", "Local holds (POST /hold) open now.", snap.local_holds)
        ended = CounterMetricFamily(
            "nullworker_reservations_ended",
            "Reservations ended, by outcome.",
            labels=["outcome"],
        )
        for outcome in Outcome:
            ended.add_metric([outcome.value], snap.reservations_ended.get(outcome.value, 0))
        yield ended
        yield CounterMetricFamily(
            "nullworker_rejected",
            "Reservations answered 429: the slot stayed busy for MAX_QUEUE_TIME.",
            value=snap.reservations_ended.get(Outcome.REJECTED.value, 0),
        )
        local_ended = CounterMetricFamily(
            "nullworker_local_holds_ended", "Local holds ended, by outcome.", labels=["outcome"]
        )
        for outcome_value, count in sorted(snap.local_holds_ended.items()):
            local_ended.add_metric([outcome_value], count)
        yield local_ended
        yield CounterMetricFamily(
            "nullworker_engine_reports_sent",
            "worker_status reports an engine address accepted.",
            value=snap.reports_sent,
        )
        yield CounterMetricFamily(
            "nullworker_engine_reports_failed",
            "Report rounds that no engine address accepted.",
            value=snap.reports_failed,
        )
        if snap.reporting and snap.seconds_since_last_report is not None:
            yield _gauge(
                "seconds_since_last_report",
                "Seconds since the engine last accepted a report (since start when none was).",
                snap.seconds_since_last_report,
            )


def _gauge(name: str, documentation: str, value: float | bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"nullworker_{name}", documentation, value=float(value))


class WorkerMetrics:
    """The metrics of one worker: a private registry, read at scrape time.

    Args:
      snapshot: returns the worker's state; called once per scrape, in the Trio run.
    """

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(snapshot))
        self.hold_seconds = Histogram(
            "nullworker_hold_seconds",
            "How long each reservation held the slot.",
            buckets=HOLD_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "nullworker_queue_wait_seconds",
            "How long each reservation waited for the slot (until it started or left the queue).",
            buckets=QUEUE_WAIT_BUCKETS_S,
            registry=self.registry,
        )
        self.local_hold_seconds = Histogram(
            "nullworker_local_hold_seconds",
            "How long each local hold lasted.",
            buckets=HOLD_BUCKETS_S,
            registry=self.registry,
        )

    def observe(self, event: ReservationEvent) -> None:
        """The slot's observer: the queue wait as a reservation leaves the queue; the hold."""
        res = event.reservation
        if event.kind == "started":
            self.queue_wait_seconds.observe(res.queue_wait_s)
        elif event.kind == "ended":
            if res.started_at:
                self.hold_seconds.observe(res.held_s)
            else:  # it never left the queue for the slot: rejected, cancelled, shutdown
                self.queue_wait_seconds.observe(res.queue_wait_s)

    def observe_local(self, event: LocalHoldEvent) -> None:
        """The local holds' observer: each hold's length at its end."""
        if event.kind == "ended":
            self.local_hold_seconds.observe(event.hold.held_s)

    def render(self) -> bytes:
        """The exposition text of every metric (``generate_latest`` of the private registry)."""
        return generate_latest(self.registry)
