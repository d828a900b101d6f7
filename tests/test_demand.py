"""Demand sources (``nullworker.client.demand``) against real servers, and the asyncio bridge.

Redis and NATS run as real subprocesses on free loopback ports (``tests/servers.py``);
outages are real (the server is stopped and started again on the same port) and so are
hangs (a listener that never answers, or a server frozen with SIGSTOP). Queues are
filled with the plain synchronous ``redis`` client and, for NATS, with nats-py run
through ``nullworker.client._aio`` (so the test data does not depend on the code under test).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
import redis
import trio
from nats.js.api import AckPolicy, ConsumerConfig

from nullworker.client._aio import current_asyncio_loop, open_asyncio_loop, run_aio
from nullworker.client.demand import (
    CallableDemand,
    CommandDemand,
    DemandError,
    DemandNotFound,
    DemandSource,
    DemandTimeout,
    NatsConsumer,
    RedisList,
    RedisStream,
    redact,
)

from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    nats_server_binary_fixture,
    nats_server_fixture,
    rdb_fixture,
    redis_server_binary_fixture,
    redis_server_fixture,
    silent_server_fixture,
)

#: Bound on anything a test waits for.
WAIT_S = 10.0
#: A short read timeout for the hang tests.
SHORT_S = 0.3


async def read_within(source: DemandSource, bound_s: float = WAIT_S) -> int:
    with trio.fail_after(bound_s):
        return await source.read()


async def read_error(source: DemandSource, bound_s: float = WAIT_S) -> DemandError:
    """The DemandError a read raises (any other exception fails the test)."""
    with trio.fail_after(bound_s):
        try:
            value = await source.read()
        except DemandError as exc:
            return exc
    pytest.fail(f"read() returned {value} instead of raising DemandError")


# -- redaction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://alice:secret@host", "redis://alice:***@host"),
        ("rediss://alice:p@ss/w0rd@host/1", "rediss://alice:***@host/1"),
        ("nats://s3cr3t-token@host:4222", "nats://***@host:4222"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://host/0?password=secret&db=1", "redis://host/0?password=***&db=1"),
        ("redis-cli -u redis://:secret@q LLEN jobs", "redis-cli -u redis://:***@q LLEN jobs"),
    ],
)
def test_redact_masks_credentials(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_describe_never_shows_a_password() -> None:
    sources: list[DemandSource] = [
        RedisList("redis://:secret@queue:6379/0", "jobs", "jobs:processing"),
        RedisStream("redis://bob:secret@queue", "events", "workers"),
        NatsConsumer("nats://alice:secret@queue:4222", "JOBS", "workers"),
        CommandDemand("redis-cli -u redis://:secret@queue LLEN jobs"),
    ]
    for source in sources:
        assert "secret" not in source.describe()
        assert "***" in source.describe()
        assert "secret" not in repr(source)
    assert (
        sources[0].describe()
        == "redis list 'jobs' + 'jobs:processing' at redis://:***@queue:6379/0"
    )


def test_constructors_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scheme"):
        RedisList("http://queue", "jobs")
    with pytest.raises(ValueError, match="scheme"):
        NatsConsumer("redis://queue", "JOBS", "workers")
    with pytest.raises(ValueError, match="stream name"):
        NatsConsumer("nats://queue", "JOBS.X", "workers")
    with pytest.raises(ValueError, match="timeout_s"):
        CommandDemand("echo 1", timeout_s=0)
    with pytest.raises(ValueError, match="scan_limit"):
        RedisStream("redis://queue", "s", "g", scan_limit=0)
    with pytest.raises(ValueError):
        CommandDemand("  ")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis:/queue:6379", "expected redis://host"),  # redis-py would read localhost
        ("redis://:6379", "no host"),
        ("redis://:secret@:6379/0", "no host"),
        ("redis://queue:63a9", "port must be a number"),
        ("redis://queue:70000", "port must be a number"),
        ("redis://queue:0", "port must be a number"),
        ("redis://queue:6379/zero", "database number"),
        ("unix://", "socket's path"),
        ("nats:/queue:4222", "expected nats://host"),
        ("nats://:4222", "no host"),
    ],
)
def test_a_url_that_does_not_name_a_server_is_refused_at_once(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as refused:
        if url.startswith("nats"):
            NatsConsumer(url, "JOBS", "workers")
        else:
            RedisList(url, "jobs")
    assert "secret" not in str(refused.value)
    assert "\n" not in str(refused.value)
    # ... while URLs that do name a server are taken.
    for good in ("redis://queue", "rediss://u:p@queue:6380/2", "unix:///run/redis.sock"):
        RedisList(good, "jobs")
    NatsConsumer("nats://token@[::1]:4222", "JOBS", "workers")


# -- Redis -----------------------------------------------------------------------------


async def test_redis_list_counts_the_list(redis_server: ServerProcess, rdb: redis.Redis) -> None:
    async with RedisList(redis_server.url, "jobs") as source:
        assert await read_within(source) == 0  # a missing key is an empty list
        rdb.lpush("jobs", "a", "b", "c")
        assert await read_within(source) == 3


async def test_redis_list_adds_the_processing_list(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    rdb.lpush("jobs", "a", "b", "c")
    rdb.lpush("jobs:processing", "d", "e")
    async with RedisList(redis_server.url, "jobs", "jobs:processing") as source:
        assert await read_within(source) == 5
        rdb.lmove("jobs", "jobs:processing")
        rdb.lpop("jobs:processing")
        assert await read_within(source) == 4


async def test_redis_list_of_the_wrong_type_is_a_demand_error(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    rdb.set("jobs", "not a list")
    async with RedisList(redis_server.url, "jobs") as source:
        error = await read_error(source)
        assert "WRONGTYPE" in str(error)
        assert str(error).startswith(source.describe())
        rdb.delete("jobs")
        rdb.rpush("jobs", "a")
        assert await read_within(source) == 1


async def test_redis_error_messages_keep_the_password_out(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    rdb.config_set("requirepass", "the-right-one")
    url = redis_server.url.replace("redis://", "redis://:hunter2@")
    async with RedisList(url, "jobs") as source:
        error = await read_error(source)
    assert "hunter2" not in str(error)
    assert ":***@" in str(error)


def add_entries(rdb: redis.Redis, stream: str, n: int) -> list[str]:
    return [str(rdb.xadd(stream, {"job": str(i)})) for i in range(n)]


async def test_redis_stream_is_lag_plus_pending(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    add_entries(rdb, "events", 5)
    rdb.xgroup_create("events", "workers", id="0")
    async with RedisStream(redis_server.url, "events", "workers") as source:
        assert await read_within(source) == 5  # lag 5, nothing pending
        # A consumer takes two and does not acknowledge them yet: still demand.
        delivered = rdb.xreadgroup("workers", "c1", {"events": ">"}, count=2)
        assert len(delivered[0][1]) == 2
        info = rdb.xinfo_groups("events")[0]
        assert (info["lag"], info["pending"]) == (3, 2)
        assert await read_within(source) == 5
        rdb.xack("events", "workers", delivered[0][1][0][0])
        assert await read_within(source) == 4
        add_entries(rdb, "events", 2)
        assert await read_within(source) == 6


async def test_redis_stream_counts_entries_itself_when_lag_is_unknown(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    ids = add_entries(rdb, "events", 6)
    # A group created at an arbitrary ID has no known lag (Redis reports null).
    rdb.xgroup_create("events", "workers", id=ids[1])
    rdb.xreadgroup("workers", "c1", {"events": ">"}, count=1)
    assert rdb.xinfo_groups("events")[0]["lag"] is None
    async with RedisStream(redis_server.url, "events", "workers") as source:
        assert await read_within(source) == 4  # ids[3:] undelivered + ids[2] pending
    # Deleting an undelivered entry makes the lag unknown too; the count follows it.
    rdb.xdel("events", ids[4])
    async with RedisStream(redis_server.url, "events", "workers") as source:
        assert await read_within(source) == 3
    # The count stops at scan_limit.
    async with RedisStream(redis_server.url, "events", "workers", scan_limit=1) as source:
        assert await read_within(source) == 2


async def test_redis_stream_or_group_missing_is_demand_not_found(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    async with RedisStream(redis_server.url, "events", "workers") as source:
        error = await read_error(source)
        assert isinstance(error, DemandNotFound)
        assert "'events' does not exist" in str(error)
        add_entries(rdb, "events", 1)
        error = await read_error(source)
        assert isinstance(error, DemandNotFound)
        assert "no consumer group 'workers'" in str(error)
        rdb.xgroup_create("events", "workers", id="0")
        assert await read_within(source) == 1


async def test_redis_outage_is_a_demand_error_and_the_source_reconnects(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    rdb.lpush("jobs", "a", "b")
    async with RedisList(redis_server.url, "jobs") as source:
        assert await read_within(source) == 2
        await redis_server.stop()
        error = await read_error(source)
        assert not isinstance(error, DemandTimeout)  # refused at once, not hung
        assert "Connection refused" in str(error) or "connecting" in str(error)
        assert error.__cause__ is not None
        await redis_server.start()  # same port, empty (no persistence)
        assert await read_within(source) == 0
        rdb.lpush("jobs", "c")
        assert await read_within(source) == 1


async def test_redis_restart_between_reads_is_not_even_noticed(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    async with RedisList(redis_server.url, "jobs") as source:
        assert await read_within(source) == 0
        await redis_server.restart()  # the pooled connection is now dead
        rdb.lpush("jobs", "a")
        assert await read_within(source) == 1


async def test_a_frozen_redis_read_is_cancelled_cleanly(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    rdb.lpush("jobs", "a", "b")
    async with RedisList(redis_server.url, "jobs") as source:
        assert await read_within(source) == 2
        redis_server.pause()
        try:
            with trio.move_on_after(SHORT_S) as scope:
                await source.read()
            assert scope.cancelled_caught
        finally:
            redis_server.resume()
        # The cut-off request's reply must not be taken for the next one's.
        rdb.lpush("jobs", "c")
        assert await read_within(source) == 3
        rdb.lpush("jobs", "d")
        assert await read_within(source) == 4


# -- NATS ------------------------------------------------------------------------------


async def _aio_nats_setup(url: str, publish: int, fetch: int) -> None:
    """Stream JOBS (jobs.>), durable pull consumer ``workers``; publish, fetch unacked."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="JOBS", subjects=["jobs.>"])
        await js.add_consumer(
            "JOBS", ConsumerConfig(durable_name="workers", ack_policy=AckPolicy.EXPLICIT)
        )
        for i in range(publish):
            await js.publish("jobs.new", str(i).encode())
        if fetch:
            sub = await js.pull_subscribe_bind("workers", stream="JOBS")
            messages = await sub.fetch(fetch, timeout=5)
            assert len(messages) == fetch
    finally:
        await nc.close()


