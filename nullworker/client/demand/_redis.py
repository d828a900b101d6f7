"""Redis sources: a list (plus its processing list) and a stream's consumer group."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio
import redis.exceptions
import trio

from ...errors import DemandError, DemandNotFound
from .._aio import AsyncioLoop, run_aio
from .._redact import reason, redact
from .._redis_client import new_redis_client
from ._asyncio import AsyncioSource
from ._base import DEFAULT_TIMEOUT_S

log = logging.getLogger("nullworker.demand")

#: RedisStream without a usable ``lag``: entries fetched per XRANGE while counting ...
STREAM_SCAN_BATCH = 1000
#: ... and the count at which it stops (the demand then reads as this number).
STREAM_SCAN_LIMIT = 10_000
#: The server setting that keyspace notifications need, and the flag of all classes.
_NOTIFY_SETTING = "notify-keyspace-events"
_NOTIFY_ALL = "A"
#: How long one wait for a notification lasts before the subscription's health check
#: (a PING every :data:`_HEALTH_CHECK_S` of silence) gets its turn.
_NOTIFY_WAIT_S = 5.0
_HEALTH_CHECK_S = 30.0


def notify_flags_missing(setting: str, event_class: str) -> str:
    """The flags ``notify-keyspace-events`` lacks for keyspace events of ``event_class``
    (``l`` lists, ``t`` streams): ``""`` when they are on."""
    missing = "" if "K" in setting else "K"
    if event_class not in setting and _NOTIFY_ALL not in setting:
        missing += event_class
    return missing


class RedisSource(AsyncioSource[redis.asyncio.Redis]):
    _scheme_names = ("redis", "rediss", "unix")
    _socket_schemes = ("unix",)
    _numeric_path = True
    _wrapped_errors = (redis.exceptions.RedisError, OSError, TimeoutError)
    _timeout_errors = (TimeoutError, redis.exceptions.TimeoutError)
    #: The keyspace event class of the watched keys' commands (``l`` lists, ``t`` streams).
    _event_class = ""

    def __init__(
        self, url: str, *, timeout_s: float, configure_notifications: bool = False
    ) -> None:
        super().__init__(url, timeout_s=timeout_s)
        self.configure_notifications = bool(configure_notifications)
        self._notify_off_logged = False

    def _watched_keys(self) -> list[str]:
        raise NotImplementedError

    def can_push(self) -> bool:
        # The job frameworks (RedisQueue) spread a queue over several keys: polled only.
        return bool(self._event_class)

    async def _aio_subscribe(
        self, changed: Callable[[], None], lost: Callable[[], None]
    ) -> tuple[redis.asyncio.Redis, Any] | None:
        # No retry: a lost connection must end the subscription (and be noticed), not
        # be quietly reopened.
        client = new_redis_client(
            self.url,
            timeout_s=self.timeout_s,
            name="nullworker-watch",
            retries=0,
            socket_keepalive=True,
            health_check_interval=_HEALTH_CHECK_S,
        )
        try:
            if not await self._aio_notifications_on(client):
                await client.aclose()
                return None
            db = int(client.connection_pool.connection_kwargs.get("db") or 0)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(*(f"__keyspace@{db}__:{key}" for key in self._watched_keys()))
        except BaseException:
            await client.aclose()
            raise
        return client, pubsub

    async def _aio_notifications_on(self, client: redis.asyncio.Redis) -> bool:
        """Whether the server sends the keyspace events we need; turns them on if asked."""
        try:
            answer = await client.config_get(_NOTIFY_SETTING)
        except redis.exceptions.ResponseError as exc:
            # A managed Redis may refuse CONFIG; its notifications may still be on.
            if not self._notify_off_logged:
                self._notify_off_logged = True
                log.warning(
                    "%s: cannot check %s (%s); subscribing anyway",
                    self.describe(),
                    _NOTIFY_SETTING,
                    reason(exc),
                )
            return True
        setting = str(answer.get(_NOTIFY_SETTING, ""))
        missing = notify_flags_missing(setting, self._event_class)
        if not missing:
            return True
        if self.configure_notifications:
            await client.config_set(_NOTIFY_SETTING, setting + missing)
            log.warning(
                "%s: set %s to %r (was %r), as --redis-configure-notifications asks",
                self.describe(),
                _NOTIFY_SETTING,
                setting + missing,
                setting,
            )
            return True
        if not self._notify_off_logged:
            self._notify_off_logged = True
            log.warning(
                "%s: keyspace notifications are off (%s is %r), so changes are seen at "
                "the next poll only; to be woken at once, turn on the %r flags: "
                "`CONFIG SET %s %s` (and `%s %s` in redis.conf), or run with "
                "--redis-configure-notifications",
                self.describe(),
                _NOTIFY_SETTING,
                setting,
                missing,
                _NOTIFY_SETTING,
                setting + missing,
                _NOTIFY_SETTING,
                setting + missing,
            )
        return False

    async def _follow(
        self, handle: Any, changed: Callable[[], None], lost: trio.Event, loop: AsyncioLoop
    ) -> None:
        await run_aio(self._aio_pump, handle[1], changed, loop=loop)

    async def _aio_pump(self, pubsub: Any, changed: Callable[[], None]) -> None:
        while True:
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=_NOTIFY_WAIT_S
            )
            if message is not None:
                changed()

    async def _aio_unsubscribe(self, handle: Any) -> None:
        client, pubsub = handle
        try:
            await pubsub.aclose()
        finally:
            await client.aclose()

    def _new_client(self) -> redis.asyncio.Redis:
        # One immediate retry: the pooled connection may predate a server restart
        # (the retry reconnects); more would only spend the read's time budget.
        return new_redis_client(
            self.url, timeout_s=self.timeout_s, name="nullworker-demand", retries=1
        )

    async def _aio_close(self, client: redis.asyncio.Redis) -> None:
        await client.aclose()

    def _answer_error(self, exc: redis.exceptions.ResponseError) -> DemandError:
        return DemandError(f"{self.describe()}: the server answered {reason(exc)}")


class RedisList(RedisSource):
    """The length of a Redis list, plus that of its "processing" list when given.

    The usual Redis work queue: producers ``LPUSH`` jobs onto ``key``, consumers
    ``BLMOVE`` them onto ``processing`` while they work and ``LREM`` them when done.
    Demand is ``LLEN key + LLEN processing``, read in one round trip (a pipeline). A
    missing key is an empty list (0), as in Redis.

    Args:
      url: ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``, ``unix://``).
      key: the list of waiting jobs.
      processing: the list of jobs being worked on, if any.
      timeout_s: bound on one read.
      configure_notifications: turn the server's keyspace notifications for lists on
        (``CONFIG SET notify-keyspace-events``) if they are off. Off by default: the
        server is yours, and without them the source only polls.

    Push: :meth:`watch` subscribes to the keys' keyspace notifications
    (``__keyspace@DB__:KEY``), which the server sends only with ``K`` and ``l`` (or
    ``A``) in ``notify-keyspace-events``. When they are off, one warning says how to turn
    them on, and the source polls only.
    """

    _event_class = "l"

    def __init__(
        self,
        url: str,
        key: str,
        processing: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        configure_notifications: bool = False,
    ) -> None:
        if not key or processing == "":
            raise ValueError("RedisList needs a key (and a non-empty processing key if any)")
        super().__init__(url, timeout_s=timeout_s, configure_notifications=configure_notifications)
        self.key = key
        self.processing = processing

    def _watched_keys(self) -> list[str]:
        return [self.key] if self.processing is None else [self.key, self.processing]

    def describe(self) -> str:
        keys = repr(self.key) if self.processing is None else f"{self.key!r} + {self.processing!r}"
        return f"redis list {keys} at {redact(self.url)}"

    async def _aio_query(self, client: redis.asyncio.Redis) -> int:
        keys = [self.key] if self.processing is None else [self.key, self.processing]
        try:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                lengths: list[Any] = await pipe.execute()
        except redis.exceptions.ResponseError as exc:
            # WRONGTYPE and the like: the server answered, the connection is fine.
            raise self._answer_error(exc) from exc
        return sum(int(length) for length in lengths)


class RedisStream(RedisSource):
    """Entries of a Redis stream that a consumer group has not finished with.

    Demand is the group's ``lag`` (entries not yet delivered to any consumer of the
    group) plus its ``pending`` (delivered, not yet acknowledged), both from one
    ``XINFO GROUPS``.

    Redis reports ``lag`` as null when it cannot compute it: the group was created at
    (or moved to) an arbitrary ID, or entries after the group's last-delivered-id were
    deleted (``XDEL``); Redis before 7.0 has no ``lag`` at all. The source then counts
    the entries after last-delivered-id itself with ``XRANGE`` (Redis 6.2+), in batches
    of :data:`STREAM_SCAN_BATCH`, and stops at ``scan_limit``: past that, the lag reads
    as ``scan_limit`` (set it above the most reservations you would ever hold). Such a
    read costs a few more round trips and transfers the entries' fields.

    Args:
      url: ``redis://…`` as for :class:`RedisList`.
      stream: the stream's key.
      group: the consumer group.
      timeout_s: bound on one read.
      scan_limit: the cap on counting entries when ``lag`` is unknown.
      configure_notifications: as for :class:`RedisList` (the ``t`` flag here).

    A missing stream or group raises :class:`DemandNotFound`.

    Push: as for :class:`RedisList`, on the stream's key, with ``K`` and ``t`` (or ``A``)
    in ``notify-keyspace-events``. ``XADD`` wakes the reader; acknowledgements send no
    keyspace event and are seen at the next poll.

    :meth:`oldest_age` is the age of the oldest entry not yet delivered to the group
    (the first after its last-delivered-id): the millisecond time of its ID, against the
    Redis server's own clock (``TIME``), so the clocks of this host and of the producers
    do not matter, but the IDs must be the server's (``XADD key * ...``). Entries
    delivered and pending are being worked on, and do not count as waiting.
    """

    _event_class = "t"

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        scan_limit: int = STREAM_SCAN_LIMIT,
        configure_notifications: bool = False,
    ) -> None:
        if not stream or not group:
            raise ValueError("RedisStream needs a stream and a group")
        if isinstance(scan_limit, bool) or not isinstance(scan_limit, int) or scan_limit < 1:
            raise ValueError(f"scan_limit must be an int >= 1, not {scan_limit!r}")
        super().__init__(url, timeout_s=timeout_s, configure_notifications=configure_notifications)
        self.stream = stream
        self.group = group
        self.scan_limit = scan_limit

    def _watched_keys(self) -> list[str]:
        return [self.stream]

    def describe(self) -> str:
        return f"redis stream {self.stream!r} group {self.group!r} at {redact(self.url)}"

    async def _aio_query(self, client: redis.asyncio.Redis) -> int:
        try:
            groups = await client.xinfo_groups(self.stream)
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                raise DemandNotFound(
                    f"{self.describe()}: the stream {self.stream!r} does not exist"
                ) from exc
            raise self._answer_error(exc) from exc
        for info in groups:
            if info.get("name") == self.group:
                break
        else:
            raise DemandNotFound(
                f"{self.describe()}: the stream has no consumer group {self.group!r}"
            )
        pending = int(info["pending"])
        lag = info.get("lag")
        if lag is None:
            lag = await self._aio_count_after(client, str(info["last-delivered-id"]))
        return int(lag) + pending

    async def _aio_oldest_age(self, client: redis.asyncio.Redis) -> float | None:
        try:
            groups = await client.xinfo_groups(self.stream)
        except redis.exceptions.ResponseError as exc:
            raise self._answer_error(exc) from exc
        last_id = next(
            (str(info["last-delivered-id"]) for info in groups if info.get("name") == self.group),
            None,
        )
        if last_id is None:
            return None
        try:
            first = await client.xrange(self.stream, min=f"({last_id}", max="+", count=1)
            seconds, micros = await client.time()
        except redis.exceptions.ResponseError as exc:
            raise self._answer_error(exc) from exc
        if not first:
            return None
        entry_id = first[0][0]
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        added_ms = int(entry_id.partition("-")[0])
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return max(0, now_ms - added_ms) / 1000.0

    async def _aio_count_after(self, client: redis.asyncio.Redis, last_id: str) -> int:
        count = 0
        start = f"({last_id}"  # exclusive range start (Redis 6.2+)
        while count < self.scan_limit:
            want = min(STREAM_SCAN_BATCH, self.scan_limit - count)
            try:
                batch = await client.xrange(self.stream, min=start, max="+", count=want) or []
            except redis.exceptions.ResponseError as exc:
                raise self._answer_error(exc) from exc
            count += len(batch)
            if len(batch) < want:
                break
            last = batch[-1][0]
            start = f"({last.decode() if isinstance(last, bytes) else last}"
        return count
