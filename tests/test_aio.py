"""The trio-asyncio bridge's :class:`AsyncioClient` against a real ``redis-server``.

The lifecycle the Redis lease and the membership rely on: one client kept across calls,
thrown away (and its connection closed) after a failed or cancelled call, a new one at
the next call, everything closed when the block ends; and the demand sources' two
options, a failure that keeps the client (``keep_after``) and a check of a kept client
(``usable``). What the server sees is read with a plain synchronous client
(``CLIENT LIST``), not from the object under test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.exceptions
import trio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from nullworker.client._aio import AsyncioClient, current_asyncio_loop, open_asyncio_loop

from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    rdb_fixture,
    redis_server_binary_fixture,
    redis_server_fixture,
)

NAME = "nullworker-aio-test"
#: Bound on the server noticing a closed connection (loopback; generous for a busy machine).
WAIT_S = 10.0


def connections(db: redis.Redis) -> list[int]:
    """The ids of the connections the server has open for the client under test."""
    return [int(c["id"]) for c in db.client_list() if c.get("name") == NAME]


async def wait_connections(db: redis.Redis, count: int) -> list[int]:
    with trio.fail_after(WAIT_S):
        while len(found := connections(db)) != count:
            await trio.sleep(0.02)
    return found


async def client_id(client: redis.asyncio.Redis) -> int:
    return int(await client.client_id())


async def block(client: redis.asyncio.Redis) -> object:
    """A command that never answers by itself: BLPOP with no timeout on an empty list."""
    return await client.blpop(["nullworker:aio-test:empty"], timeout=0)


STRING_KEY = "nullworker:aio-test:string"


async def wrong_type(client: redis.asyncio.Redis) -> object:
    """LLEN of a string: the server answers WRONGTYPE, on a connection that is fine."""
    return await client.llen(STRING_KEY)


def new_client(
    url: str,
    made: list[redis.asyncio.Redis],
    *,
    closed: list[tuple[redis.asyncio.Redis, int]] | None = None,
    **options: Any,
) -> AsyncioClient[redis.asyncio.Redis]:
    """An AsyncioClient of redis.asyncio clients, each one appended to ``made``; with
    ``closed``, each close appends the client and how many had been made by then.
    ``options`` go to AsyncioClient as they are."""

    def new() -> redis.asyncio.Redis:
        client = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0), client_name=NAME
        )
        made.append(client)
        return client

    async def close(client: redis.asyncio.Redis) -> None:
        if closed is not None:
            closed.append((client, len(made)))
        await client.aclose()

    return AsyncioClient(new, close=close, what="test redis", **options)


async def test_one_client_kept_and_thrown_away_after_a_cancelled_or_failed_call(
    redis_server: ServerProcess,
    rdb: redis.Redis,
) -> None:
    made: list[redis.asyncio.Redis] = []
    aio = new_client(redis_server.url, made)
    with pytest.raises(RuntimeError, match="test redis: no asyncio loop; use `async with` first"):
        await aio.run(client_id)
    assert made == []

    async with aio:
        # Made at the first call, then kept: one connection for every call.
        first = await aio.run(client_id)
        assert await aio.run(client_id) == first
        assert len(made) == 1 and await wait_connections(rdb, 1) == [first]

        # A call cancelled from Trio throws the client away and closes its connection.
        with trio.move_on_after(0.3) as scope:
            await aio.run(block)
        assert scope.cancelled_caught
        assert await wait_connections(rdb, 0) == []
        second = await aio.run(client_id)
        assert len(made) == 2 and second != first

        # A call that fails (the server is gone) throws it away too; once the server is
        # back, the next call connects anew without anyone reopening anything.
        await redis_server.stop()
        with pytest.raises((redis.exceptions.ConnectionError, OSError)):
            await aio.run(client_id)
        assert len(made) == 2
        await redis_server.start()
        assert await aio.run(client_id) > 0
        assert len(made) == 3
        assert len(await wait_connections(rdb, 1)) == 1

    # Leaving the block closes the client, then the loop it opened.
    assert await wait_connections(rdb, 0) == []
    assert current_asyncio_loop() is None


async def test_a_loop_already_open_is_reused_and_left_open(
    redis_server: ServerProcess,
    rdb: redis.Redis,
) -> None:
    made: list[redis.asyncio.Redis] = []
    async with open_asyncio_loop() as loop:
        async with new_client(redis_server.url, made) as aio:
            await aio.run(client_id)
            assert await wait_connections(rdb, 1)
        # The client is closed, the caller's loop is not.
        assert await wait_connections(rdb, 0) == []
        assert current_asyncio_loop() is loop and not loop.is_closed()
        # A client entered again after it was closed works as a new one.
        async with new_client(redis_server.url, made) as again:
            assert await again.run(client_id) > 0
    assert len(made) == 2


async def test_a_failure_named_in_keep_after_keeps_the_client_any_other_throws_it_away(
    redis_server: ServerProcess,
    rdb: redis.Redis,
) -> None:
    rdb.set(STRING_KEY, "not a list")
    made: list[redis.asyncio.Redis] = []
    async with new_client(
        redis_server.url, made, keep_after=(redis.exceptions.ResponseError,)
    ) as aio:
        first = await aio.run(client_id)

        # The server's answer was an error: raised, and the client and its connection
        # kept for the next call.
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await aio.run(wrong_type)
        assert await aio.run(client_id) == first
        assert len(made) == 1 and await wait_connections(rdb, 1) == [first]

        # A failure not named there (the server cut the connection) still throws the
        # client away, and the next call connects anew.
        rdb.client_kill_filter(_id=str(first))
        with pytest.raises(redis.exceptions.ConnectionError):
            await aio.run(client_id)
        second = await aio.run(client_id)
        assert len(made) == 2 and second != first
        assert await wait_connections(rdb, 1) == [second]


async def test_a_kept_client_that_usable_rejects_is_closed_and_replaced_before_the_call(
    redis_server: ServerProcess,
    rdb: redis.Redis,
) -> None:
    made: list[redis.asyncio.Redis] = []
    closed: list[tuple[redis.asyncio.Redis, int]] = []
    retired: list[redis.asyncio.Redis] = []
    checked: list[redis.asyncio.Redis] = []

    def usable(client: redis.asyncio.Redis) -> bool:
        asyncio.get_running_loop()  # raises outside asyncio: the check runs on the loop
        checked.append(client)
        return client not in retired

    aio = new_client(redis_server.url, made, usable=usable, closed=closed)
    assert not aio.is_open and aio.loop is None
    async with aio:
        assert aio.is_open and aio.loop is current_asyncio_loop() is not None
        first = await aio.run(client_id)
        assert checked == []  # nothing held yet: nothing to check
        assert await aio.run(client_id) == first
        assert checked == [made[0]] and closed == []

        # Rejected: closed on the loop before a new client is made, and the call
        # succeeds on the new one (no failed call for it).
        retired.append(made[0])
        second = await aio.run(client_id)
        assert second != first and len(made) == 2
        assert closed == [(made[0], 1)]
        assert await wait_connections(rdb, 1) == [second]
        assert await aio.run(client_id) == second
    assert not aio.is_open
    assert closed == [(made[0], 1), (made[1], 2)]
    assert await wait_connections(rdb, 0) == []
