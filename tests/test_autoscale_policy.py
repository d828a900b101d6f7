"""The autoscaler's policy rules: activation, scale-to-zero delay, scale-up rate limit,
scheduled minimum and age boost.

The rules themselves (:mod:`nullworker.client.policy`) are pure functions, tested with
plain values. Each rule is then run in the autoscaler on a MockClock with the fake
engine of ``test_autoscaler``, to the exact time the rule fixes; the wall clock of the
schedule is driven by the Trio clock (``now=``).
"""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nullworker.client.autoscale_cli import main
from nullworker.client.autoscale_config import load_config
from nullworker.client.autoscaler import autoscale
from nullworker.client.policy import (
    Policy,
    RateLimit,
    ScheduleWindow,
    kept_target,
    parse_schedule,
    raw_target,
)
from nullworker.engine import Engine
from nullworker.errors import ConfigError, DemandError

from .conftest import StartWorker
from .test_autoscale_cli import (  # noqa: F401  (run_autoscale is a fixture, used by name)
    DEMAND,
    RunAutoscale,
    run_autoscale_fixture,
    start_vast_worker,
    usage_error,
    write_demand,
)
from .test_autoscale_config import (  # noqa: F401  (env is a fixture, used by name)
    BASE,
    check_refuses,
    env_fixture,
)
from .test_autoscaler import FakeEngine, Script, running, settle_at

# A Monday.
MONDAY = datetime(2026, 1, 5, tzinfo=UTC)


def at(day: int, hh: int, mm: int, ss: int = 0) -> datetime:
    """``day`` days after Monday 2026-01-05, at hh:mm:ss UTC."""
    return MONDAY + timedelta(days=day, hours=hh, minutes=mm, seconds=ss)


def trio_wall_clock(start: datetime) -> Any:
    """A wall clock that reads ``start`` at Trio time 0 and moves with the MockClock."""
    return lambda: start + timedelta(seconds=trio.current_time())


# -- the pure rules ------------------------------------------------------------------------


def test_parse_schedule_and_describe_round_trip() -> None:
    window = parse_schedule("mon-fri 08:00-18:00 UTC=3")
    assert window == ScheduleWindow(frozenset(range(5)), 480, 1080, 3, "UTC")
    assert window.describe() == "mon-fri 08:00-18:00 UTC=3"
    assert parse_schedule("sat,sun 10:00-24:00=1").describe() == "sat-sun 10:00-24:00 UTC=1"
    assert parse_schedule("fri-mon 22:00-06:00 Europe/Paris=2").days == {4, 5, 6, 0}
    assert parse_schedule("daily 00:00-24:00=1").describe() == "daily 00:00-24:00 UTC=1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mon-fri 08:00-18:00", "use 'DAYS HH:MM-HH:MM"),
        ("mon-fri=3", "use 'DAYS HH:MM-HH:MM"),
        ("mon-fri 08:00-18:00 UTC=x", "must be an integer >= 0"),
        ("mon-fri 08:00-18:00 UTC=-1", "must be an integer >= 0"),
        ("weekdays 08:00-18:00=3", "days 'weekdays': use mon..sun"),
        ("mon-fri 8-18=3", "hours '8-18': use HH:MM-HH:MM"),
        ("mon-fri 08:00-25:00=3", "hours '08:00-25:00'"),
        ("mon-fri 08:00-08:00=3", "the start and the end are the same time"),
        ("mon-fri 08:00-18:00 Mars/Olympus=3", "time zone 'Mars/Olympus' is unknown"),
    ],
)
def test_parse_schedule_refuses_with_a_clear_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_schedule(text)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"days": frozenset()}, "days must be a non-empty set of 0..6"),
        ({"days": frozenset({7})}, "days must be a non-empty set of 0..6"),
        ({"start_min": 1440}, "start_min must be 0..1439"),
        ({"end_min": 0}, "end_min 1..1440"),
        ({"end_min": 480}, "the start and the end are the same time"),
        ({"min_workers": -1}, "min_workers must be an integer >= 0"),
        ({"tz": "Nowhere/X"}, "time zone 'Nowhere/X' is unknown"),
    ],
)
def test_a_window_built_by_hand_is_checked(fields: dict[str, Any], message: str) -> None:
    good: dict[str, Any] = {"days": frozenset({0}), "start_min": 480, "end_min": 600}
    with pytest.raises(ValueError, match=message):
        ScheduleWindow(**{**good, "min_workers": 1, **fields})


