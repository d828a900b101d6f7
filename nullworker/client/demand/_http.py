"""HTTP sources: a number in a JSON document, and a Prometheus instant query.

Both read with httpx in Trio (no asyncio bridge). One ``httpx.AsyncClient`` per source
keeps its connection alive between polls; a read that fails for any reason other than
the server's own answer (connection refused or lost, timeout, cancellation) closes the
client, and the next read connects anew, as the Redis and NATS sources do.

A response is read as a stream and refused once it passes ``max_bytes``
(:data:`HTTP_RESPONSE_LIMIT` by default), so a misdirected URL serving a large file
costs at most that much. Redirects are not followed: an answer other than 200 is an
error that says which status it was.

Credentials come from arguments (the CLI takes them from the environment), go only
into the request's ``Authorization`` header, and never into :meth:`describe`, an error
or a log line; a password in the URL is masked like any other (:func:`redact`).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, ClassVar

import httpx

from ...errors import DemandError
from .._redact import reason, redact
from .._urls import check_url
from ._base import DEFAULT_TIMEOUT_S, DemandSource, aclose_quietly

__all__ = ["HTTP_RESPONSE_LIMIT", "HttpJson", "PrometheusQuery"]

log = logging.getLogger("nullworker.demand")

#: Default bound on the size of one response body, in bytes.
HTTP_RESPONSE_LIMIT = 1_000_000
#: How much of an error body goes into a DemandError.
_BODY_SHOWN = 200


def _shown(text: str) -> str:
    text = " ".join(text.split())
    return redact(text if len(text) <= _BODY_SHOWN else text[: _BODY_SHOWN - 1] + "…")


def count_of(value: object, what: str) -> int:
    """``value`` as a job count, or :class:`DemandError`: never a silent 0.

    A JSON integer >= 0, or a float with no fraction (Prometheus and many exporters
    write ``3.0``). ``null``, booleans, strings, NaN, infinities, negative numbers and
    fractions are refused.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DemandError(f"{what} is {_shown(json.dumps(value))}, not a number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DemandError(f"{what} is {value}, not a count")
        if not value.is_integer():
            raise DemandError(f"{what} is {value:g}, not a whole number (round it: ceil())")
        value = int(value)
    if value < 0:
        raise DemandError(f"{what} is {value}, a negative count")
    return value


class _HttpSource(DemandSource):
    """A GET whose JSON answer holds the count; subclasses build the URL and pick it."""

    _wrapped_errors: ClassVar[tuple[type[BaseException], ...]] = (httpx.HTTPError,)
    _timeout_errors: ClassVar[tuple[type[BaseException], ...]] = (httpx.TimeoutException,)

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        bearer_token: str | None,
        basic_auth: tuple[str, str] | None,
        max_bytes: int,
    ) -> None:
        super().__init__(timeout_s=timeout_s)
        check_url(url, schemes=("http", "https"))
        if bearer_token is not None and basic_auth is not None:
            raise ValueError("give a bearer token or a user and password, not both")
        if bearer_token is not None and (not bearer_token or "\n" in bearer_token):
            raise ValueError("the bearer token must be one non-empty line")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an int >= 1, not {max_bytes!r}")
        self.url = url
        self.max_bytes = max_bytes
        self._auth: httpx.Auth | None = None
        self._headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        elif basic_auth is not None:
            self._auth = httpx.BasicAuth(*basic_auth)
        self._client: httpx.AsyncClient | None = None

    def _request_url(self) -> httpx.URL:
        return httpx.URL(self.url)

    def _pick(self, document: Any) -> int:
        raise NotImplementedError

    def _refused(self, status: int, document: Any, body: bytes) -> DemandError:
        text = body.decode("utf-8", "replace").strip()
        said = f": {_shown(text)}" if text else ""
        return DemandError(f"{self.describe()}: the server answered {status}{said}")

    async def _read(self) -> int:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                follow_redirects=False,
                headers=self._headers,
                auth=self._auth,
            )
        try:
            status, body = await self._get(self._client)
        except BaseException:
            await self._drop_client()
            raise
        document: Any = None
        try:
            document = json.loads(body)
        except ValueError as exc:
            if status == 200:
                raise DemandError(
                    f"{self.describe()}: the answer is not JSON ({reason(exc)})"
                ) from None
        if status != 200:
            raise self._refused(status, document, body)
        return self._pick(document)

    async def _get(self, client: httpx.AsyncClient) -> tuple[int, bytes]:
        body = bytearray()
        async with client.stream("GET", self._request_url()) as response:
            # Decoded bytes, counted as they come: "identity" is asked for, and a
            # server that compresses anyway inflates one chunk at a time.
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_bytes:
                    raise DemandError(
                        f"{self.describe()}: the answer is larger than {self.max_bytes} bytes"
                    )
            return response.status_code, bytes(body)

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await aclose_quietly(client, self.describe())

    async def _close(self) -> None:
        await self._drop_client()


def _parse_path(path: str) -> list[str]:
    if not path or any(not part for part in path.split(".")):
        raise ValueError(
            f"JSON path {path!r}: dot-separated keys, list indexes or key=value "
            "selectors, none empty (e.g. active_queues.name=celery.messages)"
        )
    return path.split(".")