async def nats_setup(url: str, *, publish: int = 0, fetch: int = 0) -> None:
    async with open_asyncio_loop():
        with trio.fail_after(WAIT_S):
            await run_aio(_aio_nats_setup, url, publish, fetch)


async def test_nats_consumer_is_pending_plus_ack_pending(nats_server: ServerProcess) -> None:
    await nats_setup(nats_server.url, publish=5, fetch=2)
    async with NatsConsumer(nats_server.url, "JOBS", "workers") as source:
        assert await read_within(source) == 5  # 3 not delivered + 2 delivered, unacked


async def test_nats_stream_or_consumer_missing_is_demand_not_found(
    nats_server: ServerProcess,
) -> None:
    async with NatsConsumer(nats_server.url, "JOBS", "workers") as source:
        error = await read_error(source)
        assert isinstance(error, DemandNotFound)
        assert "'JOBS' does not exist" in str(error)
        await nats_setup(nats_server.url, publish=1)
        async with NatsConsumer(nats_server.url, "JOBS", "other") as other:
            error = await read_error(other)
            assert isinstance(error, DemandNotFound)
            assert "no consumer 'other'" in str(error)
        assert await read_within(source) == 1  # the same source, once both exist


async def test_nats_outage_is_a_demand_error_and_the_source_reconnects(
    nats_server: ServerProcess,
) -> None:
    await nats_setup(nats_server.url, publish=3, fetch=1)
    async with NatsConsumer(nats_server.url, "JOBS", "workers") as source:
        assert await read_within(source) == 3
        await nats_server.stop()
        error = await read_error(source)
        assert not isinstance(error, DemandNotFound)
        assert error.__cause__ is not None
        # The connection is gone by now, so the next read connects anew: refused at once.
        error = await read_error(source)
        assert type(error) is DemandError
        assert "Connect call failed" in str(error)
        await nats_server.start()  # same port, same JetStream store
        assert await read_within(source) == 3


