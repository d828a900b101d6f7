"""The autoscaler's target rules beyond ``ceil(demand / jobs_per_worker)``: pure and synchronous.

:mod:`.autoscaler` owns the clock, the reads and the reservations; this module only says
what a reading means. Every function here takes the time it needs as an argument (the
Trio clock for delays and rates, a wall-clock ``datetime`` for schedules), does no I/O,
and returns a number plus the words that explain it, so that each rule is tested with
plain values and each decision can be shown in the autoscaler's events.

The rules, in the order :func:`raw_target` applies them:

1. *Scheduled minimum*: the effective minimum is the largest of ``min_workers`` and the
   ``min`` of every :class:`ScheduleWindow` that covers the wall-clock time.
2. *Age boost*: while the oldest waiting job is older than ``age_boost_after_s`` (and
   the source can tell), ``age_boost`` workers are added to what the demand asks for:
   ``ceil(demand / jobs_per_worker) + age_boost``. The boost adds to the demand's count,
   not to the minimum: warm workers that sit idle are not what an old job lacks, and a
   queue whose jobs wait although workers are held needs workers beyond its count. An
   unknown age (``None``) or no demand adds nothing: the boost only ever adds.
3. *Activation* (KEDA's ``activationQueueLength``): while no reservation is kept (the
   target is 0 and the effective minimum is 0), a demand of ``activation`` or fewer
   jobs asks for none. Once active, the plain rule holds. An age boost activates anyway:
   a job that waits past ``age_boost_after_s`` is what activation must not starve.
4. The result is clamped to ``[minimum, max_workers]``.

Two rules act on the kept target over time (:func:`kept_target`, :class:`RateLimit`):

* *Scale-to-zero delay*: the last reservation is released only once the raw target has
  been 0 for ``scale_to_zero_delay_s`` (which may be shorter or longer than the
  scale-down delay);
* *Scale-up rate limit*: at most ``per_minute`` reservations start within any 60 s of
  the Trio clock.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "RATE_WINDOW_S",
    "WEEKDAYS",
    "Policy",
    "RateLimit",
    "ScheduleWindow",
    "Target",
    "kept_target",
    "minimum_at",
    "parse_days",
    "parse_hours",
    "parse_schedule",
    "parse_zone",
    "raw_target",
]

#: The weekdays' names, Monday first (``datetime.weekday()``'s order).
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: The scale-up rate limit counts the reservations started within this many seconds.
RATE_WINDOW_S = 60.0

_DAY_WORDS = {"*": frozenset(range(7)), "daily": frozenset(range(7))}
_HOURS = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True)
class ScheduleWindow:
    """A minimum number of reservations kept on some days between two times of day.

    ``days`` are the days the window *starts* on (0 = Monday). A window whose end is not
    after its start crosses midnight: ``fri 22:00-06:00`` runs from Friday 22:00 to
    Saturday 06:00. Times are minutes after midnight in ``tz`` (an IANA zone name);
    ``end_min`` may be 1440 (``24:00``). Build one with :func:`parse_schedule` or from
    checked parts (:func:`parse_days`, :func:`parse_hours`, :func:`parse_zone`).
    """

    days: frozenset[int]
    start_min: int
    end_min: int
    min_workers: int
    tz: str = "UTC"

    def __post_init__(self) -> None:
        # Checked here too, so that a window built by hand cannot fail later, at 08:00.
        if not self.days or not self.days <= frozenset(range(7)):
            raise ValueError(f"days must be a non-empty set of 0..6, got {set(self.days)!r}")
        if not (0 <= self.start_min < _MINUTES_PER_DAY and 0 < self.end_min <= _MINUTES_PER_DAY):
            raise ValueError("start_min must be 0..1439 and end_min 1..1440 (minutes)")
        if self.start_min == self.end_min:
            raise ValueError("the start and the end are the same time")
        if isinstance(self.min_workers, bool) or not isinstance(self.min_workers, int):
            raise ValueError(f"min_workers must be an integer >= 0, got {self.min_workers!r}")
        if self.min_workers < 0:
            raise ValueError(f"min_workers must be an integer >= 0, got {self.min_workers!r}")
        parse_zone(self.tz)

    def covers(self, now: datetime) -> bool:
        """Whether ``now`` (an aware datetime; a naive one is taken as UTC) is inside."""
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        local = now.astimezone(ZoneInfo(self.tz))
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start_min < self.end_min:
            return day in self.days and self.start_min <= minute < self.end_min
        # Crossing midnight: the evening of a listed day, or the morning after one.
        return (day in self.days and minute >= self.start_min) or (
            (day - 1) % 7 in self.days and minute < self.end_min
        )

    def describe(self) -> str:
        """The window as ``--min-schedule`` spells it: ``mon-fri 08:00-18:00 UTC=3``."""
        hours = f"{_hhmm(self.start_min)}-{_hhmm(self.end_min)}"
        return f"{_days_text(self.days)} {hours} {self.tz}={self.min_workers}"


@dataclass(frozen=True)
class Policy:
    """The settings :func:`raw_target` reads (checked by the autoscaler, not here)."""

    min_workers: int = 0
    max_workers: int = 10
    jobs_per_worker: int = 1
    activation: int = 0
    schedule: tuple[ScheduleWindow, ...] = ()
    age_boost_after_s: float | None = None
    age_boost: int = 1


@dataclass(frozen=True)
class Target:
    """A reading's raw target, its effective minimum and the rules that shaped it."""

    raw: int
    minimum: int
    reasons: tuple[str, ...] = ()


