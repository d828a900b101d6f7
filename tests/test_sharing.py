"""Several ``nullworker autoscale --config`` processes sharing leased endpoints.

* Pure Trio, on the mock clock (``autojump_clock``): three "processes" in one run,
  each an :func:`~nullworker.client.sharing.autoscale_endpoints` call with its own
  token, on a store in memory whose keys expire on the Trio clock as Redis's do (a
  "killed" process's commands never arrive any more). Processes join one by one, then
  one dies: at every sample no endpoint has two leaders, and after each step the spread
  settles to at most ``ceil(n / k)`` each, every endpoint led.
* The membership (``nullworker.client.lease.Membership``) on a real ``redis-server``:
  the count, an entry expiring on the server's clock, leaving, and the key each group
  gets.
* Three real ``nullworker autoscale --config`` processes, one file of four endpoints
  each with a lease (``--max 1``, more demand than that), a real ``redis-server``, the
  local engine in this process and five real workers: the endpoints are spread (each
  led by exactly one process, none leading more than ``ceil(4 / 3) = 2``); one process
  is killed with SIGKILL and its endpoints are led again within the TTL plus one
  renewal, two each. Throughout, the engine's own records (every ``/route/`` answer,
  every ``/worker_status/`` report) never show an endpoint holding more than its
  ``max``.

Every wait is bounded; times are asserted only as "within the TTL plus generous slack".
"""

from __future__ import annotations

import math
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
import trio.testing

from nullworker.client.autoscale_cli import main
from nullworker.client.autoscaler import autoscale
from nullworker.client.lease import (
    MEMBERS_PREFIX,
    Lease,
    LeaseEvent,
    Membership,
    RedisLease,
    RedisLeaseStore,
    members_key,
)
from nullworker.client.sharing import EndpointRun, ShareEvent, autoscale_endpoints
from nullworker.engine import Engine

from .conftest import StartWorker
from .helpers import wait_until
from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    rdb_fixture,
    redis_server_binary_fixture,
    redis_server_fixture,
)
from .test_autoscale_cli import (
    Autoscale,
    RunAutoscale,
    run_autoscale_fixture,  # noqa: F401  (a fixture, used by name)
    start_vast_worker,
    write_demand,
)

ENDPOINTS = ("e1", "e2", "e3", "e4")
MAX = 1
TTL_S = 1.5
RENEW_S = 0.5
#: Bound on each wait: process start-up on a busy machine, settling, reserving.
WAIT_S = 15.0
# Scheduling slack on top of the lease timings: generous, for a loaded 2-core machine.
SLACK_S = 5.0


# -- pure Trio: the sharing's logic, on a store in memory -------------------------------------


class Server:
    """Keys and sorted sets in memory, expiring on the Trio clock as Redis's do."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, float]] = {}
        self.members: dict[str, float] = {}

    def holder(self, key: str) -> str | None:
        value, expires_at = self.keys.get(key, ("", -math.inf))
        return value if trio.current_time() < expires_at else None


class Process:
    """One process's connection: once ``dead``, its commands never arrive (SIGKILL)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.dead = False

    async def run(self) -> None:
        if self.dead:
            await trio.sleep_forever()
        await trio.sleep(0.01)  # a round trip