async def test_a_frozen_nats_read_is_cancelled_cleanly(nats_server: ServerProcess) -> None:
    await nats_setup(nats_server.url, publish=2)
    async with NatsConsumer(nats_server.url, "JOBS", "workers") as source:
        assert await read_within(source) == 2
        nats_server.pause()
        try:
            with trio.move_on_after(SHORT_S) as scope:
                await source.read()
            assert scope.cancelled_caught
        finally:
            nats_server.resume()
        assert await read_within(source) == 2


# -- hung servers ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis list", "redis stream", "nats"])
async def test_a_server_that_never_answers_is_a_timeout(silent_server: int, kind: str) -> None:
    address = f"127.0.0.1:{silent_server}"
    source: DemandSource
    if kind == "redis list":
        source = RedisList(f"redis://{address}", "jobs", timeout_s=SHORT_S)
    elif kind == "redis stream":
        source = RedisStream(f"redis://{address}", "events", "workers", timeout_s=SHORT_S)
    else:
        source = NatsConsumer(f"nats://{address}", "JOBS", "workers", timeout_s=SHORT_S)
    async with source:
        for _ in range(2):  # and the source is still usable after a timeout
            start = trio.current_time()
            error = await read_error(source, bound_s=3.0)
            assert isinstance(error, DemandTimeout), error
            assert trio.current_time() - start < SHORT_S + 1.5
            assert "0.3 s" in str(error) or "imeout" in str(error)


