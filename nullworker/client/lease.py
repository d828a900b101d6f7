"""A Redis lease: one leader among several ``nullworker autoscale`` processes.

Several autoscalers may run for one endpoint; only the holder of the lease holds
reservations, and the others stand by::

    async with RedisLease("redis://queue:6379/0", "autoscale:my-endpoint") as lease:
        try:
            while True:
                async with lease.leadership():  # waits until this process holds the lease
                    await autoscale(...)         # cancelled as soon as the lease is lost
        finally:
            await lease.release()                # shielded: a standby takes over at once

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
* Redis is reached through ``redis.asyncio`` on the trio-asyncio loop
  (:mod:`._aio`); a command that fails for any reason throws the client away, and the
  next one connects anew. ``trio.Cancelled`` is never caught.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, nullcontext
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, Self, TypeVar, TypeVarTuple

import redis.asyncio
import redis.exceptions
import trio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._support import finite
from ..errors import ConfigError, LeaseError
from ._aio import AsyncioLoop, current_asyncio_loop, open_asyncio_loop, run_aio
from ._redact import reason, redact
from ._urls import check_url

__all__ = [
    "DEFAULT_RENEW_S",
    "DEFAULT_TTL_S",
    "Lease",
    "LeaseError",
    "LeaseEvent",
    "LeaseEventKind",
    "LeaseStatistics",
    "LeaseStore",
    "LostReason",
    "MemberStore",
    "Membership",
    "RedisLease",
    "RedisLeaseStore",
    "Term",
    "members_key",
]

log = logging.getLogger(__name__)

#: How long the key lives after each acquisition or renewal.
DEFAULT_TTL_S = 10.0
#: Seconds between renewals by the leader, and between attempts to acquire by a standby.
DEFAULT_RENEW_S = 3.0
#: Characters of a token shown in events (enough to tell processes apart).
TOKEN_SHOWN = 8
#: Bound on closing a Redis client that is being thrown away (shielded).
CLOSE_TIMEOUT_S = 1.0
#: The prefix of :func:`members_key`'s keys.
MEMBERS_PREFIX = "nullworker:members:"

#: SET NX PX; when the key already holds our token, extend it. Answers the holder.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return ARGV[1]
end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return holder
"""
#: Compare-and-extend. Answers the holder (nil when the key is gone).
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return holder
"""
#: Compare-and-delete. Answers 1 when deleted.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
#: Membership: (re)add ARGV[1] expiring ARGV[2] ms from the server's clock, drop the
#: members that expired, answer how many are left. The server's clock only: the
#: processes' clocks never meet.
_JOIN = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"""
#: Leave: remove ARGV[1]. Answers 1 when it was there.
_LEAVE = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

LostReason = Literal["expired", "taken", "gone"]
LeaseEventKind = Literal["standby", "lease_acquired", "lease_lost", "lease_released"]


class LeaseStore(Protocol):
    """Where the lease lives: the three atomic commands, each answering at once.

    :class:`RedisLeaseStore` is the real one; tests pass one in memory. A failure raises
    :class:`LeaseError`; :class:`Lease` bounds each call's time itself.
    """

    def describe(self) -> str:
        """Where the store is, for messages: never includes a password."""
        ...

    async def open(self) -> None:
        """Get ready for commands, without I/O (:class:`RedisLeaseStore` opens the
        trio-asyncio loop). Called by ``async with lease``."""
        ...

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

    async def aclose(self) -> None:
        """Release the store's connections."""
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


