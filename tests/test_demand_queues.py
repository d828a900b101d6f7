"""``RedisQueue``: the job frameworks' waiting, in-flight and due jobs, on a real redis-server.

Where the framework's own Python package is light (rq, dramatiq, kombu for Celery), the
jobs are enqueued, started and acknowledged by that package, so the keys are the
framework's own. arq (which needs redis-py < 6, where nullworker needs 8), BullMQ
(Node) and Sidekiq (Ruby) have their keys laid by hand, as their sources write them
(the source files are named in each test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dramatiq
import kombu
import pytest
import redis
import rq
import trio
from dramatiq.brokers.redis import RedisBroker

from nullworker.client.demand import DemandError, DemandSource, RedisQueue

from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    rdb_fixture,
    redis_server_binary_fixture,
    redis_server_fixture,
)

#: Bound on anything a test waits for.
WAIT_S = 20.0
ROOT = Path(__file__).resolve().parent.parent


async def demand(source: DemandSource) -> int:
    with trio.fail_after(WAIT_S):
        return await source.read()


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT_S):
        while not predicate():
            await trio.sleep(0.05)


def now_ms(rdb: redis.Redis) -> int:
    seconds, micros = rdb.time()
    return int(seconds) * 1000 + int(micros) // 1000


# -- rq ----------------------------------------------------------------------------------


async def test_rq_counts_waiting_and_started_jobs_until_they_finish(
    redis_server: ServerProcess, rdb: redis.Redis, tmp_path: Path
) -> None:
    """Real rq: three jobs enqueued, a real ``rq worker`` runs them one at a time.

    Each job blocks until the test pushes onto ``release``. While a job runs it is off
    the queue list and in the started registry (``rq:wip:default``): it still counts.
    """
    connection = redis.Redis.from_url(redis_server.url)
    queue = rq.Queue("default", connection=connection)
    for _ in range(3):
        queue.enqueue("tests.rq_jobs.wait_for_release", redis_server.url, "release")
    async with RedisQueue(redis_server.url, "rq", "default") as source:
        assert await demand(source) == 3
        log = (tmp_path / "worker.log").open("wb")
        worker = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "rq.cli",
                "worker",
                "--burst",
                "--worker-class",
                "rq.worker.SimpleWorker",
                "--url",
                redis_server.url,
                "default",
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await until(lambda: rdb.llen("rq:queue:default") == 2 and rdb.zcard("rq:wip:default"))
            assert await demand(source) == 3  # 2 waiting + 1 started
            rdb.lpush("release", "1")
            await until(lambda: rdb.llen("rq:queue:default") == 1 and rdb.zcard("rq:wip:default"))
            assert await demand(source) == 2
            rdb.lpush("release", "1", "1")
            with trio.fail_after(WAIT_S):
                await worker.wait()
            assert worker.returncode == 0, (tmp_path / "worker.log").read_text()
            assert await demand(source) == 0
        finally:
            with trio.CancelScope(shield=True):
                if worker.returncode is None:
                    worker.kill()
                await worker.wait()
            log.close()
            connection.close()


async def test_rq_leaves_out_dead_workers_and_counts_the_intermediate_list(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    """``rq/registry.py``: an entry of the started registry scored in the past is a job
    whose worker died (its lease expired); ``rq/intermediate_queue.py``: a job moved off
    the queue whose status is still ``queued`` has not reached the registry yet."""
    connection = redis.Redis.from_url(redis_server.url)
    queue = rq.Queue("default", connection=connection)
    job = queue.enqueue("tests.rq_jobs.wait_for_release", redis_server.url, "release")
    connection.close()
    rdb.lmove("rq:queue:default", "rq:queue:default:intermediate")  # as Queue.dequeue_any
    now = int(rdb.time()[0])
    rdb.zadd("rq:wip:default", {"dead:1": now - 100, "alive:1": now + 100, "forever:1": "+inf"})
    async with RedisQueue(redis_server.url, "rq", "default") as source:
        assert await demand(source) == 3  # the intermediate job + 2 live registry entries
        rdb.hset(f"rq:job:{job.id}", "status", "started")
        assert await demand(source) == 2


# -- dramatiq ----------------------------------------------------------------------------


async def test_dramatiq_counts_messages_until_acked_and_due_delayed_ones(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    """Real dramatiq: messages sent by an actor, fetched and acked by the broker's consumer."""
    broker = RedisBroker(url=redis_server.url)
    try:

        @dramatiq.actor(broker=broker, queue_name="default")
        def work() -> None: ...

        for _ in range(3):
            work.send()
        work.send_with_options(delay=3_600_000)  # an hour from now: not counted
        async with RedisQueue(redis_server.url, "dramatiq", "default") as source:
            assert await demand(source) == 3
            consumer = broker.consume("default", prefetch=1, timeout=1000)
            message = next(consumer)
            assert message is not None
            assert rdb.llen("dramatiq:default") == 2
            assert await demand(source) == 3  # fetched, not acked: still counted
            consumer.ack(message)
            assert await demand(source) == 2
            consumer.close()
            work.send_with_options(delay=1)
            await trio.sleep(0.05)  # its eta (1 ms after the send) has passed
            assert await demand(source) == 3  # the due delayed message counts
    finally:
        broker.close()


