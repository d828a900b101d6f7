"""Tests of the Redis lease (``nullworker.client.lease``) and ``nullworker autoscale --lease``.

* Pure Trio, on the mock clock (``autojump_clock``), against a store in memory whose key
  expires on the Trio clock as Redis's does: the local deadline (the term ends
  ``ttl - renew`` after the last successful renewal was *sent*, before the key can
  expire), commands that fail or never answer, a key that disappears, the handover on
  release, and two leases under random faults never leading at once.
* The command line: usage errors, the lease metrics' names.
* Two ``nullworker autoscale --lease`` subprocesses against a real ``redis-server``, the
  local engine and three real workers, with ``--max 2``: kill -9 of the leader, Redis
  stopped, SIGTERM of the leader. Throughout each, the engine's ``/workers`` is sampled
  every 50 ms and the most workers busy at once must never exceed ``--max`` (two
  leaders at once would make three busy).
"""

from __future__ import annotations

import itertools
import math
import random
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from nullworker.client.autoscale_cli import main
from nullworker.client.autoscaler import AutoscalerStatistics
from nullworker.client.lease import (
    Lease,
    LeaseError,
    LeaseEvent,
    LeaseStatistics,
    RedisLease,
    Term,
)
from nullworker.client.metrics import AutoscalerCollector
from nullworker.engine import Engine
from nullworker.errors import ConfigError

from .conftest import StartWorker
from .servers import (  # noqa: F401  (pytest fixtures, used by name)
    ServerProcess,
    redis_server_binary_fixture,
    redis_server_fixture,
)
from .test_autoscale_cli import (
    KEY,
    WAIT_S,
    Autoscale,
    RunAutoscale,
    engine_view,
    parse_metrics,
    run_autoscale_fixture,  # noqa: F401  (a fixture, used by name)
    start_vast_worker,
    wait_engine,
    write_demand,
)

# -- a store in memory, on the Trio clock ------------------------------------------------


class FakeRedis:
    """One key, expiring on the Trio clock, with faults: what the lease's scripts see."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.expires_at = -math.inf
        #: Commands fail at once (connection refused).
        self.down = False
        #: Commands are never answered (a frozen server).
        self.hang = False
        #: Seconds each way: a command runs this long after it is sent, and is answered
        #: as long after that.
        self.delay_s = 0.0

    def holder(self) -> str | None:
        if self.value is not None and trio.current_time() >= self.expires_at:
            self.value = None
        return self.value

    def wipe(self) -> None:
        """The key disappears (a restart without persistence, FLUSHALL, a failover)."""
        self.value = None


class FakeStore:
    """A :class:`~nullworker.client.lease.LeaseStore` on a :class:`FakeRedis`."""

    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.commands = 0

    def describe(self) -> str:
        return "fake"

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def _run(self, command: Callable[[], Any]) -> Any:
        self.commands += 1
        server = self.server
        if server.hang:
            await trio.sleep_forever()
        if server.down:
            raise LeaseError("fake: connection refused")
        await trio.sleep(server.delay_s)
        result = command()
        await trio.sleep(server.delay_s)
        return result

    async def acquire(self, key: str, token: str, ttl_ms: int) -> str | None:
        def run() -> str | None:
            if self.server.holder() in (None, token):
                self.server.value = token
                self.server.expires_at = trio.current_time() + ttl_ms / 1000
            return self.server.holder()

        result: str | None = await self._run(run)
        return result

    async def renew(self, key: str, token: str, ttl_ms: int) -> str | None:
        def run() -> str | None:
            if self.server.holder() == token:
                self.server.expires_at = trio.current_time() + ttl_ms / 1000
            return self.server.holder()

        result: str | None = await self._run(run)
        return result

    async def release(self, key: str, token: str) -> bool:
        def run() -> bool:
            if self.server.holder() == token:
                self.server.value = None
                return True
            return False

        result: bool = await self._run(run)
        return result


class Recorder:
    """A lease's events and terms: (start, end) on the Trio clock, end None while leading."""

    def __init__(self) -> None:
        self.events: list[LeaseEvent] = []
        self.terms: list[list[float | None]] = []
        self.lost_terms: list[Term] = []

    def __call__(self, event: LeaseEvent) -> None:
        self.events.append(event)

    def of_kind(self, kind: str) -> list[LeaseEvent]:
        return [event for event in self.events if event.kind == kind]


