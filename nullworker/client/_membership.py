"""How many processes of a group are alive: :class:`Membership`, for :mod:`.sharing`.

Processes that run the same leased endpoints share them out (:mod:`.sharing`); to know
its share, each needs the number of processes alive. Each process keeps an entry in a
sorted set on the leases' Redis server, scored by its expiry on the *server's* clock;
:func:`members_key` names the set after the group's lease keys.

Concurrency invariants
----------------------
* :meth:`Membership.refresh` is bounded by ``timeout_s`` and never raises for a failed
  command: it answers the last count known and says why in ``error``.
* :meth:`Membership.leave` is shielded and bounded, so it runs on the way out of a
  cancelled run; a process that dies without it is counted until its entry expires.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

import trio

from .._support import finite
from ..errors import ConfigError, LeaseError
from ._lease import DEFAULT_RENEW_S, DEFAULT_TTL_S, TOKEN_SHOWN, Lease, Store, StoreSession
from ._redis_lease import RedisLeaseStore

__all__ = ["MEMBERS_PREFIX", "MemberStore", "Membership", "members_key"]

#: The lease's logger (the public module's name): the membership is part of it.
log = logging.getLogger("nullworker.client.lease")

#: The prefix of :func:`members_key`'s keys.
MEMBERS_PREFIX = "nullworker:members:"


class MemberStore(Store, Protocol):
    """Where a :class:`Membership` lives (:class:`RedisLeaseStore`)."""

    async def join(self, key: str, member: str, ttl_ms: int) -> int:
        """Add or refresh ``member`` for ``ttl_ms``, drop the expired; the live count."""
        ...

    async def leave(self, key: str, member: str) -> bool:
        """Remove ``member``; whether it was there."""
        ...


class Membership(StoreSession[MemberStore]):
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