def test_a_window_covers_its_hours_on_its_days() -> None:
    window = parse_schedule("mon-fri 08:00-18:00 UTC=3")
    assert not window.covers(at(0, 7, 59, 59))
    assert window.covers(at(0, 8, 0))
    assert window.covers(at(4, 17, 59, 59))
    assert not window.covers(at(4, 18, 0))
    assert not window.covers(at(5, 10, 0))  # Saturday


def test_a_window_crossing_midnight_belongs_to_the_day_it_starts() -> None:
    window = parse_schedule("fri 22:00-06:00=2")
    assert not window.covers(at(4, 21, 59))
    assert window.covers(at(4, 22, 0))
    assert window.covers(at(5, 5, 59))  # Saturday morning
    assert not window.covers(at(5, 6, 0))
    assert not window.covers(at(3, 23, 0))  # Thursday night
    assert not window.covers(at(5, 23, 0))  # Saturday night
    assert not window.covers(at(0, 3, 0))  # Monday morning (Sunday is not listed)


def test_a_window_in_another_zone() -> None:
    window = parse_schedule("mon-fri 08:00-18:00 Europe/Paris=2")  # UTC+1 in January
    assert not window.covers(at(0, 6, 59))
    assert window.covers(at(0, 7, 0))
    assert not window.covers(at(0, 17, 0))


def test_raw_target_activation_only_from_zero() -> None:
    policy = Policy(activation=3)
    idle = raw_target(policy, demand=2, active=False)
    assert (idle.raw, idle.reasons) == (0, ("demand 2 ≤ activation 3",))
    assert raw_target(policy, demand=4, active=False).raw == 4
    assert raw_target(policy, demand=2, active=True) == raw_target(Policy(), demand=2, active=True)
    # A minimum above 0 is active by itself.
    assert raw_target(Policy(activation=3, min_workers=1), demand=2, active=False).raw == 2


def test_raw_target_age_boost_adds_to_the_demand_and_only_adds() -> None:
    policy = Policy(jobs_per_worker=2, age_boost_after_s=300.0, age_boost=2, min_workers=1)
    assert raw_target(policy, demand=3, active=True, oldest_age_s=300.0).raw == 2
    boosted = raw_target(policy, demand=3, active=True, oldest_age_s=300.5)
    assert (boosted.raw, boosted.reasons) == (4, ("oldest job waiting over 300 s: +2",))
    assert raw_target(policy, demand=3, active=True, oldest_age_s=None).raw == 2
    assert raw_target(policy, demand=0, active=True, oldest_age_s=1e6).raw == 1
    # It activates: an old job is what activation must not starve.
    activation = Policy(activation=5, age_boost_after_s=60.0)
    assert raw_target(activation, demand=2, active=False, oldest_age_s=61.0).raw == 3
    # The cap still holds (and, as before these rules, goes unsaid).
    capped = raw_target(
        Policy(max_workers=3, age_boost_after_s=0.0), demand=3, active=True, oldest_age_s=1.0
    )
    assert (capped.raw, capped.reasons) == (3, ("oldest job waiting over 0 s: +1",))


