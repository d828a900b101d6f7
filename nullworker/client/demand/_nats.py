"""The NATS JetStream source: a consumer's pending and unacknowledged messages."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

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

    Push: :meth:`watch` subscribes (core NATS, on a connection of its own) to the
    subjects the stream takes (its ``subjects``), so a message published to the stream
    wakes the reader; nothing has to be enabled on the server. Each message is delivered
    to this subscription too (the traffic of the stream once more, to this client). A
    stream with no subjects of its own (a mirror, one fed by ``sources``) cannot be
    watched: it is polled only. Acknowledgements are seen at the next poll.
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
        self._no_subjects_logged = False

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

    async def _aio_connect(self, client: NatsClient, name: str, **callbacks: Any) -> None:
        self._connect_error = None
        try:
            await client.connect(
                servers=[self.url],
                name=name,
                allow_reconnect=False,
                # nats-py tries each server up to max_reconnect_attempts + 1 times
                # before NoServersError (0 means forever), reconnect_time_wait apart.
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=max(1, math.ceil(self.timeout_s)),
                error_cb=self._aio_on_error,
                **callbacks,
            )
        except nats.errors.NoServersError:
            # Say why (connection refused, ...) rather than "no servers available".
            last, self._connect_error = self._connect_error, None
            if isinstance(last, OSError | TimeoutError | nats.errors.Error):
                raise last from None
            raise

    async def _aio_query(self, client: NatsClient) -> int:
        if not client.is_connected:
            await self._aio_connect(client, "nullworker-demand")
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

    def can_push(self) -> bool:
        return True

    async def _aio_subscribe(
        self, changed: Callable[[], None], lost: Callable[[], None]
    ) -> NatsClient | None:
        async def on_lost() -> None:
            lost()

        async def on_message(msg: Any) -> None:
            changed()

        client = NatsClient()
        await self._aio_connect(
            client, "nullworker-watch", disconnected_cb=on_lost, closed_cb=on_lost
        )
        try:
            info = await client.jsm(timeout=self.timeout_s).stream_info(self.stream)
            subjects = list(info.config.subjects or ())
            if not subjects:
                # Asked again every minute (quietly): the stream may be changed.
                log.log(
                    logging.DEBUG if self._no_subjects_logged else logging.WARNING,
                    "%s: the stream has no subjects of its own to subscribe to; polling only",
                    self.describe(),
                )
                self._no_subjects_logged = True
                await client.close()
                return None
            for subject in subjects:
                await client.subscribe(subject, cb=on_message)
            # The subscriptions are in place at the server before the caller reads.
            await client.flush(timeout=max(1, math.ceil(self.timeout_s)))
        except BaseException:
            await client.close()
            raise
        return client

    async def _aio_unsubscribe(self, handle: Any) -> None:
        await handle.close()
