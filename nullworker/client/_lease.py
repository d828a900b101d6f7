"""The lease's term logic: :class:`Lease` over a :class:`LeaseStore`, its events and statistics.

Which process of a group leads, decided through a store that runs three atomic
commands (acquire, renew, release). This module holds what does not depend on the
store: when each command is sent, how long a term lasts, what is reported. The store on
a Redis server is in :mod:`._redis_lease`; users import both from :mod:`.lease`.

The protocol (one key, a random token per :class:`Lease`)
---------------------------------------------------------
* **Acquire**: ``SET key token NX PX ttl``, in a script that answers the holder's token
  and, when the key still holds our own token (a reply lost to a timeout, a term lost
  locally while the server kept the key), extends it: it is ours already.
* **Renew**, every ``renew_s`` from the time the previous command was sent:
  compare-and-extend (``if GET key == token then PEXPIRE key ttl``), answering the
  holder's token.
* **Release**: compare-and-delete (``if GET key == token then DEL key``).
* A standby tries to acquire every ``renew_s`` (when its ``gate`` lets it: see
  :meth:`Lease.leadership`).
* Every command is bounded by ``timeout_s`` (``renew_s / 2`` by default), shorter than
  the renewal interval.

The local deadline
------------------
The key expires on the Redis server's clock, ``ttl`` after the server ran the last
command that set or extended it, which is after the leader sent it. The leader takes
the time on its own monotonic clock (:func:`trio.current_time`) *before* sending each
acquiring or renewing command, and keeps the term only until::

    deadline = (send time of the last command that succeeded) + ttl_s - margin_s

with ``margin_s = renew_s``. When no renewal succeeds by then, or a renewal answers that
the key holds another token or none (reason ``taken`` or ``gone``), the term is lost: the
body of :meth:`Lease.leadership` is cancelled, which for ``autoscale()`` closes every
reservation. Since the server can only let the key go ``ttl`` after the send, and another
process can only acquire it after that, the leader has dropped its reservations
``margin_s`` before anyone else can start holding any. Two leaders hold reservations at
once only when the key disappears early (a Redis restart without persistence, a
``FLUSHALL``, a failover to a replica without the key, a jump of the server's wall
clock) -- until the old leader's next renewal, at most ``renew_s`` plus one command's
``timeout_s`` later -- or when the leader process is frozen (SIGSTOP, a paused VM) past
its deadline. The lease is no fencing token: the workers do not check it.

The trade: when Redis cannot be reached, the leader drops every reservation at its
deadline rather than keep capacity that a standby could also be holding.

Concurrency invariants
----------------------
* A :class:`Lease` has at most one term at a time: :meth:`Lease.leadership` is not
  re-entered while a term is open. A term runs in a nursery of its own: the body (the
  caller's block) and one *keeper* task that renews. The keeper alone decides that the
  term is lost; it emits ``lease_lost`` synchronously and then cancels the nursery, so
  a callback reading the autoscaler's state sees what is about to be released.
* The deadline is a cancel scope around the keeper's renewal loop, moved forward after
  each successful renewal: a renewal still in flight at the deadline is cut off there.
  A renewal the server ran but whose answer never came therefore only keeps the key
  longer (a capacity gap, never an overlap), and the next acquisition finds our own
  token and takes it back.
* :meth:`Lease.release` is shielded and bounded by ``timeout_s``, so it runs on the
  way out of a cancelled run (SIGTERM) after the body has closed its reservations.
* A store command that fails raises :class:`LeaseError`; ``trio.Cancelled`` is never
  caught.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, Self, TypeVar, TypeVarTuple

import trio

from .._support import finite
from ..errors import ConfigError, LeaseError

__all__ = [
    "DEFAULT_RENEW_S",
    "DEFAULT_TTL_S",
    "TOKEN_SHOWN",
    "Lease",
    "LeaseEvent",
    "LeaseEventKind",
    "LeaseStatistics",
    "LeaseStore",
    "LostReason",
    "Store",
    "StoreSession",
    "Term",
]

#: The public module's name: one logger for the whole lease, wherever its code lives.
log = logging.getLogger("nullworker.client.lease")

#: How long the key lives after each acquisition or renewal.
DEFAULT_TTL_S = 10.0
#: Seconds between renewals by the leader, and between attempts to acquire by a standby.
DEFAULT_RENEW_S = 3.0
#: Characters of a token shown in events (enough to tell processes apart).
TOKEN_SHOWN = 8

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

LostReason = Literal["expired", "taken", "gone"]
LeaseEventKind = Literal["standby", "lease_acquired", "lease_lost", "lease_released"]


class Store(Protocol):
    """What a :class:`Lease` or a membership keeps its state in: opened when its owner
    is entered, closed when it is left (:class:`StoreSession`)."""

    def describe(self) -> str:
        """Where the store is, for messages: never includes a password."""
        ...

    async def open(self) -> None:
        """Get ready for commands, without I/O (the Redis store opens the trio-asyncio
        loop)."""
        ...

    async def aclose(self) -> None:
        """Release the store's connections."""
        ...


