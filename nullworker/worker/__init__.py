"""The worker that runs on the instance: the reservation core, the engine reporter, the
HTTP apps, the runtime and :func:`serve`.

Public entry points (what the rest of the package and embedding programs use):

* :class:`WorkerConfig` -- the settings (:mod:`.config`);
* :class:`ReservationSlot` and its results -- the pure-Trio core (:mod:`.reservations`);
* :func:`serve` and :class:`ServeInfo` -- run a worker in a Trio program (:mod:`.server`);
* :func:`create_app` -- the Quart-Trio app, for Hypercorn's own CLI (:mod:`.app`);
* :class:`Worker` -- the runtime that :func:`serve` starts and keeps to itself (:mod:`.runtime`).

The worker imports :mod:`nullworker.errors` and :mod:`nullworker.vast`, never the client
or the local engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import WorkerConfig
from .reservations import Outcome, ReservationResult, ReservationSlot, SlotStatistics

if TYPE_CHECKING:
    from .app import create_app
    from .runtime import Worker
    from .server import ServeInfo, serve

__all__ = [
    "Outcome",
    "ReservationResult",
    "ReservationSlot",
    "ServeInfo",
    "SlotStatistics",
    "Worker",
    "WorkerConfig",
    "create_app",
    "serve",
]

# The web stack (Quart, Hypercorn) and httpx are imported on first use, so that a program
# importing the pure-Trio core pays for neither.
_LAZY = {
    "create_app": ("app", "create_app"),
    "serve": ("server", "serve"),
    "ServeInfo": ("server", "ServeInfo"),
    "Worker": ("runtime", "Worker"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