# -- celery (kombu) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyprefix", "sep"),
    [
        ("", "\x06\x16"),  # kombu's defaults
        ("app1:", "\x06\x16"),  # global_keyprefix
        ("", ":"),  # the priority setup Celery's docs recommend: sep ":", steps 0..9
    ],
)
async def test_celery_counts_waiting_priority_and_unacked_messages(
    redis_server: ServerProcess, rdb: redis.Redis, keyprefix: str, sep: str
) -> None:
    """Real kombu (Celery's Redis transport): messages put, fetched and acked."""
    options: dict[str, object] = {"global_keyprefix": keyprefix} if keyprefix else {}
    if sep == ":":
        options.update(sep=":", priority_steps=list(range(10)))
    else:
        # A key that looks like a sibling with the other separator is left alone.
        rdb.set(f"{keyprefix}celery:4", "someone else's key, not a list")
    # One connection per queue: a channel consuming both would prefetch from either.
    with (
        kombu.Connection(redis_server.url, transport_options=options) as for_celery,
        kombu.Connection(redis_server.url, transport_options=options) as for_other,
    ):
        celery = for_celery.SimpleQueue("celery")
        other = for_other.SimpleQueue("other")
        celery.put({"task": 1})
        celery.put({"task": 2})
        celery.put({"task": 3}, priority=9)  # a sibling list, celery<sep>9
        other.put({"task": 4})
        assert rdb.type(f"{keyprefix}celery{sep}9") == "list"
        source = RedisQueue(
            redis_server.url, "celery", "celery", prefix=keyprefix if keyprefix else None
        )
        async with source:
            assert await demand(source) == 3
            fetched = celery.get(block=True, timeout=WAIT_S)
            assert rdb.hlen(f"{keyprefix}unacked") == 1
            assert await demand(source) == 3  # fetched, not acked: still counted
            from_other = other.get(block=True, timeout=WAIT_S)
            assert rdb.hlen(f"{keyprefix}unacked") == 2
            assert await demand(source) == 3  # another queue's unacked message is not
            fetched.ack()
            assert await demand(source) == 2
            from_other.ack()
            assert await demand(source) == 2
        celery.close()
        other.close()


# -- arq (keys by hand) ----------------------------------------------------------------------


