"""Prometheus metrics of a running autoscaler, served by ``prometheus-client``.

``nullworker autoscale --metrics-port P`` serves these at ``http://HOST:P/metrics``, each
with the label ``endpoint="NAME"`` (one series per endpoint with ``--config``):

* ``nullworker_autoscale_demand`` (gauge): the last demand read; no sample before one;
* ``nullworker_autoscale_target`` (gauge): reservations kept (after the scale-down delay);
* ``nullworker_autoscale_reservations_held`` (gauge): reservations held on a worker;
* ``nullworker_autoscale_reservations_waiting`` (gauge): reservations waiting for a worker;
* ``nullworker_autoscale_reservations_ended_total{outcome=...}`` (counter): held
  reservations that ended, by outcome (``duration_elapsed``, ``explicit``,
  ``client_released``, ``connection_lost``, ...);
* ``nullworker_autoscale_reservations_failed_total`` (counter): attempts to reserve that
  failed;
* ``nullworker_autoscale_source_errors_total`` (counter): failed demand reads, every one;
* ``nullworker_autoscale_source_up`` (gauge): 1 if the last demand read succeeded, else 0.

With ``--lease`` (:mod:`.lease`), also:

* ``nullworker_autoscale_lease_leader`` (gauge): 1 while this process holds the lease
  (and so may hold reservations), else 0;
* ``nullworker_autoscale_lease_terms_total`` (counter): terms of leadership begun.

A standby runs no autoscaler: it serves the lease metrics only.

Concurrency invariants
----------------------
* The registry is private (a ``CollectorRegistry`` of our own): nothing else registers
  in it, and the process-wide default registry is left alone.
* Values are not copied into ``prometheus_client`` metric objects as they change: the
  :class:`AutoscalerCollector` builds them from one
  :class:`~nullworker.client.autoscaler.AutoscalerStatistics` snapshot at scrape time,
  so the figures of one scrape are consistent with each other.
* ``prometheus_client`` serves from threads of its own (one per scrape), not from the
  Trio run. The ``statistics`` (and ``lease``) functions given to
  :func:`start_metrics_server` are called in those threads: they must be safe to call
  there (the command line hops into the Trio thread with ``trio.from_thread.run_sync``
  to take each snapshot).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ._lease import LeaseStatistics
from .autoscaler import AutoscalerStatistics

__all__ = ["PREFIX", "AutoscalerCollector", "MetricsServer", "start_metrics_server"]

#: The prefix of every metric name.
PREFIX = "nullworker_autoscale_"

#: Returns a snapshot per endpoint name; an endpoint with nothing to report yet (or a
#: standby) is left out.
StatisticsFunction = Callable[[], Mapping[str, AutoscalerStatistics]]
#: Returns the lease's snapshot per endpoint name (those with a lease).
LeaseStatisticsFunction = Callable[[], Mapping[str, LeaseStatistics]]


class AutoscalerCollector(Collector):
    """Builds the autoscaler's metrics from ``statistics()`` at each scrape.

    Args:
      statistics: returns the snapshots to report, by endpoint name (an endpoint left
        out has no autoscaler metrics: none runs yet, or it stands by); called once per
        scrape, in the thread that serves it.
      lease: with leases, returns their snapshots by endpoint name; called once per
        scrape too.
    """

    def __init__(
        self, statistics: StatisticsFunction, *, lease: LeaseStatisticsFunction | None = None
    ) -> None:
        self._statistics = statistics
        self._lease = lease

    def collect(self) -> Iterator[Metric]:
        if self._lease is not None:
            leases = sorted(self._lease().items())
            if leases:
                leader = _gauge(
                    "lease_leader",
                    "1 while this autoscaler holds the lease (and may hold reservations), else 0.",
                )
                terms = _counter(
                    "lease_terms", "Terms of leadership begun (times the lease was acquired)."
                )
                for endpoint, lease in leases:
                    leader.add_metric([endpoint], 1 if lease.leader else 0)
                    terms.add_metric([endpoint], lease.terms)
                yield leader
                yield terms
        snapshots = sorted(self._statistics().items())
        if not snapshots:
            return
        demand = _gauge("demand", "Jobs the demand source counted at its last successful read.")
        target = _gauge(
            "target",
            "Reservations kept: ceil(demand / jobs per worker) clamped to min..max, "
            "held up during the scale-down delay.",
        )
        held = _gauge("reservations_held", "Reservations held on a worker.")
        waiting = _gauge(
            "reservations_waiting", "Reservations waiting for the engine to give them a worker."
        )
        ended = _counter(
            "reservations_ended", "Held reservations that ended, by outcome.", "outcome"
        )
        failed = _counter(
            "reservations_failed",
            "Attempts to reserve a worker that failed (engine unreachable, refused, rejected).",
        )
        errors = _counter("source_errors", "Demand reads that failed.")
        up = _gauge("source_up", "1 if the last demand read succeeded, else 0.")
        for endpoint, stats in snapshots:
            label = [endpoint]
            if stats.demand is not None:
                demand.add_metric(label, stats.demand)
            target.add_metric(label, stats.target)
            held.add_metric(label, stats.held)
            waiting.add_metric(label, stats.waiting)
            for outcome, count in sorted(stats.ended_by_outcome.items()):
                ended.add_metric([endpoint, outcome], count)
            failed.add_metric(label, stats.reservations_failed)
            errors.add_metric(label, stats.source_errors)
            up.add_metric(label, 1 if stats.source_ok else 0)
        yield from (demand, target, held, waiting, ended, failed, errors, up)


def _gauge(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, labels=["endpoint"])


def _counter(name: str, documentation: str, *labels: str) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, labels=["endpoint", *labels])


class MetricsServer:
    """``prometheus_client``'s HTTP server, serving one :class:`AutoscalerCollector`.

    Made by :func:`start_metrics_server`; ``url`` is where the metrics are.
    """

    def __init__(self, server: WSGIServer, thread: threading.Thread, url: str) -> None:
        self._server = server
        self._thread = thread
        self.url = url

    def close(self) -> None:
        """Stop serving and close the port. Blocks up to about half a second (the
        server's poll interval). Idempotent."""
        if not self._thread.is_alive():
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_metrics_server(
    statistics: StatisticsFunction,
    *,
    host: str,
    port: int,
    lease: LeaseStatisticsFunction | None = None,
) -> MetricsServer:
    """Serve the autoscaler's metrics on ``http://host:port/metrics``, in a thread.

    Args:
      statistics, lease: see :class:`AutoscalerCollector`.
      host: the address to bind (``127.0.0.1``, ``0.0.0.0``, ``::``, a name).
      port: the port; ``0`` picks a free one (read it from the ``url``).

    Returns:
      The running server; call :meth:`MetricsServer.close` when done.

    Raises:
      OSError: the address cannot be bound (in use, not ours, unknown name).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AutoscalerCollector(statistics, lease=lease))
    server, thread = start_http_server(port, host, registry=registry)
    bound_port = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    return MetricsServer(server, thread, f"http://{shown}:{bound_port}/metrics")
