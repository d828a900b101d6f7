"""The lease's store on a Redis server: :class:`RedisLeaseStore` and :class:`RedisLease`.

The commands of the protocol in :mod:`._lease` (acquire, renew, release), and the
membership's (join, leave, for :mod:`._membership`), each one Lua script run atomically
by the server, so that no other client's command comes between its read and its write.

Concurrency invariants
----------------------
* Redis is reached through ``redis.asyncio`` on the trio-asyncio loop, held by one
  :class:`~._aio.AsyncioClient`: a command that fails for any reason throws the client
  away, and the next one connects anew. ``trio.Cancelled`` is never caught.
* Every script is idempotent for its token: the client retries a command once at
  once, since its pooled connection may predate a server restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import redis.asyncio
import redis.exceptions

from ..errors import ConfigError, LeaseError
from ._aio import AsyncioClient
from ._lease import DEFAULT_RENEW_S, DEFAULT_TTL_S, Lease, LeaseEvent
from ._redact import reason, redact
from ._redis_client import new_redis_client
from ._urls import check_url

__all__ = ["RedisLease", "RedisLeaseStore"]

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
        self._client = AsyncioClient(
            self._new_client, close=redis.asyncio.Redis.aclose, what=redact(url)
        )

    def describe(self) -> str:
        return redact(self.url)

    async def open(self) -> None:
        await self._client.open()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
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

    async def _call(self, script: str, key: str, *args: str) -> object:
        try:
            return await self._client.run(_eval, script, key, args)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise LeaseError(reason(exc)) from exc

    def _new_client(self) -> redis.asyncio.Redis:
        # One immediate retry: the pooled connection may predate a server restart.
        # Every script is idempotent for its token.
        return new_redis_client(
            self.url, timeout_s=self.timeout_s, name="nullworker-lease", retries=1
        )


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


async def _eval(
    client: redis.asyncio.Redis, script: str, key: str, args: tuple[str, ...]
) -> object:
    result: object = await client.eval(script, 1, key, *args)
    return result


def _holder(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise LeaseError(f"unexpected answer from the lease script: {value!r}")
