"""nullworker: a Vast.ai Serverless PyWorker that only holds capacity.

Embedding in a Trio program::

    import trio, nullworker

    async def main():
        async with trio.open_nursery() as nursery:
            info = await nursery.start(nullworker.serve, nullworker.WorkerConfig(port=0))
            print("serving on", info.url)

Holding capacity from a Trio program::

    async with nullworker.reserve("my-endpoint", duration_s=300) as reservation:
        ...  # the worker at reservation.worker_url is yours until the block exits

Holding as much capacity as a queue needs, until cancelled::

    await nullworker.autoscale("my-endpoint", demand=count_jobs, max_workers=8)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import (
    ClientError,
    ConfigError,
    DemandError,
    DemandNotFound,
    DemandTimeout,
    DuplicateRequest,
    EngineRefused,
    EngineUnavailable,
    EnvelopeError,
    LeaseError,
    LocalHoldFailed,
    NullworkerError,
    PubkeyUnavailable,
    QueueTimeout,
    ReleaseConflict,
    ReleaseFailed,
    ReservationFailed,
    ReservationRejected,
    RouteTimeout,
    ShuttingDown,
    StartupFailed,
    WorkerFailed,
)
from .worker.config import WorkerConfig
from .worker.reservations import Outcome, ReservationResult, ReservationSlot, SlotStatistics

if TYPE_CHECKING:
    from .client import ProgressEvent, Reservation, autoscale, hold, reserve
    from .client.local_hold import (
        LocalHold,
        control_url,
        local_hold,
        release_reservation,
        wait_reserved,
    )
    from .worker.app import create_app
    from .worker.server import ServeInfo, serve

__all__ = [
    "ClientError",
    "ConfigError",
    "DemandError",
    "DemandNotFound",
    "DemandTimeout",
    "DuplicateRequest",
    "EngineRefused",
    "EngineUnavailable",
    "EnvelopeError",
    "LeaseError",
    "LocalHold",
    "LocalHoldFailed",
    "NullworkerError",
    "Outcome",
    "ProgressEvent",
    "PubkeyUnavailable",
    "QueueTimeout",
    "ReleaseConflict",
    "ReleaseFailed",
    "Reservation",
    "ReservationFailed",
    "ReservationRejected",
    "ReservationResult",
    "ReservationSlot",
    "RouteTimeout",
    "ServeInfo",
    "ShuttingDown",
    "SlotStatistics",
    "StartupFailed",
    "WorkerConfig",
    "WorkerFailed",
    "__version__",
    "autoscale",
    "control_url",
    "create_app",
    "hold",
    "local_hold",
    "release_reservation",
    "reserve",
    "serve",
    "wait_reserved",
]

# The web stack (Quart, Hypercorn) and the client are imported on first use, so that a
# program importing the pure-Trio core pays for neither.
_LAZY = {
    "create_app": ("worker.app", "create_app"),
    "serve": ("worker.server", "serve"),
    "ServeInfo": ("worker.server", "ServeInfo"),
    "reserve": ("client", "reserve"),
    "hold": ("client", "hold"),
    "Reservation": ("client", "Reservation"),
    "ProgressEvent": ("client", "ProgressEvent"),
    "autoscale": ("client", "autoscale"),
    "local_hold": ("client.local_hold", "local_hold"),
    "LocalHold": ("client.local_hold", "LocalHold"),
    "control_url": ("client.local_hold", "control_url"),
    "release_reservation": ("client.local_hold", "release_reservation"),
    "wait_reserved": ("client.local_hold", "wait_reserved"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
