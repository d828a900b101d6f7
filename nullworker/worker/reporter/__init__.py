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

Layout
------
The package is three modules, one concern each (as h11 keeps its state machine apart
from any I/O):

* :mod:`._core` -- the accounting, sans I/O: counters owed and delivered, pending
  delete entries and their batches, the journal's bookkeeping, the pacing and backoff
  arithmetic. Plain synchronous code, tested in ``tests/test_reporter_core.py``.
* :mod:`._engine_api` -- the engine's HTTP API on an injected ``httpx.AsyncClient``:
  one bounded POST, the bounded ``/pubkey/`` read, the error beacon.
* :mod:`._loop` -- :class:`EngineReporter`: the report loop, its pacing, heartbeats,
  retries and backoff, and the public methods the rest of the worker calls.

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

from ...errors import PubkeyUnavailable
from ._core import LOCAL_HOLD_LOAD, RETRY_CAP_S, RETRY_JITTER, WORKER_VERSION, retry_pause
from ._engine_api import (
    CONNECT_TIMEOUT_S,
    POST_ANSWER_MAX_BYTES,
    PUBKEY_ANSWER_MAX_BYTES,
    PUBKEY_BACKOFF_S,
    send_error_beacon,
)
from ._loop import EngineReporter

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