# -- a command ---------------------------------------------------------------------------


async def test_command_output_is_the_demand() -> None:
    async with CommandDemand("echo '  7 '") as source:
        assert await read_within(source) == 7
    async with CommandDemand("printf 0") as source:
        assert await read_within(source) == 0


@pytest.mark.parametrize(
    ("cmd", "words"),
    [
        ("echo hello", ["printed 'hello'", "not a non-negative integer"]),
        ("echo -3", ["printed '-3'"]),
        ("echo 1.5", ["printed '1.5'"]),
        ("echo '1 2'", ["printed '1 2'"]),
        ("echo 1; echo 2", ["printed '1\\n2'"]),
        ("echo; echo 5", ["printed '5'", "on one line"]),
        ("echo 1234567890123456789", ["printed '1234567890123456789'"]),  # 19 digits
        # A count, then more than COMMAND_STDOUT_LIMIT bytes of blanks and a second
        # count that used to fall past the kept prefix and pass unseen.
        ("echo 1; printf '%5000s'; echo 2", ["printed more than 4096 bytes"]),
        ("true", ["printed nothing"]),
        ("echo 12; echo 'queue is odd' >&2", None),  # fine: stderr does not count
        ("echo 4; echo 'no such queue' >&2; exit 3", ["exited with status 3", "no such queue"]),
        ("no-such-command-xyz", ["exited with status 127", "not found"]),
        ("kill -9 $$", ["was killed by SIGKILL"]),
    ],
)
async def test_command_failures_are_demand_errors(cmd: str, words: list[str] | None) -> None:
    async with CommandDemand(cmd) as source:
        if words is None:
            assert await read_within(source) == 12
            return
        error = await read_error(source)
    assert type(error) is DemandError
    assert str(error).startswith(f"command {cmd!r}: ")
    for word in words:
        assert word in str(error)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_command_timeout_kills_the_whole_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    # A background child holding the pipes open, and a foreground wait: both must go.
    cmd = f"sleep 30 & echo $! > {pidfile}; echo 'still working' >&2; wait"
    async with CommandDemand(cmd, timeout_s=SHORT_S) as source:
        start = trio.current_time()
        error = await read_error(source)
        assert trio.current_time() - start < SHORT_S + 2.0
    assert isinstance(error, DemandTimeout)
    assert "did not finish within 0.3 s and was killed" in str(error)
    assert "still working" in str(error)
    child = int(pidfile.read_text())
    with trio.fail_after(WAIT_S):
        while _alive(child):
            await trio.sleep(0.01)


