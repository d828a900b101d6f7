"""Demand sources: how many jobs a queue holds right now.

``nullworker autoscale`` holds one reservation per job; a demand source tells it how
many that is. Every source has the same small interface::

    async with RedisList("redis://:secret@queue:6379/0", "jobs", "jobs:processing") as source:
        log.info("reading demand from %s", source.describe())  # no password in it
        n = await source.read()                                 # an int >= 0

Sources
-------
* :class:`RedisList` — ``LLEN key`` (+ ``LLEN processing``), one round trip.
* :class:`RedisStream` — a consumer group's ``lag`` + ``pending`` (``XINFO GROUPS``).
* :class:`RedisQueue` — a job framework's waiting + in-flight + due jobs (celery, rq,
  dramatiq, arq, bullmq, sidekiq), from the framework's own keys, in one Lua script.
* :class:`HttpJson` — a number at a path in a JSON document served over HTTP.
* :class:`PrometheusQuery` — the one value of a Prometheus instant query.
* :class:`NatsConsumer` — a JetStream consumer's ``num_pending + num_ack_pending``.
* :class:`SqsQueue` — an SQS queue's visible + in-flight (+ delayed) messages (boto3).
* :class:`RabbitMQQueue` — a RabbitMQ queue's ready + unacknowledged messages, from the
  management API (httpx).
* :class:`PostgresQuery` — the number a PostgreSQL query returns (asyncpg).
* :class:`CommandDemand` — a shell command that prints one integer.
* :class:`CallableDemand` — any async function returning an int.
* :class:`CombinedDemand` — the ``sum`` or ``max`` of several sources (a queue and its
  retry queue); a failed read of any part fails the whole read.

Errors
------
::

    DemandError            a read failed; the message names the source (password-free) and why
    ├── DemandTimeout      no answer within the source's timeout_s
    └── DemandNotFound     the stream, group, consumer or queue to read does not exist

A failed read raises a :class:`DemandError` (with the library's exception as
``__cause__``) and nothing else: a caller logs it and tries again on its next poll.
Programming errors are not demand errors: a bad URL or name raises ``ValueError`` in the
constructor, and reading a closed source raises ``trio.ClosedResourceError``.

Layout
------
One private module per kind of client, so that a source needs only its own client
library: :mod:`._base` (the interface), :mod:`._command` (a command, a callable; no
queue client), :mod:`._asyncio` (sources on the trio-asyncio bridge), :mod:`._redis`,
:mod:`._redis_queues` (the job frameworks), :mod:`._nats`, :mod:`._sqs`, :mod:`._rabbitmq`,
:mod:`._postgres`, :mod:`._http` (HTTP JSON and Prometheus, with httpx in Trio: no bridge).
The sources that need a queue client are imported on first use, so the command, callable
and HTTP sources work without the ``autoscale`` extra's queue clients.

Concurrency invariants
----------------------
* Every :meth:`DemandSource.read` is bounded by the source's ``timeout_s`` (a Trio cancel
  scope), so a server that accepts connections and never answers cannot stall the
  caller. Reads of one source are serialized (a lock): a second concurrent read waits
  for the first, and its wait counts against its own timeout.
* Redis, NATS and PostgreSQL (asyncpg) clients are asyncio libraries, run through
  :mod:`nullworker.client._aio`.
  ``async with source:`` opens (or reuses) the trio-asyncio loop; the client itself is
  created lazily inside that loop by the first read.
* SQS's boto3 is blocking: each read runs in a worker thread behind a capacity limiter
  of one, so a read abandoned at its timeout never leaves two threads on one source.
  RabbitMQ's management API is read with httpx, natively in Trio.
* A read that fails for any reason other than the server's own answer (connection
  refused or lost, timeout, cancellation) throws the client away, closing it under a
  short shielded bound. The next read connects anew: a source recovers from a server
  restart by itself, with no background reconnect loop and no state left over from a
  request that was cut off half-way.
* ``trio.Cancelled`` is never swallowed or turned into a :class:`DemandError`. A
  cancelled read leaves the source usable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._support import public_module
from ...errors import DemandError, DemandNotFound, DemandTimeout
from .._redact import redact
from ._base import CLOSE_TIMEOUT_S, DEFAULT_TIMEOUT_S, DemandSource
from ._combined import COMBINE, Combine, CombinedDemand
from ._command import (
    COMMAND_STDERR_TAIL,
    COMMAND_STDOUT_LIMIT,
    COMMAND_TIMEOUT_S,
    CallableDemand,
    CommandDemand,
)
from ._http import HTTP_RESPONSE_LIMIT, HttpJson, PrometheusQuery

if TYPE_CHECKING:
    from ._nats import NatsConsumer
    from ._postgres import PostgresQuery
    from ._rabbitmq import RabbitMQQueue
    from ._redis import STREAM_SCAN_BATCH, STREAM_SCAN_LIMIT, RedisList, RedisStream
    from ._redis_queues import FRAMEWORKS, RedisQueue
    from ._sqs import SqsQueue

__all__ = [
    "CLOSE_TIMEOUT_S",
    "COMBINE",
    "COMMAND_STDERR_TAIL",
    "COMMAND_STDOUT_LIMIT",
    "COMMAND_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "FRAMEWORKS",
    "HTTP_RESPONSE_LIMIT",
    "STREAM_SCAN_BATCH",
    "STREAM_SCAN_LIMIT",
    "CallableDemand",
    "Combine",
    "CombinedDemand",
    "CommandDemand",
    "DemandError",
    "DemandNotFound",
    "DemandSource",
    "DemandTimeout",
    "HttpJson",
    "NatsConsumer",
    "PostgresQuery",
    "PrometheusQuery",
    "RabbitMQQueue",
    "RedisList",
    "RedisQueue",
    "RedisStream",
    "SqsQueue",
    "redact",
]

#: Names whose module imports a queue client, by module.
_LAZY = {
    "NatsConsumer": "_nats",
    "RedisList": "_redis",
    "RedisQueue": "_redis_queues",
    "FRAMEWORKS": "_redis_queues",
    "RedisStream": "_redis",
    "STREAM_SCAN_BATCH": "_redis",
    "STREAM_SCAN_LIMIT": "_redis",
    "SqsQueue": "_sqs",
    "RabbitMQQueue": "_rabbitmq",
    "PostgresQuery": "_postgres",
}


public_module(__name__, [CallableDemand, CombinedDemand, CommandDemand, DemandSource])
public_module(__name__, [HttpJson, PrometheusQuery, redact])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        public_module(__name__, [value])
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
