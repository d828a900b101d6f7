"""The one way nullworker makes a ``redis.asyncio`` client (demand sources, the lease).

Every client gets the same things: decoded replies, the caller's bound on connecting and
on each reply, a ``CLIENT SETNAME`` that says which part of nullworker it is (seen in
``CLIENT LIST`` on the server), and retries without backoff: a retry only reconnects,
and waiting between tries would spend the caller's time budget for nothing.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = ["new_redis_client"]


def new_redis_client(
    url: str, *, timeout_s: float | None, name: str, retries: int, **options: Any
) -> redis.asyncio.Redis:
    """A client of ``url`` (not connected yet: the first command connects); ``timeout_s``
    None: no bound.

    ``retries`` immediate retries of a command whose connection failed; ``options`` go
    to :meth:`redis.asyncio.Redis.from_url` as they are.
    """
    return redis.asyncio.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries),
        client_name=name,
        **options,
    )