class MemoryStore:
    """A lease store and a member store on a :class:`Server`, through a :class:`Process`."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.server = process.server

    def describe(self) -> str:
        return "memory"

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def acquire(self, key: str, token: str, ttl_ms: int) -> str | None:
        await self.process.run()
        if self.server.holder(key) in (None, token):
            self.server.keys[key] = (token, trio.current_time() + ttl_ms / 1000)
        return self.server.holder(key)

    async def renew(self, key: str, token: str, ttl_ms: int) -> str | None:
        await self.process.run()
        if self.server.holder(key) == token:
            self.server.keys[key] = (token, trio.current_time() + ttl_ms / 1000)
        return self.server.holder(key)

    async def release(self, key: str, token: str) -> bool:
        await self.process.run()
        if self.server.holder(key) == token:
            del self.server.keys[key]
            return True
        return False

    async def join(self, key: str, member: str, ttl_ms: int) -> int:
        await self.process.run()
        now = trio.current_time()
        self.server.members[member] = now + ttl_ms / 1000
        self.server.members = {m: t for m, t in self.server.members.items() if t > now}
        return len(self.server.members)

    async def leave(self, key: str, member: str) -> bool:
        await self.process.run()
        return self.server.members.pop(member, None) is not None


async def test_a_closed_gate_skips_the_attempts_and_says_so_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server()
    events: list[LeaseEvent] = []
    lease = Lease(
        MemoryStore(Process(server)), "autoscale:a", ttl_s=10.0, renew_s=3.0, on_event=events.append
    )
    open_ = False
    entered: list[float] = []

    @asynccontextmanager
    async def gate() -> AsyncIterator[bool]:
        entered.append(trio.current_time())
        yield open_

    async with trio.open_nursery() as nursery:

        async def lead() -> None:
            async with lease.leadership(gate=gate):
                await trio.sleep_forever()

        nursery.start_soon(lead)
        await trio.sleep(29)
        # Asked every renew_s; nothing sent; said once.
        assert len(entered) == 10 and server.holder("autoscale:a") is None
        assert not lease.leader and not lease.claimed
        [standby] = events
        assert standby.kind == "standby" and "leads its share" in standby.message
        open_ = True
        await trio.sleep(1.5)  # the next attempt, at 30 s
        assert lease.leader and lease.claimed and server.holder("autoscale:a") == lease.token
        assert [e.kind for e in events] == ["standby", "lease_acquired"]
        nursery.cancel_scope.cancel()


async def no_jobs() -> int:
    return 0


class Member:
    """One "process": its leases (one per endpoint) and its autoscale_endpoints() call."""

    def __init__(self, server: Server, name: str, endpoints: Sequence[str]) -> None:
        self.process = Process(server)
        self.token = name * 32
        self.events: list[ShareEvent] = []
        # The real autoscaler, with no demand: it never reserves.
        self.runs = [
            EndpointRun(
                endpoint,
                partial(autoscale, endpoint, demand=no_jobs, api_key="unused"),
                lease=Lease(
                    MemoryStore(self.process),
                    f"autoscale:{endpoint}",
                    ttl_s=10.0,
                    renew_s=3.0,
                    token=self.token,
                ),
            )
            for endpoint in endpoints
        ]
        self.scope = trio.CancelScope()

    def membership(self, leases: Sequence[Lease]) -> Membership:
        return Membership(
            MemoryStore(self.process), "members", member=self.token, ttl_s=10.0, renew_s=3.0
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await autoscale_endpoints(
                self.runs,
                membership=self.membership,
                on_event=self.events.append,
                task_status=task_status,
            )

    def leading(self) -> set[str]:
        return {run.name for run in self.runs if run.leading}


async def test_processes_joining_and_dying_settle_to_their_share_never_two_leaders(
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoints = ("a", "b", "c", "d", "e")
    server = Server()
    members: list[Member] = []
    overlaps: list[tuple[float, str]] = []

    async def watch() -> None:
        while True:
            for endpoint in endpoints:
                if sum(endpoint in m.leading() for m in members) > 1:
                    overlaps.append((trio.current_time(), endpoint))
            await trio.sleep(0.05)

    def live() -> list[Member]:
        return [m for m in members if not m.process.dead]

    def settled() -> bool:
        alive = live()
        share = math.ceil(len(endpoints) / len(alive))
        led = [m.leading() for m in alive]
        return (
            sorted(e for mine in led for e in mine) == sorted(endpoints)
            and max(len(mine) for mine in led) <= share
        )

    async def settle(within_s: float) -> float:
        began = trio.current_time()
        await wait_until(settled, within_s=within_s, poll_s=0.05)
        took = trio.current_time() - began
        # And it stays so: nothing moves any more.
        spread = [m.leading() for m in live()]
        await trio.sleep(60)
        assert [m.leading() for m in live()] == spread
        return took

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for name in "xyz":
            member = Member(server, name, endpoints)
            members.append(member)
            await nursery.start(member.run)
            took = await settle(within_s=60)
            spread = [sorted(m.leading()) for m in members]
            print(f"{len(members)} process(es): {spread} after {took:.1f} s")
        assert sorted(len(m.leading()) for m in members) == [1, 2, 2]
        assert [e.members for e in members[0].events if e.kind == "members"] == [1, 2, 3]
        assert any(e.kind == "shed" for e in members[0].events)

        # SIGKILL the one leading the most: nothing it sends arrives any more.
        victim = max(members, key=lambda m: len(m.leading()))
        victim.process.dead = True
        took = await settle(within_s=60)
        print(f"killed: {[sorted(m.leading()) for m in live()]} after {took:.1f} s")
        assert sorted(len(m.leading()) for m in live()) == [2, 3]
        # Within the TTL and one renewal (plus the round trips of the attempts).
        assert took <= 10.0 + 3.0 + 0.5, took
        for member in live():
            assert [e for e in member.events if e.kind == "members"][-1].members == 2
        victim.scope.cancel()
        nursery.cancel_scope.cancel()
    assert overlaps == []


# -- the membership ------------------------------------------------------------------------


def test_the_members_key_depends_on_the_set_of_lease_keys_only() -> None:
    key = members_key(["autoscale:b", "autoscale:a"])
    assert key.startswith(MEMBERS_PREFIX)
    assert key == members_key(["autoscale:a", "autoscale:b", "autoscale:a"])
    assert key != members_key(["autoscale:a", "autoscale:c"])


async def test_members_count_themselves_expire_on_the_server_and_leave(
    redis_server: ServerProcess, rdb: redis.Redis
) -> None:
    url = f"{redis_server.url}/0"
    leases = [RedisLease(url, f"autoscale:{n}", ttl_s=1.5, renew_s=0.5) for n in ("a", "b")]
    one = Membership.beside(leases)
    assert one is not None and one.key == members_key(["autoscale:a", "autoscale:b"])
    assert (one.ttl_s, one.renew_s, one.member) == (1.5, 0.5, leases[0].token)
    # Leases on two servers have no membership.
    assert Membership.beside([leases[0], RedisLease(f"{url}1", "autoscale:b")]) is None
    two = Membership(RedisLeaseStore(url), one.key, member="two", ttl_s=1.5, renew_s=0.5)
    async with one, two:
        assert await one.refresh() == 1
        assert await two.refresh() == 2
        assert await one.refresh() == 2
        # The entry lives ttl - renew (1 s) after its last refresh, on the server's clock.
        score = rdb.zscore(one.key, "two")
        seconds, micros = rdb.time()
        assert score is not None and 0 < score - (seconds * 1000 + micros // 1000) <= 1000
        await trio.sleep(1.3)
        assert await one.refresh() == 1  # "two" was killed: it expired
        await two.refresh()
        await two.leave()
        assert await one.refresh() == 1
        assert one.error is None
    # Unreachable: the last count is kept, and the reason is said.
    gone = Membership(RedisLeaseStore("redis://127.0.0.1:1/0"), "k", member="m", renew_s=0.5)
    async with gone:
        assert await gone.refresh() == 1
        assert gone.error is not None and "ConnectionError" in gone.error


# -- three processes, four endpoints -----------------------------------------------------------


def test_the_plan_says_which_endpoints_are_shared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAST_API_KEY", "unused")
    config = tmp_path / "autoscale.toml"
    write_config(
        config, engine_url="http://127.0.0.1:1", redis_url="redis://:pw@queue:6379", demand=config
    )
    assert main(["--config", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    key = members_key(f"autoscale:{name}" for name in ENDPOINTS)
    assert out.splitlines()[-1] == (
        "sharing: 4 leased endpoints at redis://:***@queue:6379/0, shared out among the "
        f"processes running this file (members {key!r})"
    )
    assert "pw" not in out


def write_config(path: Path, *, engine_url: str, redis_url: str, demand: Path) -> None:
    tables = []
    for name in ENDPOINTS:
        tables.append(
            f"""
