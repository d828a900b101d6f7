"""The page's reading of the engine: timeline samples, why a request waits, the idle countdown.

Pure functions over the records (:mod:`.records`): they read workers and requests and
change nothing, and they never import the routing core (:mod:`.core`), which calls them
to fill the views it serves (``GET /workers``, ``GET /timeline``) and the ``reason`` of a
WAITING answer -- an extension for humans, in the page's words; Vast's engine sends none.

* The timeline is a bounded ring of one-second samples: the wall-clock time, then the
  requests waiting and the workers by kind (:data:`TIMELINE_SERIES`). The web layer
  takes one a second while the engine is served; the page's chart draws them.
* :func:`wait_reasons` pairs the oldest waiting requests with the workers starting up
  (``nullworker dev`` starts one per waiting request) and gives the rest the reason the
  pool has, from the :class:`~.records.Scaling` policy of whoever runs the workers.
* :func:`scale_down_in` mirrors ``nullworker dev``'s rule for stopping idle workers, so
  the page can count down to it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from .records import PendingRequest, Scaling, WorkerRecord, breakdown

__all__ = [
    "DEFAULT_TIMELINE_S",
    "SAMPLE_INTERVAL_S",
    "TIMELINE_SERIES",
    "Sample",
    "new_timeline",
    "sample_of",
    "scale_down_in",
    "timeline_json",
    "wait_reasons",
]

#: How much history the timeline keeps, and the sampling interval it assumes.
DEFAULT_TIMELINE_S = 600.0
SAMPLE_INTERVAL_S = 1.0
#: Series of each timeline sample, after its wall-clock time.
TIMELINE_SERIES = ("waiting", "busy", "idle", "starting", "unhealthy")

#: One sample: wall-clock time, then :data:`TIMELINE_SERIES`.
Sample = tuple[float, int, int, int, int, int]


def new_timeline(timeline_s: float) -> deque[Sample]:
    """An empty ring that keeps ``timeline_s`` seconds of samples (at least one)."""
    return deque(maxlen=max(1, math.ceil(timeline_s / SAMPLE_INTERVAL_S)))


def sample_of(
    workers: Iterable[WorkerRecord], waiting: int, now: float, stale_after_s: float
) -> Sample:
    """One sample, now: ``waiting`` requests and the workers counted by kind."""
    counts = breakdown(workers, now, stale_after_s)
    return (
        round(time.time(), 3),
        waiting,
        counts.get("busy", 0) + counts.get("leased", 0),
        counts.get("idle", 0),
        counts.get("starting", 0) + counts.get("loading", 0),
        counts.get("error", 0) + counts.get("stale", 0),
    )


def timeline_json(timeline: deque[Sample], since: float | None = None) -> dict[str, Any]:
    """The timeline's samples (all, or those taken after wall-clock ``since``)."""
    samples = [list(s) for s in timeline if since is None or s[0] > since]
    return {
        "interval_s": SAMPLE_INTERVAL_S,
        "keep_s": (timeline.maxlen or 0) * SAMPLE_INTERVAL_S,
        "series": ["t", *TIMELINE_SERIES],
        "samples": samples,
    }


def wait_reasons(
    workers: Mapping[int, WorkerRecord],
    pending: Mapping[int, PendingRequest],
    scaling: Scaling | None,
    now: float,
    stale_after_s: float,
) -> dict[int, str]:
    """Why each pending request waits, by ``request_idx``.

    The oldest requests are matched with the workers starting up (one each, as
    ``nullworker dev`` starts one per waiting request); the rest wait for the
    reason the pool has: at its maximum, paused after a crash, or no one to start
    a worker at all.
    """
    states = {w.id: w.state(now, stale_after_s) for w in workers.values()}
    starting = sorted(
        (w for w in workers.values() if states[w.id] in ("starting", "loading")),
        key=lambda w: w.first_seen,
    )
    counts = breakdown(workers.values(), now, stale_after_s)
    pool = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    paused = None if scaling is None else scaling.paused_until
    if scaling is not None and len(workers) >= scaling.max_workers:
        rest = f"at --max-workers {scaling.max_workers} ({pool})"
    elif scaling is not None and paused is not None and paused > now:
        rest = f"a worker failed: no new worker for {paused - now:.0f} s"
    elif scaling is not None:
        rest = "no free worker: starting one"
    elif not workers:
        rest = "no worker has reported (this engine starts none)"
    else:
        rest = f"no free worker ({pool}; this engine starts none)"
    reasons: dict[int, str] = {}
    by_age = sorted(pending.values(), key=lambda p: (p.first_seen, p.request_idx))
    for position, request in enumerate(by_age):
        if position < len(starting):
            worker = starting[position]
            doing = "is starting" if states[worker.id] == "starting" else "is loading"
            reasons[request.request_idx] = (
                f"no ready worker yet: worker {worker.id} {doing} ({now - worker.first_seen:.0f} s)"
            )
        else:
            reasons[request.request_idx] = rest
    return reasons


def scale_down_in(
    workers: Mapping[int, WorkerRecord],
    scaling: Scaling | None,
    now: float,
    stale_after_s: float,
) -> dict[int, float | None]:
    """Seconds until each idle worker is stopped (``None``: kept by --min-workers).

    Mirrors ``nullworker dev``'s rule: the longest idle ones above the minimum go.
    """
    if scaling is None:
        return {}
    idle = sorted(
        (
            w
            for w in workers.values()
            if w.idle_since is not None and w.state(now, stale_after_s) == "idle"
        ),
        key=lambda w: w.idle_since or 0.0,
    )
    excess = max(0, len(workers) - scaling.min_workers)
    countdown: dict[int, float | None] = {}
    for position, worker in enumerate(idle):
        assert worker.idle_since is not None
        left = scaling.idle_timeout_s - (now - worker.idle_since)
        countdown[worker.id] = round(max(0.0, left), 3) if position < excess else None
    return countdown
