"""Push wake-ups of demand sources (``DemandSource.watch``) against real servers.

Redis (keyspace notifications on and off), ``nats-server -js`` and PostgreSQL run as
real processes (``tests/servers.py``, ``tests/servers_cloud.py``). Each test runs a
source's ``watch`` beside the test, counts the wake-ups it makes, changes the queue with
a client of its own (so the data does not depend on the code under test), and checks
that a wake-up follows the change: the count of wake-ups is taken before the change
and must grow after it. Outages are real: the server is restarted, or the subscription's
connection is killed on the server.

Only order and outcome are asserted; every wait is bounded by ``WAIT_S``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import nats
import pytest
import redis
import trio
from nats.js.api import AckPolicy, ConsumerConfig

from nullworker.client._aio import open_asyncio_loop, run_aio
from nullworker.client.demand import (
    CallableDemand,
    CombinedDemand,
    DemandSource,
    NatsConsumer,
    PostgresQuery,
    RedisList,
    RedisStream,
)

from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    nats_server_binary_fixture,
    nats_server_fixture,
    redis_client,
    redis_notify_server_fixture,
    redis_server_binary_fixture,
    redis_server_fixture,
)
from .servers_cloud import (  # noqa: F401  (pytest fixtures, used by name)
    PG_PASSWORD,
    PostgresServer,
    postgres_server_fixture,
)

#: Bound on anything a test waits for.
WAIT_S = 10.0
#: How long a test lets a watcher that must stay silent run after a change.
QUIET_S = 0.5


class Wakes:
    """The ``changed`` callback given to ``watch``: counts the wake-ups."""

    def __init__(self) -> None:
        self.count = 0
        self._event = trio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._event.set()
        self._event = trio.Event()

    async def after(self, seen: int) -> int:
        """Wait for a wake-up beyond the first ``seen``; the count then."""
        with trio.fail_after(WAIT_S):
            while self.count <= seen:
                await self._event.wait()
        return self.count


@asynccontextmanager
async def watching(source: DemandSource) -> AsyncIterator[Wakes]:
    """``source`` entered and watched for the block; the wake-ups it made."""
    wakes = Wakes()
    async with source, trio.open_nursery() as nursery:
        nursery.start_soon(source.watch, wakes)
        yield wakes
        nursery.cancel_scope.cancel()


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    with trio.fail_after(WAIT_S):
        while True:
            for record in caplog.records:
                if text in record.getMessage():
                    return record
            await trio.sleep(0.02)


@pytest.fixture
def rdb(redis_notify_server: ServerProcess) -> Iterator[redis.Redis]:
    with redis_client(redis_notify_server) as client:
        yield client


# -- Redis -------------------------------------------------------------------------------


async def test_redis_list_push_wakes_the_watcher(
    redis_notify_server: ServerProcess, rdb: redis.Redis
) -> None:
    source = RedisList(redis_notify_server.url, "jobs", "jobs:processing")
    assert source.can_push()
    async with watching(source) as wakes:
        # One wake-up once subscribed: what changed before it went unheard.
        seen = await wakes.after(0)
        rdb.lpush("jobs", "job-1")
        seen = await wakes.after(seen)
        assert await source.read() == 1
        # The processing list is watched too: a job moved there wakes the reader.
        rdb.lmove("jobs", "jobs:processing", "RIGHT", "LEFT")
        await wakes.after(seen)
        assert await source.read() == 1


async def test_redis_stream_entry_wakes_the_watcher(
    redis_notify_server: ServerProcess, rdb: redis.Redis
) -> None:
    rdb.xgroup_create("events", "workers", id="$", mkstream=True)
    source = RedisStream(redis_notify_server.url, "events", "workers")
    async with watching(source) as wakes:
        seen = await wakes.after(0)
        rdb.xadd("events", {"job": "1"})
        await wakes.after(seen)
        assert await source.read() == 1


async def test_redis_without_keyspace_notifications_polls_only_and_says_how(
    redis_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        caplog.set_level(logging.WARNING, "nullworker.demand")
        source = RedisList(redis_server.url, "jobs")
        async with watching(source) as wakes:
            record = await wait_for_log(caplog, "keyspace notifications are off")
            client.lpush("jobs", "job-1")
            await trio.sleep(QUIET_S)
            assert wakes.count == 0
            # Reads still work: the autoscaler's poll is the fallback.
            assert await source.read() == 1
        message = record.getMessage()
        assert record.levelno == logging.WARNING
        assert "CONFIG SET notify-keyspace-events Kl" in message
        assert "--redis-configure-notifications" in message
        assert len([r for r in caplog.records if "notifications are off" in r.getMessage()]) == 1
        # The user's server is left as it was.
        assert client.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""
    finally:
        client.close()


async def test_redis_configure_notifications_turns_them_on(
    redis_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        client.config_set("notify-keyspace-events", "Eg")  # some, not those we need
        caplog.set_level(logging.WARNING, "nullworker.demand")
        source = RedisStream(redis_server.url, "events", "workers", configure_notifications=True)
        client.xgroup_create("events", "workers", id="$", mkstream=True)
        async with watching(source) as wakes:
            seen = await wakes.after(0)
            setting = client.config_get("notify-keyspace-events")["notify-keyspace-events"]
            assert {"E", "g", "K", "t"} <= set(setting)
            client.xadd("events", {"job": "1"})
            await wakes.after(seen)
        assert any("set notify-keyspace-events" in r.getMessage() for r in caplog.records)
    finally:
        client.close()


async def test_redis_restart_resubscribes(
    redis_notify_server: ServerProcess, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "nullworker.demand")
    source = RedisList(redis_notify_server.url, "jobs")
    async with watching(source) as wakes:
        seen = await wakes.after(0)
        await redis_notify_server.restart()
        # Lost (one warning), then subscribed again: the new subscription wakes the reader.
        await wait_for_log(caplog, "no push subscription")
        seen = await wakes.after(seen)
        await wait_for_log(caplog, "push subscription restored")
        rdb.lpush("jobs", "job-1")
        await wakes.after(seen)
        assert await source.read() == 1


async def test_a_combined_source_is_woken_by_its_pushing_part(
    redis_notify_server: ServerProcess, rdb: redis.Redis
) -> None:
    async def none() -> int:
        return 0

    source = CombinedDemand([RedisList(redis_notify_server.url, "jobs"), CallableDemand(none)])
    assert source.can_push()
    async with watching(source) as wakes:
        seen = await wakes.after(0)
        rdb.lpush("jobs", "job-1", "job-2")
        await wakes.after(seen)
        assert await source.read() == 2
    assert not CombinedDemand([CallableDemand(none)]).can_push()


# -- NATS --------------------------------------------------------------------------------


async def _aio_nats(url: str, *, setup: bool, publish: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if setup:
            await js.add_stream(name="JOBS", subjects=["jobs.>"])
            await js.add_consumer(
                "JOBS", ConsumerConfig(durable_name="workers", ack_policy=AckPolicy.EXPLICIT)
            )
        for i in range(publish):
            await js.publish("jobs.new", str(i).encode())
    finally:
        await nc.close()


async def nats_do(url: str, *, setup: bool = False, publish: int = 0) -> None:
    async with open_asyncio_loop():
        with trio.fail_after(WAIT_S):
            await run_aio(lambda: _aio_nats(url, setup=setup, publish=publish))


async def test_nats_publish_wakes_the_watcher_and_a_restart_resubscribes(
    nats_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "nullworker.demand")
    await nats_do(nats_server.url, setup=True)
    source = NatsConsumer(nats_server.url, "JOBS", "workers")
    assert source.can_push()
    async with watching(source) as wakes:
        seen = await wakes.after(0)
        await nats_do(nats_server.url, publish=1)
        seen = await wakes.after(seen)
        assert await source.read() == 1

        await nats_server.restart()
        await wait_for_log(caplog, "no push subscription")
        seen = await wakes.after(seen)
        await wait_for_log(caplog, "push subscription restored")
        await nats_do(nats_server.url, publish=1)
        await wakes.after(seen)
        assert await source.read() == 2


# -- PostgreSQL --------------------------------------------------------------------------


async def test_postgres_notify_wakes_the_watcher_and_a_killed_listener_reconnects(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "nullworker.demand")
    postgres_server.psql("CREATE TABLE push_jobs (id serial PRIMARY KEY)")
    try:
        source = PostgresQuery(
            postgres_server.dsn, "SELECT count(*) FROM push_jobs", listen="push jobs"
        )
        assert source.can_push()
        async with watching(source) as wakes:
            seen = await wakes.after(0)
            postgres_server.psql('INSERT INTO push_jobs DEFAULT VALUES; NOTIFY "push jobs"')
            seen = await wakes.after(seen)
            assert await source.read() == 1

            # The server ends the listening session: the source listens again.
            killed = postgres_server.psql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%'"
            )
            assert killed == "1"
            await wait_for_log(caplog, "no push subscription")
            seen = await wakes.after(seen)
            postgres_server.psql('INSERT INTO push_jobs DEFAULT VALUES; NOTIFY "push jobs"')
            await wakes.after(seen)
            assert await source.read() == 2
        assert not any(PG_PASSWORD in r.getMessage() for r in caplog.records)
    finally:
        postgres_server.psql("DROP TABLE push_jobs")


async def test_postgres_without_listen_does_not_push(postgres_server: PostgresServer) -> None:
    source = PostgresQuery(postgres_server.dsn, "SELECT 0")
    assert not source.can_push()
    async with source:
        with trio.fail_after(WAIT_S):
            await source.watch(Wakes())  # returns at once: nothing to watch
    with pytest.raises(ValueError, match="listen"):
        PostgresQuery(postgres_server.dsn, "SELECT 0", listen="")