class HttpJson(_HttpSource):
    """The number at a path in the JSON document that ``GET url`` answers.

    ``path`` walks the document one dot-separated step at a time: a key of an object;
    in a list, an index (``0``) or a ``key=value`` selector that picks the one object
    whose ``key`` is the string ``value`` (none or several is an error). For Flower's
    ``/api/queues/length`` (``{"active_queues": [{"name": "celery", "messages": 3}]}``)::

        HttpJson("http://flower:5555/api/queues/length", "active_queues.name=celery.messages")

    The value there must be a count (:func:`count_of`): ``null``, a string, NaN, a
    negative number or a fraction is a :class:`DemandError`, never 0; so is a missing
    key, an answer other than 200, a body that is not JSON or larger than ``max_bytes``.

    Args:
      url: ``http(s)://host[:port]/path?query``.
      path: where the number is.
      timeout_s: bound on one read.
      bearer_token: sent as ``Authorization: Bearer …``.
      basic_auth: ``(user, password)`` for HTTP basic authentication.
      max_bytes: bound on the response body.
    """

    def __init__(
        self,
        url: str,
        path: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        bearer_token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        max_bytes: int = HTTP_RESPONSE_LIMIT,
    ) -> None:
        self.steps = _parse_path(path)
        self.path = path
        super().__init__(
            url,
            timeout_s=timeout_s,
            bearer_token=bearer_token,
            basic_auth=basic_auth,
            max_bytes=max_bytes,
        )

    def describe(self) -> str:
        return f"JSON {self.path!r} at {redact(self.url)}"

    def _pick(self, document: Any) -> int:
        node = document
        walked: list[str] = []
        for step in self.steps:
            where = ".".join(walked) or "the document"
            if isinstance(node, dict):
                if step not in node:
                    raise DemandError(f"{self.describe()}: {where} has no key {step!r}")
                node = node[step]
            elif isinstance(node, list):
                node = self._in_list(node, step, where)
            else:
                raise DemandError(
                    f"{self.describe()}: {where} is {type(node).__name__}, "
                    f"not an object or list to take {step!r} from"
                )
            walked.append(step)
        return count_of(node, f"{self.describe()}: the value")

    def _in_list(self, items: list[Any], step: str, where: str) -> Any:
        if step.isascii() and step.isdigit():
            index = int(step)
            if index >= len(items):
                raise DemandError(
                    f"{self.describe()}: {where} has {len(items)} item(s), no [{index}]"
                )
            return items[index]
        key, equals, value = step.partition("=")
        if not equals:
            raise DemandError(
                f"{self.describe()}: {where} is a list: {step!r} is neither an index "
                "nor a key=value selector"
            )
        found = [item for item in items if isinstance(item, dict) and item.get(key) == value]
        if len(found) != 1:
            raise DemandError(
                f"{self.describe()}: {len(found)} items of {where} have {key} = {value!r}, "
                "not exactly one"
            )
        return found[0]


class PrometheusQuery(_HttpSource):
    """The value of a Prometheus instant query (``GET /api/v1/query``).

    The query must give exactly one number: a scalar, or a vector of exactly one
    series. An empty vector (no such series, or nothing scraped yet), several series,
    a range vector, NaN, an infinity, a negative value or a fraction is a
    :class:`DemandError`, never 0: write ``sum(...)`` to add series up, ``ceil(...)``
    to round, and ``... or vector(0)`` if an absent series really means no jobs.
    A query Prometheus refuses (bad syntax, a timeout of its own) is an error that
    quotes Prometheus's ``error``.

    Args:
      url: the Prometheus base URL (``http://prometheus:9090``, or with the path prefix
        it is served under); ``/api/v1/query`` is appended.
      query: PromQL.
      timeout_s: bound on one read.
      bearer_token, basic_auth, max_bytes: as for :class:`HttpJson`.
    """

    def __init__(
        self,
        url: str,
        query: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        bearer_token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        max_bytes: int = HTTP_RESPONSE_LIMIT,
    ) -> None:
        if not query.strip():
            raise ValueError("PrometheusQuery needs a query")
        self.query = query
        super().__init__(
            url,
            timeout_s=timeout_s,
            bearer_token=bearer_token,
            basic_auth=basic_auth,
            max_bytes=max_bytes,
        )
        if httpx.URL(url).query:
            raise ValueError(f"{redact(url)!r}: the Prometheus URL must not have a query")

    def describe(self) -> str:
        shown = self.query if len(self.query) <= 200 else self.query[:199] + "…"
        return f"prometheus query {shown!r} at {redact(self.url)}"

    def _request_url(self) -> httpx.URL:
        base = httpx.URL(self.url)
        return base.copy_with(path=base.path.rstrip("/") + "/api/v1/query").copy_merge_params(
            {"query": self.query}
        )

    def _refused(self, status: int, document: Any, body: bytes) -> DemandError:
        if isinstance(document, dict) and "error" in document:
            return DemandError(
                f"{self.describe()}: Prometheus answered {status}: "
                f"{_shown(str(document.get('errorType', '')))} {_shown(str(document['error']))}"
            )
        return super()._refused(status, document, body)

    def _pick(self, document: Any) -> int:
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, dict) or document.get("status") != "success":
            raise DemandError(f"{self.describe()}: not a Prometheus query answer")
        kind, result = data.get("resultType"), data.get("result")
        if kind == "scalar":
            sample = result
        elif kind == "vector" and isinstance(result, list):
            if len(result) != 1:
                said = "no series" if not result else f"{len(result)} series"
                raise DemandError(f"{self.describe()}: the query gave {said}, not exactly one")
            sample = result[0].get("value") if isinstance(result[0], dict) else None
        else:
            raise DemandError(
                f"{self.describe()}: the query gave a {kind}, not a scalar or one series"
            )
        if not (isinstance(sample, list) and len(sample) == 2 and isinstance(sample[1], str)):
            raise DemandError(f"{self.describe()}: not a Prometheus sample: {_shown(str(sample))}")
        try:
            value = float(sample[1])
        except ValueError:
            raise DemandError(
                f"{self.describe()}: the value {sample[1]!r} is not a number"
            ) from None
        return count_of(value, f"{self.describe()}: the value")
