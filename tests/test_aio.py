"""The trio-asyncio bridge's :class:`AsyncioClient` against a real ``redis-server``.

The lifecycle the Redis lease and the membership rely on: one client kept across calls,
thrown away (and its connection closed) after a failed or cancelled call, a new one at
the next call, everything closed when the block ends. What the server sees is read with
a plain synchronous client (``CLIENT LIST``), not from the object under test.
"""

from __future__ import annotations

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
    redis_server_binary_fixture,
    redis_server_fixture,
)
from .test_sharing import rdb  # noqa: F401  (a pytest fixture, used by name)

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


def new_client(url: str, made: list[redis.asyncio.Redis]) -> AsyncioClient[redis.asyncio.Redis]:
    def new() -> redis.asyncio.Redis:
        client = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0), client_name=NAME
        )
        made.append(client)
        return client

    return AsyncioClient(new, close=redis.asyncio.Redis.aclose, what="test redis")


async def test_one_client_kept_and_thrown_away_after_a_cancelled_or_failed_call(
    redis_server: ServerProcess,
    rdb: redis.Redis,  # noqa: F811
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
    rdb: redis.Redis,  # noqa: F811
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