[endpoints.{name}]
api_key_env = "VAST_API_KEY"
engine_url = "{engine_url}"
max = {MAX}
poll = 0.3
scale_down_delay = 1

[[endpoints.{name}.sources]]
kind = "command"
command = "cat {demand}"

[endpoints.{name}.lease]
url = "{redis_url}/0"
name = "autoscale:{name}"
ttl = {TTL_S}
renew = {RENEW_S}
"""
        )
    path.write_text("".join(tables))


def leads(cli: Autoscale) -> set[str]:
    """The endpoints this process leads, from its own lease events, in order."""
    led: set[str] = set()
    for event in cli.events:
        if event["kind"] == "lease_acquired":
            led.add(event["endpoint"])
        elif event["kind"] in ("lease_lost", "lease_released"):
            led.discard(event["endpoint"])
    return led


def token(cli: Autoscale) -> str:
    tokens = {event["token"] for event in cli.of_kind("started")}
    assert len(tokens) == 1, tokens  # one token per process, on every endpoint's line
    return tokens.pop()


def holders(rdb: redis.Redis, clis: list[Autoscale]) -> dict[str, Autoscale | None]:
    """Who holds each endpoint's lease key in Redis (by token prefix)."""
    by_token = {token(cli): cli for cli in clis}
    found: dict[str, Autoscale | None] = {}
    for name in ENDPOINTS:
        value = rdb.get(f"autoscale:{name}")
        found[name] = None if value is None else by_token.get(str(value)[:8])
    return found


