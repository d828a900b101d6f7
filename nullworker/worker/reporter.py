"""The engine reporter: what the worker tells the Vast engine (autoscaler), and when.

The reporter turns :class:`~nullworker.worker.reservations.ReservationEvent` s into the
engine's accounting (docs/protocol.md §6.1, §6) and delivers it:

* ``POST {addr}/worker_status/`` -- the §6.2 body plus 1.9.1's ``disk_usage``; at once
  (after a short coalescing window) whenever the state changes, and as a heartbeat at
  least every ``config.heartbeat_s``. Rounds are paced by a token bucket
  (``report_burst`` back to back, then one per ``report_interval_s``): a change after a
  quiet spell goes out at once, and a state that changes hundreds of times a second
  (short reservations back to back) is sent once a second with the defaults (burst 2,
  interval 1 s: about the official worker's cadence), as it stands then.
* ``POST {addr}/delete_requests/`` -- every ended request, in the 1.9.1 shape or the
  legacy pair of POSTs (``config.delete_requests_format``); sent in the same wake-up as
  the ``worker_status`` that shows the request gone.
* ``GET {addr}/pubkey/`` -- the engine's RSA key, per address (never the raw comma list).

Concurrency invariants
----------------------
* :meth:`EngineReporter.observe`, :meth:`~EngineReporter.set_ready` and
  :meth:`~EngineReporter.set_error` are synchronous and never block or raise: they
  update in-memory state and set a ``trio.Event`` that wakes the report loop. The slot
  can therefore never be held up by reporting.
* At most one *round* (a ``worker_status`` and/or a ``delete_requests`` delivery) is in
  flight at a time: rounds run under ``self._lock``, shared by :meth:`run` and
  :meth:`flush`.
* Snapshot and subtract, never zero (fixes pitfall §10.8): a round copies the counters
  into the body it sends and, only once an address accepted that body, subtracts exactly
  those copied values. Increments made while the POST was in flight survive into the
  next report; a failed round subtracts nothing, so nothing is lost or counted twice.
* Delete entries are removed from the pending list only after an address accepted the
  POST that carried them (by identity, not by ``request_idx``), so a failed POST never
  loses an entry and an accepted one is never sent again. An entry is sent only once a
  delivered ``worker_status`` showed the request gone, so the engine always hears "idle"
  before the deletion (the official order); a round whose ``worker_status`` no address
  took sends no ``delete_requests`` at all.
* At-least-once, not exactly-once: a POST the engine accepted but whose answer did not
  arrive within the try's deadline counts as failed and is sent again, so the engine can
  count that ``worker_status``'s load figures (or see those delete entries) twice.
  Opening the connection has its own bound, ``CONNECT_TIMEOUT_S`` (2 s): when it fires
  nothing reached the engine, and a slow connect no longer eats the time the engine has
  to answer a body it did get (the rest of ``engine_timeout_s``: 3 s or more with the
  defaults, where it used to be whatever the connect left of 5 s).
* A ``delete_requests`` POST the engine refuses (HTTP 4xx other than 408/425/429) is not
  retried as it is: its entries are sent again in halves (bisection: a refusal ends the
  round, while accepted batches are followed at once by the next, up to 20 POSTs a
  round), the halves that are accepted are done, and an entry refused on its own is dropped with
  one warning naming its ``request_idx`` and the status. Every refusal halves the largest
  batch its entries may travel in, so the splitting ends (one bad entry among 8 costs 7
  POSTs in all). A refusal is the answer of an address that does not take this body: the
  next address is tried, and the batch counts as refused when no address accepted it and
  at least one refused it. 5xx, 408/425/429 and transport errors are failures and are
  retried with the whole batch, as for ``worker_status``.
* Each address gets its own bounded deadline (fixes §10.7): ``engine_tries`` tries of at
  most ``engine_timeout_s`` each, with ``engine_retry_s`` doubling between tries (capped
  at ``RETRY_CAP_S``), then the next address in order. The first address that accepts
  ends the round (fallback, not fan-out).
* Outages: a round in which every address failed is retried after
  ``engine_retry_s`` doubling per failed round, capped at ``RETRY_CAP_S`` and spread by
  ``RETRY_JITTER`` (0.5 s, then 0.8-1.2 s with the defaults); until one succeeds, each
  round gives every address a single try, and state changes wait for that retry instead
  of starting rounds of their own. So an unreachable engine gets about one request per
  second per address, and, where the addresses fail fast (refused connections, error
  statuses), hears the current state within ``RETRY_CAP_S`` x 1.2 plus
  ``report_coalesce_s`` (1.22 s with the defaults) and one request of answering again.
* Only a 2xx answer is a delivery. Redirects are never followed (the clients say so
  explicitly): a 3xx means the body did not reach the engine (``REPORT_ADDR=http://...``
  behind an http->https redirect), so it is a failure like a 5xx, retried and counted,
  and the log names its status and ``Location`` (scheme, host and path only).
* Every engine answer is read with a bound, as a stream: ``POST_ANSWER_MAX_BYTES``
  (4 KiB) for reports and the error beacon, whose status is all we need, and
  ``PUBKEY_ANSWER_MAX_BYTES`` (64 KiB) for the key. A longer answer is a failed try
  ("answer over N bytes"); the connection is dropped as soon as the bound is passed,
  so a broken or hostile engine cannot make the worker buffer megabytes.
* Every failure of an HTTP exchange is caught (``httpx.HTTPError``: transport errors and
  timeouts, but also an undecodable reply from a broken engine or proxy; our own per-try
  deadline; any status but a 2xx; an oversized answer): it is logged without secrets
  (never the ``mtoken`` or a body; one warning when the engine becomes unreachable,
  then at most one a minute, and one line when it is back) and retried later, because
  a reporting failure must never take the worker down. Anything else is a bug and
  propagates. ``trio.Cancelled`` is never swallowed; a round cancelled mid-POST leaves
  its state to be sent again.

Accounting choices (documented deviations from the official worker)
-------------------------------------------------------------------
* ``num_requests_recieved`` (sic, the wire spelling) counts distinct ``request_idx``
  values seen since start. Memory stays bounded: a count plus a window of the last
  ``_RECENT_IDX_WINDOW`` indexes for de-duplication (a client retrying with the same
  ``request_idx`` after a 429 is not counted twice), instead of an ever-growing set.
  Reservations without a ``request_idx`` each count once.
* ``cur_perf`` keeps the official meaning -- workload served since the last delivered
  report -- but without the lost increments.
* Local holds (:mod:`nullworker.worker.local_holds`) are not engine requests: they have
  no ``request_idx``, never reach ``/delete_requests/`` and add nothing to ``new_load``,
  ``cur_perf`` or ``num_requests_recieved``. While at least one is open the worker reports
  at least one unit of work: ``cur_load`` at least ``LOCAL_HOLD_LOAD`` (= ``max_perf``,
  100) and ``num_requests_working`` at least 1, whatever their number: a worker whose
  consumer is mid-job reports what a held reservation reports. Only the first hold
  opening and the last one closing change the report.
* ``error_msg`` is not sticky forever: :meth:`EngineReporter.set_ready` clears an earlier
  start-up error (e.g. a pubkey fetch that failed and then succeeded), and
  ``set_error("")`` clears it explicitly.
* A request the engine was told about survives the process: with a ``journal_path``
  (the worker passes ``nullworker-<port>.journal`` beside its port lock), the
  ``request_idx`` of every hold is written before the first ``worker_status`` that lists
  it and struck out once its delete entry is accepted. What a killed process left open
  is reported on the next start as ``Error`` (``success`` false), once
  (:mod:`nullworker.worker.journal` says why this costs one append per round, not per
  reservation, and why there is no ``fsync``).
* The pending ``delete_requests`` list is bounded (``_MAX_PENDING_DELETES``, oldest
  dropped with a warning) so a long engine outage cannot grow memory without limit.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import shutil
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ..errors import NullworkerError
from ..vast.signing import load_public_key
from .config import MAX_PERF, WorkerConfig
from .journal import Journal
from .reservations import Outcome, Reservation, ReservationEvent

__all__ = [
    "CONNECT_TIMEOUT_S",
    "LOCAL_HOLD_LOAD",
    "POST_ANSWER_MAX_BYTES",
    "PUBKEY_ANSWER_MAX_BYTES",
    "PUBKEY_BACKOFF_S",
    "RETRY_CAP_S",
    "RETRY_JITTER",
    "WORKER_VERSION",
    "EngineReporter",
    "PubkeyUnavailable",
    "retry_pause",
    "send_error_beacon",
]

log = logging.getLogger("nullworker.reporter")

#: The ``version`` field of every ``worker_status`` (what the official worker sends).
WORKER_VERSION = "1.1.0"
#: Sleeps between rounds of ``GET /pubkey/`` over all addresses: 5 rounds in 2.75 s.
PUBKEY_BACKOFF_S: tuple[float, ...] = (0.25, 0.5, 1.0, 1.0)
#: Cap on every retry sleep towards the engine (between tries, between failed rounds,
#: between key fetches): after an outage the engine hears from the worker within about
#: this long (times the jitter) of answering again, and meanwhile gets about one request
#: a second per address.
RETRY_CAP_S = 1.0
#: Sleeps between failed rounds and key fetches are spread by +-20 %, so that workers
#: which lost the engine together do not all come back in step.
RETRY_JITTER = 0.2
#: Bound on opening a connection to the engine (TCP and TLS), inside ``engine_timeout_s``.
#: Nothing reached the engine when it fires, so the retry cannot count anything twice;
#: a body that was sent keeps at least ``engine_timeout_s`` minus this for its answer.
CONNECT_TIMEOUT_S = 2.0
#: The most of an answer to a ``worker_status``/``delete_requests`` POST (or the error
#: beacon) that is read: only its status matters, and a longer answer is a failed try.
POST_ANSWER_MAX_BYTES = 4 * 1024
#: The most of a ``/pubkey/`` answer that is read (a 4096-bit key in PEM is under 1 KiB).
PUBKEY_ANSWER_MAX_BYTES = 64 * 1024
#: Sent with every request to the engine: an answer we bound must not come compressed.
_ANSWER_HEADERS = {"Accept-Encoding": "identity"}
#: 4xx answers that mean "try again later", not "this body is refused".
_RETRY_LATER_4XX = frozenset({408, 425, 429})
#: While the engine stays unreachable, at most one warning this often (the rest: debug).
_FAILURE_LOG_EVERY_S = 60.0
#: The engine address that takes ``worker_status`` but never ``delete_requests`` (§6.4).
_NO_DELETES_ADDR = "https://cloud.vast.ai/api/v0"
#: How many recent ``request_idx`` values are remembered to de-duplicate the count.
_RECENT_IDX_WINDOW = 4096
#: Bound on ended requests waiting for delivery (the oldest are dropped beyond it).
_MAX_PENDING_DELETES = 10_000
#: At most this many entries per ``delete_requests`` POST.
_DELETE_BATCH = 500
#: At most this many ``delete_requests`` POSTs per round (batches the engine accepts
#: follow each other at once): 10,000 entries a second with the default pacing.
_MAX_DELETE_POSTS_PER_ROUND = 20
#: The ``cur_load`` floor while local holds are open: one busy worker (``max_perf``).
LOCAL_HOLD_LOAD = MAX_PERF

_STATUS_OF: dict[Outcome, str] = {
    Outcome.ELAPSED: "Success",
    Outcome.RELEASED: "Success",
    Outcome.CANCELLED: "Cancelled",
    Outcome.SHUTDOWN: "Cancelled",
    Outcome.REJECTED: "Rejected",
    Outcome.ERROR: "Error",
}
#: The engine's ``success`` flag: served or cancelled, not refused or failed (§6.4).
_SUCCESS_STATUSES = frozenset({"Success", "Cancelled"})


class PubkeyUnavailable(NullworkerError):
    """No engine address served a usable public key within the retry bound."""


def _root_disk_gib() -> float:
    """GiB used on ``/`` (one ``statvfs``: cheap enough to call synchronously)."""
    try:
        return shutil.disk_usage("/").used / 2**30
    except OSError:
        return 0.0


def _as_idx(value: Any) -> int | None:
    # The envelope already turns request_idx into an int; be strict anyway so a
    # malformed tag can never put a non-int into working_request_idxs.
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def retry_pause(seconds: float = RETRY_CAP_S) -> float:
    """``seconds`` spread by +-``RETRY_JITTER`` (a sleep before trying the engine again)."""
    return seconds * random.uniform(1.0 - RETRY_JITTER, 1.0 + RETRY_JITTER)


def _timeout(timeout_s: float) -> httpx.Timeout:
    """``timeout_s`` per phase, but at most ``CONNECT_TIMEOUT_S`` to connect."""
    return httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))


@dataclass
class _Counters:
    """Workload totals accumulated since the last delivered report."""

    received: float = 0.0
    cancelled: float = 0.0
    served: float = 0.0
    errored: float = 0.0
    rejected: float = 0.0

    def copy(self) -> _Counters:
        return _Counters(self.received, self.cancelled, self.served, self.errored, self.rejected)

    def subtract(self, sent: _Counters) -> None:
        self.received -= sent.received
        self.cancelled -= sent.cancelled
        self.served -= sent.served
        self.errored -= sent.errored
        self.rejected -= sent.rejected


@dataclass(eq=False)
class _DeleteEntry:
    """One ended request waiting for ``/delete_requests/`` (compared by identity)."""

    request_idx: int
    status: str
    entered_queue_at: float
    work_started_at: float
    work_completed_at: float
    #: Set once a delivered worker_status showed this request gone from the working set.
    reported: bool = False
    #: The largest batch this entry may travel in; halved each time a batch carrying it
    #: is refused, so a refused entry ends up alone (and is dropped).
    max_batch: int = _DELETE_BATCH

    @property
    def success(self) -> bool:
        return self.status in _SUCCESS_STATUSES

    def as_json(self) -> dict[str, Any]:
        return {
            "request_idx": self.request_idx,
            "success": self.success,
            "status": self.status,
            "entered_queue_at": self.entered_queue_at,
            "work_started_at": self.work_started_at,
            "work_completed_at": self.work_completed_at,
        }


@dataclass(frozen=True)
class _StatusSnapshot:
    body: dict[str, Any]
    counters: _Counters
    disk_gib: float
    #: The ended requests this body already shows as gone.
    ended: list[_DeleteEntry]


def _status_body(
    config: WorkerConfig,
    *,
    loadtime: float,
    counters: _Counters,
    cur_load: float,
    max_perf: float,
    error_msg: str,
    num_requests_working: int,
    num_requests_received: int,
    disk_gib: float,
    additional_disk_gib: float,
    working_request_idxs: list[int],
) -> dict[str, Any]:
    """The ``/worker_status/`` body: every §6.2 field plus 1.9.1's ``disk_usage``."""
    return {
        "id": config.container_id,
        "mtoken": config.master_token,
        "version": WORKER_VERSION,
        "loadtime": float(loadtime),
        "new_load": float(max(counters.received - counters.cancelled, 0.0)),
        "cur_load": float(cur_load),
        "rej_load": float(counters.rejected),
        "max_perf": float(max_perf),
        "cur_perf": float(counters.served),
        "error_msg": error_msg,
        "num_requests_working": int(num_requests_working),
        "num_requests_recieved": int(num_requests_received),  # sic: the wire spelling
        "additional_disk_usage": float(additional_disk_gib),
        "disk_usage": float(disk_gib),
        "working_request_idxs": list(working_request_idxs),
        "cur_capacity": 0,
        "max_capacity": 0,
        "url": config.public_url or "",
    }


