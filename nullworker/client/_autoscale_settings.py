"""The autoscaler's settings: the caller's options checked once, and its fixed timing.

:meth:`Settings.build` checks every option :func:`~nullworker.client.autoscaler.autoscale`
takes for its policy before anything starts, and raises a
:class:`~nullworker.errors.ConfigError` naming the first bad one; the rest of the
autoscaler trusts the frozen result. The timing that is not an option (the backoff, its
jitter) is here too, as constants, since the poller and the reconciler both pause by it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from .._support import finite
from ..errors import ConfigError
from .policy import Policy, ScheduleWindow

__all__ = ["BACKOFF_FIRST_S", "BACKOFF_MAX_S", "Settings", "backoff"]

#: The pause after the first failed attempt to reserve; it doubles with each failure in
#: a row, up to the cap. The same cap bounds the retry pause of a demand outage.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
#: Each pause is shortened by a random fraction up to this, so that autoscalers that
#: failed together do not retry in lockstep (and no pause exceeds the cap).
_JITTER = 0.2


@dataclass(frozen=True)
class Settings:
    """The options of one :func:`~nullworker.client.autoscaler.autoscale` call, checked."""

    endpoint: str
    min_workers: int
    max_workers: int
    jobs_per_worker: int
    poll_s: float
    scale_down_delay_s: float
    duration_s: float | None
    policy: Policy
    scale_to_zero_delay_s: float
    max_new_per_minute: int | None
    now: Callable[[], datetime]

    @classmethod
    def build(
        cls,
        *,
        endpoint: str,
        min_workers: int,
        max_workers: int,
        jobs_per_worker: int,
        poll_s: float,
        scale_down_delay_s: float,
        duration_s: float | None,
        activation: int = 0,
        scale_to_zero_delay_s: float | None = None,
        max_new_per_minute: int | None = None,
        min_schedule: Sequence[ScheduleWindow] = (),
        age_boost_after_s: float | None = None,
        age_boost: int = 1,
        now: Callable[[], datetime] | None = None,
    ) -> Settings:
        """The settings, or a ``ConfigError`` naming the first option that is wrong."""
        if not isinstance(endpoint, str) or not endpoint:
            raise ConfigError(f"an endpoint name is required, got {endpoint!r}")
        for name, value, least in (
            ("min_workers", min_workers, 0),
            ("max_workers", max_workers, 1),
            ("jobs_per_worker", jobs_per_worker, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        if min_workers > max_workers:
            raise ConfigError(
                f"min_workers ({min_workers}) must not be greater than max_workers ({max_workers})"
            )
        if not (finite(poll_s) and poll_s > 0):
            raise ConfigError(f"poll_s must be a finite number of seconds > 0, got {poll_s!r}")
        if not (finite(scale_down_delay_s) and scale_down_delay_s >= 0):
            raise ConfigError(
                "scale_down_delay_s must be a finite number of seconds >= 0, "
                f"got {scale_down_delay_s!r}"
            )
        if duration_s is not None and not (finite(duration_s) and duration_s > 0):
            raise ConfigError(
                f"duration_s must be a finite number of seconds > 0 or None, got {duration_s!r}"
            )
        for name, value, least in (
            ("activation", activation, 0),
            ("age_boost", age_boost, 1),
            ("max_new_per_minute", 1 if max_new_per_minute is None else max_new_per_minute, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        for name, seconds in (
            ("scale_to_zero_delay_s", scale_to_zero_delay_s),
            ("age_boost_after_s", age_boost_after_s),
        ):
            if seconds is not None and not (finite(seconds) and seconds >= 0):
                raise ConfigError(
                    f"{name} must be a finite number of seconds >= 0 or None, got {seconds!r}"
                )
        if not isinstance(min_schedule, list | tuple):
            raise ConfigError(
                "min_schedule takes a list or tuple of ScheduleWindow (parse_schedule), "
                f"got {min_schedule!r}"
            )
        windows = tuple(min_schedule)
        for window in windows:
            if not isinstance(window, ScheduleWindow):
                raise ConfigError(
                    f"min_schedule takes ScheduleWindow values (parse_schedule), got {window!r}"
                )
            if window.min_workers > max_workers:
                raise ConfigError(
                    f"min_schedule {window.describe()!r}: the minimum must not be greater "
                    f"than max_workers ({max_workers})"
                )
        if now is not None and not callable(now):
            raise ConfigError(f"now must be callable, not {now!r}")
        policy = Policy(
            min_workers=min_workers,
            max_workers=max_workers,
            jobs_per_worker=jobs_per_worker,
            activation=activation,
            schedule=windows,
            age_boost_after_s=None if age_boost_after_s is None else float(age_boost_after_s),
            age_boost=age_boost,
        )
        return cls(
            policy=policy,
            scale_to_zero_delay_s=float(
                scale_down_delay_s if scale_to_zero_delay_s is None else scale_to_zero_delay_s
            ),
            max_new_per_minute=max_new_per_minute,
            now=now if now is not None else _utc_now,
            endpoint=endpoint,
            min_workers=min_workers,
            max_workers=max_workers,
            jobs_per_worker=jobs_per_worker,
            poll_s=float(poll_s),
            scale_down_delay_s=float(scale_down_delay_s),
            duration_s=float(duration_s) if duration_s is not None else None,
        )


def _utc_now() -> datetime:
    return datetime.now(UTC)


def backoff(first_s: float, failures: int, cap_s: float) -> float:
    # The exponent is bounded so a long outage cannot overflow the float.
    base = min(first_s * 2.0 ** min(failures - 1, 32), cap_s)
    return base * random.uniform(1.0 - _JITTER, 1.0)