def held_by_endpoint(engine: Engine) -> dict[str, int]:
    """The most reservations held at once per endpoint, replaying the engine's records:
    each report sets its worker's requests in flight; each request's endpoint is the one
    its ``/route/`` asked for."""
    endpoint_of = {record.request_idx: record.endpoint for record in engine.ready_replies}
    working: dict[int, tuple[int, ...]] = {}
    most: dict[str, int] = defaultdict(int)
    for report in engine.worker_status_reports:
        working[report.body["id"]] = tuple(report.body.get("working_request_idxs", ()))
        now: dict[str, int] = defaultdict(int)
        for idxs in working.values():
            for name in {endpoint_of.get(idx, "?") for idx in idxs}:
                now[name] += 1
        for name, count in now.items():
            most[name] = max(most[name], count)
    return dict(most)


def held_now(engine: Engine) -> dict[str, int]:
    """Workers busy per endpoint as of each worker's latest report."""
    endpoint_of = {record.request_idx: record.endpoint for record in engine.ready_replies}
    now: dict[str, int] = defaultdict(int)
    for worker in engine.workers.values():
        for name in {endpoint_of.get(idx, "?") for idx in worker.working_request_idxs}:
            now[name] += 1
    return dict(now)


def epoch(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


async def wait_spread(
    rdb: redis.Redis, engine: Engine, clis: list[Autoscale], *, most: int
) -> dict[str, Autoscale | None]:
    """Until every endpoint is led by exactly one process (its events and Redis agree),
    none leads more than ``most``, and each endpoint holds its one worker."""

    def settled() -> bool:
        found = holders(rdb, clis)
        if any(cli is None for cli in found.values()):
            return False
        for cli in clis:
            mine = {name for name, holder in found.items() if holder is cli}
            if leads(cli) != mine or len(mine) > most:
                return False
        return held_now(engine) == dict.fromkeys(ENDPOINTS, MAX)

    await wait_until(settled, within_s=WAIT_S, poll_s=0.05)
    return holders(rdb, clis)


async def test_three_processes_share_four_endpoints_and_a_killed_ones_move_within_the_ttl(
    redis_server: ServerProcess,
    rdb: redis.Redis,
    vast_engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
    tmp_path: Path,
) -> None:
    engine = vast_engine
    assert engine.url is not None
    for worker_id in range(1, len(ENDPOINTS) + 2):  # one spare for the hand-offs
        await start_vast_worker(start_worker, engine, worker_id)
    demand = tmp_path / "demand"
    write_demand(demand, "3")  # more than max: each endpoint's target is its max
    config = tmp_path / "autoscale.toml"
    write_config(config, engine_url=engine.url, redis_url=redis_server.url, demand=demand)

    clis = [await run_autoscale("--config", str(config), endpoint=None) for _ in range(3)]
    for cli in clis:
        await cli.wait_events("members")
    share = math.ceil(len(ENDPOINTS) / len(clis))
    found = await wait_spread(rdb, engine, clis, most=share)
    counts = sorted(len(leads(cli)) for cli in clis)
    print(f"settled: {counts} endpoints per process")
    assert sum(counts) == len(ENDPOINTS) and max(counts) <= share
    # Every process comes to count all three (on a loaded machine an entry can lapse
    # for a moment and be renewed; what matters is that each one gets there).
    for cli in clis:
        await cli.wait_until(lambda cli=cli: cli.of_kind("members")[-1]["members"] == 3)

    # SIGKILL the process leading the most: its endpoints move to the two others.
    victim = max(clis, key=lambda cli: len(leads(cli)))
    moved = {name for name, holder in found.items() if holder is victim}
    survivors = [cli for cli in clis if cli is not victim]
    before = {id(cli): len(cli.of_kind("lease_acquired")) for cli in survivors}
    killed_at = time.time()
    victim.process.kill()
    await victim.process.wait()
    found = await wait_spread(rdb, engine, survivors, most=math.ceil(len(ENDPOINTS) / 2))
    assert sorted(len(leads(cli)) for cli in survivors) == [2, 2]
    taken = {
        event["endpoint"]: epoch(event) - killed_at
        for cli in survivors
        for event in cli.of_kind("lease_acquired")[before[id(cli)] :]
    }
    assert moved <= set(taken), (moved, taken)
    # The key outlives its holder by up to the TTL; the membership entry expires before
    # it; then the next attempt (every renew) of a process under its share takes it.
    slowest = max(taken[name] for name in moved)
    assert slowest <= TTL_S + RENEW_S + SLACK_S, taken
    print(f"SIGKILL: {sorted(moved)} led again after {slowest:.2f} s (ttl {TTL_S:g} s)")
    for cli in survivors:
        await cli.wait_until(lambda cli=cli: cli.of_kind("members")[-1]["members"] == 2)

    # Every lease and sharing line names the process that printed it. (Whether the start
    # needed a shed depends on which process counted the others first.)
    for cli in clis:
        mine = token(cli)
        kinds = ("standby", "lease_acquired", "lease_lost", "lease_released", "members", "shed")
        assert all(e["token"] == mine for e in cli.events if e["kind"] in kinds)
    sheds = [e for cli in clis for e in cli.of_kind("shed")]
    assert all(e["endpoint"] in ENDPOINTS for e in sheds)
    print(f"sheds: {[e['endpoint'] for e in sheds]}")

    # SIGTERM of one survivor: it closes its reservations, deletes its keys and leaves;
    # the last one, counting one process, takes all four within two renewals.
    first, last = survivors
    handed = leads(first)
    before = len(last.of_kind("lease_acquired"))
    stopped_at = time.time()
    assert await first.stop(signal.SIGTERM, within_s=WAIT_S) == 143, first.err
    assert first.err == ""
    kinds = [e["kind"] for e in first.events]
    assert kinds[-1] == "stopped" and kinds.count("lease_released") >= len(handed)
    await wait_spread(rdb, engine, [last], most=len(ENDPOINTS))
    taken = {e["endpoint"]: epoch(e) - stopped_at for e in last.of_kind("lease_acquired")[before:]}
    assert handed <= set(taken), (handed, taken)
    print(f"SIGTERM: {sorted(handed)} led again after {max(taken.values()):.2f} s")
    assert max(taken.values()) <= 2 * RENEW_S + SLACK_S, taken

    # Never more than max held per endpoint, in the engine's own records.
    most = held_by_endpoint(engine)
    print(f"most held at once per endpoint: {most}")
    assert set(most) == set(ENDPOINTS) and all(count <= MAX for count in most.values()), most
    assert await last.stop(signal.SIGTERM, within_s=WAIT_S) == 143, last.err
    assert last.err == ""
    assert all(rdb.get(f"autoscale:{name}") is None for name in ENDPOINTS)  # handed over
    # The killed one expired from the membership, the others left it.
    assert rdb.zcard(members_key(f"autoscale:{name}" for name in ENDPOINTS)) == 0
