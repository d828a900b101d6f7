"""The local engine emulator and ``nullworker dev``, for development and tests.

* :mod:`.core` -- :class:`Engine`, the sans-IO routing core: routing, reports, demand;
* :mod:`.records` -- the plain data it keeps (workers, requests, finished holds, counters);
* :mod:`.timeline` -- the page's reading of it: timeline samples, why a request waits;
* :mod:`.view` -- the page's view model;
* :mod:`.web` -- its HTTP layer: the Quart-Trio routes and :func:`serve_engine`;
* :mod:`.cli` -- ``nullworker engine`` (also ``python -m nullworker.engine``);
* :mod:`.dev` -- ``nullworker dev``: the engine plus real worker processes started and
  stopped on demand (its options in :mod:`.dev_options`, its scaling policy in
  :mod:`.dev_scaling`, its processes in :mod:`.dev_processes`).

The engine starts workers only as processes (``python -m nullworker serve``) and never
imports the worker's internals.
"""

from __future__ import annotations

from .cli import main
from .core import (
    DEFAULT_ENGINE_PORT,
    Engine,
    EngineRequestError,
    FinishedRequest,
    PendingRequest,
    ReceivedBody,
    RouteRecord,
    WorkerRecord,
    load_private_key,
)
from .web import create_engine_app, serve_engine

__all__ = [
    "DEFAULT_ENGINE_PORT",
    "Engine",
    "EngineRequestError",
    "FinishedRequest",
    "PendingRequest",
    "ReceivedBody",
    "RouteRecord",
    "WorkerRecord",
    "create_engine_app",
    "load_private_key",
    "main",
    "serve_engine",
]
