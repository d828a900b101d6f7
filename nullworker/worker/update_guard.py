"""Refused ``/pyworker/update`` calls: logged sparingly and rate-limited per address.

The policy only (:class:`UpdateGuard`); the route in :mod:`nullworker.worker.app` asks
it before comparing a token and tells it the result. Time is ``trio.current_time()``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import trio

__all__ = ["UpdateGuard"]

log = logging.getLogger("nullworker")


@dataclass
class _Attempts:
    """What :class:`UpdateGuard` remembers of one address."""

    #: Trio time of the first failure of the current window (None: no open window).
    window_start: float | None = None
    failures: int = 0
    #: Refusals not yet counted in a log line: a bad or missing token, and 429s.
    unlogged_bad: int = 0
    unlogged_limited: int = 0
    last_logged_at: float = -math.inf


class UpdateGuard:
    """Rate-limits and logs refused ``/pyworker/update`` calls, per client address.

    Per address (the connection's peer address, never a header):

    * A refusal for a wrong or missing token (or because no ``MASTER_TOKEN`` is set) is a
      failure. The first failure opens a window of ``window_s`` (60 s); the
      ``max_failures``-th (10th) failure in it blocks the address for the rest of that
      window: every request from it gets ``429`` with ``Retry-After``, **the right token
      too**, and the token is not even compared. Letting the right token through would
      let guessing go on at full speed, the 429 being just another "no"; the cost is
      that the engine's own signal, if it shared an address with a guesser, waits at
      most one window. When the window is over, the count starts again; a request with
      the right token outside a block clears the address's failures.
    * Refusals (401 and 429 alike) are logged as warnings at most once per address every
      ``log_every_s`` (10 s), the line saying how many were refused since the previous
      line; the failure that blocks an address is always logged. Neither the given
      token nor the master token ever appears in a line.
    * At most ``max_addresses`` (1,024) addresses are remembered; the one seen least
      recently is forgotten first, so a flood from many addresses cannot grow memory.
      Addresses whose calls all succeed are not remembered at all.

    Time is ``trio.current_time()``, so the policy runs on a ``MockClock`` in tests.
    """

    def __init__(
        self,
        *,
        max_failures: int = 10,
        window_s: float = 60.0,
        log_every_s: float = 10.0,
        max_addresses: int = 1024,
        logger: logging.Logger | None = None,
    ) -> None:
        if max_failures < 1 or max_addresses < 1 or window_s <= 0 or log_every_s < 0:
            raise ValueError("UpdateGuard: limits must be positive")
        self.max_failures = max_failures
        self.window_s = window_s
        self.log_every_s = log_every_s
        self.max_addresses = max_addresses
        self._log = logger or log
        self._table: OrderedDict[str, _Attempts] = OrderedDict()

    def __len__(self) -> int:
        """How many addresses are remembered (at most ``max_addresses``)."""
        return len(self._table)

    def blocked_for(self, addr: str) -> float | None:
        """Seconds left of ``addr``'s block (the request is then refused and counted), or None."""
        now = trio.current_time()
        entry = self._lookup(addr, now)
        if entry is None or entry.window_start is None or entry.failures < self.max_failures:
            return None
        entry.unlogged_limited += 1
        self._maybe_log(addr, entry, now, force=False)
        return max(entry.window_start + self.window_s - now, 0.0)

    def failed(self, addr: str) -> None:
        """Count a refused token from ``addr``; log if its line is due."""
        now = trio.current_time()
        entry = self._lookup(addr, now)
        if entry is None:
            if len(self._table) >= self.max_addresses:
                self._table.popitem(last=False)
            entry = self._table[addr] = _Attempts()
        if entry.window_start is None:
            entry.window_start = now
        entry.failures += 1
        entry.unlogged_bad += 1
        self._maybe_log(addr, entry, now, force=entry.failures == self.max_failures)

    def succeeded(self, addr: str) -> None:
        """The right token came from ``addr`` (not blocked): forget its failures."""
        entry = self._table.get(addr)
        if entry is not None:
            entry.window_start = None
            entry.failures = 0

    def _lookup(self, addr: str, now: float) -> _Attempts | None:
        entry = self._table.get(addr)
        if entry is None:
            return None
        self._table.move_to_end(addr)
        if entry.window_start is not None and now >= entry.window_start + self.window_s:
            entry.window_start = None
            entry.failures = 0
        return entry

    def _maybe_log(self, addr: str, entry: _Attempts, now: float, *, force: bool) -> None:
        if not force and now - entry.last_logged_at < self.log_every_s:
            return
        refused = entry.unlogged_bad + entry.unlogged_limited
        text = (
            f"/pyworker/update from {addr}: {refused} request(s) refused since the last line "
            f"({entry.unlogged_bad} wrong or missing token, "
            f"{entry.unlogged_limited} rate-limited with 429)"
        )
        if force:
            text += (
                f"; {entry.failures} failures within {self.window_s:g} s: "
                f"answering 429 for {self.window_s:g} s"
            )
        self._log.warning("%s; at most one line per address every %g s", text, self.log_every_s)
        entry.last_logged_at = now
        entry.unlogged_bad = 0
        entry.unlogged_limited = 0
