"""The client side: reserve capacity on a Vast Serverless endpoint.

* :mod:`.reservation` -- the library: :func:`reserve`, :func:`hold`,
  :class:`Reservation`, :class:`ProgressEvent`;
* :mod:`.cli` -- its command line, ``python -m nullworker.client`` (and
  ``nullworker reserve``);
* :mod:`.demand` -- demand sources (how many jobs a queue holds), over the
  trio-asyncio bridge in :mod:`._aio`.

The client imports :mod:`nullworker.errors` and :mod:`nullworker.vast`, never the
worker or the local engine.
"""

from __future__ import annotations

from ..errors import ClientError, EngineUnavailable, ReservationFailed, ReservationRejected
from .cli import main
from .reservation import (
    DEFAULT_ENGINE_URL,
    ProgressEvent,
    Reservation,
    RouteTimeout,
    hold,
    reserve,
)

__all__ = [
    "DEFAULT_ENGINE_URL",
    "ClientError",
    "EngineUnavailable",
    "ProgressEvent",
    "Reservation",
    "ReservationFailed",
    "ReservationRejected",
    "RouteTimeout",
    "hold",
    "main",
    "reserve",
]
