"""``nullworker autoscale``: hold as many reservations as a job queue needs.

A thin layer over :func:`~.autoscaler.autoscale`: parse the command line (the flags
and their checks are :mod:`._autoscale_args`'s; this module is the run and its output),
open the demand source (a Redis, NATS or PostgreSQL source opens the trio-asyncio loop
itself, in ``async with``; SQS, RabbitMQ and a command need none), hand its ``read`` to
``autoscale()``, print one line per :class:`~.autoscaler.AutoscaleEvent`, and stop at
SIGINT/SIGTERM.

Output (stdout), one line per event; ``--json`` prints each as a JSON object instead::

    12:00:01 autoscaling endpoint 'my-endpoint' on redis list 'jobs' at redis://q:6379 ...
    12:00:01 metrics on http://127.0.0.1:9464/metrics
    12:00:01 demand 2, target 2: 0 held, 2 waiting
    12:00:02 held: http://1.2.3.4:41234
    ...
    12:05:00 interrupted: released 2 worker(s)

Exit status: 2 usage, 1 the metrics port cannot be bound, 130/143 SIGINT/SIGTERM (every
reservation released at once). Nothing else ends the command: an unreadable source or a
refusing engine is printed and retried with backoff.

With ``--lease URL KEY`` several of these processes run side by side and only the holder
of a Redis lease (:mod:`.lease`) holds reservations; with ``--config`` and several
leased endpoints, the processes share them out (:mod:`.sharing`, whose
:func:`~.sharing.autoscale_endpoints` runs the endpoints: the loop { standby ->
``lease_acquired`` -> ``autoscale()`` until ``lease_lost`` } is there). At
SIGINT/SIGTERM the leader closes its reservations first, then deletes the lease
(``lease_released``) so that a standby takes over at its next attempt.

With ``--config FILE.toml`` (:mod:`.autoscale_config`) one process drives several
endpoints, each with its sources, policy, API key and lease: the file is checked whole
before anything starts (``--check`` prints the plan and stops there), and each line
says whose it is (``endpoint`` in JSON; a ``[NAME]`` prefix in text when there are
several). Every lease event carries this process's ``token`` (one per process).

Concurrency invariants
----------------------
* One Trio run. The signal receiver is open for the whole of it, so SIGINT and SIGTERM
  always become a cancellation (never a ``KeyboardInterrupt`` between two checkpoints):
  leaving ``autoscale()`` closes every reservation's connection before the exit status
  is returned.
* Events are printed synchronously from the ``on_event`` callback, in the order the
  autoscaler made them.
* The metrics server (``prometheus_client``'s, in threads of its own) is bound before
  the Trio run starts and closed after it ends. A scrape takes its snapshots in the Trio
  thread (``trio.from_thread.run_sync``), never by reading the autoscaler's state from
  the server's thread.
* With a lease, each term runs its own ``autoscale()`` call; the ended terms' counters
  are kept by :class:`~.sharing.EndpointRun`, so the metrics' counters never go back; a
  standby has no autoscaler, and serves the lease metrics only. ``lease_lost`` is printed
  (with the reservations about to be released) before the term's cancellation runs.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import trio

from .. import logs
from ._autoscale_args import Options, build_parser, parse_options
from ._lease import TOKEN_SHOWN, LeaseEvent, LeaseStatistics
from ._redis_lease import RedisLease
from .autoscale_config import EndpointOptions, plan_lines
from .autoscaler import AutoscaleEvent, AutoscalerStatistics, HeldReservation, autoscale
from .cli import EXIT_USAGE, SIGNAL_EXIT
from .demand import redact
from .reservation import reserve
from .sharing import EndpointRun, ShareEvent, autoscale_endpoints

__all__ = ["EXIT_METRICS", "EXIT_USAGE", "main"]

_T = TypeVar("_T")

#: Exit status when the metrics port cannot be bound.
EXIT_METRICS = 1

_PROG = "nullworker autoscale"


def _iso_utc(now: float) -> str:
    return (
        datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _event_fields(event: AutoscaleEvent) -> dict[str, Any]:
    """The event as JSON fields: the common ones always, the others when set."""
    fields: dict[str, Any] = {
        "demand": event.demand,
        "target": event.target,
        "held": event.held,
        "waiting": event.waiting,
    }
    fields.update(
        _set_fields(
            worker_url=event.worker_url,
            outcome=event.outcome,
            cause=event.cause,
            held_s=event.held_s,
            waited_s=event.waited_s,
            error=event.error,
            delay_s=event.delay_s,
            failures=event.failures,
            outage_s=event.outage_s,
            reason=event.reason,
            held_back=event.held_back,
        )
    )
    return fields


def _lease_fields(event: LeaseEvent) -> dict[str, Any]:
    """A lease event as JSON fields: ``term`` always, the others when set."""
    return {
        "term": event.term,
        **_set_fields(
            holder=event.holder,
            reason=event.reason,
            error=event.error,
            held_for_s=event.held_for_s,
            waited_s=event.waited_s,
            deleted=event.deleted,
        ),
    }


def _set_fields(**extras: Any) -> dict[str, Any]:
    """The fields that are not ``None``: floats rounded, strings without passwords."""
    fields: dict[str, Any] = {}
    for name, value in extras.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = round(value, 3)
        elif isinstance(value, str):
            value = redact(value)
        fields[name] = value
    return fields


@dataclass(eq=False)
class _Endpoint:
    """One endpoint's options and its run (autoscaler, lease, counters)."""

    options: EndpointOptions
    run: EndpointRun


