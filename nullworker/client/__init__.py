"""The client side: reserve capacity on a Vast Serverless endpoint.

* :mod:`.reservation` -- the library: :func:`reserve`, :func:`hold`,
  :class:`Reservation`, :class:`ProgressEvent`;
* :mod:`.cli` -- its command line, ``python -m nullworker.client`` (and
  ``nullworker reserve``);
* :mod:`.autoscaler` -- :func:`autoscale`, which holds as many reservations as a
  queue's demand asks for; :mod:`.autoscale_cli` is its command line
  (``nullworker autoscale``) and :mod:`.metrics` its Prometheus metrics;
* :mod:`.local_hold` -- :func:`local_hold`, which keeps this instance's worker busy
  while a job runs, :func:`release_reservation` and :func:`wait_reserved`;
* :mod:`.lease` -- the Redis lease that lets standby autoscalers take over;
* :mod:`.sharing` -- :func:`autoscale_endpoints`, several endpoints each under its
  lease, shared out among the processes that run them;
* :mod:`.demand` -- demand sources (how many jobs a queue holds), over the
  trio-asyncio bridge in :mod:`._aio`.

The autoscaler and the demand sources are imported on first use, so ``nullworker
reserve`` does not pay for them. The queue clients the demand sources and the lease use
(redis, nats-py, trio-asyncio) come with the ``autoscale`` extra
(``pip install 'nullworker[autoscale]'``), not with the worker's own install; without
them, importing those names raises an :class:`ImportError` that names the extra.

Every error the client raises is in :mod:`nullworker.errors` (its tree is drawn there)
and exported here too.

The client imports :mod:`nullworker.errors` and :mod:`nullworker.vast`, never the
worker or the local engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import (
    ClientError,
    DemandError,
    DemandNotFound,
    DemandTimeout,
    EngineRefused,
    EngineUnavailable,
    LeaseError,
    LocalHoldFailed,
    ReleaseFailed,
    ReservationFailed,
    ReservationRejected,
    RouteTimeout,
)
from .cli import main
from .extras import AUTOSCALE_EXTRA_MODULES, missing_extra_message
from .local_hold import (
    LocalHold,
    control_url,
    local_hold,
    release_reservation,
    wait_reserved,
)
from .reservation import (
    DEFAULT_ENGINE_URL,
    ProgressEvent,
    Reservation,
    hold,
    reserve,
)

if TYPE_CHECKING:
    from .autoscaler import AutoscaleEvent, Autoscaler, AutoscalerStatistics, autoscale
    from .demand import (
        CallableDemand,
        Combine,
        CombinedDemand,
        CommandDemand,
        DemandSource,
        HttpJson,
        NatsConsumer,
        PostgresQuery,
        PrometheusQuery,
        RabbitMQQueue,
        RedisList,
        RedisQueue,
        RedisStream,
        SqsQueue,
    )
    from .lease import Lease, Membership, RedisLease
    from .sharing import EndpointRun, autoscale_endpoints

__all__ = [
    "DEFAULT_ENGINE_URL",
    "AutoscaleEvent",
    "Autoscaler",
    "AutoscalerStatistics",
    "CallableDemand",
    "ClientError",
    "Combine",
    "CombinedDemand",
    "CommandDemand",
    "DemandError",
    "DemandNotFound",
    "DemandSource",
    "DemandTimeout",
    "EndpointRun",
    "EngineRefused",
    "EngineUnavailable",
    "HttpJson",
    "Lease",
    "LeaseError",
    "LocalHold",
    "LocalHoldFailed",
    "Membership",
    "NatsConsumer",
    "PostgresQuery",
    "ProgressEvent",
    "PrometheusQuery",
    "RabbitMQQueue",
    "RedisLease",
    "RedisList",
    "RedisQueue",
    "RedisStream",
    "ReleaseFailed",
    "Reservation",
    "ReservationFailed",
    "ReservationRejected",
    "RouteTimeout",
    "SqsQueue",
    "autoscale",
    "autoscale_endpoints",
    "control_url",
    "hold",
    "local_hold",
    "main",
    "release_reservation",
    "reserve",
    "wait_reserved",
]

_LAZY = {
    "AutoscaleEvent": "autoscaler",
    "Autoscaler": "autoscaler",
    "AutoscalerStatistics": "autoscaler",
    "autoscale": "autoscaler",
    "CallableDemand": "demand",
    "Combine": "demand",
    "CombinedDemand": "demand",
    "CommandDemand": "demand",
    "DemandSource": "demand",
    "HttpJson": "demand",
    "PrometheusQuery": "demand",
    "RedisQueue": "demand",
    "NatsConsumer": "demand",
    "RedisList": "demand",
    "RedisStream": "demand",
    "SqsQueue": "demand",
    "RabbitMQQueue": "demand",
    "PostgresQuery": "demand",
    "Lease": "lease",
    "Membership": "lease",
    "RedisLease": "lease",
    "EndpointRun": "sharing",
    "autoscale_endpoints": "sharing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        try:
            return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        except ModuleNotFoundError as exc:
            if exc.name not in AUTOSCALE_EXTRA_MODULES:
                raise
            raise ModuleNotFoundError(missing_extra_message(exc.name), name=exc.name) from exc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