S = TypeVar("S", bound=Store)


class StoreSession(Generic[S]):
    """``async with`` it to open its :attr:`store`, and to close the store at the end.

    The base of :class:`Lease` and of the membership, so that the store's lifecycle is
    written once: entering opens the store (for the Redis store, the trio-asyncio
    loop), leaving closes it (its client, then the loop if it opened it), however the
    block ends.
    """

    store: S

    async def __aenter__(self) -> Self:
        await self.store.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.store.aclose()


class LeaseStore(Store, Protocol):
    """Where the lease lives: the three atomic commands, each answering at once.

    :class:`~nullworker.client.lease.RedisLeaseStore` is the real one; tests pass one in
    memory. A failure raises :class:`LeaseError`; :class:`Lease` bounds each call's time
    itself.
    """

    async def acquire(self, key: str, token: str, ttl_ms: int) -> str | None:
        """Set ``key`` to ``token`` for ``ttl_ms`` if it is free (or extend it if it holds
        ``token``); return the holder's token after the command."""
        ...

    async def renew(self, key: str, token: str, ttl_ms: int) -> str | None:
        """Extend ``key`` by ``ttl_ms`` if it holds ``token``; return the holder's token."""
        ...

    async def release(self, key: str, token: str) -> bool:
        """Delete ``key`` if it holds ``token``; return whether it did."""
        ...


@dataclass(frozen=True)
class LeaseEvent:
    """One change of the lease's state, for displays and logs.

    ``kind`` is one of:

    * ``standby`` -- this process does not hold the lease: ``holder`` (a token prefix)
      does, or the store cannot be reached (``error``); sent when the holder seen
      changes, not at every attempt;
    * ``lease_acquired`` -- term ``term`` starts, after ``waited_s`` of standing by;
    * ``lease_lost`` -- the term ended because of ``reason``: ``expired`` (no renewal
      succeeded before the local deadline; ``error`` is the last failure), ``taken``
      (another token holds the key) or ``gone`` (the key disappeared); sent just before
      the body is cancelled. ``held_for_s`` is the term's length;
    * ``lease_released`` -- :meth:`Lease.release` deleted the key (``deleted``), or
      could not (``error``) at the end of a term.
    """

    kind: LeaseEventKind
    at: float
    message: str
    term: int
    holder: str | None = None
    reason: LostReason | None = None
    error: str | None = None
    held_for_s: float | None = None
    waited_s: float | None = None
    deleted: bool | None = None


@dataclass(frozen=True)
class LeaseStatistics:
    """A snapshot of a :class:`Lease`: ``leader`` while a term is open, ``terms`` begun."""

    leader: bool
    terms: int