def test_raw_target_scheduled_minimum_is_the_largest() -> None:
    policy = Policy(
        min_workers=1,
        max_workers=5,
        schedule=(parse_schedule("mon-fri 08:00-18:00=3"), parse_schedule("mon 12:00-13:00=9")),
    )
    assert raw_target(policy, demand=0, active=True, now=at(0, 7, 0)).raw == 1
    office = raw_target(policy, demand=0, active=True, now=at(0, 9, 0))
    assert (office.raw, office.reasons) == (3, ("scheduled minimum mon-fri 08:00-18:00 UTC=3",))
    assert raw_target(policy, demand=4, active=True, now=at(0, 9, 0)).reasons == ()
    lunch = raw_target(policy, demand=0, active=True, now=at(0, 12, 30))
    assert (lunch.raw, lunch.minimum) == (5, 5)  # never above max_workers


def test_kept_target_holds_the_last_reservation_then_releases_it() -> None:
    assert kept_target(3, raw=3, zero_for_s=None, scale_to_zero_delay_s=60) == (3, None)
    assert kept_target(0, raw=0, zero_for_s=None, scale_to_zero_delay_s=60) == (0, None)
    held = kept_target(0, raw=0, zero_for_s=59.9, scale_to_zero_delay_s=60)
    assert held == (1, "last reservation kept by the scale-to-zero delay")
    assert kept_target(0, raw=0, zero_for_s=60, scale_to_zero_delay_s=60) == (0, None)
    # Shorter than the scale-down delay: zero at once, whatever the window keeps.
    assert kept_target(4, raw=0, zero_for_s=10, scale_to_zero_delay_s=10) == (0, None)
    assert kept_target(4, raw=0, zero_for_s=9, scale_to_zero_delay_s=10) == (4, None)


def test_rate_limit_is_a_sliding_minute() -> None:
    limit = RateLimit(2)
    assert limit.allowance(0.0) == 2
    limit.record(0.0)
    limit.record(10.0)
    assert limit.allowance(59.9) == 0
    assert limit.free_at(59.9) == 60.0
    assert limit.allowance(60.0) == 1
    assert limit.allowance(70.0) == 2
    assert RateLimit(None).allowance(0.0) == float("inf")


# -- the rules in the autoscaler, on a MockClock ------------------------------------------


async def test_activation_waits_for_more_than_n_jobs_then_normal_rules(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 2), (10, 4), (20, 1), (30, 0), (40, 3))
    async with running(engine, script, activation=3) as run:
        await settle_at(9.0)
        assert engine.count == 0
        await settle_at(10.0)
        assert engine.count == 4
        await settle_at(20.0)
        assert engine.count == 1  # active: 1 job keeps 1 worker
        await settle_at(30.0)
        assert engine.count == 0
        await settle_at(45.0)
        assert engine.count == 0  # from zero again: 3 ≤ 3
    messages = {e.at: e.message for e in run.of_kind("state")}
    assert messages[0.0] == "demand 2, target 0 (demand 2 ≤ activation 3): 0 held, 0 waiting"
    assert messages[40.0] == "demand 3, target 0 (demand 3 ≤ activation 3): 0 held, 0 waiting"
    reasons = {e.at: e.reason for e in run.of_kind("state")}
    assert reasons[0.0] == "demand 2 ≤ activation 3"
    assert reasons[10.0] is None


async def test_scale_to_zero_delay_keeps_the_last_reservation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    # The last reading of 3 is at t=9: down to 1 at 9+5, to 0 at 9+60.
    script = Script((0, 3), (10, 0))
    async with running(engine, script, scale_down_delay_s=5.0, scale_to_zero_delay_s=60.0) as run:
        await settle_at(13.999)
        assert engine.count == 3
        await settle_at(14.0)
        assert engine.count == 1
        await settle_at(68.999)
        assert engine.count == 1
        await settle_at(69.0)
        assert engine.count == 0
    messages = {e.at: e.message for e in run.of_kind("state")}
    assert messages[14.0] == (
        "demand 0, target 1 (last reservation kept by the scale-to-zero delay): 1 held, 0 waiting"
    )
    assert messages[69.0] == "demand 0, target 0: 0 held, 0 waiting"