class _Cli:
    """One ``nullworker autoscale`` run: its endpoints' autoscalers, printer and signals."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.endpoints = [
            _Endpoint(o, EndpointRun(o.endpoint, self._autoscale_partial(o)))
            for o in options.endpoints
        ]
        #: One token for every lease (and the membership) of this process: its name in
        #: every lease event, here and in the other processes' standby lines.
        self.token = secrets.token_hex(16)
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self.signum: int | None = None
        self.released_on_signal = 0

    # -- output ------------------------------------------------------------------------

    def _print(self, kind: str, text: str, *, label: str | None = None, **fields: Any) -> None:
        now = time.time()
        if self.options.json:
            if label is not None:
                fields = {"endpoint": label, **fields}
            line = json.dumps({"kind": kind, "time": _iso_utc(now), "message": text, **fields})
        else:
            # With several endpoints, each line says whose it is.
            if label is not None and len(self.endpoints) > 1:
                text = f"[{label}] {text}"
            line = f"{time.strftime('%H:%M:%S', time.localtime(now))} {text}"
        print(line, flush=True)

    def _on_event(self, endpoint: str, event: AutoscaleEvent) -> None:
        self._print(event.kind, redact(event.message), label=endpoint, **_event_fields(event))

    def _on_lease_event(self, ep: _Endpoint, event: LeaseEvent) -> None:
        fields = {**_lease_fields(event), "token": self.token[:TOKEN_SHOWN]}
        message = event.message
        if event.kind == "lease_lost":
            # Printed before the term's cancellation runs: these are about to go.
            scaler = ep.run.scaler
            held = 0 if scaler is None else scaler.statistics().held
            fields["released"] = held
            message += f"; releasing {held} worker(s)"
        self._print(event.kind, redact(message), label=ep.options.endpoint, **fields)

    def _on_share_event(self, event: ShareEvent) -> None:
        fields: dict[str, Any] = {
            "members": event.members,
            "share": event.share,
            "endpoints": event.endpoints,
            "leading": list(event.leading),
            "token": self.token[:TOKEN_SHOWN],
        }
        self._print(event.kind, redact(event.message), label=event.endpoint, **fields)

    def print_start(self, ep: _Endpoint) -> None:
        o = ep.options
        duration = "the worker's cap" if o.duration_s is None else f"{o.duration_s:g} s"
        engine_url = redact(o.engine_url)
        lease: dict[str, Any] = {}
        lease_text = ""
        if o.lease is not None and ep.run.lease is not None:
            lease = {
                "lease": ep.run.lease.describe(),
                "lease_ttl_s": o.lease.ttl_s,
                "lease_renew_s": o.lease.renew_s,
                "token": self.token[:TOKEN_SHOWN],
                "pid": os.getpid(),
            }
            lease_text = (
                f"; {ep.run.lease.describe()}, ttl {o.lease.ttl_s:g} s, renewed every "
                f"{o.lease.renew_s:g} s, token {self.token[:TOKEN_SHOWN]} (pid {os.getpid()})"
            )
        self._print(
            "started",
            f"autoscaling endpoint {o.endpoint!r} on {o.source.describe()}: min {o.min_workers}, "
            f"max {o.max_workers}, {o.jobs_per_worker} job(s) per worker, poll {o.poll_s:g} s, "
            f"scale-down delay {o.scale_down_delay_s:g} s, each hold {duration}; "
            f"{''.join(f'{line}; ' for line in o.policy_lines())}"
            f"engine {engine_url}{lease_text}",
            label=o.endpoint,
            source=o.source.describe(),
            engine_url=engine_url,
            min=o.min_workers,
            max=o.max_workers,
            jobs_per_worker=o.jobs_per_worker,
            poll_s=o.poll_s,
            scale_down_delay_s=o.scale_down_delay_s,
            duration_s=o.duration_s,
            **_set_fields(
                activation=o.activation or None,
                scale_to_zero_delay_s=o.scale_to_zero_delay_s,
                max_new_per_minute=o.max_new_per_minute,
                min_schedule=[w.describe() for w in o.schedule] or None,
                age_boost_after_s=o.age_boost_after_s,
                age_boost=o.age_boost if o.age_boost_after_s is not None else None,
            ),
            **lease,
        )

    # -- the metrics server's side (another thread) ---------------------------------------

    def statistics_for_scrape(self) -> dict[str, AutoscalerStatistics]:
        """Snapshots taken in the Trio thread; called from the metrics server's threads."""
        return self._in_trio(self._statistics)

    def lease_statistics_for_scrape(self) -> dict[str, LeaseStatistics]:
        """The leases' snapshots, taken in the Trio thread (endpoints with a lease only)."""
        return self._in_trio(self._lease_statistics)

    def _in_trio(self, snapshot: Callable[[], dict[str, _T]]) -> dict[str, _T]:
        token = self._trio_token
        if token is None:
            return {}
        try:
            return trio.from_thread.run_sync(snapshot, trio_token=token)
        except trio.RunFinishedError:
            # The run is over: nothing changes any more.
            return snapshot()

    def _statistics(self) -> dict[str, AutoscalerStatistics]:
        # A standby (or an endpoint not started yet) has no autoscaler metrics.
        snapshots = ((ep.options.endpoint, ep.run.statistics()) for ep in self.endpoints)
        return {name: stats for name, stats in snapshots if stats is not None}

    def _lease_statistics(self) -> dict[str, LeaseStatistics]:
        return {
            ep.options.endpoint: ep.run.lease.statistics()
            for ep in self.endpoints
            if ep.run.lease is not None
        }

    # -- the Trio run --------------------------------------------------------------------

    async def run(self, metrics_url: str | None) -> int:
        self._trio_token = trio.lowlevel.current_trio_token()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            # Every source and lease is opened here, in this task, before the endpoints'
            # tasks start: the first one that needs the trio-asyncio loop opens it, and
            # the others (and the tasks) share it. No shared HTTP client: each
            # reservation gets its own small one (with the shared TLS context), since
            # one pool holding every held connection makes each request scan them all.
            async with AsyncExitStack() as stack:
                for ep in self.endpoints:
                    await stack.enter_async_context(ep.options.source)
                    ep.run.lease = await stack.enter_async_context(self._open_lease(ep))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals, nursery.cancel_scope)
                    for ep in self.endpoints:
                        self.print_start(ep)
                    if metrics_url is not None:
                        self._print("metrics", f"metrics on {metrics_url}", url=metrics_url)
                    runs = [ep.run for ep in self.endpoints]
                    await nursery.start(
                        partial(autoscale_endpoints, runs, on_event=self._on_share_event)
                    )
        # Only a signal ends the nursery without an exception.
        assert self.signum is not None
        status = SIGNAL_EXIT.get(signal.Signals(self.signum), 128 + self.signum)
        self._print(
            "stopped",
            f"interrupted: released {self.released_on_signal} worker(s)",
            signal=signal.Signals(self.signum).name,
            released=self.released_on_signal,
            exit_status=status,
        )
        return status

    def _autoscale_partial(self, o: EndpointOptions) -> Callable[..., Any]:
        """``autoscale()`` for one endpoint, for ``nursery.start`` (once per term)."""

        def reserve_one() -> AbstractAsyncContextManager[HeldReservation]:
            return reserve(
                o.endpoint, duration_s=o.duration_s, api_key=o.api_key, engine_url=o.engine_url
            )

        return partial(
            autoscale,
            o.endpoint,
            demand=o.source,
            min_workers=o.min_workers,
            max_workers=o.max_workers,
            jobs_per_worker=o.jobs_per_worker,
            poll_s=o.poll_s,
            scale_down_delay_s=o.scale_down_delay_s,
            duration_s=o.duration_s,
            reserve=reserve_one,
            on_event=lambda event: self._on_event(o.endpoint, event),
            activation=o.activation,
            scale_to_zero_delay_s=o.scale_to_zero_delay_s,
            max_new_per_minute=o.max_new_per_minute,
            min_schedule=o.schedule,
            age_boost_after_s=o.age_boost_after_s,
            age_boost=o.age_boost,
        )

    @asynccontextmanager
    async def _open_lease(self, ep: _Endpoint) -> AsyncIterator[RedisLease | None]:
        lease_options = ep.options.lease
        if lease_options is None:
            yield None
            return
        lease = RedisLease(
            lease_options.url,
            lease_options.key,
            ttl_s=lease_options.ttl_s,
            renew_s=lease_options.renew_s,
            token=self.token,
            on_event=partial(self._on_lease_event, ep),
        )
        # autoscale_endpoints() deletes the key on its way out, after the reservations.
        async with lease:
            yield lease

    async def _watch_signals(self, signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
        async for signum in signals:
            self.signum = signum
            self.released_on_signal = sum(
                ep.run.scaler.statistics().held
                for ep in self.endpoints
                if ep.run.scaler is not None
            )
            scope.cancel()
            return


def main(argv: list[str] | None = None, *, prog: str = _PROG) -> int:
    """``nullworker autoscale``; returns the exit status.

    ``argv`` defaults to ``sys.argv[1:]``. Runs its own ``trio.run``, so call it from the
    main thread, outside any Trio run.
    """
    parser = build_parser(prog)
    try:
        options = parse_options(parser, argv)
    except SystemExit as exc:  # argparse's way out: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if options.check:
        print("\n".join(plan_lines(options.endpoints)), flush=True)
        return 0
    logs.configure(logging.WARNING, options.log_format, text_format=logs.SHORT_TEXT_FORMAT)
    cli = _Cli(options)
    metrics = None
    if options.metrics_port is not None:
        # Imported here: prometheus_client is needed only with --metrics-port.
        from .metrics import start_metrics_server

        try:
            metrics = start_metrics_server(
                cli.statistics_for_scrape,
                lease=(
                    cli.lease_statistics_for_scrape
                    if any(o.lease is not None for o in options.endpoints)
                    else None
                ),
                host=options.metrics_host,
                port=options.metrics_port,
            )
        except OSError as exc:
            print(
                f"{prog}: error: cannot serve metrics on "
                f"{options.metrics_host}:{options.metrics_port}: {exc}",
                file=sys.stderr,
            )
            return EXIT_METRICS
    try:
        return trio.run(cli.run, None if metrics is None else metrics.url)
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was open
        return SIGNAL_EXIT[signal.SIGINT]
    finally:
        if metrics is not None:
            metrics.close()
