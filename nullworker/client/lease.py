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

This module is where the lease's public names are imported from; each concern lives in
a module of its own:

* :mod:`._lease` -- :class:`Lease`, the term logic over a :class:`LeaseStore`: the
  protocol, the local deadline and the concurrency invariants are argued there;
  :class:`LeaseEvent`, :class:`LeaseStatistics`, :class:`Term`;
* :mod:`._redis_lease` -- :class:`RedisLeaseStore`, the protocol's commands as Lua
  scripts on a Redis server, and :class:`RedisLease`, a :class:`Lease` on one;
* :mod:`._membership` -- :class:`Membership`, how many processes of a group are alive,
  which :mod:`.sharing` shares the endpoints out by.

Importing this module needs the ``autoscale`` extra (redis, trio-asyncio).
"""

from __future__ import annotations

from .._support import public_module
from ..errors import LeaseError
from ._aio import CLOSE_TIMEOUT_S
from ._lease import (
    DEFAULT_RENEW_S,
    DEFAULT_TTL_S,
    TOKEN_SHOWN,
    Lease,
    LeaseEvent,
    LeaseEventKind,
    LeaseStatistics,
    LeaseStore,
    LostReason,
    Term,
)
from ._membership import MEMBERS_PREFIX, Membership, MemberStore, members_key
from ._redis_lease import RedisLease, RedisLeaseStore

__all__ = [
    "CLOSE_TIMEOUT_S",
    "DEFAULT_RENEW_S",
    "DEFAULT_TTL_S",
    "MEMBERS_PREFIX",
    "TOKEN_SHOWN",
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

public_module(__name__, [Lease, LeaseEvent, LeaseStatistics, LeaseStore, Term])
public_module(__name__, [MemberStore, Membership, RedisLease, RedisLeaseStore, members_key])
