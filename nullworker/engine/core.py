"""The local engine's routing core: the Vast serverless engine's state machine, sans IO.

It speaks the wire protocol of ``docs/protocol.md`` from the engine's side:

* ``GET /pubkey/`` -- the PEM public key workers verify route signatures with;
* ``POST /route/`` -- a client asks for a worker; the answer is either READY (it
  carries ``url`` and ``signature``, and becomes the client's ``auth_data``) or
  WAITING (no ``url``; the client polls again with the ``request_idx`` it was given);
* ``POST /worker_status/`` -- a worker's periodic report (§6.2);
* ``POST /delete_requests/`` -- a worker lists finished requests (the vastai 1.9.1
  shape and the older ``request_idxs`` + ``success`` shape are both accepted);
* ``GET /workers`` and ``GET /`` -- a JSON and an HTML view for humans and tests;
  ``GET /timeline`` -- the last minutes of one-second samples behind the page's chart.

It is an emulator, not a scheduler: every endpoint name shares one pool of workers,
and there is no billing, no benchmark bookkeeping and no scaling of its own. Scaling
is delegated to an ``on_demand`` hook (``nullworker dev`` starts a worker from it).

Layout and concurrency invariants
---------------------------------
* :class:`Engine` is the sans-IO core: plain synchronous methods that take a decoded
  JSON body and return a JSON-ready answer (or raise :class:`EngineRequestError`).
  Trio is cooperative and none of those methods awaits, so each call is atomic: two
  clients asking at once are served one after the other, never interleaved. That is
  what makes the routing lease sound without a lock.
* :func:`~nullworker.engine.web.create_engine_app` is a thin Quart-Trio layer: parse,
  call the core, map :class:`EngineRequestError` to a JSON error status, log one access
  line. ``nullworker engine`` is :mod:`nullworker.engine.cli`.
* What the core knows is plain data in :mod:`.records` (workers, requests, finished
  holds, counters; re-exported here). The page's reading of it (timeline samples, why
  a request waits, the idle countdown) is :mod:`.timeline`, pure functions over the
  records that never import this module; the core calls them for ``GET /workers``,
  ``GET /timeline`` and the WAITING answer's ``reason``, and never shapes the page.
* Time for ages, leases and expiry is ``trio.current_time()`` (so ``MockClock``
  drives it in tests; plain synchronous tests pass their own ``clock``); the
  timestamps stored with received bodies are wall-clock ``time.time()``, as the
  worker's own timestamps are.
* Every accepted change bumps a generation event; :meth:`Engine.wait_for` sleeps on
  it, so tests wake on each incoming report instead of polling.
* Routing: a worker is *free* when it is ready (``loadtime > 0``, ``max_perf > 0``,
  no ``error_msg``), its last report shows ``num_requests_working == 0``, it has
  reported within ``stale_after_s``, and it holds no lease. Routing to a worker gives
  it a lease of ``lease_s`` seconds, which ends early when a report shows it busy:
  without it, two clients asking before the worker's next report would both get it.
  Among free workers the least recently routed one wins.
* Demand: a WAITING answer keeps the request in ``pending`` under its
  ``request_idx``. Polls re-send the same index and only refresh it, so they never
  count as new demand; an entry not polled for ``demand_ttl_s`` expires. The answer
  also says why it waits (``reason``, the page's words; Vast's engine sends none).
* Records of received bodies are bounded deques, so a long ``nullworker dev`` session
  does not grow without limit. So are the page's records: the timeline (a ring of
  :meth:`Engine.sample` calls, one a second while served), the stopped workers and the
  requests that stopped polling.
* What the page says beyond the protocol comes from whoever runs the workers:
  ``nullworker dev`` passes its :class:`Scaling` policy (for "why is this request
  waiting" and the idle countdown), each worker's pid, log and control listener, the
  active hold and the local holds it reads from the worker's control listener
  (:meth:`Engine.set_hold`, for the time left and to tell an elapsed hold from a
  released one; :meth:`Engine.set_local_holds`, for what keeps a worker busy without a
  reservation) and the state of the consumer it runs beside it
  (:meth:`Engine.set_consumer`).
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..vast.envelope import as_int
from ..vast.signing import generate_private_key, public_key_pem, sign_url
from ..vast.vocabulary import RequestStatus
from .records import (
    AbandonedRequest,
    Consumer,
    FinishedRequest,
    Hold,
    LocalHoldView,
    PendingRequest,
    ReceivedBody,
    RouteRecord,
    Scaling,
    WorkerRecord,
    age_of,
    breakdown,
    new_counters,
)
from .timeline import (
    DEFAULT_TIMELINE_S,
    SAMPLE_INTERVAL_S,
    TIMELINE_SERIES,
    Sample,
    new_timeline,
    sample_of,
    scale_down_in,
    timeline_json,
    wait_reasons,
)

__all__ = [
    "DEFAULT_ENGINE_PORT",
    "DEFAULT_TIMELINE_S",
    "SAMPLE_INTERVAL_S",
    "TIMELINE_SERIES",
    "AbandonedRequest",
    "Consumer",
    "Engine",
    "EngineRequestError",
    "FinishedRequest",
    "Hold",
    "LocalHoldView",
    "PendingRequest",
    "ReceivedBody",
    "RouteRecord",
    "Scaling",
    "WorkerRecord",
    "load_private_key",
]

#: The official client's ``instance="local"`` autoscaler is ``http://localhost:8080``.
DEFAULT_ENGINE_PORT = 8080
#: How long a routed worker is held back from other clients before a report arrives.
DEFAULT_LEASE_S = 3.0
#: A WAITING request not polled for this long is dropped from the demand count. The
#: official client polls at most every ~5 s (newer ones up to 15 s), so 20 s keeps a
#: live client's request while still forgetting clients that went away.
DEFAULT_DEMAND_TTL_S = 20.0
#: Workers report at least every ~10-11 s; three missed heartbeats mean it is gone.
DEFAULT_STALE_AFTER_S = 35.0
#: Bounds on the in-memory records (received bodies, finished requests, READY answers).
DEFAULT_HISTORY = 10_000
RECENT_FINISHED_IN_VIEW = 50
#: Stopped workers and abandoned requests kept for the page.
RECENT_STOPPED = 50
#: The worker's clock marks a hold's end at its deadline; a hold that ended more than
#: this before its full duration was released by the consumer, not elapsed.
ELAPSED_SLACK_S = 0.1
#: Hold durations remembered by request_idx (to name how a finished hold ended).
_DURATIONS_KEPT = 4096

#: Finished-request statuses of the vastai 1.9.1 ``/delete_requests/`` body.
FINISHED_STATUSES = frozenset(RequestStatus)


class EngineRequestError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status, ``detail`` the JSON body."""

    def __init__(self, status: int, detail: dict[str, Any]) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


