"""The engine's HTTP API on an injected client: one bounded exchange at a time.

Each function here is one exchange with one engine address (or, for the beacon and the
key fetch, a fixed pattern over the addresses), on the ``httpx.AsyncClient`` the caller
passes in; what to send and when to send it again is decided elsewhere (:mod:`._core`,
:mod:`._loop`).

* Only a 2xx answer is a delivery. Redirects are never followed (the clients say so
  explicitly): a 3xx means the body did not reach the engine (``REPORT_ADDR=http://...``
  behind an http->https redirect), so it is a failure like a 5xx, and the log names its
  status and ``Location`` (scheme, host and path only).
* Every engine answer is read with a bound, as a stream: ``POST_ANSWER_MAX_BYTES``
  (4 KiB) for reports and the error beacon, whose status is all we need, and
  ``PUBKEY_ANSWER_MAX_BYTES`` (64 KiB) for the key. A longer answer is a failed try
  ("answer over N bytes"); the connection is dropped as soon as the bound is passed,
  so a broken or hostile engine cannot make the worker buffer megabytes.
* Every failure of an exchange (``httpx.HTTPError``, our own per-try deadline, any
  status but a 2xx, an oversized answer) comes back as a value saying why, never as an
  exception, and never with the ``mtoken`` or a body in it. ``trio.Cancelled`` is never
  swallowed.
* Opening the connection has its own bound, ``CONNECT_TIMEOUT_S`` (2 s): when it fires
  nothing reached the engine, and a slow connect does not eat the time the engine has to
  answer a body it did get.
"""

from __future__ import annotations

import logging
import shutil
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ..._support import describe_error
from ...errors import PubkeyUnavailable
from ...vast.signing import load_public_key
from ..config import WorkerConfig
from ._core import Counters, status_body

log = logging.getLogger("nullworker.reporter")

#: Sleeps between rounds of ``GET /pubkey/`` over all addresses: 5 rounds in 2.75 s.
PUBKEY_BACKOFF_S: tuple[float, ...] = (0.25, 0.5, 1.0, 1.0)
#: Bound on opening a connection to the engine (TCP and TLS), inside ``engine_timeout_s``.
#: Nothing reached the engine when it fires, so the retry cannot count anything twice;
#: a body that was sent keeps at least ``engine_timeout_s`` minus this for its answer.
CONNECT_TIMEOUT_S = 2.0
#: The most of an answer to a ``worker_status``/``delete_requests`` POST (or the error
#: beacon) that is read: only its status matters, and a longer answer is a failed try.
POST_ANSWER_MAX_BYTES = 4 * 1024
#: The most of a ``/pubkey/`` answer that is read (a 4096-bit key in PEM is under 1 KiB).
PUBKEY_ANSWER_MAX_BYTES = 64 * 1024
#: Sent with every request to the engine: an answer we bound must not come compressed.
_ANSWER_HEADERS = {"Accept-Encoding": "identity"}
#: 4xx answers that mean "try again later", not "this body is refused".
_RETRY_LATER_4XX = frozenset({408, 425, 429})


def root_disk_gib() -> float:
    """GiB used on ``/`` (one ``statvfs``)."""
    try:
        return shutil.disk_usage("/").used / 2**30
    except OSError:
        return 0.0


def _timeout(timeout_s: float) -> httpx.Timeout:
    """``timeout_s`` per phase, but at most ``CONNECT_TIMEOUT_S`` to connect."""
    return httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))


@dataclass(frozen=True)
class Answer:
    """How one POST (or the last try of several) went."""

    #: None: accepted; else why not, for the log.
    error: str | None = None
    #: The HTTP status when the engine answered, but not with a 2xx.
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def refused(self) -> bool:
        """The engine answered that it does not take this body (retrying it is useless)."""
        return (
            self.status is not None
            and 400 <= self.status < 500
            and self.status not in _RETRY_LATER_4XX
        )


