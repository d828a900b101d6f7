"""Temporary alias of :mod:`nullworker.client.demand`, where the demand sources now live.

Kept only for ``nullworker/autoscaler.py`` and its tests until they move beside the
client (``nullworker/client/``); delete this module then.
"""

from __future__ import annotations

from .client.demand import (
    CallableDemand,
    CommandDemand,
    DemandError,
    DemandNotFound,
    DemandSource,
    DemandTimeout,
    NatsConsumer,
    RedisList,
    RedisStream,
    redact,
)

__all__ = [
    "CallableDemand",
    "CommandDemand",
    "DemandError",
    "DemandNotFound",
    "DemandSource",
    "DemandTimeout",
    "NatsConsumer",
    "RedisList",
    "RedisStream",
    "redact",
]