class Lease:
    """Leadership among several processes, held through a :class:`LeaseStore`.

    Args:
      store: where the key lives (:class:`RedisLeaseStore`).
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

    async def __aenter__(self) -> Self:
        await self.store.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.store.aclose()

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


class RedisLeaseStore:
    """The lease's key on a Redis server, through ``redis.asyncio`` on trio-asyncio.

    Enter it (``async with``, or through its :class:`Lease`) before the first command:
    that opens, or reuses, the trio-asyncio loop. The client is made by the first
    command, and thrown away after any failure.

    Args:
      url: ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``, ``unix://``).
      timeout_s: the client's socket timeouts, if any (a :class:`Lease` bounds each
        command itself, and :class:`RedisLease` sets these to its bound).
    """

    _schemes = ("redis", "rediss", "unix")

    def __init__(self, url: str, *, timeout_s: float | None = None) -> None:
        try:
            check_url(url, schemes=self._schemes, socket_schemes=("unix",), numeric_path=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.url = url
        self.timeout_s = timeout_s
        self._client: redis.asyncio.Redis | None = None
        self._loop: AsyncioLoop | None = None
        self._stack = AsyncExitStack()

    def describe(self) -> str:
        return redact(self.url)

    async def open(self) -> None:
        if self._loop is None:
            self._loop = await self._stack.enter_async_context(open_asyncio_loop())

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def acquire(self, key: str, token: str, ttl_ms: int) -> str | None:
        return _holder(await self._call(_ACQUIRE, key, token, str(ttl_ms)))

    async def renew(self, key: str, token: str, ttl_ms: int) -> str | None:
        return _holder(await self._call(_RENEW, key, token, str(ttl_ms)))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._call(_RELEASE, key, token))

    async def join(self, key: str, member: str, ttl_ms: int) -> int:
        """Add or refresh ``member`` of the set ``key`` for ``ttl_ms``; the live count."""
        count = await self._call(_JOIN, key, member, str(ttl_ms))
        if not isinstance(count, int) or isinstance(count, bool):
            raise LeaseError(f"unexpected answer from the membership script: {count!r}")
        return count

    async def leave(self, key: str, member: str) -> bool:
        """Remove ``member`` from the set ``key``; whether it was there."""
        return bool(await self._call(_LEAVE, key, member))

    async def aclose(self) -> None:
        try:
            await self._drop_client()
        finally:
            self._loop = None
            await self._stack.aclose()

    async def _call(self, script: str, key: str, *args: str) -> object:
        loop = self._current_loop()
        if loop is None:
            raise RuntimeError(f"{self.describe()}: no asyncio loop; use `async with` first")
        try:
            return await run_aio(self._aio_eval, script, key, args, loop=loop)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            await self._drop_client()
            raise LeaseError(reason(exc)) from exc
        except BaseException:
            await self._drop_client()
            raise

    async def _aio_eval(self, script: str, key: str, args: tuple[str, ...]) -> object:
        if self._client is None:
            self._client = redis.asyncio.Redis.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                # One immediate retry: the pooled connection may predate a server restart.
                # Every script is idempotent for its token.
                retry=Retry(NoBackoff(), 1),
                client_name="nullworker-lease",
            )
        result: object = await self._client.eval(script, 1, key, *args)
        return result

    def _current_loop(self) -> AsyncioLoop | None:
        if self._loop is not None and not self._loop.is_closed():
            return self._loop
        return current_asyncio_loop()

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        loop = self._current_loop()
        if client is None or loop is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await run_aio(client.aclose, loop=loop)
            except Exception as exc:
                log.debug("%s: closing the client failed: %s", self.describe(), reason(exc))


class RedisLease(Lease):
    """A :class:`Lease` on a Redis server: ``RedisLease(url, key, ttl_s=10, renew_s=3)``.

    ``async with`` it to open (or reuse) the trio-asyncio loop and close the client at
    the end. The other arguments are :class:`Lease`'s.

    Raises:
      ConfigError: (a ``ValueError``) a URL that is not ``redis://``, ``rediss://`` or
        ``unix://``, or an invalid argument.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        renew_s: float = DEFAULT_RENEW_S,
        timeout_s: float | None = None,
        token: str | None = None,
        on_event: Callable[[LeaseEvent], None] | None = None,
    ) -> None:
        store = RedisLeaseStore(url)
        super().__init__(
            store,
            key,
            ttl_s=ttl_s,
            renew_s=renew_s,
            timeout_s=timeout_s,
            token=token,
            on_event=on_event,
        )
        store.timeout_s = self.timeout_s


class MemberStore(Protocol):
    """Where a :class:`Membership` lives (:class:`RedisLeaseStore`)."""

    def describe(self) -> str:
        """Where the store is, for messages: never includes a password."""
        ...

    async def open(self) -> None:
        """Get ready for commands (``async with membership``)."""
        ...

    async def aclose(self) -> None:
        """Release the store's connections."""
        ...

    async def join(self, key: str, member: str, ttl_ms: int) -> int:
        """Add or refresh ``member`` for ``ttl_ms``, drop the expired; the live count."""
        ...

    async def leave(self, key: str, member: str) -> bool:
        """Remove ``member``; whether it was there."""
        ...