@dataclass(frozen=True)
class _Answer:
    """How one POST (or the last try of several) went."""

    #: None: accepted; else why not, for the log.
    error: str | None = None
    #: The HTTP status when the engine answered, but not with a 2xx.
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def refused(self) -> bool:
        """The engine answered that it does not take this body (retrying it is useless)."""
        return (
            self.status is not None
            and 400 <= self.status < 500
            and self.status not in _RETRY_LATER_4XX
        )


class _AnswerTooLarge(Exception):
    """An engine answer longer than the caller reads (the connection is then dropped)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer over {limit} bytes")


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The body of ``response`` as sent, at most ``limit`` bytes.

    Reads the raw stream (no decompression, so a compressed answer cannot grow past
    the bound either) and gives up as soon as the bound is passed: a declared
    ``Content-Length`` over it fails before anything is read, and a longer stream is
    dropped mid-way (closing an unfinished response closes its connection).

    Raises:
      _AnswerTooLarge: the answer is longer than ``limit``.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _AnswerTooLarge(limit)
    if response.is_stream_consumed:  # a transport that hands over a body in memory
        if len(response.content) > limit:
            raise _AnswerTooLarge(limit)
        return response.content
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise _AnswerTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _decoded(response: httpx.Response, raw: bytes, limit: int) -> bytes:
    """``raw`` without its content encoding, bounded by ``limit`` once decoded.

    We ask for ``identity``; a gzip or deflate answer sent anyway is inflated at most
    to ``limit`` bytes (a small compressed body can expand a thousandfold).

    Raises:
      _AnswerTooLarge: the decoded answer is longer than ``limit``.
      ValueError: an encoding we cannot read, or a corrupt compressed body.
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ValueError(f"answer in an unsupported encoding ({encoding[:40]})")
    try:
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # gzip or zlib header
        data = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"corrupt {encoding} answer ({exc})") from None
    if len(data) > limit:
        raise _AnswerTooLarge(limit)
    return data


