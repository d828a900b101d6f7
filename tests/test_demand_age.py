"""``oldest_age()`` of the demand sources, for the autoscaler's age boost, against real servers.

Redis (``tests/servers.py``), RabbitMQ and PostgreSQL (``tests/servers_cloud.py``) run
as real processes on loopback. The jobs are written with the servers' own clients and
carry a known age: a Redis stream entry ID set 90 s in the server's past, a RabbitMQ
message whose ``timestamp`` property is 100 s old, a PostgreSQL row created 100 s ago.
An age is checked within the time the test itself may take (``WAIT_S``), never to a
wall-clock bound a busy machine can miss. An unknown age is ``None``, never an error.
"""

from __future__ import annotations

import itertools
import time

import pytest
import redis
import trio

from nullworker.client.demand import (
    CombinedDemand,
    DemandSource,
    PostgresQuery,
    RabbitMQQueue,
    RedisList,
    RedisStream,
)

from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    rdb_fixture,
    redis_server_binary_fixture,
    redis_server_fixture,
)
from .servers_cloud import (  # noqa: F401  (pytest fixtures, used by name)
    PostgresServer,
    RabbitNode,
    postgres_server_fixture,
    rabbitmq_node_fixture,
)

#: Bound on anything a test waits for, and the slack allowed on an age.
WAIT_S = 15.0

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}_age_{next(_names)}_{int(time.time() * 1000) % 1_000_000}"


async def age_within(source: DemandSource) -> float | None:
    with trio.fail_after(WAIT_S):
        return await source.oldest_age()


def about(age: float | None, expected: float) -> bool:
    """``age`` is ``expected`` seconds plus however long the test took since."""
    return age is not None and expected - 1.0 <= age <= expected + WAIT_S


# -- Redis streams -------------------------------------------------------------------------