# -- body validation helpers ---------------------------------------------------------


def _int_field(body: Mapping[str, Any], name: str, *, default: int | None = None) -> int:
    value = body.get(name, default)
    if isinstance(value, str):
        value = as_int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineRequestError(422, {"error": f"{name} must be an integer", "field": name})
    return value


def _float_field(body: Mapping[str, Any], name: str, default: float = 0.0) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EngineRequestError(422, {"error": f"{name} must be a number", "field": name})
    result = float(value)
    if not math.isfinite(result):
        raise EngineRequestError(422, {"error": f"{name} must be finite", "field": name})
    return result


def _str_field(body: Mapping[str, Any], name: str, default: str = "") -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise EngineRequestError(422, {"error": f"{name} must be a string", "field": name})
    return value


def _int_list(body: Mapping[str, Any], name: str) -> list[int]:
    value = body.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise EngineRequestError(
            422, {"error": f"{name} must be a list of integers", "field": name}
        )
    return list(value)


def _optional_time(entry: Mapping[str, Any], name: str) -> float | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EngineRequestError(
            422, {"error": f"requests[].{name} must be a number", "field": name}
        )
    return float(value)


class Engine:
    """The engine's state, signing key and records of what it received.

    Args:
      private_key: the RSA key route signatures are made with; a new 2048-bit key
        when omitted.
      api_key: when set, ``/route/`` requires this key (in the body's ``api_key``,
        an ``Authorization: Bearer`` header or the ``api_key`` query parameter,
        as the official client sends all three) and answers 401 otherwise.
      master_token: when set, worker reports must carry it as ``mtoken`` (401
        otherwise).
      on_demand: called synchronously with the number of waiting requests each time
        a WAITING answer is given. It must not block; schedule work instead.
      lease_s, demand_ttl_s, stale_after_s: see the module docstring.
      history: bound on each record deque.
      scaling: the policy of whoever starts and stops the workers, for the page.
      timeline_s: how many seconds of :meth:`sample` calls the timeline keeps.
      clock: the engine's time (ages, leases, expiry); ``trio.current_time`` by
        default, so ``MockClock`` drives it. Any other function of no arguments lets
        plain synchronous code drive the core outside a Trio run (:meth:`wait_for`
        still needs one).
    """

    def __init__(
        self,
        *,
        private_key: rsa.RSAPrivateKey | None = None,
        api_key: str | None = None,
        master_token: str | None = None,
        on_demand: Callable[[int], None] | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        demand_ttl_s: float = DEFAULT_DEMAND_TTL_S,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        history: int = DEFAULT_HISTORY,
        scaling: Scaling | None = None,
        timeline_s: float = DEFAULT_TIMELINE_S,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.private_key = private_key if private_key is not None else generate_private_key()
        self.public_key_pem = public_key_pem(self.private_key)
        self.api_key = api_key or None
        self.master_token = master_token or None
        self.on_demand = on_demand
        self.lease_s = lease_s
        self.demand_ttl_s = demand_ttl_s
        self.stale_after_s = stale_after_s
        self.scaling = scaling
        self._clock = clock
        #: Base URL and ``trio.current_time()`` once served (set by :func:`serve_engine`).
        self.url: str | None = None
        self.started_at: float | None = None

        self.workers: dict[int, WorkerRecord] = {}
        self.pending: dict[int, PendingRequest] = {}
        self.worker_status_reports: deque[ReceivedBody] = deque(maxlen=history)
        self.delete_requests_reports: deque[ReceivedBody] = deque(maxlen=history)
        self.finished: deque[FinishedRequest] = deque(maxlen=history)
        self.ready_replies: deque[RouteRecord] = deque(maxlen=history)
        #: Retired workers, most recent last.
        self.stopped: deque[WorkerRecord] = deque(maxlen=RECENT_STOPPED)
        #: WAITING requests whose client stopped polling, most recent last.
        self.abandoned: deque[AbandonedRequest] = deque(maxlen=RECENT_STOPPED)
        #: One tuple per :meth:`sample`: wall-clock time, then :data:`TIMELINE_SERIES`.
        self.timeline: deque[Sample] = new_timeline(timeline_s)
        self._durations: dict[int, float] = {}
        self.counters: dict[str, int] = new_counters()
        self._retired: set[int] = set()
        self._next_request_idx = 1
        self._next_reqnum = 1
        self._changed = trio.Event()

    # -- change notification ---------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(
        self,
        predicate: Callable[[Engine], object],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> None:
        """Wait until ``predicate(engine)`` is true, re-checking after every change.

        A change is any accepted report, route answer or worker registration, and the
        moment time alone changes a state: a lease or a pending request expiring, a
        worker going stale (a worker whose lease ends between heartbeats turns idle
        then, with no report to announce it).

        Raises:
          trio.TooSlowError: the predicate stayed false for ``timeout`` seconds.
        """
        with trio.fail_after(timeout):
            while True:
                # Take the event before checking, so a change between the check and
                # the wait still wakes us.
                changed = self._changed
                if predicate(self):
                    return
                now = self._now()
                with trio.move_on_at(trio.current_time() + self._next_expiry(now) - now):
                    await changed.wait()

    def _next_expiry(self, now: float) -> float:
        """The next moment, on the engine's clock, at which time alone changes a state."""
        moments = [pending.last_seen + self.demand_ttl_s for pending in self.pending.values()]
        for worker in self.workers.values():
            if worker.lease_until is not None:
                moments.append(worker.lease_until)
            if worker.last_report_at is not None:
                moments.append(worker.last_report_at + self.stale_after_s)
        # Strictly after now (a state flips once its moment has passed), never before.
        return min((m for m in moments if m >= now), default=math.inf) + 1e-6

    # -- time-driven bookkeeping -----------------------------------------------------

    def _now(self) -> float:
        return self._clock()

    def _expire(self, now: float) -> None:
        for idx, pending in list(self.pending.items()):
            if now - pending.last_seen > self.demand_ttl_s:
                del self.pending[idx]
                self.counters["demand_expired"] += 1
                self.abandoned.append(
                    AbandonedRequest(
                        request_idx=idx,
                        endpoint=pending.endpoint,
                        waited_s=pending.last_seen - pending.first_seen,
                        forgotten_at=time.time(),
                    )
                )
        for worker in self.workers.values():
            if worker.lease_until is not None and worker.lease_until <= now:
                # The client never showed up at the worker (or the report is late):
                # the worker is free again.
                worker.lease_until = None
                worker.lease_request_idx = None
                self._refresh(worker, now)

    def _refresh(self, worker: WorkerRecord, now: float) -> None:
        """Recompute busy_since / idle_since after a change."""
        if worker.busy or worker.leased(now):
            worker.idle_since = None
            if worker.busy_since is None:
                worker.busy_since = now
        else:
            worker.busy_since = None
            if worker.ready and worker.idle_since is None:
                worker.idle_since = now
            elif not worker.ready:
                worker.idle_since = None

    # -- workers ---------------------------------------------------------------------

    def register_worker(
        self, worker_id: int, *, label: str = "", log: str | None = None, control_url: str = ""
    ) -> WorkerRecord:
        """Announce a worker before it reports (state ``starting``), as the real
        engine knows the instances it created. Used by ``nullworker dev``, which also
        says where the worker's output goes (``log``) and where its control listener
        is (``control_url``, for the page and its consumer)."""
        now = self._now()
        self._retired.discard(worker_id)
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = WorkerRecord(id=worker_id, first_seen=now)
        worker.label = label
        worker.log = log
        worker.control_url = control_url
        self._notify()
        return worker

    def set_pid(self, worker_id: int, pid: int) -> None:
        """Record the process id of a registered worker (for the page)."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.pid = pid
            self._notify()

    def set_hold(self, worker_id: int, hold: Hold | None) -> None:
        """Record the worker's active hold as the worker describes it (``None``: none).

        The engine learns a hold's duration only this way; with it the page shows the
        time left, and a finished hold is named *elapsed* or *released by consumer*.
        """
        worker = self.workers.get(worker_id)
        if worker is None or worker.hold == hold:
            return
        worker.hold = hold
        if hold is not None and hold.request_idx is not None:
            self._durations[hold.request_idx] = hold.duration_s
            while len(self._durations) > _DURATIONS_KEPT:
                del self._durations[next(iter(self._durations))]
        self._notify()

    def set_local_holds(self, worker_id: int, holds: tuple[LocalHoldView, ...]) -> None:
        """Record the local holds open on the worker, as its control ``/status`` lists
        them (dev asks while the worker is busy); a report showing it idle clears them."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.local_holds == holds:
            return
        worker.local_holds = holds
        self._notify()

    def set_consumer(self, worker_id: int, consumer: Consumer | None) -> None:
        """Record the state of the consumer dev runs beside the worker (for the page)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = next((w for w in self.stopped if w.id == worker_id), None)
        if worker is None or worker.consumer == consumer:
            return
        worker.consumer = consumer
        self._notify()

    def retire_worker(self, worker_id: int, *, reason: str = "") -> None:
        """Forget a worker and ignore its later reports (it is being stopped).

        Its record moves to :attr:`stopped` with ``reason``, for the page.
        """
        self._retired.add(worker_id)
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            worker.stopped_at = self._now()
            worker.stop_reason = reason
            worker.hold = None
            worker.local_holds = ()
            self.stopped.append(worker)
            self._notify()

    def free_workers(self) -> list[WorkerRecord]:
        now = self._now()
        self._expire(now)
        return [w for w in self.workers.values() if w.free(now, self.stale_after_s)]

    def worker_state(self, worker_id: int) -> str | None:
        worker = self.workers.get(worker_id)
        return None if worker is None else worker.state(self._now(), self.stale_after_s)

    @property
    def waiting(self) -> int:
        """Requests that got WAITING and are still being polled."""
        self._expire(self._now())
        return len(self.pending)

    def check_api_key(self, candidates: list[str | None]) -> bool:
        if self.api_key is None:
            return True
        expected = self.api_key.encode("utf-8")
        return any(
            c is not None and hmac.compare_digest(c.encode("utf-8"), expected) for c in candidates
        )

    def _check_mtoken(self, body: Mapping[str, Any], counter: str) -> None:
        if self.master_token is None:
            return
        token = body.get("mtoken")
        if not isinstance(token, str) or not hmac.compare_digest(
            token.encode("utf-8"), self.master_token.encode("utf-8")
        ):
            self.counters[counter] += 1
            raise EngineRequestError(401, {"error": "invalid mtoken"})

    # -- protocol handlers -----------------------------------------------------------

    def route(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one ``/route/`` call (the body is already authenticated).

        Returns the READY answer (with ``url`` and ``signature``) or the WAITING one.

        Raises:
          EngineRequestError: 422 for a missing endpoint or a malformed field.
        """
        endpoint = _str_field(body, "endpoint")
        if not endpoint:
            self.counters["route_rejected"] += 1
            raise EngineRequestError(
                422, {"error": "endpoint must be a non-empty string", "field": "endpoint"}
            )
        try:
            cost = _float_field(body, "cost", 100.0)
            raw_idx = body.get("request_idx")
            request_idx = 0 if raw_idx is None else _int_field(body, "request_idx")
            if request_idx < 0:
                raise EngineRequestError(
                    422, {"error": "request_idx must be >= 0", "field": "request_idx"}
                )
            _float_field(body, "replay_timeout", 0.0)
        except EngineRequestError:
            self.counters["route_rejected"] += 1
            raise

        now = self._now()
        self._expire(now)
        if request_idx == 0:
            request_idx = self._next_request_idx
            self._next_request_idx += 1
        else:
            # A poll, or a retry after the worker refused: same request, same demand.
            # An index this engine never issued (e.g. from before a restart) is adopted.
            self._next_request_idx = max(self._next_request_idx, request_idx + 1)

        pending = self.pending.get(request_idx)
        if pending is None:
            pending = self.pending[request_idx] = PendingRequest(
                request_idx=request_idx,
                endpoint=endpoint,
                cost=cost,
                first_seen=now,
                last_seen=now,
            )
        else:
            pending.last_seen = now
            pending.polls += 1

        free = [w for w in self.workers.values() if w.free(now, self.stale_after_s)]
        if free:
            # Least recently routed first; never-routed workers before all others.
            worker = min(
                free,
                key=lambda w: (w.last_routed_at is not None, w.last_routed_at or 0.0, w.id),
            )
            del self.pending[request_idx]
            worker.lease_until = now + self.lease_s
            worker.lease_request_idx = request_idx
            worker.last_routed_at = now
            worker.routed_count += 1
            self._refresh(worker, now)
            reqnum = self._next_reqnum
            self._next_reqnum += 1
            reply: dict[str, Any] = {
                "url": worker.url,
                "signature": sign_url(self.private_key, worker.url),
                "cost": body.get("cost", 100),
                "endpoint": endpoint,
                "reqnum": reqnum,
                "request_idx": request_idx,
            }
            self.ready_replies.append(
                RouteRecord(
                    reqnum=reqnum,
                    request_idx=request_idx,
                    worker_id=worker.id,
                    url=worker.url,
                    endpoint=endpoint,
                    at=time.time(),
                )
            )
            self.counters["route_ready"] += 1
            self._notify()
            return reply

        self.counters["route_waiting"] += 1
        waiting = len(self.pending)
        reply = {
            "status": "WAITING",
            "endpoint": endpoint,
            "request_idx": request_idx,
            "waiting": waiting,
            "workers": self._breakdown(now),
        }
        self._notify()
        if self.on_demand is not None:
            self.on_demand(waiting)
        # Why it waits, as the page says it (an extension: Vast's engine gives no reason).
        # Asked after the hook, which may just have started a worker for this request.
        reply["reason"] = self._wait_reasons(self._now()).get(request_idx, "")
        return reply

    def _breakdown(self, now: float) -> dict[str, int]:
        return breakdown(self.workers.values(), now, self.stale_after_s)

    def worker_status(self, body: Mapping[str, Any]) -> WorkerRecord | None:
        """Record one ``/worker_status/`` report (§6.2; ``disk_usage`` optional).

        Returns the updated record, or ``None`` for a retired worker (ignored).

        Raises:
          EngineRequestError: 422 naming a malformed field; 401 for a wrong mtoken.
        """
        try:
            worker_id = _int_field(body, "id")
            self._check_mtoken(body, "worker_status_rejected")
            url = _str_field(body, "url")
            error_msg = _str_field(body, "error_msg")
            version = _str_field(body, "version")
            loadtime = _float_field(body, "loadtime")
            max_perf = _float_field(body, "max_perf")
            cur_load = _float_field(body, "cur_load")
            num_working = _int_field(body, "num_requests_working", default=0)
            working_idxs = _int_list(body, "working_request_idxs")
            for name in ("new_load", "rej_load", "cur_perf", "disk_usage", "additional_disk_usage"):
                _float_field(body, name)
        except EngineRequestError as exc:
            if exc.status == 422:
                self.counters["worker_status_rejected"] += 1
            raise

        now = self._now()
        self.worker_status_reports.append(ReceivedBody(time.time(), dict(body)))
        self.counters["worker_status"] += 1
        if worker_id in self._retired:
            self._notify()
            return None
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = WorkerRecord(id=worker_id, first_seen=now)
        if url:
            worker.url = url
        worker.version = version
        worker.error_msg = error_msg
        worker.loadtime = loadtime
        worker.max_perf = max_perf
        worker.cur_load = cur_load
        worker.num_requests_working = num_working
        worker.working_request_idxs = tuple(working_idxs)
        worker.report_count += 1
        worker.last_report_at = now
        if not worker.busy:
            worker.hold = None
            worker.local_holds = ()
        if worker.busy and worker.lease_until is not None:
            # The reservation arrived: the report now speaks for the worker, so the
            # lease has done its job. The reservation age keeps counting from routing.
            worker.lease_until = None
            worker.lease_request_idx = None
        self._expire(now)
        self._refresh(worker, now)
        self._notify()
        return worker

    def delete_requests(self, body: Mapping[str, Any]) -> list[FinishedRequest]:
        """Record one ``/delete_requests/`` body, in either shape.

        * vastai 1.9.1: ``{"worker_id", "mtoken", "requests": [{"request_idx",
          "success", "status", "entered_queue_at", "work_started_at",
          "work_completed_at"}]}``
        * legacy: ``{"worker_id", "mtoken", "request_idxs": [...], "success": bool}``

        Raises:
          EngineRequestError: 422 naming a malformed field; 401 for a wrong mtoken.
        """
        try:
            worker_id = _int_field(body, "worker_id")
            self._check_mtoken(body, "delete_requests_rejected")
            received_at = time.time()
            finished: list[FinishedRequest] = []
            if "requests" in body:
                entries = body["requests"]
                if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                    raise EngineRequestError(
                        422, {"error": "requests must be a list of objects", "field": "requests"}
                    )
                for entry in entries:
                    idx = _int_field(entry, "request_idx")
                    status = entry.get("status")
                    if status is not None and status not in FINISHED_STATUSES:
                        raise EngineRequestError(
                            422,
                            {"error": f"unknown status {status!r}", "field": "requests[].status"},
                        )
                    success = entry.get("success")
                    if success is not None and not isinstance(success, bool):
                        raise EngineRequestError(
                            422,
                            {"error": "success must be a boolean", "field": "requests[].success"},
                        )
                    started = _optional_time(entry, "work_started_at")
                    completed = _optional_time(entry, "work_completed_at")
                    finished.append(
                        FinishedRequest(
                            worker_id=worker_id,
                            request_idx=idx,
                            success=success,
                            status=status,
                            received_at=received_at,
                            entered_queue_at=_optional_time(entry, "entered_queue_at"),
                            work_started_at=started,
                            work_completed_at=completed,
                            ended=self._how_it_ended(
                                worker_id, idx, status, success, started, completed
                            ),
                        )
                    )
            elif "request_idxs" in body:
                idxs = _int_list(body, "request_idxs")
                success = body.get("success")
                if not isinstance(success, bool):
                    raise EngineRequestError(
                        422, {"error": "success must be a boolean", "field": "success"}
                    )
                finished = [
                    FinishedRequest(
                        worker_id=worker_id,
                        request_idx=idx,
                        success=success,
                        status=None,
                        received_at=received_at,
                        ended=self._how_it_ended(worker_id, idx, None, success, None, None),
                    )
                    for idx in idxs
                ]
            else:
                raise EngineRequestError(
                    422, {"error": "expected requests or request_idxs", "field": "requests"}
                )
        except EngineRequestError as exc:
            if exc.status == 422:
                self.counters["delete_requests_rejected"] += 1
            raise

        self.delete_requests_reports.append(ReceivedBody(received_at, dict(body)))
        self.finished.extend(finished)
        self.counters["delete_requests"] += 1
        self._notify()
        return finished

    def _how_it_ended(
        self,
        worker_id: int,
        request_idx: int,
        status: str | None,
        success: bool | None,
        started: float | None,
        completed: float | None,
    ) -> str:
        """A finished request's end in the project's words.

        The status alone merges outcomes (the worker reports an elapsed hold and one
        released through ``POST /release`` both as Success, a client that let go and a
        worker shutting down both as Cancelled); what the engine knows separates them:
        the hold's duration (:meth:`set_hold`), whether the worker was retired and
        whether the hold had begun.

        A Cancelled hold on a worker in service is a release by its client: closing the
        connection is how every nullworker client lets go (the autoscaler's scale-down,
        Ctrl-C), so it is the normal end, not a failure. A client that crashed closes
        it the same way (the kernel does), and the worker cannot tell the two apart.
        """
        if status == RequestStatus.SUCCESS:
            duration = self._durations.get(request_idx)
            if duration is None or not started or not completed:
                return "completed"  # elapsed or released: the duration is unknown here
            if completed - started >= duration - ELAPSED_SLACK_S:
                return "elapsed"
            return "released by consumer"
        if status == RequestStatus.CANCELLED:
            if worker_id in self._retired:
                return "worker shut down"
            if not started:
                return "client left before the hold began"
            return "released by client"
        if status == RequestStatus.REJECTED:
            return "rejected: the worker stayed busy past its queue time"
        if status == RequestStatus.ERROR:
            return "failed on the worker"
        if status is None:
            return "completed" if success else "failed"
        return status.lower()

    # -- the page's data -------------------------------------------------------------

    def sample(self) -> None:
        """Append one timeline sample (:mod:`.timeline`): requests waiting and workers by
        kind, now. :func:`~nullworker.engine.web.serve_engine` calls it every second."""
        now = self._now()
        self._expire(now)
        self.timeline.append(
            sample_of(self.workers.values(), len(self.pending), now, self.stale_after_s)
        )

    def timeline_json(self, since: float | None = None) -> dict[str, Any]:
        """The timeline's samples (all, or those taken after wall-clock ``since``)."""
        return timeline_json(self.timeline, since)

    def _wait_reasons(self, now: float) -> dict[int, str]:
        return wait_reasons(self.workers, self.pending, self.scaling, now, self.stale_after_s)

    # -- views -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view: workers, demand, recent finished requests, counters.

        Also what the page shows: stopped workers, requests that stopped polling, why
        each pending request waits and, with a :class:`Scaling`, the idle countdown.
        """
        now = self._now()
        self._expire(now)
        recent = list(self.finished)[-RECENT_FINISHED_IN_VIEW:]
        reasons = self._wait_reasons(now)
        countdown = scale_down_in(self.workers, self.scaling, now, self.stale_after_s)
        workers = []
        for worker in sorted(self.workers.values(), key=lambda w: w.id):
            view = worker.to_json(now, self.stale_after_s)
            view["scale_down_in_s"] = countdown.get(worker.id)
            workers.append(view)
        return {
            "url": self.url,
            "time": time.time(),
            "uptime_s": age_of(now, self.started_at),
            "workers": workers,
            "stopped": [w.stopped_json(now) for w in reversed(self.stopped)],
            "breakdown": self._breakdown(now),
            "waiting": len(self.pending),
            "pending": [
                {
                    "request_idx": p.request_idx,
                    "endpoint": p.endpoint,
                    "cost": p.cost,
                    "age_s": age_of(now, p.first_seen),
                    "polls": p.polls,
                    "reason": reasons.get(p.request_idx, ""),
                }
                for p in sorted(self.pending.values(), key=lambda p: p.first_seen)
            ],
            "finished": [f.to_json() for f in reversed(recent)],
            "abandoned": [a.to_json() for a in reversed(self.abandoned)],
            "counters": dict(self.counters),
            "scaling": None if self.scaling is None else self.scaling.to_json(now),
            "settings": {
                "lease_s": self.lease_s,
                "demand_ttl_s": self.demand_ttl_s,
                "stale_after_s": self.stale_after_s,
                "api_key_required": self.api_key is not None,
                "mtoken_required": self.master_token is not None,
            },
        }

    statistics = snapshot


def load_private_key(path: str) -> rsa.RSAPrivateKey:
    """Read an unencrypted PEM RSA private key; ``ValueError`` if it is anything else."""
    with open(path, "rb") as file:
        data = file.read()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} does not hold an RSA private key")
    return key