def make_lease(server: FakeRedis, recorder: Recorder, **kwargs: Any) -> Lease:
    settings: dict[str, Any] = {"ttl_s": 10.0, "renew_s": 3.0, "on_event": recorder}
    settings.update(kwargs)
    return Lease(FakeStore(server), "lease", **settings)


async def lead_forever(lease: Lease, recorder: Recorder) -> None:
    """What ``nullworker autoscale --lease`` does, with a body that holds nothing."""
    while True:
        async with lease.leadership() as term:
            span: list[float | None] = [trio.current_time(), None]
            recorder.terms.append(span)
            try:
                await trio.sleep_forever()
            finally:
                span[1] = trio.current_time()
        recorder.lost_terms.append(term)


# -- pure Trio: the lease's logic --------------------------------------------------------


async def test_a_leader_keeps_the_lease_and_hands_it_over_on_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeRedis()
    a_events, b_events = Recorder(), Recorder()
    a = make_lease(server, a_events, token="a" * 32)
    b = make_lease(server, b_events, token="b" * 32)
    async with trio.open_nursery() as nursery:
        a_scope = trio.CancelScope()

        async def run_a() -> None:
            with a_scope:
                await lead_forever(a, a_events)

        nursery.start_soon(run_a)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lead_forever, b, b_events)
        await trio.sleep(60)
        # A renewed all along; B saw it once and said so once.
        assert a.leader and not b.leader
        assert a.statistics() == LeaseStatistics(leader=True, terms=1)
        assert [e.kind for e in a_events.events] == ["lease_acquired"]
        (standby,) = b_events.events
        assert standby.kind == "standby" and standby.holder == "a" * 8 and standby.error is None
        assert server.holder() == a.token and server.expires_at > trio.current_time()

        a_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        released_at = trio.current_time()
        assert await a.release()
        assert a_events.events[-1].kind == "lease_released" and a_events.events[-1].deleted
        await wait_event(b_events, "lease_acquired")
        # Handover at B's next attempt, not after the TTL.
        assert b_events.of_kind("lease_acquired")[0].at - released_at <= b.renew_s
        assert b.leader and not a.leader
        # Releasing what is not ours any more deletes nothing and says nothing.
        count = len(a_events.events)
        assert not await a.release()
        assert len(a_events.events) == count
        nursery.cancel_scope.cancel()


async def wait_event(recorder: Recorder, kind: str, count: int = 1) -> None:
    with trio.fail_after(100):
        while len(recorder.of_kind(kind)) < count:
            await trio.sleep(0.01)


@pytest.mark.parametrize("fault", ["down", "hang"])
async def test_the_leader_drops_at_its_local_deadline_before_the_key_expires(
    autojump_clock: trio.testing.MockClock, fault: str
) -> None:
    server = FakeRedis()
    events = Recorder()
    lease = make_lease(server, events)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead_forever, lease, events)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        assert lease.leader and events.terms == [[t0, None]]
        # Renewals are sent at t0 + 3 (succeeds) and t0 + 6 (fails): the term must end at
        # t0 + 3 + ttl - margin = t0 + 10, while the key lives on the server until t0 + 13.
        await trio.sleep(4)
        setattr(server, fault, True)
        await wait_event(events, "lease_lost")
        (lost,) = events.of_kind("lease_lost")
        assert lost.reason == "expired" and lost.at == pytest.approx(t0 + 10)
        if fault == "down":
            assert lost.error == "fake: connection refused"
        else:
            assert lost.error == "no answer within 1.5 s"
        assert events.terms[0][1] == pytest.approx(t0 + 10)  # the body was cancelled then
        assert server.expires_at - lost.at >= lease.margin_s == 3.0
        assert not lease.leader
        assert lease.statistics() == LeaseStatistics(leader=False, terms=1)
        # Back to standby, once (not at every failed attempt), and no second term.
        await trio.sleep(30)
        standby = events.of_kind("standby")
        assert len(standby) == 1 and standby[0].error is not None
        assert len(events.terms) == 1
        # The server answers again; the key expired long ago, so it is free.
        server.down = server.hang = False
        await wait_event(events, "lease_acquired", 2)
        await trio.sleep(0.1)
        assert lease.statistics() == LeaseStatistics(leader=True, terms=2)
        nursery.cancel_scope.cancel()


