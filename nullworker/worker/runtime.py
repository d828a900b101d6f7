"""The worker's runtime: the slot, local holds, readiness, the engine reporter and metrics.

One :class:`Worker` lives for one serving lifetime. :meth:`Worker.run` is its background
work (the single-process lock, the engine reporter and its journal, readiness, the
consumer health check, key refreshes), a task like any other: its caller starts it with
``await nursery.start(worker.run)`` and cancels it to stop it.

Who starts it:

* :func:`~nullworker.worker.server.serve`, the composition root, in its one nursery,
  beside the HTTP servers (the control listener, then the main port). An error in any of
  them propagates out of ``serve()`` the ordinary way.
* Only for an app whose server is not ours (``hypercorn 'nullworker.app:create_app()'``),
  the app's ``before_serving`` hook, in Quart-Trio's nursery (see
  :func:`~nullworker.worker.app.create_app`).

The runtime knows nothing of the web layer: the HTTP handlers and the control listener
read and change it, it never imports :mod:`nullworker.worker.app`.

Invariants
----------
* The slot is in-process state. Two processes serving the same port would each think
  they are free, so :meth:`Worker.run` takes an exclusive lock named after the port and
  refuses to start without it (that is how ``hypercorn --workers 2`` is refused).
* Readiness comes after the engine's public key (unless unsecured) and a benchmark that
  runs a real zero-length hold through a private slot. ``max_perf`` is pinned to 100.
* With a consumer health check (``BACKEND_HEALTH_URL`` or
  ``NULLWORKER_BACKEND_HEALTH_COMMAND``), readiness also waits for the consumer's first
  healthy answer; while it does not answer (:attr:`Worker.consumer_error`) the engine
  hears ``error_msg`` and ``/reserve`` is refused, until it answers again. Held
  reservations and local holds are left to end as they would.
* Busy means a reservation held *or* a local hold open (:attr:`Worker.busy`): that is
  what ``/health``, ``/status``, the metrics and the engine reports say.
* Shutdown: :meth:`Worker.begin_shutdown` ends every hold with the ``shutdown`` outcome
  (holders get a 503 they can read, local holders a 200 saying ``shutdown``); whatever is
  still pending for the engine is flushed under a short shielded deadline when
  :meth:`Worker.run` ends, cancelled or failed.
* A failure after start-up is never hidden: :meth:`Worker.run` logs it, ends every hold,
  tells the engine (``error_msg``, bounded) and raises
  :class:`~nullworker.errors.WorkerFailed`, which stops whoever runs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from .._groups import only_leaf
from ..errors import ConfigError, StartupFailed, WorkerFailed
from .config import MAX_PERF, RESERVATION_WORKLOAD, WorkerConfig
from .local_holds import HoldOutcome, LocalHoldEvent, LocalHolds
from .metrics import MetricsSnapshot, WorkerMetrics
from .reservations import Outcome, ReservationEvent, ReservationSlot

if TYPE_CHECKING:
    from .reporter import EngineReporter

__all__ = ["Worker"]

log = logging.getLogger("nullworker")

#: Shielded bound on the final report at shutdown.
FINAL_FLUSH_S = 2.0
#: While the engine takes no reports either, the key is fetched again after about this
#: long (jittered), or as soon as a report is delivered again.
KEY_RETRY_IN_OUTAGE_S = 5.0
#: After a failure has ended every hold, how long the holders' handlers get to write
#: their answers before the failure stops the HTTP servers.
ANSWER_GRACE_S = 0.2


class Worker:
    """State shared by the HTTP handlers and the background tasks.

    Args:
      config: the validated settings.
      started_at: ``time.monotonic()`` at process start, so the reported ``loadtime``
        covers interpreter start-up too. Defaults to now.
    """

    def __init__(self, config: WorkerConfig, *, started_at: float | None = None) -> None:
        self.config = config
        self.started_at = time.monotonic() if started_at is None else started_at
        self.slot = ReservationSlot(
            max_reservation_s=config.max_reservation_s,
            max_queue_time_s=config.max_queue_time_s,
            workload=RESERVATION_WORKLOAD,
        )
        self.slot.add_observer(self._log_event)
        self.local_holds = LocalHolds()
        self.local_holds.add_observer(self._log_local_event)
        self.metrics = WorkerMetrics(self._metrics_snapshot)
        self.slot.add_observer(self.metrics.observe)
        self.local_holds.add_observer(self.metrics.observe_local)
        self.reporter: EngineReporter | None = None
        self.public_key: rsa.RSAPublicKey | None = None
        self.ready = trio.Event()
        self.ready_after_s: float | None = None
        self.error: str | None = None
        #: Why the consumer counts as unhealthy now (None: healthy, or no check).
        self.consumer_error: str | None = None
        #: Set at the consumer's first healthy answer (at once without a check).
        self._consumer_healthy = trio.Event()
        if config.backend_health_target is None:
            self._consumer_healthy.set()
        self._key_fetched_at = -config.key_refresh_min_s
        self._key_refresh = trio.Event()
        #: Set when the refetch in flight ends; None while none is in flight.
        self._key_refetched: trio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the background work until cancelled; ``started()`` once it runs.

        Started: the port's lock is held, the engine reporter runs (its journal read),
        and readiness, the consumer health check and the key refreshes are under way.
        The HTTP servers are not this method's: its caller starts them after it.

        Raises:
          StartupFailed: before ``started()``, the port's lock is held by another process.
          ConfigError: before ``started()``, ``lock_dir`` is unusable.
          WorkerFailed: after ``started()``, the background work failed. It has been
            logged, every hold ended (``shutdown``) and the engine told (``error_msg``,
            bounded) before this is raised, so a worker that can no longer report stops
            rather than going on looking alive (and idle).

        A known start-up error comes on its own, not inside exception groups: its
        message says what failed, in one line. Cancelling ends every hold and reports
        what is still pending to the engine under a short shielded deadline.
        """
        started = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run)
                started = True
                task_status.started()
        except Exception as exc:  # a group of real errors; a Cancelled is not caught
            leaf = only_leaf(exc)
            if not started:
                if isinstance(leaf, ConfigError | StartupFailed):
                    raise leaf from None
                raise
            raise await self.report_failure(exc) from leaf

    async def report_failure(self, exc: Exception) -> WorkerFailed:
        """Log ``exc``, end every hold, tell the engine; the :class:`WorkerFailed` to raise.

        :meth:`run` calls it for its own failures; whoever runs the HTTP servers beside it
        calls it for theirs after start-up, so any failure stops the worker the same way.
        """
        leaf = only_leaf(exc)
        failure = WorkerFailed(f"{type(leaf).__name__}: {leaf}")
        self.error = f"worker failed: {failure}"
        log.critical("%s; stopping", self.error, exc_info=exc)
        self.begin_shutdown()
        # The HTTP servers beside this task are cancelled as soon as the error reaches
        # them: first let the holders record their outcomes and their handlers write
        # the answers (503 shutdown), which takes a few scheduler rounds, not I/O waits.
        with trio.move_on_after(FINAL_FLUSH_S / 2):
            await self.slot.wait_idle()
            await self.local_holds.wait_idle()
        await trio.sleep(ANSWER_GRACE_S)
        if self.config.reporting:
            from .reporter import send_error_beacon

            with trio.move_on_after(self.config.engine_timeout_s * 2):
                await send_error_beacon(self.config, self.error)
        return failure

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """:meth:`run` without the failure handling: lock, reporter, background tasks."""
        with self._single_process_lock() as lock_path:
            # Redirects are never followed: a 3xx from the engine is a failed delivery.
            async with httpx.AsyncClient(
                timeout=self.config.engine_timeout_s, follow_redirects=False
            ) as http:
                if self.config.reporting:
                    from .reporter import EngineReporter

                    self.reporter = EngineReporter(
                        self.config,
                        http=http,
                        started_at=self.started_at,
                        # Beside the lock, and read only now that it is held.
                        journal_path=None
                        if lock_path is None
                        else lock_path[: -len(".lock")] + ".journal",
                    )
                    self.slot.add_observer(self.reporter.observe)
                    reporter = self.reporter
                    self.local_holds.add_observer(
                        lambda _event: reporter.set_local_holds(self.local_holds.count)
                    )
                    reporter.set_local_holds(self.local_holds.count)
                try:
                    async with trio.open_nursery() as nursery:
                        if self.reporter is not None:
                            await nursery.start(self.reporter.run)
                        nursery.start_soon(self._become_ready)
                        if self.config.backend_health_target is not None:
                            nursery.start_soon(self._watch_consumer)
                        if self.reporter is not None and not self.config.unsecured:
                            nursery.start_soon(self._refresh_key_on_demand)
                        self._log_mode()
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    self.begin_shutdown()
                    if self.reporter is not None:
                        with trio.move_on_after(FINAL_FLUSH_S, shield=True):
                            # Let the holders record their outcomes first, so the
                            # final report shows the worker idle.
                            with trio.move_on_after(FINAL_FLUSH_S / 2):
                                await self.slot.wait_idle()
                                await self.local_holds.wait_idle()
                            await self.reporter.flush(timeout_s=FINAL_FLUSH_S / 2)

    def begin_shutdown(self) -> None:
        """Take no new reservations or local holds; end the open ones (``shutdown``)."""
        if not self.slot.closing:
            log.info("shutting down: releasing the active and queued reservations and local holds")
        self.slot.shutdown()
        self.local_holds.shutdown()

    @property
    def busy(self) -> bool:
        """A reservation holds the slot or a local hold is open: the engine hears "busy"."""
        return self.slot.busy or self.local_holds.count > 0

    @contextlib.contextmanager
    def _single_process_lock(self) -> Iterator[str | None]:
        """Hold the port's lock; yields its path (None for port 0: no lock)."""
        if self.config.port == 0:  # an ephemeral port cannot be shared by accident
            yield None
            return
        path = os.path.join(self.config.lock_dir, f"nullworker-{self.config.port}.lock")
        try:
            handle = open(path, "a+")  # held for the whole serving lifetime
        except OSError as exc:
            raise ConfigError(
                f"NULLWORKER_LOCK_DIR {self.config.lock_dir} is not usable: cannot open the "
                f"lock {path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StartupFailed(
                f"another nullworker process already serves port {self.config.port} "
                f"(lock {path}). The reservation slot is in-process state: run exactly ONE "
                "worker process (hypercorn --workers 1)."
            ) from None
        except OSError as exc:  # e.g. a file system without locks
            handle.close()
            raise ConfigError(
                f"NULLWORKER_LOCK_DIR {self.config.lock_dir} is not usable: cannot lock "
                f"{path}: {exc.strerror or exc}"
            ) from None
        try:
            yield path
        finally:
            handle.close()

    def _log_mode(self) -> None:
        if self.config.standalone:
            log.info(
                "standalone mode (no REPORT_ADDR/CONTAINER_ID): unsecured, "
                "not reporting to an engine"
            )
        else:
            log.info(
                "Vast mode: reporting to %s as container %s, url %s, signatures %s",
                ", ".join(self.config.report_addrs),
                self.config.container_id,
                self.config.public_url,
                "NOT checked (UNSECURED)" if self.config.unsecured else "checked",
            )

    # -- readiness -------------------------------------------------------------------

    async def _become_ready(self) -> None:
        if self.reporter is not None and not self.config.unsecured:
            await self._load_key_until_loaded()
        max_perf = await self._benchmark()
        await self._consumer_healthy.wait()
        self.ready_after_s = time.monotonic() - self.started_at
        self.error = None
        self.ready.set()
        if self.reporter is not None:
            self.reporter.set_ready(max_perf=max_perf)
        log.info("ready after %.3f s (max_perf %g)", self.ready_after_s, max_perf)

    async def _watch_consumer(self) -> None:
        """Probe the consumer (see :mod:`~nullworker.worker.consumer_health`) until cancelled.

        The URL is probed with a client of its own: the probe's bound, no redirects, and
        no proxy from the environment (the consumer is on this instance).
        """
        from .consumer_health import command_probe, http_probe, watch

        cfg = self.config
        target = cfg.backend_health_target
        assert target is not None
        log.info(
            "consumer health check: %s every %g s; ready once it answers, errored after "
            "%g s without an answer",
            target,
            cfg.backend_health_interval_s,
            cfg.backend_health_timeout_s,
        )
        async with httpx.AsyncClient(
            timeout=cfg.backend_health_probe_timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            probe = (
                http_probe(cfg.backend_health_url, client=client)
                if cfg.backend_health_url is not None
                else command_probe(cfg.backend_health_command or "")
            )
            await watch(
                probe,
                target=target,
                interval_s=cfg.backend_health_interval_s,
                probe_timeout_s=cfg.backend_health_probe_timeout_s,
                timeout_s=cfg.backend_health_timeout_s,
                startup_s=cfg.backend_health_startup_s,
                on_change=self._consumer_health_changed,
            )

    def _consumer_health_changed(self, message: str | None) -> None:
        """The consumer's health changed: ``None`` healthy, else why not."""
        was, self.consumer_error = self.consumer_error, message
        if message is None:
            self._consumer_healthy.set()
            if was is not None and self.error == was:
                self.error = None
                if self.reporter is not None and self.ready.is_set():
                    self.reporter.set_error("")
            return
        self.error = message
        if self.reporter is not None:
            self.reporter.set_error(message)

    async def _load_key_until_loaded(self) -> None:
        """Fetch the engine's key until it loads; the engine hears the error meanwhile.

        First the reporter's quick ramp (``PUBKEY_BACKOFF_S``: 5 rounds over the
        addresses in 2.75 s), then one round every ``RETRY_CAP_S`` (jittered, 0.8-1.2 s).
        While the report loop cannot reach the engine either, the next round waits for
        its next delivered report instead (at most ``KEY_RETRY_IN_OUTAGE_S``, jittered):
        a worker started during an engine outage then adds about one ``GET /pubkey/``
        per 5 s to the report loop's one request a second, and still loads the key right
        after the engine takes a report again. The error is reported (and logged) when it
        changes, and logged again at most once a minute.
        """
        from .reporter import PUBKEY_BACKOFF_S, RETRY_CAP_S, retry_pause

        assert self.reporter is not None
        backoff: tuple[float, ...] = PUBKEY_BACKOFF_S
        logged_at = -float("inf")
        while True:
            try:
                self.public_key = await self.reporter.fetch_pubkey(backoff_s=backoff)
            except Exception as exc:  # PubkeyUnavailable: every try of this call failed
                error = f"cannot fetch the engine's public key: {exc}"
                now = trio.current_time()
                if error != self.error or now - logged_at >= 60.0:
                    log.error("%s; retrying", error)
                    logged_at = now
                if error != self.error:
                    self.error = error
                    self.reporter.set_error(error)
                backoff = ()  # one round per call from now on
                await trio.sleep(retry_pause(RETRY_CAP_S))
                await self.reporter.wait_until_reachable(
                    timeout_s=retry_pause(KEY_RETRY_IN_OUTAGE_S)
                )
                continue
            self._key_fetched_at = trio.current_time()
            return

    async def _benchmark(self) -> float:
        """Run one real zero-length hold through a private slot: the whole core path."""
        probe = ReservationSlot(max_reservation_s=1.0, max_queue_time_s=0.0)
        result = await probe.hold(0.0)
        if result.outcome is not Outcome.ELAPSED:  # pragma: no cover -- a broken core
            raise RuntimeError(f"benchmark hold ended with {result.outcome}")
        return MAX_PERF

    async def key_changed(self) -> bool:
        """Called after a failed signature check: has the engine rotated its key?

        Returns True when a refetch found a new key (check the signature again with
        :attr:`public_key`), False otherwise. A refetch already in flight is waited for
        (bounded by one round over the engine addresses); else one is started if the last
        began at least ``key_refresh_min_s`` ago; else the answer is False at once. So a
        valid request after a rotation is accepted as soon as any request, an
        attacker's included, has triggered the refetch, and however many bad
        signatures arrive the engine sees at most one ``GET /pubkey/`` per
        ``key_refresh_min_s`` from this worker.
        """
        before = self.public_key
        done = self._key_refetched
        if done is None:
            if trio.current_time() - self._key_fetched_at < self.config.key_refresh_min_s:
                return False
            done = self._key_refetched = trio.Event()
            self._key_fetched_at = trio.current_time()
            self._key_refresh.set()
        with trio.move_on_after(
            self.config.engine_timeout_s * max(1, len(self.config.report_addrs)) + 1.0
        ):
            await done.wait()
        return self.public_key is not before

    async def _refresh_key_on_demand(self) -> None:
        """Run the refetches :meth:`key_changed` asks for, in this task rather than in a
        request's: a client that goes away does not cancel the fetch the others wait for."""
        assert self.reporter is not None
        while True:
            await self._key_refresh.wait()
            self._key_refresh = trio.Event()
            try:
                key = await self.reporter.fetch_pubkey(backoff_s=())
            except Exception as exc:
                log.warning("refreshing the engine's public key failed: %s", exc)
            else:
                if self.public_key is None or (
                    key.public_numbers() != self.public_key.public_numbers()
                ):
                    log.info("the engine's public key changed; using the new one")
                    self.public_key = key
            finally:
                done, self._key_refetched = self._key_refetched, None
                if done is not None:
                    done.set()

    # -- views -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        stats = self.slot.statistics()
        active: dict[str, Any] | None = None
        if stats.active is not None:
            active = {
                "id": stats.active.id,
                "duration": stats.active.duration_s,
                "started_at": stats.active.started_at,
                "ends_at": stats.active.ends_at,
                "held_s": round(stats.active.held_s, 3),
                "request_idx": stats.active.tag.get("request_idx"),
            }
        local = self.local_holds.statistics()
        body: dict[str, Any] = {
            "ready": self.ready.is_set(),
            "busy": stats.busy or local.count > 0,
            "closing": stats.closing,
            "active": active,
            "queue_length": stats.waiting,
            "reservation_waiters": stats.held_waiters,
            "local_holds": {
                "count": local.count,
                "holds": [
                    {
                        "id": h.id,
                        "label": h.label,
                        "duration": h.duration_s,
                        "started_at": h.started_at,
                        "age_s": round(h.age_s, 3),
                        "remaining_s": (
                            round(h.remaining_s, 3) if h.remaining_s is not None else None
                        ),
                    }
                    for h in local.holds
                ],
                "counts": local.counts,
            },
            "counts": stats.counts,
            "max_reservation_seconds": self.config.max_reservation_s,
            "max_queue_time": self.config.max_queue_time_s,
            "error": self.error,
            "mode": "standalone" if self.config.standalone else "vast",
        }
        if self.reporter is not None:
            body["engine"] = self.reporter.statistics()
        return body

    def _metrics_snapshot(self) -> MetricsSnapshot:
        stats = self.slot.statistics()
        engine = self.reporter.statistics() if self.reporter is not None else None
        since: float | None = None
        if engine is not None:
            age = engine["last_report_age_s"]
            since = float(age) if age is not None else time.monotonic() - self.started_at
        return MetricsSnapshot(
            ready=self.ready.is_set() and not stats.closing and self.consumer_error is None,
            reservation_held=stats.busy,
            queue_length=stats.waiting,
            local_holds=self.local_holds.count,
            reservations_ended={k: v for k, v in stats.counts.items() if k != "started"},
            local_holds_ended={
                k: v for k, v in self.local_holds.statistics().counts.items() if k != "started"
            },
            reporting=self.config.reporting,
            reports_sent=int(engine["reports_sent"]) if engine else 0,
            reports_failed=int(engine["report_failures"]) if engine else 0,
            seconds_since_last_report=since,
        )

    def _log_event(self, event: ReservationEvent) -> None:
        res = event.reservation
        idx = res.tag.get("request_idx")
        fields: dict[str, Any] = {
            "event": f"reservation_{event.kind}",
            "reservation_id": res.id,
            "request_idx": idx,
        }
        if event.kind == "queued" and self.slot.busy:
            log.info(
                "reservation %s (request_idx %s) queued behind the active one",
                res.id,
                idx,
                extra=fields,
            )
        elif event.kind == "started":
            log.info(
                "reservation %s (request_idx %s) held for up to %g s",
                res.id,
                idx,
                res.duration_s,
                extra=fields | {"duration_s": res.duration_s},
            )
        elif event.kind == "ended":
            outcome = res.outcome.value if res.outcome else "?"
            fields |= {
                "outcome": outcome,
                "held_s": round(res.held_s, 3),
                "duration_s": res.duration_s,
            }
            if res.outcome is Outcome.CANCELLED:
                why = "server stopping" if self.slot.closing else "client disconnected"
                log.info(
                    "reservation %s (request_idx %s) cancelled after %.3f s: %s (499)",
                    res.id,
                    idx,
                    res.held_s,
                    why,
                    extra=fields | {"reason": why},
                )
            else:
                log.info(
                    "reservation %s (request_idx %s) ended: %s after %.3f s",
                    res.id,
                    idx,
                    outcome,
                    res.held_s,
                    extra=fields,
                )

    def _log_local_event(self, event: LocalHoldEvent) -> None:
        hold = event.hold
        fields: dict[str, Any] = {
            "event": f"local_hold_{event.kind}",
            "local_hold_id": hold.id,
            "label": hold.label,
            "local_holds": self.local_holds.count,
        }
        shown = f" ({hold.label})" if hold.label else ""
        if event.kind == "started":
            log.info(
                "local hold %s%s opened %s (%d open)",
                hold.id,
                shown,
                "until its holder goes away"
                if hold.duration_s is None
                else f"for up to {hold.duration_s:g} s",
                self.local_holds.count,
                extra=fields | {"duration_s": hold.duration_s},
            )
        elif event.kind == "ended":
            outcome = hold.outcome.value if hold.outcome else "?"
            log.info(
                "local hold %s%s ended %s after %.3f s (%d open)",
                hold.id,
                shown,
                "by disconnect" if hold.outcome is HoldOutcome.DISCONNECTED else f"({outcome})",
                hold.held_s,
                self.local_holds.count,
                extra=fields | {"outcome": outcome, "held_s": round(hold.held_s, 3)},
            )