def _redacted_location(location: str) -> str:
    """A redirect target for the log: scheme, host, port and path only.

    A query string or user info may carry credentials, and the header is whatever the
    other side sent: both are left out, and the rest is cut to a sane length.
    """
    try:
        parts = urlsplit(location)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "an unparsable Location"
    text = f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else parts.path
    text = "".join(ch for ch in text if ch.isprintable())
    return text[:200] + ("..." if len(text) > 200 else "")


def _not_delivered(response: httpx.Response) -> _Answer | None:
    """None for a 2xx answer; else the failed :class:`_Answer`, saying why.

    Only a 2xx is a delivery. A 3xx is a failure like a 5xx (redirects are never
    followed: a body POSTed to an ``http://`` address behind an https redirect never
    reached the engine), named with its ``Location`` so the log says where to point
    ``REPORT_ADDR``.
    """
    status = response.status_code
    if 200 <= status < 300:
        return None
    error = f"HTTP {status}"
    if 300 <= status < 400:
        location = response.headers.get("Location")
        target = f" to {_redacted_location(location)}" if location else ""
        error += f" (redirect{target}; redirects are not followed)"
    return _Answer(error, status)


async def _post_once(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], *, timeout_s: float
) -> _Answer:
    """One POST under a hard deadline of ``timeout_s``; accepted only with a 2xx.

    Redirects are not followed, and at most ``POST_ANSWER_MAX_BYTES`` of the answer
    are read (only its status matters).
    """
    with trio.move_on_after(timeout_s):
        try:
            async with client.stream(
                "POST",
                url,
                json=body,
                headers=_ANSWER_HEADERS,
                timeout=_timeout(timeout_s),
                follow_redirects=False,
            ) as response:
                failed = _not_delivered(response)
                if failed is not None:
                    return failed
                await _read_bounded(response, POST_ANSWER_MAX_BYTES)
        except _AnswerTooLarge as exc:
            return _Answer(str(exc))
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # transport, timeout, bad reply
            return _Answer(_describe(exc))
        return _Answer()
    return _Answer(f"no answer within {timeout_s:g} s")