async def test_a_renewal_answered_too_late_keeps_the_key_and_the_next_attempt_takes_it_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server runs each command 1 s after it is sent and answers 1 s later: past the
    # 1.5 s bound. The leader loses its term although the server keeps extending the
    # key, and then finds its own token there and takes it back.
    server = FakeRedis()
    events = Recorder()
    lease = make_lease(server, events)
    other = make_lease(server, Recorder())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead_forever, lease, events)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        server.delay_s = 1.0
        nursery.start_soon(lead_forever, other, Recorder())
        await wait_event(events, "lease_lost")
        (lost,) = events.of_kind("lease_lost")
        assert lost.at == pytest.approx(t0 + 7) and lost.reason == "expired"
        assert server.holder() == lease.token
        server.delay_s = 0.0
        await wait_event(events, "lease_acquired", 2)
        assert lease.statistics() == LeaseStatistics(leader=True, terms=2)
        assert not other.leader
        nursery.cancel_scope.cancel()


async def test_a_key_that_disappears_ends_the_term_within_one_renewal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeRedis()
    a_events, b_events = Recorder(), Recorder()
    a = make_lease(server, a_events, token="a" * 32)
    b = make_lease(server, b_events, token="b" * 32)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead_forever, a, a_events)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lead_forever, b, b_events)
        await trio.sleep(10.5)
        server.wipe()
        await wait_event(a_events, "lease_lost")
        await wait_event(b_events, "lease_acquired")
        (lost,) = a_events.of_kind("lease_lost")
        (acquired,) = b_events.of_kind("lease_acquired")
        assert lost.reason in ("taken", "gone")
        # The one overlap the lease allows: at most one renewal interval.
        assert lost.at - acquired.at <= a.renew_s
        assert a_events.terms[0][1] is not None
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", range(6))
async def test_two_leases_never_lead_at_once_under_random_faults(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    rng = random.Random(seed)
    server = FakeRedis()
    recorders = [Recorder(), Recorder()]
    leases = [
        make_lease(server, recorder, ttl_s=2.0, renew_s=0.5, token=f"{i}" * 32)
        for i, recorder in enumerate(recorders)
    ]
    async with trio.open_nursery() as nursery:
        for lease, recorder in zip(leases, recorders, strict=True):
            nursery.start_soon(lead_forever, lease, recorder)
        for _ in range(150):
            server.down = rng.random() < 0.2
            server.hang = not server.down and rng.random() < 0.1
            # Up to just under the bound each way: some answers arrive too late.
            server.delay_s = rng.choice([0.0, 0.0, 0.01, 0.3, 0.7])
            await trio.sleep(rng.uniform(0.1, 3.0))
        nursery.cancel_scope.cancel()
    spans = sorted(
        (start, end if end is not None else math.inf, i)
        for i, recorder in enumerate(recorders)
        for start, end in ((s, e) for s, e in recorder.terms if s is not None)
    )
    assert sum(len(r.terms) for r in recorders) >= 3, "the faults left no handover to check"
    for (_, end, i), (start, _, j) in itertools.pairwise(spans):
        assert end <= start, f"leases {i} and {j} both led from {start} to {end}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl_s": 6.0, "renew_s": 3.0}, r"ttl_s must be .* > 2 \* renew_s \(6\)"),
        ({"renew_s": 0.0}, "renew_s must be"),
        ({"ttl_s": math.inf}, "ttl_s must be"),
        ({"timeout_s": 3.0}, "timeout_s must be"),
        ({"token": ""}, "token must be"),
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Lease(FakeStore(FakeRedis()), "lease", **kwargs)


