"""The NATS JetStream source: a consumer's pending and unacknowledged messages."""

from __future__ import annotations

import logging
import math

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from ...errors import DemandError, DemandNotFound
from .._redact import reason, redact
from ._asyncio import AsyncioSource
from ._base import DEFAULT_TIMEOUT_S

log = logging.getLogger("nullworker.demand")


_NATS_STREAM_NOT_FOUND = 10059
_NATS_CONSUMER_NOT_FOUND = 10014
#: Characters NATS refuses in stream and consumer names.
_NATS_BAD_NAME_CHARS = frozenset(">*. /\\\t\r\n")


class NatsConsumer(AsyncioSource[NatsClient]):
    """Messages a NATS JetStream durable consumer has not finished with.

    Demand is the consumer's ``num_pending`` (messages in its stream not yet delivered
    to it) plus ``num_ack_pending`` (delivered, not yet acknowledged), from one consumer
    info request.

    The client connects without nats-py's own reconnect loop: when the server goes away
    the connection closes, the read fails with :class:`DemandError`, and the next read
    connects anew. (A server that dies while a request is in flight leaves that request
    unanswered: the read ends as a :class:`DemandTimeout`.)

    Args:
      url: ``nats://[user:password@ | token@]host[:port]`` (or ``tls://``, ``ws://``,
        ``wss://``).
      stream: the JetStream stream.
      consumer: the durable consumer.
      timeout_s: bound on one read (connecting included).

    A missing stream or consumer raises :class:`DemandNotFound`.
    """

    _scheme_names = ("nats", "tls", "ws", "wss")
    _wrapped_errors = (nats.errors.Error, OSError, TimeoutError)

    def __init__(
        self,
        url: str,
        stream: str,
        consumer: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        for what, name in (("stream", stream), ("consumer", consumer)):
            if not name or _NATS_BAD_NAME_CHARS.intersection(name):
                raise ValueError(f"invalid NATS {what} name: {name!r}")
        super().__init__(url, timeout_s=timeout_s)
        self.stream = stream
        self.consumer = consumer
        self._connect_error: Exception | None = None

    def describe(self) -> str:
        return f"nats consumer {self.consumer!r} on stream {self.stream!r} at {redact(self.url)}"

    def _new_client(self) -> NatsClient:
        return NatsClient()

    def _usable(self, client: NatsClient) -> bool:
        return not client.is_closed

    async def _aio_on_error(self, exc: Exception) -> None:
        # nats-py reports connection trouble here as well as raising it; the read's
        # DemandError is what callers see, so this stays at debug level.
        self._connect_error = exc
        log.debug("%s: %s", self.describe(), reason(exc))

    async def _aio_query(self, client: NatsClient) -> int:
        if not client.is_connected:
            self._connect_error = None
            try:
                await client.connect(
                    servers=[self.url],
                    name="nullworker-demand",
                    allow_reconnect=False,
                    # nats-py tries each server up to max_reconnect_attempts + 1 times
                    # before NoServersError (0 means forever), reconnect_time_wait apart.
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    connect_timeout=max(1, math.ceil(self.timeout_s)),
                    error_cb=self._aio_on_error,
                )
            except nats.errors.NoServersError:
                # Say why (connection refused, ...) rather than "no servers available".
                last, self._connect_error = self._connect_error, None
                if isinstance(last, OSError | TimeoutError | nats.errors.Error):
                    raise last from None
                raise
        try:
            info = await client.jsm(timeout=self.timeout_s).consumer_info(
                self.stream, self.consumer, timeout=self.timeout_s
            )
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _NATS_STREAM_NOT_FOUND:
                what = f"the stream {self.stream!r} does not exist"
            elif exc.err_code == _NATS_CONSUMER_NOT_FOUND:
                what = f"the stream has no consumer {self.consumer!r}"
            else:
                what = f"not found ({exc.description})"
            raise DemandNotFound(f"{self.describe()}: {what}") from exc
        except nats.js.errors.APIError as exc:
            raise DemandError(f"{self.describe()}: the server answered {reason(exc)}") from exc
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    async def _aio_close(self, client: NatsClient) -> None:
        await client.close()
