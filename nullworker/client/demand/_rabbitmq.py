"""The RabbitMQ source: a queue's ready and unacknowledged messages, from the management API."""

from __future__ import annotations

import json
import logging
import os
import time
from urllib.parse import quote, unquote, urlsplit

import httpx

from ...errors import DemandError, DemandNotFound
from .._redact import reason, redact
from ._base import DEFAULT_TIMEOUT_S, DemandSource, aclose_quietly

log = logging.getLogger("nullworker.demand")

#: Where the management API's user and password come from when the URL has none.
RABBITMQ_USER_ENV = "NULLWORKER_RABBITMQ_USER"
RABBITMQ_PASSWORD_ENV = "NULLWORKER_RABBITMQ_PASSWORD"
#: The most of an answer's body read (a queue's object is a few kB).
RABBITMQ_BODY_LIMIT = 1 << 20


class RabbitMQQueue(DemandSource):
    """Messages of a RabbitMQ queue that are ready or delivered and not yet acknowledged.

    Demand is the queue's ``messages`` (``messages_ready + messages_unacknowledged``) from
    the management plugin's HTTP API, ``GET /api/queues/{vhost}/{queue}``: a message a
    consumer holds unacknowledged still counts, so a busy worker is not scaled away.

    The management plugin reports a queue's counts from statistics its queues emit every
    ``collect_statistics_interval`` (5 s by default): a queue created since the last
    emission has no ``messages`` yet. That read is a :class:`DemandError` ("unknown"),
    never 0; the next emission fixes it. The counts are as old as that interval.

    One ``httpx.AsyncClient`` (Trio-native, keep-alive) is created by the first read; a
    read that fails on the way (connection refused or lost, timeout, cancellation) closes
    it, and the next read connects anew.

    Args:
      management_url: ``http[s]://[user:password@]host:15672[/prefix]``; without a user
        in the URL, :data:`RABBITMQ_USER_ENV` and :data:`RABBITMQ_PASSWORD_ENV` are used.
        The password is sent as HTTP basic auth and never shown.
      queue: the queue's name.
      vhost: the queue's virtual host (``/`` by default).
      timeout_s: bound on one read.

    A missing queue or vhost raises :class:`DemandNotFound`; refused credentials a
    :class:`DemandError` saying so.

    :meth:`oldest_age` is now minus the queue's ``head_message_timestamp``: the
    ``timestamp`` property (whole seconds, set by the publisher) of the message at the
    head of the queue, which the management API reports when that message has one.
    Without it (publishers that set no timestamp, an empty queue) the age is unknown.
    It is as old as the statistics, and as right as the publishers' clocks.
    """

    _wrapped_errors = (httpx.HTTPError, OSError, httpx.InvalidURL)
    _timeout_errors = (TimeoutError, httpx.TimeoutException)

    def __init__(
        self,
        management_url: str,
        queue: str,
        *,
        vhost: str = "/",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(timeout_s=timeout_s)
        if not queue:
            raise ValueError("RabbitMQQueue needs a queue name")
        if not vhost:
            raise ValueError("RabbitMQQueue needs a vhost ('/' is the default one)")
        parts = urlsplit(management_url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise ValueError(
                f"{redact(management_url)!r}: the management URL must be "
                "http[s]://[user:password@]host[:port][/prefix]"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{redact(management_url)!r}: the management URL takes no query")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = host if port is None else f"{host}:{port}"
        #: The management API's base URL, without credentials.
        self.base_url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
        self.queue = queue
        self.vhost = vhost
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
        else:
            user = os.environ.get(RABBITMQ_USER_ENV, "")
            password = os.environ.get(RABBITMQ_PASSWORD_ENV, "")
        self._auth = httpx.BasicAuth(user, password) if user else None
        self._queue_url = (
            f"{self.base_url}/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
        )
        self._client: httpx.AsyncClient | None = None

    def describe(self) -> str:
        return f"rabbitmq queue {self.queue!r} in vhost {self.vhost!r} at {self.base_url}"

    async def _read(self) -> int:
        return self._count(*await self._fetch())

    async def _oldest_age(self) -> float | None:
        status, body = await self._fetch()
        self._count(status, body)  # the same checks: a missing queue, refused credentials
        head = json.loads(body).get("head_message_timestamp")
        if isinstance(head, bool) or not isinstance(head, int | float):
            return None
        return time.time() - head

    async def _fetch(self) -> tuple[int, bytes]:
        if self._client is None:
            self._client = httpx.AsyncClient(
                auth=self._auth,
                timeout=httpx.Timeout(self.timeout_s),
                follow_redirects=False,
                headers={"accept": "application/json"},
            )
        try:
            async with self._client.stream("GET", self._queue_url) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > RABBITMQ_BODY_LIMIT:
                        raise DemandError(
                            f"{self.describe()}: the answer is over {RABBITMQ_BODY_LIMIT} bytes"
                        )
        except DemandError:
            raise
        except BaseException:
            await self._drop_client()
            raise
        return response.status_code, bytes(body)

    def _count(self, status: int, body: bytes) -> int:
        if status == 404:
            raise DemandNotFound(f"{self.describe()}: no such queue (or no such vhost) (HTTP 404)")
        if status == 401:
            raise DemandError(
                f"{self.describe()}: the management API refused the credentials (HTTP 401); "
                f"give them in the URL or in {RABBITMQ_USER_ENV}/{RABBITMQ_PASSWORD_ENV}"
            )
        if status == 403:
            raise DemandError(
                f"{self.describe()}: the user may not read this queue (HTTP 403): it needs "
                "the 'monitoring' (or 'management') tag and access to the vhost"
            )
        if status != 200:
            text = body[:200].decode("utf-8", "replace").strip()
            raise DemandError(f"{self.describe()}: HTTP {status}: {redact(text)!r}")
        try:
            info = json.loads(body)
        except ValueError as exc:
            raise DemandError(f"{self.describe()}: the answer is not JSON ({reason(exc)})") from exc
        if not isinstance(info, dict):
            raise DemandError(f"{self.describe()}: the answer is not a queue object")
        messages = info.get("messages")
        if messages is None:
            # No statistics yet: a queue created since the last emission, or statistics
            # collection turned off. Unknown is not empty.
            raise DemandError(
                f"{self.describe()}: the queue has no message count yet (no statistics "
                "emitted since it was created): unknown, not 0"
            )
        if isinstance(messages, bool) or not isinstance(messages, int) or messages < 0:
            raise DemandError(f"{self.describe()}: 'messages' is {messages!r}, not a count")
        return messages

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await aclose_quietly(client, self.describe())

    async def _close(self) -> None:
        await self._drop_client()