def test_a_redis_lease_needs_a_redis_url_and_shows_no_password() -> None:
    with pytest.raises(ConfigError, match="the URL scheme must be one of") as caught:
        RedisLease("http://:hunter2@h", "k")
    assert "hunter2" not in str(caught.value)
    lease = RedisLease("redis://:hunter2@h:6379/2", "k", renew_s=1.0, ttl_s=3.0)
    assert lease.describe() == "lease 'k' at redis://:***@h:6379/2"
    assert lease.timeout_s == 0.5 and len(lease.token) == 32
    assert RedisLease("redis://h", "k").token != lease.token


# -- where the names live ------------------------------------------------------------------

#: What ``nullworker.client.lease`` offered when it was one module: its ``__all__`` and the
#: constants other modules read.
LEASE_NAMES = (
    "DEFAULT_RENEW_S DEFAULT_TTL_S Lease LeaseError LeaseEvent LeaseEventKind LeaseStatistics "
    "LeaseStore LostReason MemberStore Membership RedisLease RedisLeaseStore Term members_key"
).split()
LEASE_CONSTANTS = {
    "TOKEN_SHOWN": 8,
    "MEMBERS_PREFIX": "nullworker:members:",
    "CLOSE_TIMEOUT_S": 1.0,
}


def test_every_name_of_the_lease_module_is_still_imported_from_it() -> None:
    import nullworker.client
    import nullworker.client.lease as lease

    assert set(LEASE_NAMES) <= set(lease.__all__)
    for name in LEASE_NAMES:
        assert getattr(lease, name) is not None, name
    for name, value in LEASE_CONSTANTS.items():
        assert getattr(lease, name) == value, name
    for name in ("Lease", "Membership", "RedisLease"):
        assert getattr(nullworker.client, name) is getattr(lease, name)
    assert issubclass(lease.RedisLease, lease.Lease)


# -- the command line: usage and metrics ---------------------------------------------------

DEMAND = ["--endpoint", "ep", "--demand-command", "echo 1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*DEMAND, "--lease-ttl", "5"], "--lease-ttl goes with --lease"),
        ([*DEMAND, "--lease-renew", "1"], "--lease-renew goes with --lease"),
        ([*DEMAND, "--lease", "redis://h"], "expected 2 arguments"),
        ([*DEMAND, "--lease", "http://:pw@h", "k"], "--lease: 'http://:***@h': the URL scheme"),
        ([*DEMAND, "--lease", "redis://h", "k", "--lease-ttl", "6"], "more than twice"),
        ([*DEMAND, "--lease", "redis://h", "k", "--lease-renew", "0"], "--lease-renew must be"),
        ([*DEMAND, "--lease", "redis://h", "", "--lease-ttl", "60"], "the lease needs a key"),
    ],
)
def test_lease_usage_errors_exit_2(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAST_API_KEY", KEY)
    assert main(argv) == 2
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if "error:" in line]
    assert line.startswith("nullworker autoscale: error: ") and message in line
    assert captured.out == ""


def test_the_collector_names_the_lease_metrics() -> None:
    stats = AutoscalerStatistics(2, 2, 2, 0, 0, {}, 0, 0, True)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        AutoscalerCollector(
            lambda: {"ep": stats}, lease=lambda: {"ep": LeaseStatistics(leader=True, terms=3)}
        )
    )
    metrics = parse_metrics(generate_latest(registry).decode())
    assert metrics['nullworker_autoscale_lease_leader{endpoint="ep"}'] == 1
    assert metrics['nullworker_autoscale_lease_terms_total{endpoint="ep"}'] == 3
    assert metrics['nullworker_autoscale_reservations_held{endpoint="ep"}'] == 2
    # A standby: the lease metrics only.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        AutoscalerCollector(dict, lease=lambda: {"ep": LeaseStatistics(leader=False, terms=0)})
    )
    assert parse_metrics(generate_latest(registry).decode()) == {
        'nullworker_autoscale_lease_leader{endpoint="ep"}': 0,
        'nullworker_autoscale_lease_terms_total{endpoint="ep"}': 0,
    }


# -- two autoscalers as subprocesses ---------------------------------------------------------

MAX = 2


