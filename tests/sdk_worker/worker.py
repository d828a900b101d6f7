"""A minimal null worker on the official Vast SDK (``vastai`` 1.9.1), for interop tests.

``tests/test_sdk_interop.py`` runs this file with the Python of a virtual environment
that has the SDK installed, in a temporary working directory, with the Vast environment
contract (``REPORT_ADDR``, ``CONTAINER_ID``, ``WORKER_PORT``, ``PUBLIC_IPADDR``,
``VAST_TCP_PORT_<port>``, ``MASTER_TOKEN``, ``UNSECURED``) pointed at nullworker's engine
emulator. It is the official SDK's idea of a null worker, so the tests can check that
our engine and our client speak the same protocol as the real thing:

* one handler route, ``/reserve``, served by a remote function that sleeps for the
  requested ``duration`` (capped) and answers ``{"result": {...}}`` -- the SDK's
  remote-function shape;
* workload 100 per request and a trivial benchmark (a zero-length hold). The SDK needs
  exactly one benchmark; ``max_perf`` is pinned to 100 by writing ``.has_benchmark`` in
  the working directory first, as nullworker pins its own, so the SDK skips measuring;
* a lifecycle with nothing to load, so the SDK marks the worker loaded at once (its
  lifecycle path has no log file to tail and no 10 s fallback wait).

Readiness then shows in the SDK's first report (about 1 s after start). Signatures are
checked against the key from ``{REPORT_ADDR}/pubkey/`` unless ``UNSECURED=true``.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path
from typing import Any

from vastai.serverless.server.worker import (  # type: ignore[import-not-found]
    BenchmarkConfig,
    HandlerConfig,
    Worker,
    WorkerConfig,
)

WORKLOAD = 100.0
MAX_PERF = "100"
MAX_HOLD_S = float(os.environ.get("MAX_RESERVATION_SECONDS", "3600"))
#: Like the SDK's default: refuse (429) when the estimated wait exceeds this.
MAX_QUEUE_TIME_S = float(os.environ.get("MAX_QUEUE_TIME", "30"))


async def reserve(duration: Any = None, **_ignored: Any) -> dict[str, Any]:
    """Hold for ``duration`` seconds (the cap when omitted); the SDK cancels this task
    when the client disconnects, which ends the hold early."""
    if duration is None:
        seconds = MAX_HOLD_S
    else:
        seconds = float(duration)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError("duration must be a finite number >= 0")
        seconds = min(seconds, MAX_HOLD_S)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    return {
        "released": "duration_elapsed",
        "duration": seconds,
        "held": round(time.monotonic() - started, 3),
    }


class NothingToLoad:
    """The lifecycle of a worker with no model: ready as soon as it is entered."""

    async def __aenter__(self) -> NothingToLoad:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


def main() -> None:
    benchmark_file = Path(".has_benchmark")
    if not benchmark_file.exists():
        benchmark_file.write_text(MAX_PERF + "\n")
    config = WorkerConfig(
        handlers=[
            HandlerConfig(
                route="/reserve",
                remote_function=reserve,
                allow_parallel_requests=False,
                max_queue_time=MAX_QUEUE_TIME_S,
                workload_calculator=lambda payload: WORKLOAD,
                benchmark_config=BenchmarkConfig(dataset=[{"duration": 0}], runs=1, concurrency=1),
            )
        ],
        lifecycle=NothingToLoad(),
    )
    # Extra keyword arguments reach aiohttp's TCPSite: bind loopback only in tests.
    Worker(config).run(host=os.environ.get("SDK_WORKER_HOST", "127.0.0.1"))


if __name__ == "__main__":
    main()
