"""The report loop: when a round goes out, the retries, and the reporter's public face.

:class:`EngineReporter` wires the sans-IO accounting (:mod:`._core`) to the engine API
(:mod:`._engine_api`) and the journal file (:mod:`nullworker.worker.journal`), and owns
the timing: coalescing, pacing, heartbeats, tries per address and backoff after failed
rounds.

Concurrency invariants
----------------------
* :meth:`EngineReporter.observe`, :meth:`~EngineReporter.set_ready` and
  :meth:`~EngineReporter.set_error` are synchronous and never block or raise: they
  update the accounting and set a ``trio.Event`` that wakes the report loop. The slot
  can therefore never be held up by reporting.
* At most one *round* (a ``worker_status`` and/or a ``delete_requests`` delivery) is in
  flight at a time: rounds run under ``self._lock``, shared by :meth:`run` and
  :meth:`flush`.
* Each address gets its own bounded deadline (fixes §10.7): ``engine_tries`` tries of at
  most ``engine_timeout_s`` each, with ``engine_retry_s`` doubling between tries (capped
  at ``RETRY_CAP_S``), then the next address in order. The first address that accepts
  ends the round (fallback, not fan-out).
* At-least-once, not exactly-once: a POST the engine accepted but whose answer did not
  arrive within the try's deadline counts as failed and is sent again, so the engine can
  count that ``worker_status``'s load figures (or see those delete entries) twice.
* A ``delete_requests`` POST the engine refuses (HTTP 4xx other than 408/425/429) is not
  retried as it is: its entries are sent again in halves (bisection: a refusal ends the
  round, while accepted batches are followed at once by the next, up to 20 POSTs a
  round), and an entry refused on its own is dropped with one warning naming its
  ``request_idx`` and the status. A refusal is the answer of an address that does not
  take this body: the next address is tried, and the batch counts as refused when no
  address accepted it and at least one refused it. 5xx, 408/425/429 and transport
  errors are failures and are retried with the whole batch, as for ``worker_status``.
* Outages: a round in which every address failed is retried after
  ``engine_retry_s`` doubling per failed round, capped at ``RETRY_CAP_S`` and spread by
  ``RETRY_JITTER`` (0.5 s, then 0.8-1.2 s with the defaults); until one succeeds, each
  round gives every address a single try, and state changes wait for that retry instead
  of starting rounds of their own. So an unreachable engine gets about one request per
  second per address, and, where the addresses fail fast (refused connections, error
  statuses), hears the current state within ``RETRY_CAP_S`` x 1.2 plus
  ``report_coalesce_s`` (1.22 s with the defaults) and one request of answering again.
* Failures are logged without secrets (never the ``mtoken`` or a body; one warning when
  the engine becomes unreachable, then at most one a minute, and one line when it is
  back) and retried later, because a reporting failure must never take the worker down.
  Anything else is a bug and propagates. ``trio.Cancelled`` is never swallowed; a round
  cancelled mid-POST leaves its state to be sent again.
* The disk figure (one ``statvfs``, a blocking call) is read at most every
  ``_DISK_READ_EVERY_S`` of the Trio clock, not on every round.
* Durations (``loadtime``, ``last_report_age_s``) are on the Trio clock (``loadtime`` on
  ``time.monotonic()``, which is the Trio clock's source outside tests); only the
  ``*_at`` timestamps sent to the engine are wall-clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ..config import WorkerConfig
from ..journal import Journal
from ..reservations import ReservationEvent
from ._core import (
    Accounting,
    DeleteEntry,
    TokenBucket,
    delete_addrs,
    delete_body,
    delete_groups,
    retry_pause,
    round_backoff_s,
    try_pause_s,
)
from ._engine_api import (
    PUBKEY_BACKOFF_S,
    Answer,
    fetch_engine_pubkey,
    new_engine_client,
    post_once,
    root_disk_gib,
)

log = logging.getLogger("nullworker.reporter")

#: While the engine stays unreachable, at most one warning this often (the rest: debug).
_FAILURE_LOG_EVERY_S = 60.0
#: At most this many ``delete_requests`` POSTs per round (batches the engine accepts
#: follow each other at once): 10,000 entries a second with the default pacing.
_MAX_DELETE_POSTS_PER_ROUND = 20
#: The disk figure is read again at most this often (Trio clock), not on every round:
#: ``statvfs`` blocks the event loop, and a busy worker reports about once a second.
_DISK_READ_EVERY_S = 10.0


class EngineReporter:
    """Reports the worker's state to the Vast engine (see the package docstring).

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
        self._disk_usage = disk_usage or root_disk_gib
        self._journal: Journal | None = None
        journaled = journal_path is not None and bool(delete_addrs(config.report_addrs))
        self._acc = Accounting(config, disk_gib=self._read_disk(), journaled=journaled)
        #: The disk figure of the last round and when it was read (Trio clock).
        self._disk_gib = 0.0
        self._disk_read_at = -math.inf
        # -- scheduling -----------------------------------------------------------------
        self._wake = trio.Event()
        self._lock = trio.Lock()
        self._bucket = TokenBucket(burst=config.report_burst, interval_s=config.report_interval_s)
        # -- statistics -----------------------------------------------------------------
        self._last_success_at: float | None = None
        self._last_error: str | None = None
        self._last_failure_log_at = -math.inf
        #: Rounds failed in a row (the report loop's backoff and tries depend on it).
        self._failed_rounds = 0
        #: Set (and replaced) each time a worker_status is delivered.
        self._delivered = trio.Event()
        # -- the delivery journal ---------------------------------------------------------
        if journal_path is not None and journaled:
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
        # Wall clock: a timestamp for the engine, not a duration.
        self._acc.queue_leftovers(leftover, now_wall=time.time())
        self._sync_journal()

    def _sync_journal(self) -> None:
        """Strike out of the journal what the accounting ended (delivered or abandoned)."""
        strikes = self._acc.take_journal_strikes()
        if self._journal is not None and strikes:
            self._journal.remove(strikes)

    # -- inputs (sync, never block, never raise) ------------------------------------------

    def observe(self, event: ReservationEvent) -> None:
        """The :class:`~nullworker.worker.reservations.ReservationSlot` observer.

        Updates the accounting and wakes the report loop; never blocks, never raises.
        """
        try:
            changed = self._acc.apply(event)
            self._sync_journal()
        except Exception:  # a reporting bug must never break the slot
            log.exception("engine reporter failed to account for a %s event", event.kind)
            self._acc.mark_changed()
            changed = True
        if changed:
            self._wake.set()

    def set_ready(self, *, max_perf: float) -> None:
        """The worker is ready: report ``loadtime`` (now - start) and ``max_perf`` at once.

        Also clears an earlier ``error_msg``: readiness supersedes a start-up error that
        was recovered from (the engine reads ready as loadtime > 0, max_perf > 0 and an
        empty error_msg).
        """
        self._acc.set_ready(loadtime=time.monotonic() - self._started_at, max_perf=max_perf)
        self._wake.set()

    def set_local_holds(self, count: int) -> None:
        """The number of open local holds; the engine hears at once when it leaves or reaches 0.

        Never blocks, never raises (a local hold's observer calls it).
        """
        if self._acc.set_local_holds(count):
            self._wake.set()

    def set_error(self, message: str) -> None:
        """Report ``error_msg`` at once (``""`` clears it)."""
        self._acc.set_error(message)
        self._wake.set()

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
                if self._acc.urgent:
                    self._acc.urgent = False
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

        ``report_burst`` tokens at most, one more every ``report_interval_s``
        (:class:`~._core.TokenBucket` does the arithmetic).
        """
        now = trio.current_time()
        wait_s = self._bucket.wait_s(now)
        if wait_s > 0:
            await trio.sleep(wait_s)
            now = trio.current_time()
        self._bucket.take(now)

    def _retry_backoff(self, failures: int) -> float:
        """The pause after the ``failures``-th failed round in a row."""
        config = self._config
        return retry_pause(
            round_backoff_s(
                failures, engine_retry_s=config.engine_retry_s, heartbeat_s=config.heartbeat_s
            )
        )

    async def _wait_for_work(self, retry_at: float) -> None:
        while True:
            due = self._acc.due_at(
                trio.current_time(), retry_at=retry_at, heartbeat_s=self._config.heartbeat_s
            )
            if due is None:
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
                len(self._acc.pending),
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
            self._owned_http = new_engine_client(self._config)
        return self._owned_http

    async def _round(self) -> bool:
        """One delivery of whatever is pending; True when nothing is left undelivered."""
        # After a failed round every address has had its tries: one each until one answers.
        tries = 1 if self._failed_rounds else self._config.engine_tries
        self._acc.changed = False
        if self._acc.dirty:
            if not await self._send_status(tries):
                # No address took it: the deletes wait for the next round (they would
                # only fail too, and each must follow a delivered status anyway).
                return False
        else:
            self._acc.assume_reported()
        # Only requests a delivered worker_status already shows as ended: the engine
        # hears "idle" first, then the deletions (the official order). One that ended
        # while this round's status was in flight waits for the next round.
        # Batch after batch while the engine takes them: rounds are paced (one a second
        # by default), and churn ends more than a batch of requests a second.
        for _ in range(_MAX_DELETE_POSTS_PER_ROUND):
            if not self._acc.has_reported_pending():
                break
            accepted_before = self._acc.deletes_sent
            if not await self._send_deletes(tries):
                return False
            if self._acc.deletes_sent == accepted_before:
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

    def _round_disk(self, now: float) -> float:
        """The disk figure for this round: read again only every ``_DISK_READ_EVERY_S``."""
        if now - self._disk_read_at >= _DISK_READ_EVERY_S:
            self._disk_gib = self._read_disk()
            self._disk_read_at = now
        return self._disk_gib

    async def _send_status(self, tries: int) -> bool:
        now = trio.current_time()
        snap = self._acc.status_sending(now=now, disk_gib=self._round_disk(now))
        if self._journal is not None:
            # Write-ahead: the line exists before the engine can have heard of the hold.
            self._journal.add(snap.body["working_request_idxs"])
        try:
            for addr in self._config.report_addrs:
                answer = await self._post_with_retries(addr, "/worker_status/", snap.body, tries)
                if answer.ok:
                    # Subtract exactly what was delivered; concurrent increments survive.
                    self._acc.status_delivered(snap)
                    self._last_success_at = trio.current_time()
                    self._delivered.set()
                    self._delivered = trio.Event()
                    return True
        except BaseException:
            # Cancelled mid-POST (shutdown): the engine may not have it, so the final
            # flush must send this state again before any delete_requests.
            self._acc.status_interrupted(snap)
            raise
        self._acc.status_failed(snap)
        self._log_failure(
            "worker_status not delivered to any of %d engine address(es); last error: %s",
            len(self._config.report_addrs),
            self._last_error,
        )
        return False

    # -- delete_requests ------------------------------------------------------------------

    async def _send_deletes(self, tries: int) -> bool:
        """One ``delete_requests`` batch; False when it failed (and is to be retried)."""
        addrs = delete_addrs(self._config.report_addrs)
        if not addrs:
            # Nowhere to deliver them: keeping them would only grow memory.
            log.debug(
                "no engine address takes delete_requests; dropping %d", len(self._acc.pending)
            )
            self._acc.drop_pending()
            return True
        batch = self._acc.next_batch()
        for entries in delete_groups(self._config, batch):
            if not await self._deliver_deletes(addrs, entries, tries):
                self._acc.report_failures += 1
                self._log_failure(
                    "delete_requests (%d entries) not delivered to any of %d engine "
                    "address(es); last error: %s",
                    len(entries),
                    len(addrs),
                    self._last_error,
                )
                return False
        return True

    async def _deliver_deletes(
        self, addrs: list[str], entries: list[DeleteEntry], tries: int
    ) -> bool:
        """POST ``entries`` (fallback over ``addrs``); False only for a failure to retry.

        Accepted: the entries are done. Refused (no address accepted, one answered a
        refusing 4xx): a lone entry is dropped, a batch is split for the next rounds.
        """
        body = delete_body(self._config, entries)
        refusal: tuple[str, int] | None = None
        for addr in addrs:
            answer = await self._post_with_retries(
                addr, "/delete_requests/", body, tries, stop_on_refusal=True
            )
            if answer.ok:
                self._acc.deletes_accepted(entries)
                self._sync_journal()
                return True
            if answer.refused and answer.status is not None:
                refusal = (addr, answer.status)
        if refusal is None:
            return False
        addr, status = refusal
        if self._acc.deletes_refused(entries) == "dropped":
            self._sync_journal()
            log.warning(
                "engine refused the delete_requests entry of request_idx %d (HTTP %d at %s); "
                "dropped it",
                entries[0].request_idx,
                status,
                addr,
            )
        else:
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
    ) -> Answer:
        """``tries`` tries at one address; this address's own bounded deadline.

        With ``stop_on_refusal``, a refusing 4xx answer ends the tries at once (the same
        body would only be refused again).
        """
        config = self._config
        url = addr.rstrip("/") + path
        answer = Answer("no attempt made")
        for attempt in range(1, tries + 1):
            answer = await post_once(self._client(), url, body, timeout_s=config.engine_timeout_s)
            if answer.ok:
                return answer
            self._last_error = f"{path} at {addr}: {answer.error}"
            log.debug("POST %s failed (try %d/%d): %s", url, attempt, tries, answer.error)
            if stop_on_refusal and answer.refused:
                return answer
            if attempt < tries:
                await trio.sleep(try_pause_s(attempt, engine_retry_s=config.engine_retry_s))
        return answer

    async def wait_until_reachable(self, *, timeout_s: float) -> None:
        """Return once the engine takes reports, or after ``timeout_s`` at the latest.

        At once unless the last ``worker_status`` found no address that took it; then
        when the report loop delivers one again (within about ``RETRY_CAP_S`` of the
        engine answering). Lets the key fetch wait out an outage without adding its own
        requests to the report loop's.
        """
        if not self._acc.unreachable:
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
        return await fetch_engine_pubkey(self._http, self._config, backoff_s=backoff_s)

    # -- views ----------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """A JSON-ready snapshot for ``/status``."""
        acc = self._acc
        age = (
            None
            if self._last_success_at is None
            else round(trio.current_time() - self._last_success_at, 3)
        )
        cur_load, num_working = acc.load()
        return {
            "reports_sent": acc.reports_sent,
            "report_failures": acc.report_failures,
            "last_report_age_s": age,
            "pending_deletes": len(acc.pending),
            "deletes_sent": acc.deletes_sent,
            "dropped_deletes": acc.dropped_deletes,
            "refused_deletes": acc.refused_deletes,
            "last_error": self._last_error,
            "ready": acc.loadtime > 0 and acc.max_perf > 0 and not acc.error_msg,
            "error_msg": acc.error_msg,
            "cur_load": cur_load,
            "num_requests_working": num_working,
            "local_holds": acc.local_holds,
            "num_requests_received": acc.received_count,
        }