async def test_a_short_scale_to_zero_delay_cuts_the_scale_down_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 3), (10, 1), (20, 0))
    async with running(engine, script, scale_down_delay_s=60.0, scale_to_zero_delay_s=10.0):
        await settle_at(28.999)
        assert engine.count == 3  # 1 job left at t=19: the scale-down delay holds 3
        await settle_at(29.0)
        assert engine.count == 0


async def test_the_default_scale_to_zero_delay_is_the_scale_down_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 3), (10, 0))
    async with running(engine, script, scale_down_delay_s=30.0, scale_to_zero_delay_s=None):
        await settle_at(38.999)
        assert engine.count == 3
        await settle_at(39.0)
        assert engine.count == 0


async def test_rate_limit_lets_exactly_n_start_per_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    async with running(engine, Script((0, 10)), max_new_per_minute=3, max_workers=10) as run:
        await settle_at(200.0)
    assert engine.times() == [0.0] * 3 + [60.0] * 3 + [120.0] * 3 + [180.0]
    for start in range(200):
        assert sum(start <= t < start + 60 for t in engine.times()) <= 3
    limited = run.of_kind("rate_limited")
    assert [(e.at, e.held_back) for e in limited] == [(0.0, 7), (60.0, 4), (120.0, 1)]
    assert limited[0].message == (
        "rate limit 3 new per minute: 7 reservation(s) held back, the next in 60 s"
    )
    assert limited[0].delay_s == 60.0


async def test_rate_limit_counts_replacements(autojump_clock: trio.testing.MockClock) -> None:
    from .test_autoscaler import Plan

    engine = FakeEngine(default=Plan(end_after_s=10.0))
    async with running(engine, Script((0, 1)), max_new_per_minute=2):
        await settle_at(130.0)
    # Each hold ends by itself after 10 s and is replaced; no more than 2 a minute.
    for start in range(130):
        assert sum(start <= t < start + 60 for t in engine.times()) <= 2
    # The second replaces the first at once; the third waits for the minute to pass.
    assert engine.times()[:3] == [0.0, 10.0, 60.0]


async def test_scheduled_minimum_follows_the_wall_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    window = parse_schedule("mon-fri 08:00-18:00 UTC=3")
    async with running(
        engine,
        Script((0, 0)),
        poll_s=30.0,
        min_schedule=[window],
        now=trio_wall_clock(at(0, 7, 58, 30)),
    ) as run:
        await settle_at(89.0)
        assert engine.count == 0
        await settle_at(90.0)  # 08:00:00
        assert engine.count == 3
        ten_hours = 90.0 + 10 * 3600
        await settle_at(ten_hours - 1)
        assert engine.count == 3
        await settle_at(ten_hours)  # 18:00:00
        assert engine.count == 0
    message = {e.at: e.message for e in run.of_kind("state")}[90.0]
    assert message == (
        "demand 0, target 3 (scheduled minimum mon-fri 08:00-18:00 UTC=3): 3 held, 0 waiting"
    )


async def test_scheduled_minimum_across_midnight(autojump_clock: trio.testing.MockClock) -> None:
    engine = FakeEngine()
    async with running(
        engine,
        Script((0, 1)),
        poll_s=60.0,
        min_schedule=[parse_schedule("fri 22:00-06:00=2")],
        now=trio_wall_clock(at(4, 21, 59)),
    ):
        await settle_at(59.0)
        assert engine.count == 1
        await settle_at(60.0)  # Friday 22:00
        assert engine.count == 2
        await settle_at(60.0 + 8 * 3600 - 60)
        assert engine.count == 2
        await settle_at(60.0 + 8 * 3600)  # Saturday 06:00
        assert engine.count == 1


async def test_scheduled_minimum_rises_during_a_demand_outage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    script = Script((0, 1), (10, DemandError("down")))
    async with running(
        engine,
        script,
        min_schedule=[parse_schedule("daily 08:00-09:00=3")],
        now=trio_wall_clock(at(0, 7, 58)),
    ) as run:
        await settle_at(100.0)
        assert engine.count == 1
        await settle_at(200.0)
        assert engine.count == 3  # fail-static keeps, the schedule still raises
        assert run.stats().source_ok is False
        await settle_at(3900.0)
        assert engine.count == 3  # after 09:00 the frozen target stays
    first = next(t for t, v in script.reads if isinstance(v, Exception) and t >= 120)
    assert min(a.entered_at for a in engine.attempts[1:]) == first