class _AnswerTooLarge(Exception):
    """An engine answer longer than the caller reads (the connection is then dropped)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer over {limit} bytes")


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The body of ``response`` as sent, at most ``limit`` bytes.

    Reads the raw stream (no decompression, so a compressed answer cannot grow past
    the bound either) and gives up as soon as the bound is passed: a declared
    ``Content-Length`` over it fails before anything is read, and a longer stream is
    dropped mid-way (closing an unfinished response closes its connection).

    Raises:
      _AnswerTooLarge: the answer is longer than ``limit``.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _AnswerTooLarge(limit)
    if response.is_stream_consumed:  # a transport that hands over a body in memory
        if len(response.content) > limit:
            raise _AnswerTooLarge(limit)
        return response.content
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise _AnswerTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _decoded(response: httpx.Response, raw: bytes, limit: int) -> bytes:
    """``raw`` without its content encoding, bounded by ``limit`` once decoded.

    We ask for ``identity``; a gzip or deflate answer sent anyway is inflated at most
    to ``limit`` bytes (a small compressed body can expand a thousandfold).

    Raises:
      _AnswerTooLarge: the decoded answer is longer than ``limit``.
      ValueError: an encoding we cannot read, or a corrupt compressed body.
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ValueError(f"answer in an unsupported encoding ({encoding[:40]})")
    try:
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # gzip or zlib header
        data = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"corrupt {encoding} answer ({exc})") from None
    if len(data) > limit:
        raise _AnswerTooLarge(limit)
    return data


def _redacted_location(location: str) -> str:
    """A redirect target for the log: scheme, host, port and path only.

    A query string or user info may carry credentials, and the header is whatever the
    other side sent: both are left out, and the rest is cut to a sane length.
    """
    try:
        parts = urlsplit(location)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "an unparsable Location"
    text = f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else parts.path
    text = "".join(ch for ch in text if ch.isprintable())
    return text[:200] + ("..." if len(text) > 200 else "")


def _not_delivered(response: httpx.Response) -> Answer | None:
    """None for a 2xx answer; else the failed :class:`Answer`, saying why.

    Only a 2xx is a delivery. A 3xx is a failure like a 5xx (redirects are never
    followed: a body POSTed to an ``http://`` address behind an https redirect never
    reached the engine), named with its ``Location`` so the log says where to point
    ``REPORT_ADDR``.
    """
    status = response.status_code
    if 200 <= status < 300:
        return None
    error = f"HTTP {status}"
    if 300 <= status < 400:
        location = response.headers.get("Location")
        target = f" to {_redacted_location(location)}" if location else ""
        error += f" (redirect{target}; redirects are not followed)"
    return Answer(error, status)


async def post_once(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], *, timeout_s: float
) -> Answer:
    """One POST under a hard deadline of ``timeout_s``; accepted only with a 2xx.

    Redirects are not followed, and at most ``POST_ANSWER_MAX_BYTES`` of the answer
    are read (only its status matters).
    """
    with trio.move_on_after(timeout_s):
        try:
            async with client.stream(
                "POST",
                url,
                json=body,
                headers=_ANSWER_HEADERS,
                timeout=_timeout(timeout_s),
                follow_redirects=False,
            ) as response:
                failed = _not_delivered(response)
                if failed is not None:
                    return failed
                await _read_bounded(response, POST_ANSWER_MAX_BYTES)
        except _AnswerTooLarge as exc:
            return Answer(str(exc))
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # transport, timeout, bad reply
            return Answer(describe_error(exc))
        return Answer()
    return Answer(f"no answer within {timeout_s:g} s")


@asynccontextmanager
async def _client_for(
    http: httpx.AsyncClient | None, config: WorkerConfig
) -> AsyncIterator[httpx.AsyncClient]:
    """The caller's client, or a short-lived one of our own that is closed on exit."""
    if http is not None:
        yield http
        return
    async with new_engine_client(config) as own:
        yield own


def new_engine_client(config: WorkerConfig) -> httpx.AsyncClient:
    """A client of our own: redirects not followed, the connect bound applied."""
    return httpx.AsyncClient(timeout=_timeout(config.engine_timeout_s), follow_redirects=False)


