"""A job for the RQ worker that tests/test_demand_queues.py starts: it runs until released.

It lives in a module of its own (not a test module) so that the worker process imports
only this and redis.
"""

from __future__ import annotations

import redis

#: How long a job waits for its release before it gives up (a bound, never reached).
RELEASE_WAIT_S = 60


def wait_for_release(url: str, key: str) -> str:
    """Block until the test pushes onto ``key`` (one push releases one job)."""
    client = redis.Redis.from_url(url)
    try:
        if client.blpop([key], timeout=RELEASE_WAIT_S) is None:
            raise TimeoutError(f"no release on {key!r} within {RELEASE_WAIT_S} s")
    finally:
        client.close()
    return "done"