def _pids_alive(pidfile: Path) -> list[int]:
    if not pidfile.exists():
        return []
    return [pid for pid in map(int, pidfile.read_text().split()) if _alive(pid)]


@pytest.mark.parametrize(
    "detach",
    [
        "setsid {child} >/dev/null 2>&1 </dev/null &",  # left its group and session
        "setsid {child} &",  # and holds our stdout open too
        "({child} >/dev/null &) ;",  # an orphan in the group
    ],
)
async def test_a_command_leaves_no_process_behind_after_many_polls(
    tmp_path: Path, detach: str
) -> None:
    pidfile = tmp_path / "pids"
    # The detached child writes its own pid, then marks that it runs; the command
    # prints its count only then, so that each poll really leaves one behind.
    child = f"sh -c 'echo $$ >> {pidfile}; touch {tmp_path}/up.$T; exec sleep 777'"
    wait = f"while [ ! -e {tmp_path}/up.$$ ]; do sleep 0.01; done"
    cmd = f"export T=$$; {detach.format(child=child)} {wait}; echo 1"
    polls = 5
    async with CommandDemand(cmd, timeout_s=WAIT_S) as source:
        for _ in range(polls):
            assert await read_within(source) == 1
    # Every poll started one, and by the end of its read it was gone.
    assert len(pidfile.read_text().split()) == polls
    assert _pids_alive(pidfile) == []


async def test_a_command_cut_off_leaves_no_detached_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    cmd = f"setsid sh -c 'echo $$ >> {pidfile}; exec sleep 777' & sleep 30"
    async with CommandDemand(cmd, timeout_s=SHORT_S) as source:
        for _ in range(2):
            error = await read_error(source)
            assert isinstance(error, DemandTimeout)
    assert len(pidfile.read_text().split()) == 2
    assert _pids_alive(pidfile) == []