class Membership:
    """How many processes of one group are alive: a Redis sorted set scored by expiry.

    Each process adds itself (``member``, its lease token) every ``renew_s`` with an
    expiry ``ttl_s - renew_s`` ahead on the *server's* clock, and the same script drops
    the members that expired and answers the count. A process killed without a word
    is counted until its entry expires: ``ttl_s - renew_s`` after its last refresh,
    which is before the leases it held expire (``ttl_s``), so the others count one
    less by the time those leases are free. :meth:`leave` removes the entry at once.

    Args:
      store: the server (entered by the caller: :class:`RedisLeaseStore`).
      key: the sorted set's key; every process of the group uses the same.
      member: this process (its lease token).
      ttl_s, renew_s: the group's lease settings; ``ttl_s > 2 * renew_s``.
      timeout_s: bound on each command; default ``renew_s / 2``.

    Raises:
      ConfigError: (a ``ValueError``) an invalid argument.
    """

    def __init__(
        self,
        store: MemberStore,
        key: str,
        *,
        member: str,
        ttl_s: float = DEFAULT_TTL_S,
        renew_s: float = DEFAULT_RENEW_S,
        timeout_s: float | None = None,
    ) -> None:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"the membership needs a key, got {key!r}")
        if not isinstance(member, str) or not member:
            raise ConfigError(f"member must be a non-empty string, got {member!r}")
        if not (finite(renew_s) and renew_s > 0 and finite(ttl_s) and ttl_s > 2 * renew_s):
            raise ConfigError(
                f"ttl_s ({ttl_s!r}) must exceed 2 * renew_s ({renew_s!r}), both finite and > 0"
            )
        self.store = store
        self.key = key
        self.member = member
        self.ttl_s = float(ttl_s)
        self.renew_s = float(renew_s)
        self.timeout_s = self.renew_s / 2 if timeout_s is None else float(timeout_s)
        #: The live count at the last refresh that succeeded (this process alone before).
        self.members = 1
        #: Why the last refresh failed; ``None`` after one succeeded.
        self.error: str | None = None
        self._ttl_ms = max(1, round((self.ttl_s - self.renew_s) * 1000))

    @classmethod
    def beside(cls, leases: Sequence[Lease]) -> Membership | None:
        """The membership of the processes that run these leases, on their Redis server,
        under :func:`members_key` of their keys, with the first lease's token, the longest
        TTL and the shortest renewal. ``None`` unless every lease is on one Redis server
        (the same URL)."""
        stores = [lease.store for lease in leases]
        if not stores or not all(isinstance(store, RedisLeaseStore) for store in stores):
            return None
        urls = {store.url for store in stores if isinstance(store, RedisLeaseStore)}
        if len(urls) != 1:
            return None
        return cls(
            RedisLeaseStore(urls.pop(), timeout_s=min(lease.timeout_s for lease in leases)),
            members_key(lease.key for lease in leases),
            member=leases[0].token,
            ttl_s=max(lease.ttl_s for lease in leases),
            renew_s=min(lease.renew_s for lease in leases),
            timeout_s=min(lease.timeout_s for lease in leases),
        )

    def __repr__(self) -> str:
        return f"<Membership {self.describe()} member={self.member[:TOKEN_SHOWN]}>"

    async def __aenter__(self) -> Self:
        await self.store.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.store.aclose()

    def describe(self) -> str:
        """The key and the store, for messages (no password)."""
        return f"members {self.key!r} at {self.store.describe()}"

    async def refresh(self) -> int:
        """Refresh this process's entry; the live count (the last one known on failure,
        with :attr:`error` set). Bounded by ``timeout_s``."""
        try:
            with trio.move_on_after(self.timeout_s):
                self.members = max(1, await self.store.join(self.key, self.member, self._ttl_ms))
                self.error = None
                return self.members
            raise LeaseError(f"no answer within {self.timeout_s:g} s")
        except LeaseError as exc:
            self.error = str(exc)
            log.debug("refreshing %s failed: %s", self.describe(), self.error)
            return self.members

    async def leave(self) -> None:
        """Remove this process's entry. Shielded and bounded by ``timeout_s``; a failure
        is logged (the entry expires by itself)."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.timeout_s):
            try:
                await self.store.leave(self.key, self.member)
            except LeaseError as exc:
                log.debug("leaving %s failed: %s", self.describe(), exc)


def members_key(lease_keys: Iterable[str]) -> str:
    """The membership key of the processes that run these leases: the same for every
    process with the same set of lease keys, whatever their order, and another one for
    another set (so two groups on one Redis server never count each other)."""
    digest = hashlib.sha256("\n".join(sorted(set(lease_keys))).encode()).hexdigest()
    return MEMBERS_PREFIX + digest[:16]


def _holder(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise LeaseError(f"unexpected answer from the lease script: {value!r}")


def _shown(token: str | None) -> str | None:
    return None if token is None else token[:TOKEN_SHOWN]