async def fetch_engine_pubkey(
    http: httpx.AsyncClient | None, config: WorkerConfig, *, backoff_s: Sequence[float]
) -> RSAPublicKey:
    """``GET /pubkey/`` over ``config.report_addrs`` in order, ``len(backoff_s) + 1``
    rounds (see :meth:`EngineReporter.fetch_pubkey`)."""
    addrs = config.report_addrs
    if not addrs:
        raise PubkeyUnavailable("no engine address (REPORT_ADDR) to fetch the key from")
    timeout_s = config.engine_timeout_s
    rounds = len(backoff_s) + 1
    last_error = "no attempt made"
    async with _client_for(http, config) as client:
        for round_no in range(rounds):
            for addr in addrs:
                url = addr.rstrip("/") + "/pubkey/"
                key, error = await _get_pubkey_once(client, url, timeout_s=timeout_s)
                if key is not None:
                    return key
                last_error = f"{url}: {error}"
                log.debug("GET %s failed: %s", url, error)
            if round_no < len(backoff_s):
                log.warning(
                    "engine public key not available (%s); retrying in %g s",
                    last_error,
                    backoff_s[round_no],
                )
                await trio.sleep(backoff_s[round_no])
    raise PubkeyUnavailable(
        f"could not fetch the engine's public key from {len(addrs)} address(es) "
        f"in {rounds} rounds; last error: {last_error}"
    )


async def _get_pubkey_once(
    client: httpx.AsyncClient, url: str, *, timeout_s: float
) -> tuple[RSAPublicKey | None, str]:
    """One ``GET /pubkey/``: a 2xx whose body (at most ``PUBKEY_ANSWER_MAX_BYTES``) is
    an RSA public key in PEM, or None and why not."""
    with trio.move_on_after(timeout_s):
        try:
            async with client.stream(
                "GET",
                url,
                headers=_ANSWER_HEADERS,
                timeout=_timeout(timeout_s),
                follow_redirects=False,
            ) as response:
                failed = _not_delivered(response)
                if failed is not None:
                    return None, failed.error or ""
                raw = await _read_bounded(response, PUBKEY_ANSWER_MAX_BYTES)
            pem = _decoded(response, raw, PUBKEY_ANSWER_MAX_BYTES)
            return load_public_key(pem), ""
        except _AnswerTooLarge as exc:
            return None, str(exc)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return None, describe_error(exc)
        except ValueError as exc:  # not PEM, not an RSA key, or an unreadable encoding
            return None, f"not an RSA public key in PEM ({describe_error(exc)})"
    return None, f"no answer within {timeout_s:g} s"


async def send_error_beacon(
    config: WorkerConfig, message: str, *, http: httpx.AsyncClient | None = None
) -> bool:
    """Tell the engine the worker failed to start: one ``worker_status`` with ``error_msg``.

    Goes to **every** address in ``config.report_addrs`` at once (like the official start
    script's beacon), one try each bounded by ``engine_timeout_s``. Returns True if any
    address accepted it. Never raises for transport failures.
    """
    if not config.report_addrs:
        return False
    disk = root_disk_gib()
    body = status_body(
        config,
        loadtime=0.0,
        counters=Counters(),
        cur_load=0.0,
        max_perf=0.0,
        error_msg=message,
        num_requests_working=0,
        num_requests_received=0,
        disk_gib=disk,
        additional_disk_gib=0.0,
        working_request_idxs=[],
    )
    accepted: list[str] = []

    async def _one(client: httpx.AsyncClient, addr: str) -> None:
        answer = await post_once(
            client, addr.rstrip("/") + "/worker_status/", body, timeout_s=config.engine_timeout_s
        )
        if answer.ok:
            accepted.append(addr)
        else:
            log.warning("error beacon to %s failed: %s", addr, answer.error)

    async with _client_for(http, config) as client, trio.open_nursery() as nursery:
        for addr in config.report_addrs:
            nursery.start_soon(_one, client, addr)
    return bool(accepted)