def minimum_at(policy: Policy, now: datetime | None) -> tuple[int, str | None]:
    """The effective minimum at ``now`` and, when a window raises it, which one.

    ``now`` ``None`` (no wall clock) is ``min_workers``. The result never exceeds
    ``max_workers``.
    """
    best, why = policy.min_workers, None
    if now is not None:
        for window in policy.schedule:
            if window.min_workers > best and window.covers(now):
                best, why = window.min_workers, f"scheduled minimum {window.describe()}"
    return min(best, policy.max_workers), why


def raw_target(
    policy: Policy,
    *,
    demand: int,
    active: bool,
    oldest_age_s: float | None = None,
    now: datetime | None = None,
) -> Target:
    """The reservations one reading asks for (before the scale-down window).

    Args:
      policy: the settings.
      demand: the jobs read (>= 0).
      active: whether any reservation is kept now (the current target is above 0);
        activation applies only when not.
      oldest_age_s: the age of the oldest waiting job in seconds, ``None`` if unknown.
      now: the wall-clock time, for the schedule.
    """
    minimum, scheduled = minimum_at(policy, now)
    need = -(-demand // policy.jobs_per_worker)
    reasons: list[str] = []
    after = policy.age_boost_after_s
    if (
        after is not None
        and policy.age_boost > 0
        and demand > 0
        and oldest_age_s is not None
        and oldest_age_s > after
    ):
        need += policy.age_boost
        reasons.append(f"oldest job waiting over {after:g} s: +{policy.age_boost}")
    elif not active and minimum == 0 and 0 < demand <= policy.activation:
        need = 0
        reasons.append(f"demand {demand} ≤ activation {policy.activation}")
    if scheduled is not None and need < minimum:
        reasons.append(scheduled)
    return Target(
        raw=min(max(need, minimum), policy.max_workers), minimum=minimum, reasons=tuple(reasons)
    )


def kept_target(
    window_target: int, *, raw: int, zero_for_s: float | None, scale_to_zero_delay_s: float
) -> tuple[int, str | None]:
    """The target after the scale-to-zero delay, and why when it changed anything.

    Args:
      window_target: the largest raw target within the scale-down delay.
      raw: the latest raw target.
      zero_for_s: how long the raw target has been 0 (since the first 0 after the last
        reading above 0); ``None`` when it is above 0 or has never been.
      scale_to_zero_delay_s: how long it must be 0 before the last reservation goes.
    """
    if raw > 0 or zero_for_s is None:
        return window_target, None
    if zero_for_s >= scale_to_zero_delay_s:
        return 0, None
    if window_target == 0:
        return 1, "last reservation kept by the scale-to-zero delay"
    return window_target, None


class RateLimit:
    """At most ``per_minute`` starts within any :data:`RATE_WINDOW_S` (``None``: no limit).

    A sliding window of the start times on the caller's clock (the Trio clock).
    """

    def __init__(self, per_minute: int | None) -> None:
        self.per_minute = per_minute
        self._starts: deque[float] = deque()

    def allowance(self, now: float) -> float:
        """How many may start at ``now`` (``math.inf`` without a limit)."""
        if self.per_minute is None:
            return math.inf
        self._forget(now)
        return max(0, self.per_minute - len(self._starts))

    def record(self, now: float) -> None:
        """One start at ``now``."""
        if self.per_minute is not None:
            self._starts.append(now)

    def free_at(self, now: float) -> float:
        """When the next start is allowed (``now`` if one is allowed now)."""
        if self.allowance(now) > 0:
            return now
        return self._starts[0] + RATE_WINDOW_S

    def _forget(self, now: float) -> None:
        # A start exactly RATE_WINDOW_S ago no longer counts.
        while self._starts and self._starts[0] <= now - RATE_WINDOW_S:
            self._starts.popleft()


# -- parsing -------------------------------------------------------------------------------


def parse_days(text: str) -> frozenset[int]:
    """``mon-fri``, ``sat,sun``, ``fri-mon`` (wraps), ``mon-wed,fri``, ``daily`` or ``*``.

    Raises:
      ValueError: the message names what is wrong.
    """
    words = text.strip().lower()
    if words in _DAY_WORDS:
        return _DAY_WORDS[words]
    days: set[int] = set()
    for part in words.split(","):
        first, _, last = part.strip().partition("-")
        if first not in WEEKDAYS or (last and last not in WEEKDAYS):
            raise ValueError(
                f"days {text!r}: use mon..sun, ranges (mon-fri) and commas (sat,sun), or daily"
            )
        start = WEEKDAYS.index(first)
        stop = WEEKDAYS.index(last) if last else start
        days.update((start + i) % 7 for i in range((stop - start) % 7 + 1))
    return frozenset(days)


def parse_hours(text: str) -> tuple[int, int]:
    """``08:00-18:00`` as minutes after midnight; ``22:00-06:00`` crosses midnight.

    The end may be ``24:00``; start and end may not be equal.

    Raises:
      ValueError: the message names what is wrong.
    """
    match = _HOURS.match(text.strip())
    bad = ValueError(f"hours {text!r}: use HH:MM-HH:MM (24-hour, e.g. 08:00-18:00)")
    if match is None:
        raise bad
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or end > _MINUTES_PER_DAY:
        raise bad
    if start == end:
        raise ValueError(f"hours {text!r}: the start and the end are the same time")
    return start, end


def parse_zone(name: str) -> str:
    """An IANA time zone name (``UTC``, ``Europe/Paris``), checked with :mod:`zoneinfo`.

    Raises:
      ValueError: no such zone.
    """
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"time zone {name!r} is unknown (use an IANA name such as UTC or Europe/Paris)"
        ) from None
    return name