class AgedQueue:
    """A source with an age: ``(time, demand, age)`` steps; an age may be an exception."""

    def __init__(self, *steps: tuple[float, int, float | Exception | None]) -> None:
        self.steps = steps
        self.age_reads: list[float] = []

    def _step(self) -> tuple[float, int, float | Exception | None]:
        now = trio.current_time()
        return [step for step in self.steps if step[0] <= now][-1]

    async def read(self) -> int:
        return self._step()[1]

    async def oldest_age(self) -> float | None:
        self.age_reads.append(trio.current_time())
        age = self._step()[2]
        if isinstance(age, Exception):
            raise age
        return age


async def test_age_boost_adds_workers_while_the_oldest_job_is_old(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine()
    queue = AgedQueue(
        (0, 2, 100.0),
        (10, 2, 301.0),
        (20, 2, None),
        (30, 2, DemandError("cannot tell")),
        (40, 2, 500.0),
        (50, 0, 900.0),
    )
    async with running(engine, queue, age_boost_after_s=300.0, age_boost=3) as run:
        await settle_at(9.0)
        assert engine.count == 2
        await settle_at(10.0)
        assert engine.count == 5
        await settle_at(20.0)
        assert engine.count == 2  # unknown: no boost, the plain rule
        await settle_at(30.0)
        assert engine.count == 2  # a failed age read is no source error
        assert run.stats().source_errors == 0
        await settle_at(40.0)
        assert engine.count == 5
        await settle_at(50.0)
        assert engine.count == 0  # no jobs, no boost (and no age read)
    assert 50.0 not in queue.age_reads
    message = {e.at: e.message for e in run.of_kind("state")}[10.0]
    assert message == "demand 2, target 5 (oldest job waiting over 300 s: +3): 5 held, 0 waiting"


async def test_without_age_boost_no_age_is_read(autojump_clock: trio.testing.MockClock) -> None:
    queue = AgedQueue((0, 2, 1e6))
    async with running(FakeEngine(), queue, age_boost_after_s=None, age_boost=3) as run:
        await settle_at(10.0)
        assert run.stats().target == 2
    assert queue.age_reads == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"activation": -1}, "activation must be an integer >= 0"),
        ({"age_boost": 0}, "age_boost must be an integer >= 1"),
        ({"max_new_per_minute": 0}, "max_new_per_minute must be an integer >= 1"),
        ({"scale_to_zero_delay_s": -1}, "scale_to_zero_delay_s must be a finite number"),
        ({"age_boost_after_s": float("nan")}, "age_boost_after_s must be a finite number"),
        ({"min_schedule": ["mon 08:00-09:00=1"]}, "min_schedule takes ScheduleWindow values"),
        (
            {"min_schedule": "mon 08:00-09:00=1"},
            "min_schedule takes a list or tuple of ScheduleWindow",
        ),
        (
            {"min_schedule": [parse_schedule("mon 08:00-09:00=11")]},
            r"the minimum must not be greater than max_workers \(10\)",
        ),
        ({"now": 3}, "now must be callable"),
        ({"oldest_age": 3}, "oldest_age must be an async function"),
    ],
)
async def test_invalid_policy_arguments_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        await autoscale("e", demand=Script((0, 1)), reserve=FakeEngine().reserve, **options)


# -- the config file, --check and the command line ----------------------------------------

RULES = """\
[endpoints.e]
api_key_env = "NW_TEST_KEY_EMAILS"
engine_url = "http://127.0.0.1:9/"
max = 6
activation = 2
scale_to_zero_delay = 300
max_new_per_minute = 4
age_boost_after = 120
age_boost = 2
sources = [{ kind = "command", command = "echo 1" }]

[[endpoints.e.schedule]]
days = "mon-fri"
hours = "08:00-18:00"
min = 3

[[endpoints.e.schedule]]
days = "sat,sun"
hours = "22:00-02:00"
min = 1
tz = "Europe/Paris"
"""