@asynccontextmanager
async def _client_for(
    http: httpx.AsyncClient | None, config: WorkerConfig
) -> AsyncIterator[httpx.AsyncClient]:
    """The caller's client, or a short-lived one of our own that is closed on exit."""
    if http is not None:
        yield http
        return
    async with httpx.AsyncClient(
        timeout=_timeout(config.engine_timeout_s), follow_redirects=False
    ) as own:
        yield own


class EngineReporter:
    """Reports the worker's state to the Vast engine (see the module docstring).

    Args:
      config: the worker's settings; ``report_addrs`` are the engine base URLs, tried in
        order.
      http: a client to use (the caller keeps ownership). Without one, the reporter
        opens its own for rounds and closes it when :meth:`run` or :meth:`flush` ends;
        :meth:`fetch_pubkey` and :func:`send_error_beacon` use a short-lived one.
      started_at: ``time.monotonic()`` at process start, the origin of ``loadtime``;
        defaults to now.
      disk_usage: returns the GiB used on ``/``; defaults to ``shutil.disk_usage``.
      journal_path: the delivery journal (:mod:`nullworker.worker.journal`), read here:
        what a previous process left open is queued as failed delete entries. Only
        pass it once the port's lock is held. None: no journal.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        http: httpx.AsyncClient | None = None,
        started_at: float | None = None,
        disk_usage: Callable[[], float] | None = None,
        journal_path: str | None = None,
    ) -> None:
        self._config = config
        self._http = http
        self._owned_http: httpx.AsyncClient | None = None
        self._started_at = time.monotonic() if started_at is None else started_at
        self._disk_usage = disk_usage or _root_disk_gib
        # -- reported state -----------------------------------------------------------
        self._loadtime = 0.0
        self._max_perf = 0.0
        self._error_msg = ""
        self._counters = _Counters()
        #: Reservations queued or held, in admission order (the working set).
        self._working: dict[int, Reservation] = {}
        self._received_count = 0
        self._recent_idxs: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._pending: list[_DeleteEntry] = []
        #: At least one local hold is open (the count itself is not reported).
        self._local_holds = False
        # 1.9.1 measures the disk delta from the last *delivered* report; the baseline
        # is the figure at start, as the official worker takes it.
        self._last_disk_gib = self._read_disk()
        # -- scheduling -----------------------------------------------------------------
        #: Something the engine has not seen yet; True at start: the first report goes
        #: out as soon as the loop runs.
        self._dirty = True
        #: A state change since the current round began: report again without backoff.
        self._changed = True
        self._wake = trio.Event()
        self._lock = trio.Lock()
        self._last_status_round_at = -math.inf
        #: Readiness or an error changed: the next round skips the coalescing window.
        self._urgent = False
        #: The round pacing bucket (:meth:`_pace`): full at start.
        self._tokens = float(config.report_burst)
        self._tokens_at = -math.inf
        # -- statistics -----------------------------------------------------------------
        self._reports_sent = 0
        self._deletes_sent = 0
        self._report_failures = 0
        self._dropped_deletes = 0
        self._refused_deletes = 0
        self._last_success_mono: float | None = None
        self._last_error: str | None = None
        self._last_failure_log_at = -math.inf
        #: Rounds failed in a row (the report loop's backoff and tries depend on it).
        self._failed_rounds = 0
        #: True while the last worker_status found no engine address that took it.
        self._unreachable = False
        #: Set (and replaced) each time a worker_status is delivered.
        self._delivered = trio.Event()
        # -- the delivery journal ---------------------------------------------------------
        self._journal: Journal | None = None
        if journal_path is not None and self._delete_addrs():
            self._journal, leftover = Journal.open(journal_path)
            self._queue_leftovers(leftover)

    def _queue_leftovers(self, leftover: list[int]) -> None:
        """Delete entries for requests a previous process on this port never closed."""
        if not leftover:
            return
        log.warning(
            "%d request(s) the engine was told about were left open by a previous worker "
            "process on this port (killed?); reporting them failed: request_idx %s",
            len(leftover),
            ", ".join(str(idx) for idx in leftover[:20]) + (" ..." if len(leftover) > 20 else ""),
        )
        now = time.time()
        for idx in leftover:
            self._add_pending(
                _DeleteEntry(
                    request_idx=idx,
                    status="Error",
                    entered_queue_at=0.0,
                    work_started_at=0.0,
                    work_completed_at=now,
                )
            )

    def _journal_done(self, entries: list[_DeleteEntry]) -> None:
        """Strike delivered (or abandoned) entries out of the journal.

        An index still in the working set stays: a reused ``request_idx`` (a retry after
        a 429) is held again, and its own end is still to come.
        """
        if self._journal is None or not entries:
            return
        working = {_as_idx(r.tag.get("request_idx")) for r in self._working.values()}
        self._journal.remove(e.request_idx for e in entries if e.request_idx not in working)

    # -- inputs (sync, never block, never raise) ------------------------------------------

    def observe(self, event: ReservationEvent) -> None:
        """The :class:`~nullworker.worker.reservations.ReservationSlot` observer.

        Updates the accounting and wakes the report loop; never blocks, never raises.
        """
        try:
            changed = self._apply(event)
        except Exception:  # a reporting bug must never break the slot
            log.exception("engine reporter failed to account for a %s event", event.kind)
            changed = True
        if changed:
            self._mark_changed()

    def set_ready(self, *, max_perf: float) -> None:
        """The worker is ready: report ``loadtime`` (now - start) and ``max_perf`` at once.

        Also clears an earlier ``error_msg``: readiness supersedes a start-up error that
        was recovered from (the engine reads ready as loadtime > 0, max_perf > 0 and an
        empty error_msg).
        """
        # A strictly positive loadtime even if ready in the same clock tick as start.
        self._loadtime = max(time.monotonic() - self._started_at, 1e-3)
        self._max_perf = float(max_perf)
        self._error_msg = ""
        self._urgent = True
        self._mark_changed()

    def set_local_holds(self, count: int) -> None:
        """The number of open local holds; the engine hears at once when it leaves or reaches 0.

        Never blocks, never raises (a local hold's observer calls it).
        """
        held = count > 0
        if held != self._local_holds:
            self._local_holds = held
            self._mark_changed()

    def set_error(self, message: str) -> None:
        """Report ``error_msg`` at once (``""`` clears it)."""
        self._error_msg = str(message)
        self._urgent = True
        self._mark_changed()

    def _mark_changed(self) -> None:
        self._dirty = True
        self._changed = True
        self._wake.set()

    def _apply(self, event: ReservationEvent) -> bool:
        res = event.reservation
        workload = float(res.workload)
        idx = _as_idx(res.tag.get("request_idx"))
        if event.kind == "queued":
            # Admission is the protocol's "start": the request joins the working set.
            self._working[res.id] = res
            self._counters.received += workload
            self._count_received(idx)
            return True
        if event.kind == "started":
            # The hold began; nothing in the report changes (a queued reservation is
            # already in the working set), and work_started_at is read at the end.
            return False
        if event.kind != "ended":
            log.warning("engine reporter: unknown reservation event %r", event.kind)
            return False
        self._working.pop(res.id, None)
        outcome = res.outcome or Outcome.ERROR
        status = _STATUS_OF[outcome]
        if status == "Success":
            self._counters.served += workload
        elif status == "Cancelled":
            self._counters.cancelled += workload
        elif status == "Rejected":
            self._counters.rejected += workload
        else:
            self._counters.errored += workload
        if idx is not None:
            self._add_pending(
                _DeleteEntry(
                    request_idx=idx,
                    status=status,
                    entered_queue_at=float(res.entered_queue_at or 0.0),
                    work_started_at=float(res.started_at or 0.0),
                    work_completed_at=float(res.ended_at or 0.0),
                )
            )
        return True

    def _count_received(self, idx: int | None) -> None:
        if idx is None:
            self._received_count += 1
            return
        if idx in self._recent_idxs:
            self._recent_idxs.move_to_end(idx)
            return
        self._received_count += 1
        self._recent_idxs[idx] = None
        if len(self._recent_idxs) > _RECENT_IDX_WINDOW:
            self._recent_idxs.popitem(last=False)

    def _add_pending(self, entry: _DeleteEntry) -> None:
        self._pending.append(entry)
        if len(self._pending) > _MAX_PENDING_DELETES:
            excess = len(self._pending) - _MAX_PENDING_DELETES
            self._journal_done(self._pending[:excess])
            del self._pending[:excess]
            self._dropped_deletes += excess
            log.warning(
                "engine unreachable for long: dropped %d undelivered delete_requests entries",
                excess,
            )

    # -- the report loop ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report until cancelled.

        Calls ``task_status.started()`` at once. Sends ``/worker_status/`` whenever the
        state changes (a burst within ``report_coalesce_s`` becomes one report; rounds
        are paced by :meth:`_pace`) and at least every ``heartbeat_s``, then
        ``/delete_requests/`` for ended requests. When every address fails, the round
        is retried after ``engine_retry_s`` doubling per failed round, capped at
        ``RETRY_CAP_S`` and jittered; until a round succeeds, each gives every address
        one try, and state changes wait for the retry.

        Resource handling: a client the reporter opened itself is closed on exit.
        """
        task_status.started()
        if not self._config.report_addrs:
            await trio.sleep_forever()
        retry_at = -math.inf
        failing_since = 0.0
        try:
            while True:
                await self._wait_for_work(retry_at)
                # Let a burst of events (a release followed by the next admission) land
                # in the same report; under sustained change, rounds are paced.
                # Readiness and errors are one-off changes: they go without the wait.
                if self._urgent:
                    self._urgent = False
                else:
                    await trio.sleep(self._config.report_coalesce_s)
                await self._pace()
                async with self._lock:
                    ok = await self._round()
                if ok:
                    if self._failed_rounds:
                        log.info(
                            "engine reachable again: delivered after %d failed round(s) "
                            "over %.1f s",
                            self._failed_rounds,
                            trio.current_time() - failing_since,
                        )
                    self._failed_rounds = 0
                    retry_at = -math.inf
                    self._last_failure_log_at = -math.inf
                else:
                    if not self._failed_rounds:
                        failing_since = trio.current_time()
                    self._failed_rounds += 1
                    retry_at = trio.current_time() + self._retry_backoff(self._failed_rounds)
        finally:
            # flush() may hold the lock (and the client) right now; it closes it then.
            if not self._lock.locked():
                with trio.move_on_after(1.0, shield=True):
                    await self.aclose()

    async def _pace(self) -> None:
        """Take a token for one round, waiting for it when the bucket is empty.

        ``report_burst`` tokens at most, one more every ``report_interval_s``: changes
        after a quiet spell are reported at once, and a worker whose state changes
        hundreds of times a second (short reservations back to back) sends a round
        every ``report_interval_s`` with the state at that moment, not one per change.
        """
        config = self._config
        now = trio.current_time()
        if config.report_interval_s > 0:
            refill = (now - self._tokens_at) / config.report_interval_s
            self._tokens = min(float(config.report_burst), self._tokens + refill)
        else:
            self._tokens = float(config.report_burst)
        self._tokens_at = now
        if self._tokens < 1.0:
            await trio.sleep((1.0 - self._tokens) * config.report_interval_s)
            self._tokens, self._tokens_at = 1.0, trio.current_time()
        self._tokens -= 1.0

    def _retry_backoff(self, failures: int) -> float:
        """The pause after the ``failures``-th failed round in a row."""
        config = self._config
        base = config.engine_retry_s * 2 ** min(failures - 1, 16)
        return retry_pause(min(base, RETRY_CAP_S, config.heartbeat_s))

    async def _wait_for_work(self, retry_at: float) -> None:
        while True:
            now = trio.current_time()
            # While backing off after a failed round, a state change waits for the retry
            # (which sends the latest state): an unreachable engine is not hammered.
            if self._changed and now >= retry_at:
                return
            heartbeat_at = self._last_status_round_at + self._config.heartbeat_s
            leftover = self._changed or self._dirty or bool(self._pending)
            due = min(heartbeat_at, retry_at) if leftover else heartbeat_at
            if now >= due:
                if now >= heartbeat_at:
                    self._dirty = True
                return
            with trio.move_on_at(due):
                await self._wake.wait()
            # Events set after this point are seen by the checks at the top.
            self._wake = trio.Event()

    async def flush(self, *, timeout_s: float) -> None:
        """Send what is pending now (a status change, ended requests), within ``timeout_s``.

        Meant for shutdown; the caller shields it. Waits for a round already in flight
        (inside the same bound). Closes the reporter's own client, if any, afterwards.
        """
        if not self._config.report_addrs:
            return
        with trio.move_on_after(timeout_s) as scope:
            async with self._lock:
                try:
                    await self._round()
                finally:
                    with trio.move_on_after(1.0, shield=True):
                        await self.aclose()
        if scope.cancelled_caught:
            log.warning(
                "final engine report did not complete within %g s (%d delete entries left)",
                timeout_s,
                len(self._pending),
            )

    async def aclose(self) -> None:
        """Close the client the reporter opened itself (a caller's client is left open)."""
        client, self._owned_http = self._owned_http, None
        if client is not None:
            await client.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._http is not None:
            return self._http
        if self._owned_http is None:
            self._owned_http = httpx.AsyncClient(
                timeout=_timeout(self._config.engine_timeout_s), follow_redirects=False
            )
        return self._owned_http

    async def _round(self) -> bool:
        """One delivery of whatever is pending; True when nothing is left undelivered."""
        # After a failed round every address has had its tries: one each until one answers.
        tries = 1 if self._failed_rounds else self._config.engine_tries
        self._changed = False
        if self._dirty:
            if not await self._send_status(tries):
                # No address took it: the deletes wait for the next round (they would
                # only fail too, and each must follow a delivered status anyway).
                return False
        else:
            # Nothing changed since the last delivered report, so it showed all of
            # these gone already (a safety net: delivery marks them itself).
            for entry in self._pending:
                entry.reported = True
        # Only requests a delivered worker_status already shows as ended: the engine
        # hears "idle" first, then the deletions (the official order). One that ended
        # while this round's status was in flight waits for the next round.
        # Batch after batch while the engine takes them: rounds are paced (one a second
        # by default), and churn ends more than a batch of requests a second.
        for _ in range(_MAX_DELETE_POSTS_PER_ROUND):
            if not any(entry.reported for entry in self._pending):
                break
            accepted_before = self._deletes_sent
            if not await self._send_deletes(tries):
                return False
            if self._deletes_sent == accepted_before:
                break  # a refused batch: its halves go in the next round
        return True

    def _log_failure(self, message: str, *args: object) -> None:
        """A warning when delivery starts failing, then at most one a minute (else debug)."""
        now = trio.current_time()
        if now - self._last_failure_log_at >= _FAILURE_LOG_EVERY_S:
            self._last_failure_log_at = now
            log.warning(message, *args)
        else:
            log.debug(message, *args)

    # -- worker_status ------------------------------------------------------------------

    def _read_disk(self) -> float:
        try:
            value = float(self._disk_usage())
        except (OSError, ValueError, TypeError):
            return 0.0
        return value if math.isfinite(value) else 0.0

    def _snapshot(self) -> _StatusSnapshot:
        counters = self._counters.copy()
        disk = self._read_disk()
        working = list(self._working.values())
        idxs = [i for i in (_as_idx(r.tag.get("request_idx")) for r in working) if i is not None]
        cur_load, num_working = self._load()
        body = _status_body(
            self._config,
            loadtime=self._loadtime,
            counters=counters,
            cur_load=cur_load,
            max_perf=self._max_perf,
            error_msg=self._error_msg,
            num_requests_working=num_working,
            num_requests_received=self._received_count,
            disk_gib=disk,
            additional_disk_gib=disk - self._last_disk_gib,
            working_request_idxs=idxs,
        )
        return _StatusSnapshot(
            body=body, counters=counters, disk_gib=disk, ended=list(self._pending)
        )

    def _load(self) -> tuple[float, int]:
        """``cur_load`` and ``num_requests_working``: the working set, with the local-hold floor."""
        cur_load = sum(float(r.workload) for r in self._working.values())
        num_working = len(self._working)
        if self._local_holds:
            cur_load = max(cur_load, LOCAL_HOLD_LOAD)
            num_working = max(num_working, 1)
        return cur_load, num_working

    async def _send_status(self, tries: int) -> bool:
        snap = self._snapshot()
        # Cleared before the POST: a change made while it is in flight sets it again.
        self._dirty = False
        self._last_status_round_at = trio.current_time()
        if self._journal is not None:
            # Write-ahead: the line exists before the engine can have heard of the hold.
            self._journal.add(snap.body["working_request_idxs"])
        try:
            for addr in self._config.report_addrs:
                answer = await self._post_with_retries(addr, "/worker_status/", snap.body, tries)
                if answer.ok:
                    # Subtract exactly what was delivered; concurrent increments survive.
                    self._counters.subtract(snap.counters)
                    self._last_disk_gib = snap.disk_gib
                    for entry in snap.ended:
                        entry.reported = True
                    self._reports_sent += 1
                    self._last_success_mono = time.monotonic()
                    self._unreachable = False
                    self._delivered.set()
                    self._delivered = trio.Event()
                    return True
        except BaseException:
            # Cancelled mid-POST (shutdown): the engine may not have it, so the final
            # flush must send this state again before any delete_requests.
            self._dirty = True
            raise
        self._dirty = True
        self._unreachable = True
        self._report_failures += 1
        self._log_failure(
            "worker_status not delivered to any of %d engine address(es); last error: %s",
            len(self._config.report_addrs),
            self._last_error,
        )
        return False

    # -- delete_requests ------------------------------------------------------------------

    def _delete_addrs(self) -> list[str]:
        # The official worker never sends delete_requests to this address (§6.4).
        return [a for a in self._config.report_addrs if a.rstrip("/") != _NO_DELETES_ADDR]

    def _remove_pending(self, done: list[_DeleteEntry]) -> None:
        gone = set(done)
        self._pending = [e for e in self._pending if e not in gone]

    def _next_batch(self) -> list[_DeleteEntry]:
        """The oldest reported entries, as many as every one of them may travel with."""
        batch: list[_DeleteEntry] = []
        limit = _DELETE_BATCH
        for entry in self._pending:
            if not entry.reported:
                continue
            limit = min(limit, entry.max_batch)
            if len(batch) >= limit:
                break
            batch.append(entry)
        return batch

    async def _send_deletes(self, tries: int) -> bool:
        """One ``delete_requests`` batch; False when it failed (and is to be retried)."""
        addrs = self._delete_addrs()
        if not addrs:
            # Nowhere to deliver them: keeping them would only grow memory.
            log.debug("no engine address takes delete_requests; dropping %d", len(self._pending))
            self._pending.clear()
            return True
        batch = self._next_batch()
        if self._config.delete_requests_format == "legacy":
            # Two groups, each done as soon as it is accepted (or refused), so a group is
            # never sent again when the other one fails.
            groups = [
                [e for e in batch if e.success is flag]
                for flag in (True, False)
                if any(e.success is flag for e in batch)
            ]
        else:
            groups = [batch]
        for entries in groups:
            if not await self._deliver_deletes(addrs, entries, tries):
                self._report_failures += 1
                self._log_failure(
                    "delete_requests (%d entries) not delivered to any of %d engine "
                    "address(es); last error: %s",
                    len(entries),
                    len(addrs),
                    self._last_error,
                )
                return False
        return True

    def _delete_body(self, entries: list[_DeleteEntry]) -> dict[str, Any]:
        if self._config.delete_requests_format == "legacy":
            return {
                "worker_id": self._config.container_id,
                "mtoken": self._config.master_token,
                "request_idxs": [e.request_idx for e in entries],
                "success": entries[0].success,  # a group shares its flag
            }
        return {
            "worker_id": self._config.container_id,
            "mtoken": self._config.master_token,
            "requests": [e.as_json() for e in entries],
        }

    async def _deliver_deletes(
        self, addrs: list[str], entries: list[_DeleteEntry], tries: int
    ) -> bool:
        """POST ``entries`` (fallback over ``addrs``); False only for a failure to retry.

        Accepted: the entries are done. Refused (no address accepted, one answered a
        refusing 4xx): a lone entry is dropped, a batch is split for the next rounds.
        """
        body = self._delete_body(entries)
        refusal: tuple[str, int] | None = None
        for addr in addrs:
            answer = await self._post_with_retries(
                addr, "/delete_requests/", body, tries, stop_on_refusal=True
            )
            if answer.ok:
                self._remove_pending(entries)
                self._journal_done(entries)
                self._deletes_sent += len(entries)
                return True
            if answer.refused and answer.status is not None:
                refusal = (addr, answer.status)
        if refusal is None:
            return False
        addr, status = refusal
        if len(entries) == 1:
            [entry] = entries
            self._remove_pending(entries)
            self._journal_done(entries)
            self._refused_deletes += 1
            log.warning(
                "engine refused the delete_requests entry of request_idx %d (HTTP %d at %s); "
                "dropped it",
                entry.request_idx,
                status,
                addr,
            )
        else:
            half = len(entries) // 2
            for entry in entries:
                entry.max_batch = min(entry.max_batch, half)
            log.info(
                "engine refused a delete_requests batch of %d entries (HTTP %d at %s); "
                "sending it again in halves",
                len(entries),
                status,
                addr,
            )
        return True

    # -- transport ------------------------------------------------------------------------

    async def _post_with_retries(
        self,
        addr: str,
        path: str,
        body: dict[str, Any],
        tries: int,
        *,
        stop_on_refusal: bool = False,
    ) -> _Answer:
        """``tries`` tries at one address; this address's own bounded deadline.

        With ``stop_on_refusal``, a refusing 4xx answer ends the tries at once (the same
        body would only be refused again).
        """
        config = self._config
        url = addr.rstrip("/") + path
        answer = _Answer("no attempt made")
        for attempt in range(1, tries + 1):
            answer = await _post_once(self._client(), url, body, timeout_s=config.engine_timeout_s)
            if answer.ok:
                return answer
            self._last_error = f"{path} at {addr}: {answer.error}"
            log.debug("POST %s failed (try %d/%d): %s", url, attempt, tries, answer.error)
            if stop_on_refusal and answer.refused:
                return answer
            if attempt < tries:
                await trio.sleep(min(config.engine_retry_s * 2 ** (attempt - 1), RETRY_CAP_S))
        return answer

    async def wait_until_reachable(self, *, timeout_s: float) -> None:
        """Return once the engine takes reports, or after ``timeout_s`` at the latest.

        At once unless the last ``worker_status`` found no address that took it; then
        when the report loop delivers one again (within about ``RETRY_CAP_S`` of the
        engine answering). Lets the key fetch wait out an outage without adding its own
        requests to the report loop's.
        """
        if not self._unreachable:
            return
        with trio.move_on_after(timeout_s):
            await self._delivered.wait()

    # -- pubkey ---------------------------------------------------------------------------

    async def fetch_pubkey(self, *, backoff_s: Sequence[float] = PUBKEY_BACKOFF_S) -> RSAPublicKey:
        """Fetch the engine's RSA public key from ``GET {addr}/pubkey/``.

        Tries each address of ``config.report_addrs`` in order (one URL per address, not
        the raw comma list); a round that finds no usable key sleeps ``backoff_s[i]`` and
        tries again, ``len(backoff_s) + 1`` rounds in all. Each try is bounded by
        ``engine_timeout_s``; any status but a 2xx (a redirect is not followed), a
        transport error, an answer over ``PUBKEY_ANSWER_MAX_BYTES`` or a body that is not
        an RSA public key in PEM counts as a failure.

        Raises:
          PubkeyUnavailable: every try failed (the message says why the last one did).
        """
        addrs = self._config.report_addrs
        if not addrs:
            raise PubkeyUnavailable("no engine address (REPORT_ADDR) to fetch the key from")
        timeout_s = self._config.engine_timeout_s
        rounds = len(backoff_s) + 1
        last_error = "no attempt made"
        async with _client_for(self._http, self._config) as client:
            for round_no in range(rounds):
                for addr in addrs:
                    url = addr.rstrip("/") + "/pubkey/"
                    key, error = await _get_pubkey_once(client, url, timeout_s=timeout_s)
                    if key is not None:
                        return key
                    last_error = f"{url}: {error}"
                    log.debug("GET %s failed: %s", url, error)
                if round_no < len(backoff_s):
                    log.warning(
                        "engine public key not available (%s); retrying in %g s",
                        last_error,
                        backoff_s[round_no],
                    )
                    await trio.sleep(backoff_s[round_no])
        raise PubkeyUnavailable(
            f"could not fetch the engine's public key from {len(addrs)} address(es) "
            f"in {rounds} rounds; last error: {last_error}"
        )

    # -- views ----------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """A JSON-ready snapshot for ``/status``."""
        age = (
            None
            if self._last_success_mono is None
            else round(time.monotonic() - self._last_success_mono, 3)
        )
        return {
            "reports_sent": self._reports_sent,
            "report_failures": self._report_failures,
            "last_report_age_s": age,
            "pending_deletes": len(self._pending),
            "deletes_sent": self._deletes_sent,
            "dropped_deletes": self._dropped_deletes,
            "refused_deletes": self._refused_deletes,
            "last_error": self._last_error,
            "ready": self._loadtime > 0 and self._max_perf > 0 and not self._error_msg,
            "error_msg": self._error_msg,
            "cur_load": self._load()[0],
            "num_requests_working": self._load()[1],
            "local_holds": self._local_holds,
            "num_requests_received": self._received_count,
        }


async def _get_pubkey_once(
    client: httpx.AsyncClient, url: str, *, timeout_s: float
) -> tuple[RSAPublicKey | None, str]:
    """One ``GET /pubkey/``: a 2xx whose body (at most ``PUBKEY_ANSWER_MAX_BYTES``) is
    an RSA public key in PEM, or None and why not."""
    with trio.move_on_after(timeout_s):
        try:
            async with client.stream(
                "GET",
                url,
                headers=_ANSWER_HEADERS,
                timeout=_timeout(timeout_s),
                follow_redirects=False,
            ) as response:
                failed = _not_delivered(response)
                if failed is not None:
                    return None, failed.error or ""
                raw = await _read_bounded(response, PUBKEY_ANSWER_MAX_BYTES)
            pem = _decoded(response, raw, PUBKEY_ANSWER_MAX_BYTES)
            return load_public_key(pem), ""
        except _AnswerTooLarge as exc:
            return None, str(exc)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return None, _describe(exc)
        except ValueError as exc:  # not PEM, not an RSA key, or an unreadable encoding
            return None, f"not an RSA public key in PEM ({_describe(exc)})"
    return None, f"no answer within {timeout_s:g} s"


async def send_error_beacon(
    config: WorkerConfig, message: str, *, http: httpx.AsyncClient | None = None
) -> bool:
    """Tell the engine the worker failed to start: one ``worker_status`` with ``error_msg``.

    Goes to **every** address in ``config.report_addrs`` at once (like the official start
    script's beacon), one try each bounded by ``engine_timeout_s``. Returns True if any
    address accepted it. Never raises for transport failures.
    """
    if not config.report_addrs:
        return False
    disk = _root_disk_gib()
    body = _status_body(
        config,
        loadtime=0.0,
        counters=_Counters(),
        cur_load=0.0,
        max_perf=0.0,
        error_msg=message,
        num_requests_working=0,
        num_requests_received=0,
        disk_gib=disk,
        additional_disk_gib=0.0,
        working_request_idxs=[],
    )
    accepted: list[str] = []

    async def _one(client: httpx.AsyncClient, addr: str) -> None:
        answer = await _post_once(
            client, addr.rstrip("/") + "/worker_status/", body, timeout_s=config.engine_timeout_s
        )
        if answer.ok:
            accepted.append(addr)
        else:
            log.warning("error beacon to %s failed: %s", addr, answer.error)

    async with _client_for(http, config) as client, trio.open_nursery() as nursery:
        for addr in config.report_addrs:
            nursery.start_soon(_one, client, addr)
    return bool(accepted)