@dataclass
class Term:
    """One period of leadership, from acquisition to loss or to the body's end.

    Attributes:
      number: 1 for the first term of this :class:`Lease`, then 2, ...
      acquired_at: the Trio time at which the acquiring command was sent.
      renewed_at: the send time of the last command that succeeded (acquiring or renewing).
      deadline: ``renewed_at + ttl_s - margin_s``: the term is lost then at the latest.
      lost: why the term was lost, ``None`` while it lasts or when the body ended it.
      error: the last failure seen while renewing, if any.
    """

    number: int
    acquired_at: float
    renewed_at: float
    deadline: float
    lost: LostReason | None = None
    error: str | None = None


class Lease(StoreSession[LeaseStore]):
    """Leadership among several processes, held through a :class:`LeaseStore`.

    Args:
      store: where the key lives (:class:`~nullworker.client.lease.RedisLeaseStore`).
      key: the lease's key; every process of one group uses the same.
      ttl_s: how long the key lives after each acquisition or renewal.
      renew_s: seconds between renewals, and between a standby's attempts. The leader
        drops its term ``ttl_s - renew_s`` after the last successful renewal was sent,
        so ``ttl_s`` must exceed ``2 * renew_s`` (at least one retry before then).
      timeout_s: bound on each command; default ``renew_s / 2``; must be below
        ``renew_s``.
      token: this process's token; random by default (16 bytes, hex).
      on_event: called synchronously with each :class:`LeaseEvent`; it must not block.
        Exceptions it raises are logged and dropped.

    Raises:
      ConfigError: (a ``ValueError``) an invalid argument.
    """

    def __init__(
        self,
        store: LeaseStore,
        key: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        renew_s: float = DEFAULT_RENEW_S,
        timeout_s: float | None = None,
        token: str | None = None,
        on_event: Callable[[LeaseEvent], None] | None = None,
    ) -> None:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"the lease needs a key, got {key!r}")
        if not (finite(renew_s) and renew_s > 0):
            raise ConfigError(f"renew_s must be a finite number of seconds > 0, got {renew_s!r}")
        if not (finite(ttl_s) and ttl_s > 2 * renew_s):
            raise ConfigError(
                f"ttl_s must be a finite number of seconds > 2 * renew_s ({2 * renew_s:g}), "
                f"got {ttl_s!r}"
            )
        if timeout_s is None:
            timeout_s = renew_s / 2
        if not (finite(timeout_s) and 0 < timeout_s < renew_s):
            raise ConfigError(
                f"timeout_s must be a number of seconds > 0 and < renew_s, got {timeout_s!r}"
            )
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError(f"token must be a non-empty string, got {token!r}")
        if on_event is not None and not callable(on_event):
            raise ConfigError(f"on_event must be callable, not {on_event!r}")
        self.store = store
        self.key = key
        self.ttl_s = float(ttl_s)
        self.renew_s = float(renew_s)
        #: How long before the server-side expiry (at the earliest) the leader drops.
        self.margin_s = self.renew_s
        self.timeout_s = float(timeout_s)
        self.token = token if token is not None else secrets.token_hex(16)
        self._on_event = on_event
        self._ttl_ms = max(1, round(self.ttl_s * 1000))
        self._term: Term | None = None
        self._terms = 0
        #: An acquiring command is in flight.
        self._acquiring = False
        #: The key may hold our token: from an acquisition until a loss or a release.
        self._maybe_ours = False

    def __repr__(self) -> str:
        return f"<Lease {self.describe()} token={self.token[:TOKEN_SHOWN]}>"

    def describe(self) -> str:
        """The key and the store, for messages (no password)."""
        return f"lease {self.key!r} at {self.store.describe()}"

    @property
    def leader(self) -> bool:
        """A term is open: the body of :meth:`leadership` runs as leader."""
        return self._term is not None and self._term.lost is None

    @property
    def term(self) -> Term | None:
        """The open term, while :attr:`leader`."""
        return self._term if self.leader else None

    @property
    def claimed(self) -> bool:
        """A term is open, or an acquiring command succeeded and its term is about to
        open: counted as led by whoever shares the endpoints out (:mod:`.sharing`)."""
        return self._acquiring or self.leader

    def statistics(self) -> LeaseStatistics:
        """A snapshot for metrics."""
        return LeaseStatistics(leader=self.leader, terms=self._terms)

    # -- leadership ------------------------------------------------------------------

    @asynccontextmanager
    async def leadership(
        self, *, gate: Callable[[], AbstractAsyncContextManager[bool]] | None = None
    ) -> AsyncIterator[Term]:
        """Wait until this process holds the lease, then run the block as leader.

        Usage::

            async with lease.leadership() as term:
                await autoscale(...)   # runs until cancelled
            # here the term was lost (term.lost says why): wait for the next one

        Standing by, the lease is tried every ``renew_s`` (``standby`` events). Once
        acquired (``lease_acquired``), it is renewed every ``renew_s`` in a task beside
        the block; when the term is lost (``lease_lost``) the block is cancelled and the
        ``async with`` ends normally. Leaving the block by itself ends the term too, but
        does not release the key: call :meth:`release` for a handover.

        Args:
          gate: entered around each attempt (``async with gate() as go``); when ``go``
            is ``False`` the attempt is skipped (and the gate entered again ``renew_s``
            later), so that a process leading its share of several endpoints leaves
            this one to the others. A gate that holds a lock serializes the attempts:
            when one succeeds, :attr:`claimed` is already true as the gate is left.

        Yields:
          The :class:`Term`.

        Resource handling:
          The block runs inside a nursery of this context manager: a cancellation from
          outside reaches it as usual, and the renewing task stops with it.
        """
        if self._term is not None:
            raise RuntimeError(f"{self.describe()}: a term is already open")
        try:
            term = await self._wait_for_leadership(gate)
            self._term = term
        finally:
            self._acquiring = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep, term, nursery.cancel_scope, name="lease keeper")
                yield term
                # The block ended by itself: stop renewing.
                nursery.cancel_scope.cancel()
        finally:
            self._term = None

    async def release(self) -> bool:
        """Delete the key if it holds our token (compare-and-delete), for a handover.

        Shielded from cancellation and bounded by ``timeout_s``, so it can be awaited on
        the way out of a cancelled run. Emits ``lease_released`` when it deleted the key,
        or when it could not tell after holding the lease.

        Returns:
          Whether the key was deleted.
        """
        maybe_ours, self._maybe_ours = self._maybe_ours, False
        with trio.CancelScope(shield=True):
            try:
                deleted = await self._command(self.store.release, self.key, self.token)
            except LeaseError as exc:
                if maybe_ours:
                    error = str(exc)
                    self._emit(
                        "lease_released",
                        f"could not delete the lease ({error}); it expires by itself",
                        error=error,
                        deleted=False,
                    )
                return False
        if deleted:
            self._emit(
                "lease_released",
                f"released {self.describe()}: a standby takes over at its next attempt",
                deleted=True,
            )
        return deleted

    # -- the standby's side -----------------------------------------------------------

    async def _wait_for_leadership(
        self, gate: Callable[[], AbstractAsyncContextManager[bool]] | None
    ) -> Term:
        began = trio.current_time()
        seen: tuple[str | None, bool] | Literal["held back"] | None = None
        while True:
            sent = trio.current_time()
            holder: str | None = None
            error: str | None = None
            async with nullcontext(True) if gate is None else gate() as go:
                if go:
                    try:
                        holder = await self._command(
                            self.store.acquire, self.key, self.token, self._ttl_ms
                        )
                    except LeaseError as exc:
                        error = str(exc)
                    # Claimed until the term opens (leadership() clears it then).
                    self._acquiring = holder == self.token
            if not go:
                # Said once, at the start: the attempts made now and then (and the
                # holder they see) say the rest.
                if seen is None:
                    seen = "held back"
                    self._emit(
                        "standby",
                        f"standby: leaving {self.describe()} to the other processes while "
                        f"this one leads its share; asking again every {self.renew_s:g} s",
                    )
                await trio.sleep_until(sent + self.renew_s)
                continue
            if holder == self.token:
                break
            # Report a change of holder or of reachability, not every attempt.
            if seen != (holder, error is not None):
                seen = (holder, error is not None)
                self._standby(holder, error)
            await trio.sleep_until(sent + self.renew_s)
        self._maybe_ours = True
        self._terms += 1
        term = Term(
            number=self._terms,
            acquired_at=sent,
            renewed_at=sent,
            deadline=sent + self.ttl_s - self.margin_s,
        )
        self._emit(
            "lease_acquired",
            f"leader: acquired {self.describe()} (term {term.number}, token "
            f"{self.token[:TOKEN_SHOWN]})",
            term=term.number,
            holder=self.token[:TOKEN_SHOWN],
            waited_s=trio.current_time() - began,
        )
        return term

    def _standby(self, holder: str | None, error: str | None) -> None:
        every = f"trying again every {self.renew_s:g} s"
        if error is not None:
            message = f"standby: cannot reach {self.describe()} ({error}); {every}"
        else:
            shown = "nobody" if holder is None else _shown(holder)
            message = f"standby: {self.describe()} is held by {shown}; {every}"
        self._emit("standby", message, holder=_shown(holder), error=error)

    # -- the leader's side ------------------------------------------------------------

    async def _keep(self, term: Term, body: trio.CancelScope) -> None:
        with trio.CancelScope(deadline=term.deadline) as valid:
            next_at = term.acquired_at + self.renew_s
            while True:
                await trio.sleep_until(next_at)
                sent = trio.current_time()
                next_at = sent + self.renew_s
                try:
                    holder = await self._command(
                        self.store.renew, self.key, self.token, self._ttl_ms
                    )
                except LeaseError as exc:
                    term.error = str(exc)
                    log.debug("renewing %s failed: %s", self.describe(), term.error)
                    continue
                if holder != self.token:
                    self._lose(term, body, "taken" if holder is not None else "gone", holder)
                    return
                term.renewed_at = sent
                term.deadline = valid.deadline = sent + self.ttl_s - self.margin_s
                term.error = None
        self._lose(term, body, "expired", None)

    def _lose(
        self, term: Term, body: trio.CancelScope, reason: LostReason, holder: str | None
    ) -> None:
        term.lost = reason
        self._maybe_ours = reason == "expired"  # the server may still hold our token
        if reason == "expired":
            why = (
                f"no renewal succeeded within {self.ttl_s - self.margin_s:g} s "
                f"({term.error or 'no answer'})"
            )
        elif reason == "taken":
            why = f"the key is held by {_shown(holder)}"
        else:
            why = "the key is gone from the server"
        self._emit(
            "lease_lost",
            f"lost {self.describe()} ({reason}: {why})",
            term=term.number,
            holder=_shown(holder),
            reason=reason,
            error=term.error,
            held_for_s=trio.current_time() - term.acquired_at,
        )
        body.cancel()

    # -- plumbing -----------------------------------------------------------------------

    async def _command(self, command: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
        with trio.move_on_after(self.timeout_s):
            return await command(*args)
        raise LeaseError(f"no answer within {self.timeout_s:g} s")

    def _emit(
        self,
        kind: LeaseEventKind,
        message: str,
        *,
        term: int | None = None,
        holder: str | None = None,
        reason: LostReason | None = None,
        error: str | None = None,
        held_for_s: float | None = None,
        waited_s: float | None = None,
        deleted: bool | None = None,
    ) -> None:
        log.debug("%s: %s", kind, message)
        if self._on_event is None:
            return
        event = LeaseEvent(
            kind=kind,
            at=trio.current_time(),
            message=message,
            term=self._terms if term is None else term,
            holder=holder,
            reason=reason,
            error=error,
            held_for_s=held_for_s,
            waited_s=waited_s,
            deleted=deleted,
        )
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event callback failed on a %s event", kind)


def _shown(token: str | None) -> str | None:
    return None if token is None else token[:TOKEN_SHOWN]