async def test_redis_stream_age_is_the_oldest_undelivered_entry(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    seconds, micros = rdb.time()
    now_ms = seconds * 1000 + micros // 1000
    rdb.xadd("jobs", {"job": "old"}, id=f"{now_ms - 90_000}-0")
    rdb.xadd("jobs", {"job": "newer"}, id=f"{now_ms - 30_000}-0")
    rdb.xgroup_create("jobs", "workers", id="0")
    async with RedisStream(redis_server.url, "jobs", "workers") as source:
        assert about(await age_within(source), 90.0)
        # Delivered (pending) is being worked on: the oldest waiting is the next one.
        rdb.xreadgroup("workers", "c1", {"jobs": ">"}, count=1)
        assert about(await age_within(source), 30.0)
        rdb.xreadgroup("workers", "c1", {"jobs": ">"}, count=1)
        assert await age_within(source) is None  # none waits
        assert await source.read() == 2  # the demand still counts the pending two
    async with RedisStream(redis_server.url, "jobs", "nobody") as source:
        assert await age_within(source) is None
    async with RedisStream(redis_server.url, "no-such-stream", "workers") as source:
        assert await age_within(source) is None


async def test_redis_stream_age_follows_a_group_created_at_an_id(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    seconds, _ = rdb.time()
    ids = [rdb.xadd("moved", {"n": n}, id=f"{(seconds - 100 + n * 10) * 1000}-0") for n in range(3)]
    rdb.xgroup_create("moved", "workers", id=ids[0])  # lag unknown; ids[1:] undelivered
    async with RedisStream(redis_server.url, "moved", "workers") as source:
        assert about(await age_within(source), 90.0)


async def test_redis_age_of_sources_that_cannot_tell_and_of_a_combination(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    seconds, _ = rdb.time()
    rdb.xadd("mixed", {"job": "x"}, id=f"{(seconds - 50) * 1000}-0")
    rdb.xgroup_create("mixed", "workers", id="0")
    rdb.lpush("plain", "a", "b")
    stream = RedisStream(redis_server.url, "mixed", "workers")
    plain = RedisList(redis_server.url, "plain")
    async with CombinedDemand([plain, stream]) as both:
        assert await age_within(plain) is None  # a list cannot tell
        assert about(await age_within(both), 50.0)  # the oldest known of the parts
        assert await both.read() == 3


async def test_redis_age_read_of_a_stopped_server_is_unknown(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    rdb.xadd("down", {"job": "x"})
    rdb.xgroup_create("down", "workers", id="0")
    async with RedisStream(redis_server.url, "down", "workers", timeout_s=2.0) as source:
        assert await age_within(source) is not None
        await redis_server.stop()
        assert await age_within(source) is None
        await redis_server.start()


# -- RabbitMQ ------------------------------------------------------------------------------


async def test_rabbitmq_age_is_the_head_message_timestamp(rabbitmq_node: RabbitNode) -> None:
    queue = unique("stamped")
    rabbitmq_node.declare(queue)
    body = {
        "properties": {"timestamp": int(time.time()) - 100},
        "routing_key": queue,
        "payload": "job",
        "payload_encoding": "string",
    }
    answer = rabbitmq_node.api("POST", "/exchanges/%2F/amq.default/publish", body)
    assert answer.status_code == 200 and answer.json()["routed"], answer.text
    await trio.to_thread.run_sync(rabbitmq_node.wait_for_messages, queue, 1)
    async with RabbitMQQueue(rabbitmq_node.url, queue) as source:
        # The statistics carry the head's timestamp from their next emission on.
        with trio.fail_after(WAIT_S):
            while (age := await source.oldest_age()) is None:
                await trio.sleep(0.2)
        assert about(age, 100.0)


async def test_rabbitmq_age_without_timestamps_or_queue_is_unknown(
    rabbitmq_node: RabbitNode,
) -> None:
    queue = unique("plain")
    rabbitmq_node.declare(queue)
    rabbitmq_node.publish(queue, 2)  # no timestamp property
    await trio.to_thread.run_sync(rabbitmq_node.wait_for_messages, queue, 2)
    async with RabbitMQQueue(rabbitmq_node.url, queue) as source:
        assert await age_within(source) is None
        assert await source.read() == 2
    async with RabbitMQQueue(rabbitmq_node.url, unique("missing")) as source:
        assert await age_within(source) is None


# -- PostgreSQL ----------------------------------------------------------------------------


async def test_postgres_age_query(postgres_server: PostgresServer) -> None:
    table = unique("jobs")
    postgres_server.psql(
        f"CREATE TABLE {table} (id serial PRIMARY KEY, status text NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now())"
    )
    count = f"SELECT count(*) FROM {table} WHERE status = 'todo'"
    age = f"SELECT extract(epoch FROM now() - min(created_at)) FROM {table} WHERE status = 'todo'"
    async with PostgresQuery(postgres_server.dsn, count, age_query=age) as source:
        assert await age_within(source) is None  # NULL: none waits
        postgres_server.psql(
            f"INSERT INTO {table} (status, created_at) VALUES "
            "('todo', now() - interval '100 seconds'), ('todo', now() - interval '10 seconds')"
        )
        assert about(await age_within(source), 100.0)
        assert await source.read() == 2
    async with PostgresQuery(postgres_server.dsn, count) as source:
        assert await age_within(source) is None  # no age query: unknown


@pytest.mark.parametrize(
    "age_query",
    ["SELECT 'old'", "SELECT 1, 2", "SELECT count(*) FROM no_such_table", "SELEC 1"],
)
async def test_postgres_age_query_that_fails_is_unknown_and_the_count_still_reads(
    postgres_server: PostgresServer, age_query: str
) -> None:
    async with PostgresQuery(postgres_server.dsn, "SELECT 4", age_query=age_query) as source:
        assert await age_within(source) is None
        assert await source.read() == 4


def test_postgres_empty_age_query_is_refused() -> None:
    with pytest.raises(ValueError, match="the age query is empty"):
        PostgresQuery("postgresql://db/app", "SELECT 1", age_query=" ")