async def test_arq_counts_due_jobs_running_ones_included(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    """arq's layout by hand (``arq/connections.py`` enqueue_job, ``arq/worker.py``): the
    sorted set ``arq:queue`` scored by due time in ms; a running job keeps its entry
    (plus ``arq:in-progress:<id>``) until ``finish_job`` removes it."""
    now = now_ms(rdb)
    rdb.zadd("arq:queue", {"due-1": now - 5000, "due-2": now, "later": now + 3_600_000})
    rdb.zadd("arq:queue", {"running": now - 60_000})
    rdb.psetex("arq:in-progress:running", 60_000, b"1")
    async with RedisQueue(redis_server.url, "arq", "arq:queue") as source:
        assert await demand(source) == 3
        rdb.zrem("arq:queue", "running")  # finish_job
        rdb.delete("arq:in-progress:running")
        assert await demand(source) == 2
    async with RedisQueue(redis_server.url, "arq", "arq:other") as source:
        assert await demand(source) == 0


# -- bullmq (keys by hand) ---------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [None, "myapp"])
async def test_bullmq_counts_wait_prioritized_active_and_due_delayed(
    redis_server: ServerProcess, rdb: redis.Redis, prefix: str | None
) -> None:
    """BullMQ's layout by hand (``src/commands/addStandardJob-9.lua``,
    ``addPrioritizedJob-9.lua``, ``moveToActive-11.lua``, ``includes/getDelayedScore.lua``:
    a delayed job's score is ``timestamp * 0x1000 + n``; ``pause-7.lua`` sets ``paused``
    in ``:meta``)."""
    base = f"{prefix or 'bull'}:emails:"
    now = now_ms(rdb)
    rdb.lpush(base + "wait", "1", "2")
    rdb.zadd(base + "prioritized", {"3": 1})
    rdb.lpush(base + "active", "4")
    rdb.zadd(base + "delayed", {"5": (now - 1000) * 0x1000 + 1, "6": (now + 3_600_000) * 0x1000})
    rdb.zadd(base + "completed", {"7": now})
    async with RedisQueue(redis_server.url, "bullmq", "emails", prefix=prefix) as source:
        assert await demand(source) == 5  # 2 wait + 1 prioritized + 1 active + 1 due
        rdb.hset(base + "meta", "paused", 1)
        assert await demand(source) == 1  # paused: only the active job
        rdb.hdel(base + "meta", "paused")
        rdb.lmove(base + "wait", base + "active", "RIGHT", "LEFT")
        assert await demand(source) == 5
        rdb.lrem(base + "active", 1, "4")  # completed
        assert await demand(source) == 4


# -- sidekiq (keys by hand) --------------------------------------------------------------------


async def test_sidekiq_counts_the_queue_busy_threads_and_due_scheduled_jobs(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    """Sidekiq's layout by hand (``lib/sidekiq/client.rb`` pushes JSON onto
    ``queue:<name>``; ``lib/sidekiq/launcher.rb`` heartbeats ``processes`` and each
    process's ``<identity>:work`` hash, thread id -> ``{"queue", "payload", "run_at"}``;
    ``lib/sidekiq/api.rb`` WorkSet reads them; ``schedule`` and ``retry`` are sorted
    sets of job JSON scored by when, in seconds)."""
    now = float(rdb.time()[0])

    def job(queue: str) -> str:
        return json.dumps({"class": "HardJob", "queue": queue, "args": [], "jid": "j"})

    def work(queue: str) -> str:
        return json.dumps({"queue": queue, "payload": job(queue), "run_at": int(now)})

    rdb.lpush("queue:default", job("default"), job("default"))
    rdb.lpush("queue:mailers", job("mailers"))
    rdb.sadd("processes", "box:1:aaa", "box:2:bbb", "gone:3:ccc")
    rdb.hset("box:1:aaa:work", mapping={"t1": work("default"), "t2": work("mailers")})
    rdb.hset("box:2:bbb:work", mapping={"t3": work("default")})
    rdb.zadd("schedule", {job("default"): now - 10, job("mailers"): now - 10})
    rdb.zadd("schedule", {json.dumps({"queue": "default", "at": 1}): now + 3600})
    rdb.zadd("retry", {json.dumps({"queue": "default", "retry_count": 1}): now - 1})
    async with RedisQueue(redis_server.url, "sidekiq", "default") as source:
        assert await demand(source) == 6  # 2 waiting + 2 busy + 1 scheduled + 1 retry due
        rdb.hdel("box:1:aaa:work", "t1")  # the job finished
        assert await demand(source) == 5
    async with RedisQueue(redis_server.url, "sidekiq", "mailers") as source:
        assert await demand(source) == 3


# -- common ------------------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["celery", "rq", "dramatiq", "arq", "bullmq", "sidekiq"])
async def test_an_unused_queue_is_0_and_a_wrong_type_is_a_demand_error(
    redis_server: ServerProcess, rdb: redis.Redis, framework: str
) -> None:
    queue = "arq:queue" if framework == "arq" else "q"
    async with RedisQueue(redis_server.url, framework, queue) as source:
        assert await demand(source) == 0
        assert source.framework in source.describe()
        for key in (
            "q",
            "unacked",
            "rq:queue:q",
            "dramatiq:q.msgs",
            "arq:queue",
            "bull:q:active",
            "queue:q",
        ):
            rdb.set(key, "not a collection")
        with pytest.raises(DemandError, match="WRONGTYPE"):
            await demand(source)
        rdb.flushall()
        assert await demand(source) == 0  # the source stays usable


async def test_redis_queue_reconnects_after_a_restart_and_redacts_the_password(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    rdb.lpush("queue:default", "{}")
    url = redis_server.url.replace("redis://", "redis://:hunter2@")
    rdb.config_set("requirepass", "hunter2")
    async with RedisQueue(url, "sidekiq", "default") as source:
        assert "hunter2" not in source.describe() and "hunter2" not in repr(source)
        assert await demand(source) == 1
        await redis_server.stop()
        with pytest.raises(DemandError) as failed:
            await demand(source)
        assert "hunter2" not in str(failed.value)
        await redis_server.start()  # a fresh server: no data, no script cache
        fresh = redis.Redis.from_url(redis_server.url)
        fresh.config_set("requirepass", "hunter2")
        fresh.close()
        assert await demand(source) == 0


def test_redis_queue_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="celery, rq, dramatiq, arq, bullmq, sidekiq"):
        RedisQueue("redis://q:6379", "resque", "jobs")
    with pytest.raises(ValueError, match="queue name"):
        RedisQueue("redis://q:6379", "rq", "")
    with pytest.raises(ValueError, match="arq has no key prefix"):
        RedisQueue("redis://q:6379", "arq", "arq:queue", prefix="x")
    with pytest.raises(ValueError, match="expected redis://"):
        RedisQueue("redis:/q:6379", "rq", "default")