def parse_schedule(text: str) -> ScheduleWindow:
    """``DAYS HH:MM-HH:MM [TZ]=N``, e.g. ``mon-fri 08:00-18:00 UTC=3`` (the zone defaults
    to UTC).

    Raises:
      ValueError: the message names what is wrong.
    """
    spec, equals, count = text.rpartition("=")
    words = spec.split()
    if not equals or len(words) not in (2, 3):
        raise ValueError(
            f"{text!r}: use 'DAYS HH:MM-HH:MM [TZ]=N', e.g. 'mon-fri 08:00-18:00 UTC=3'"
        )
    try:
        minimum = int(count.strip())
    except ValueError:
        minimum = -1
    if minimum < 0:
        raise ValueError(f"{text!r}: the minimum after '=' must be an integer >= 0")
    start, end = parse_hours(words[1])
    return ScheduleWindow(
        days=parse_days(words[0]),
        start_min=start,
        end_min=end,
        min_workers=minimum,
        tz=parse_zone(words[2]) if len(words) == 3 else "UTC",
    )


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _days_text(days: frozenset[int]) -> str:
    if len(days) == 7:
        return "daily"
    # Runs of consecutive days, as ranges.
    parts: list[str] = []
    ordered = sorted(days)
    run = [ordered[0]]
    for day in ordered[1:]:
        if day == run[-1] + 1:
            run.append(day)
            continue
        parts.append(_run_text(run))
        run = [day]
    parts.append(_run_text(run))
    return ",".join(parts)


def _run_text(run: list[int]) -> str:
    if len(run) == 1:
        return WEEKDAYS[run[0]]
    return f"{WEEKDAYS[run[0]]}-{WEEKDAYS[run[-1]]}"