RULES_PLAN = """\
endpoint 'e'
  sources:
    command 'echo 1', timeout 10 s
  policy: min 0, max 6, 1 job(s) per worker
  timing: poll 1 s, scale-down delay 30 s, each hold the worker's cap
  rules: activation 2, scale-to-zero delay 300 s, at most 4 new per minute, +2 while the oldest job waits over 120 s
  schedule: mon-fri 08:00-18:00 UTC=3
  schedule: sat-sun 22:00-02:00 Europe/Paris=1
  engine http://127.0.0.1:9/, API key from $NW_TEST_KEY_EMAILS
  lease: none
"""  # noqa: E501


def test_check_prints_the_rules(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "autoscale.toml"
    path.write_text(RULES)
    assert main(["--config", str(path), "--check"]) == 0
    assert capsys.readouterr().out == RULES_PLAN
    (options,) = load_config(path)
    assert (options.activation, options.scale_to_zero_delay_s) == (2, 300.0)
    assert (options.max_new_per_minute, options.age_boost_after_s, options.age_boost) == (
        4,
        120.0,
        2,
    )
    assert [w.describe() for w in options.schedule] == [
        "mon-fri 08:00-18:00 UTC=3",
        "sat-sun 22:00-02:00 Europe/Paris=1",
    ]


@pytest.mark.parametrize(
    ("toml", "lines"),
    [
        (BASE + "activation = -1\n", ["endpoints.e.activation: must be an integer >= 0, got -1"]),
        (
            BASE + 'scale_to_zero_delay = "5m"\n',
            ["endpoints.e.scale_to_zero_delay: must be a finite number of seconds >= 0, got '5m'"],
        ),
        (
            BASE + "max_new_per_minute = 0\n",
            ["endpoints.e.max_new_per_minute: must be an integer >= 1, got 0"],
        ),
        (BASE + "age_boost = 2\n", ["endpoints.e.age_boost: goes with age_boost_after"]),
        (
            BASE + "age_boost_after = -5\n",
            ["endpoints.e.age_boost_after: must be a finite number of seconds >= 0, got -5"],
        ),
        (
            BASE + "schedule = 3\n",
            ["endpoints.e.schedule: must be an array of tables ([[endpoints.NAME.schedule]])"],
        ),
        (
            BASE + '[[endpoints.e.schedule]]\ndays = "weekdays"\nhours = "8-18"\n'
            'tz = "Mars/Olympus"\nmins = 3\n',
            [
                "endpoints.e.schedule[0].mins: unknown setting; did you mean min?",
                "endpoints.e.schedule[0].days: days 'weekdays': use mon..sun, ranges (mon-fri) "
                "and commas (sat,sun), or daily",
                "endpoints.e.schedule[0].hours: hours '8-18': use HH:MM-HH:MM (24-hour, e.g. "
                "08:00-18:00)",
                "endpoints.e.schedule[0].tz: time zone 'Mars/Olympus' is unknown (use an IANA "
                "name such as UTC or Europe/Paris)",
                "endpoints.e.schedule[0].min: required",
            ],
        ),
        (
            BASE + '[[endpoints.e.schedule]]\ndays = "mon"\nhours = "08:00-09:00"\nmin = 11\n',
            ["endpoints.e.schedule[0].min: must not be greater than max (10), got 11"],
        ),
        (
            BASE.replace(
                '{ kind = "command", command = "echo 1" }',
                '{ kind = "postgres", dsn = "postgresql://db/app", query = "SELECT 1", '
                "age_query = 5 }",
            ),
            ["endpoints.e.sources[0].age_query: must be a str, got 5"],
        ),
    ],
)
def test_every_rule_problem_is_one_line_naming_the_setting(
    toml: str,
    lines: list[str],
    env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "autoscale.toml"
    assert check_refuses(path, toml, capsys) == "".join(f"{path}: {line}\n" for line in lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*DEMAND, "--activation", "-1"], "--activation must be an integer >= 0, got -1"),
        ([*DEMAND, "--max-new-per-minute", "0"], "--max-new-per-minute must be an integer >= 1"),
        ([*DEMAND, "--scale-to-zero-delay", "inf"], "--scale-to-zero-delay must be a finite"),
        ([*DEMAND, "--age-boost", "2"], "--age-boost goes with --age-boost-after"),
        ([*DEMAND, "--age-boost-after", "nan"], "--age-boost-after must be a finite"),
        ([*DEMAND, "--min-schedule", "mon-fri 08:00-18:00"], "--min-schedule: 'mon-fri 08:00"),
        ([*DEMAND, "--min-schedule", "mon 08:00-09:00 Nowhere/X=1"], "time zone 'Nowhere/X'"),
        (
            [*DEMAND, "--max", "2", "--min-schedule", "mon 08:00-09:00=3"],
            "the minimum must not be greater than --max (2)",
        ),
        (
            [*DEMAND, "--postgres-age-query", "SELECT 1"],
            "--postgres-age-query goes with --postgres",
        ),
        (
            ["--config", "x.toml", "--min-schedule", "mon 08:00-09:00=1"],
            "--config excludes --min-schedule: set them in the file",
        ),
    ],
)
def test_rule_flags_refuse_bad_values_in_one_line(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert message in usage_error(argv, capsys, monkeypatch)


async def test_cli_activation_and_rate_limit_show_in_the_lines(
    vast_engine: Engine,
    start_worker: StartWorker,
    run_autoscale: RunAutoscale,
    tmp_path: Path,
) -> None:
    for worker_id in (1, 2):
        await start_vast_worker(start_worker, vast_engine, worker_id)
    demand = tmp_path / "demand"
    write_demand(demand, "2")
    assert vast_engine.url is not None
    cli = await run_autoscale(
        "--demand-command",
        f"cat {demand}",
        "--poll",
        "0.2",
        "--max",
        "2",
        "--activation",
        "2",
        "--max-new-per-minute",
        "1",
        "--min-schedule",
        "daily 00:00-24:00=0",
        "--engine-url",
        vast_engine.url,
    )
    (start,) = await cli.wait_events("started")
    assert (start["activation"], start["max_new_per_minute"]) == (2, 1)
    assert start["min_schedule"] == ["daily 00:00-24:00 UTC=0"]
    assert "rules: activation 2, at most 1 new per minute" in start["message"]
    await cli.wait_until(lambda: any(e.get("reason") for e in cli.of_kind("state")))
    idle = next(e for e in cli.of_kind("state") if e.get("reason"))
    assert idle["reason"] == "demand 2 ≤ activation 2"
    assert idle["message"] == "demand 2, target 0 (demand 2 ≤ activation 2): 0 held, 0 waiting"
    assert cli.of_kind("reservation_started") == []

    write_demand(demand, "3")
    (limited,) = await cli.wait_events("rate_limited")
    assert limited["held_back"] == 1 and limited["target"] == 2
    assert limited["message"].startswith(
        "rate limit 1 new per minute: 1 reservation(s) held back, the next in "
    )
    await cli.wait_events("reservation_started")
    await trio.sleep(1.0)  # more reads: the limit still holds the second back
    assert len(cli.of_kind("reservation_started")) == 1
    assert await cli.stop(signal.SIGINT) == 130, cli.err
    assert cli.err == ""


async def test_age_boost_with_an_oldest_age_function_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def oldest_age() -> float:
        return 1000.0

    engine = FakeEngine()
    async with running(
        engine, Script((0, 2)), age_boost_after_s=60.0, oldest_age=oldest_age
    ) as run:
        await settle_at(5.0)
        assert engine.count == 3 and run.stats().target == 3