class BusyMeter:
    """The most workers busy at once in the engine's ``/workers``, sampled every 50 ms."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_busy = 0
        self.samples = 0

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                view = (await http.get(f"{self.engine.url}/workers")).json()
                busy = sum(1 for worker in view["workers"] if worker["state"] == "busy")
                self.max_busy = max(self.max_busy, busy)
                self.samples += 1
                await trio.sleep(0.05)


def epoch(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def held_now(cli: Autoscale) -> int:
    """Reservations held, as of the process's latest event that says."""
    for event in reversed(cli.events):
        if "held" in event and event["kind"] != "stopped":
            held: int = event["held"]
            return held
    return 0


class Pair:
    """The setup of each test: three workers, the meter, and two autoscalers A then B."""

    def __init__(self, engine: Engine, run_autoscale: RunAutoscale, argv: list[str]) -> None:
        self.engine = engine
        self.meter = BusyMeter(engine)
        self._run = run_autoscale
        self.argv = argv

    async def start(self, nursery: trio.Nursery, start_worker: StartWorker) -> None:
        for worker_id in (1, 2, 3):
            await start_vast_worker(start_worker, self.engine, worker_id)
        nursery.start_soon(self.meter.run)
        self.a = await self._run(*self.argv)
        await self.a.wait_events("lease_acquired")
        await self.a.wait_until(lambda: held_now(self.a) == MAX)
        self.b = await self._run(*self.argv, "--metrics-port", "0")
        (standby,) = await self.b.wait_events("standby")
        assert standby["holder"] == self.a.of_kind("started")[0]["token"]
        assert await self.busy() == MAX

    async def busy(self) -> int:
        return sum(state == "busy" for state in (await engine_view(self.engine)).values())


async def two_autoscalers(
    nursery: trio.Nursery,
    engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
    redis: ServerProcess,
    demand: Path,
    *,
    ttl: float,
    renew: float,
) -> Pair:
    write_demand(demand, "3")  # more than --max: the target is --max
    assert engine.url is not None
    argv = [
        "--demand-command",
        f"cat {demand}",
        "--max",
        str(MAX),
        "--poll",
        "0.2",
        "--scale-down-delay",
        "1",
        "--engine-url",
        engine.url,
        "--lease",
        f"{redis.url}/0",
        "autoscale:ep",
        "--lease-ttl",
        str(ttl),
        "--lease-renew",
        str(renew),
    ]
    pair = Pair(engine, run_autoscale, argv)
    await pair.start(nursery, start_worker)
    return pair


async def test_kill_9_of_the_leader_the_standby_takes_over_within_the_ttl(
    nursery: trio.Nursery,
    redis_server: ServerProcess,
    vast_engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
    tmp_path: Path,
) -> None:
    pair = await two_autoscalers(
        nursery,
        vast_engine,
        start_worker,
        run_autoscale,
        redis_server,
        tmp_path / "demand",
        ttl=2.0,
        renew=0.5,
    )
    a, b = pair.a, pair.b
    metrics = await b.metrics()
    assert metrics['nullworker_autoscale_lease_leader{endpoint="ep"}'] == 0
    assert 'nullworker_autoscale_reservations_held{endpoint="ep"}' not in metrics
    await trio.sleep(1.0)  # several renewals: nothing changes
    assert b.of_kind("lease_acquired") == [] and a.of_kind("lease_lost") == []

    killed_at = time.time()
    a.process.kill()
    await a.process.wait()
    (acquired,) = await b.wait_events("lease_acquired")
    takeover_s = epoch(acquired) - killed_at
    # The key outlives its dead holder (by up to the TTL since its last renewal), then the
    # standby's next attempt (every 0.5 s) takes it.
    assert 0.5 <= takeover_s <= 2.0 + 0.5 + 0.5, takeover_s
    await b.wait_until(lambda: held_now(b) == MAX)
    assert await pair.busy() == MAX
    metrics = await b.metrics()
    assert metrics['nullworker_autoscale_lease_leader{endpoint="ep"}'] == 1
    assert metrics['nullworker_autoscale_lease_terms_total{endpoint="ep"}'] == 1
    assert metrics['nullworker_autoscale_reservations_held{endpoint="ep"}'] == MAX
    assert pair.meter.samples > 20
    assert pair.meter.max_busy <= MAX, pair.meter.max_busy
    print(f"kill -9: takeover {takeover_s:.2f} s, at most {pair.meter.max_busy} busy")
    assert await b.stop(signal.SIGTERM) == 143, b.err
    assert b.err == ""