async def test_a_cancelled_command_read_kills_the_command_and_leaves_the_source_usable(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "fast"
    cmd = f"test -e {flag} && echo 2 || {{ echo $$ > {tmp_path / 'pid'}; sleep 30; }}"
    async with CommandDemand(cmd) as source:
        with trio.move_on_after(SHORT_S) as scope:
            await source.read()
        assert scope.cancelled_caught
        pid = int((tmp_path / "pid").read_text())
        assert not _alive(pid)
        flag.touch()
        assert await read_within(source) == 2


# -- a callable --------------------------------------------------------------------------


async def test_callable_demand_validates_what_it_returns() -> None:
    answers: list[object] = [4, True, -1, 2.0, "3", 0]

    async def depth() -> int:
        return answers.pop(0)  # type: ignore[return-value]

    async with CallableDemand(depth) as source:
        assert "depth" in source.describe()
        assert await read_within(source) == 4
        for shown in ("True (bool)", "-1, a negative count", "2.0 (float)", "'3' (str)"):
            error = await read_error(source)
            assert shown in str(error)
        assert await read_within(source) == 0


async def test_callable_demand_wraps_exceptions_and_bounds_the_call() -> None:
    async def broken() -> int:
        raise LookupError("queue gone")

    async def stuck() -> int:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with CallableDemand(broken, name="sqs depth") as source:
        error = await read_error(source)
        assert str(error) == "callable sqs depth: LookupError: queue gone"
        assert isinstance(error.__cause__, LookupError)
    async with CallableDemand(stuck, timeout_s=SHORT_S) as source:
        assert isinstance(await read_error(source), DemandTimeout)


# -- the interface ---------------------------------------------------------------------


async def test_a_closed_source_refuses_to_read(redis_server: ServerProcess) -> None:
    source = RedisList(redis_server.url, "jobs")
    async with source:
        assert await read_within(source) == 0
    await source.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await source.read()


async def test_a_source_reads_inside_an_open_loop_without_being_entered(
    redis_server: ServerProcess,
) -> None:
    source = RedisList(redis_server.url, "jobs")
    with pytest.raises(RuntimeError, match="async with"):
        await source.read()
    async with open_asyncio_loop():
        assert await read_within(source) == 0
        await source.aclose()


async def test_sources_share_one_asyncio_loop(
    redis_server: ServerProcess, nats_server: ServerProcess
) -> None:
    await nats_setup(nats_server.url, publish=1)
    async with (
        open_asyncio_loop() as loop,
        RedisList(redis_server.url, "jobs") as redis_source,
        NatsConsumer(nats_server.url, "JOBS", "workers") as nats_source,
    ):
        assert current_asyncio_loop() is loop
        assert await read_within(redis_source) == 0
        assert await read_within(nats_source) == 1
    assert current_asyncio_loop() is None


# -- the asyncio bridge ----------------------------------------------------------------


async def test_run_aio_needs_a_loop() -> None:
    async def nothing() -> None:
        return None

    with pytest.raises(RuntimeError, match="open_asyncio_loop"):
        await run_aio(nothing)


async def test_open_asyncio_loop_reuses_the_open_loop() -> None:
    async with open_asyncio_loop() as outer:
        async with open_asyncio_loop() as inner:
            assert inner is outer
        assert not outer.is_closed()  # the inner block did not close it

        async def running_loop() -> object:
            return asyncio.get_running_loop()

        assert await run_aio(running_loop) is outer


async def test_cancelling_run_aio_cancels_the_asyncio_side_first() -> None:
    events: list[str] = []

    async def aio_sleep() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append("asyncio cancelled")
            await asyncio.sleep(0.01)  # cleanup may still await
            events.append("asyncio cleaned up")
            raise

    async with open_asyncio_loop():
        with trio.move_on_after(0.1) as scope:
            await run_aio(aio_sleep)
        events.append("trio sees the cancellation")
        assert scope.cancelled_caught
    assert events == ["asyncio cancelled", "asyncio cleaned up", "trio sees the cancellation"]


async def test_run_aio_passes_results_and_errors_through() -> None:
    async def divide(a: int, b: int) -> float:
        await asyncio.sleep(0)
        return a / b

    async with open_asyncio_loop():
        assert await run_aio(divide, 6, 3) == 2.0
        with pytest.raises(ZeroDivisionError):
            await run_aio(divide, 1, 0)


def test_the_package_reaches_asyncio_only_through_aio() -> None:
    package = Path(__file__).resolve().parent.parent / "nullworker"
    for path in package.glob("*.py"):
        if path.name == "_aio.py":
            continue
        text = path.read_text()
        for name in ("asyncio", "trio_asyncio"):
            assert f"import {name}" not in text, f"{path.name} imports {name}"
            assert f"from {name}" not in text, f"{path.name} imports from {name}"