async def test_redis_down_the_leader_drops_its_capacity_after_the_ttl(
    nursery: trio.Nursery,
    redis_server: ServerProcess,
    vast_engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
    tmp_path: Path,
) -> None:
    pair = await two_autoscalers(
        nursery,
        vast_engine,
        start_worker,
        run_autoscale,
        redis_server,
        tmp_path / "demand",
        ttl=2.0,
        renew=0.5,
    )
    a, b = pair.a, pair.b
    stopped_at = time.time()
    await redis_server.stop()
    (lost,) = await a.wait_events("lease_lost")
    dropped_s = epoch(lost) - stopped_at
    # The local deadline: ttl - renew (1.5 s) after the last renewal sent before the stop.
    assert lost["reason"] == "expired" and lost["released"] == MAX
    assert "no renewal succeeded within 1.5 s" in lost["message"]
    assert 0.9 <= dropped_s <= 2.0, dropped_s
    await wait_engine(vast_engine, {1: "idle", 2: "idle", 3: "idle"})
    ended = [e for e in a.events if e["kind"] == "reservation_ended"]
    assert len(ended) == MAX and all(epoch(e) >= epoch(lost) for e in ended)
    # Both stand by, saying once that Redis cannot be reached, and hold nothing.
    await a.wait_until(lambda: any("error" in e for e in a.of_kind("standby")))
    await b.wait_until(lambda: any("error" in e for e in b.of_kind("standby")))
    await trio.sleep(1.0)
    assert await pair.busy() == 0
    assert len(a.of_kind("standby")) == 1 and b.of_kind("lease_acquired") == []

    # Redis is back (empty): one of them leads again and holds the target.
    await redis_server.start()
    with trio.fail_after(10):
        while not (a.of_kind("lease_acquired")[1:] or b.of_kind("lease_acquired")):
            await trio.sleep(0.05)
    leader = b if b.of_kind("lease_acquired") else a
    await leader.wait_until(lambda: held_now(leader) == MAX)
    await trio.sleep(0.5)
    assert await pair.busy() == MAX
    assert pair.meter.max_busy <= MAX, pair.meter.max_busy
    print(f"redis down: dropped after {dropped_s:.2f} s, at most {pair.meter.max_busy} busy")


async def test_sigterm_of_the_leader_hands_over_at_once(
    nursery: trio.Nursery,
    redis_server: ServerProcess,
    vast_engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
    tmp_path: Path,
) -> None:
    # A long TTL, so that a handover at the TTL would show.
    pair = await two_autoscalers(
        nursery,
        vast_engine,
        start_worker,
        run_autoscale,
        redis_server,
        tmp_path / "demand",
        ttl=5.0,
        renew=0.5,
    )
    a, b = pair.a, pair.b
    signalled_at = time.time()
    assert await a.stop(signal.SIGTERM, within_s=WAIT_S) == 143, a.err
    (acquired,) = await b.wait_events("lease_acquired")
    await b.wait_until(lambda: held_now(b) == MAX)
    await trio.sleep(0.5)
    assert await pair.busy() == MAX
    assert pair.meter.max_busy <= MAX, pair.meter.max_busy
    kinds = [e["kind"] for e in a.events]
    # Every reservation closed first, then the lease deleted, then the exit.
    assert kinds[-MAX - 2 :] == [*["reservation_ended"] * MAX, "lease_released", "stopped"]
    released = a.events[-2]
    assert released["deleted"] is True
    assert a.events[-1]["released"] == MAX
    takeover_s = epoch(acquired) - signalled_at
    assert epoch(acquired) - epoch(released) <= 0.5 + 0.3
    assert takeover_s <= 1.5, takeover_s
    print(f"SIGTERM: takeover {takeover_s:.2f} s, at most {pair.meter.max_busy} busy")
    assert a.err == ""
