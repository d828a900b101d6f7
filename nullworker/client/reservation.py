"""The reservation client library: ask the engine for a worker, then hold it.

Library::

    async with reserve("my-endpoint", duration_s=300) as reservation:
        print("holding", reservation.worker_url)
        ...                      # the worker is yours while this block runs
    # leaving the block (normally, by an exception or by cancellation) closes the
    # connection to the worker, which ends the hold there at once

Its command line, ``python -m nullworker.client``, is :mod:`nullworker.client.cli`.

The flow is the official client's (``POST {engine}/route/``, poll while WAITING, then
``POST {worker_url}/reserve`` with the whole route reply as ``auth_data``) with its
pitfalls fixed (docs/protocol.md §10.14):

* The API key goes to the engine only, in the body and as ``Authorization: Bearer``;
  never in a query string, never to the worker, never into a log line.
* Every retry is bounded and reported through ``on_progress``: a few quick retries
  when the engine cannot be reached, ``max_rejections`` re-routes when workers refuse.
  Polls while WAITING reuse the request_idx, so they are not counted as new demand.
* ``/reserve`` has a connect/write timeout but no read timeout: the worker answers only
  when the hold ends, and the hold is bounded by the worker, not by a client timer.

What "held" means
-----------------
The worker answers ``/reserve`` only when the hold *ends*, so there is no "you have it
now" message on the wire. A reservation is reported held once the whole request body
has been written to the worker's socket and no answer came back within
a short accept window (0.3 s). Refusals (401 bad signature, 422 bad envelope, 413, 429
with the worker's queue off, 503 not ready / shutting down) arrive well within that
window. A worker that is already holding someone else's reservation may still *queue*
ours for up to its ``MAX_QUEUE_TIME``; if it then answers 429 the reservation ends with
the ``rejected`` outcome. The engine routes only to workers it believes free, so that
is a rare race.

Concurrency invariants
----------------------
* :func:`reserve` runs one background task per reservation attempt, in a nursery owned
  by the context manager. The task does the ``/reserve`` POST and nothing else; it never
  raises after the reservation was handed out (the worker's answer, or a lost
  connection, becomes ``outcome`` and sets ``ended``).
* Leaving the ``async with`` block cancels that nursery. Cancelling the httpx request
  makes httpcore close the socket (a cancelled HTTP/1.1 exchange is never returned to
  the pool), so the worker sees the disconnect immediately.
* ``trio.Cancelled`` is never swallowed: only ``finally`` blocks see it, and the
  nursery's exception group is unwrapped (so callers get the exception itself, e.g.
  ``EngineUnavailable`` or their own ``ValueError``) without dropping a cancellation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from .._groups import split_leaves
from .._support import finite, renamed_option
from ..errors import (
    ConfigError,
    EngineRefused,
    EngineUnavailable,
    ReservationFailed,
    ReservationRejected,
    RouteTimeout,
)
from ..vast.envelope import as_int
from ..vast.vocabulary import ClientOutcome
from .transport import default_client, trust_vast_root, vast_root_problem

__all__ = [
    "DEFAULT_ENGINE_URL",
    "EngineRefused",
    "ProgressEvent",
    "Reservation",
    "RouteTimeout",
    "hold",
    "reserve",
]

log = logging.getLogger("nullworker.client")

#: The official engine (autoscaler); ``VAST_ENGINE_URL`` overrides it.
DEFAULT_ENGINE_URL = "https://run.vast.ai"

#: One ``/route/`` call: the engine answers at once (READY or WAITING).
_ROUTE_TIMEOUT = httpx.Timeout(10.0)
#: ``/reserve``: bounded connect/write/pool, no read timeout (the worker bounds the hold).
_RESERVE_TIMEOUT = httpx.Timeout(10.0, read=None)
#: Tries per ``/route/`` call when the engine cannot be reached (transport errors only;
#: an HTTP error answer is final), and the sleep before each retry.
_ENGINE_TRIES = 3
_ENGINE_RETRY_S = (0.5, 1.0)
#: Polling while WAITING: starts at ~1 s, grows, capped at a few seconds, with jitter so
#: many clients do not poll in lockstep.
_POLL_FIRST_S = 1.0
_POLL_GROWTH = 1.3
_POLL_MAX_S = 3.0
#: Pause before re-routing after a refusal: 0.1 s doubling, capped at 1 s.
_REROUTE_FIRST_S = 0.1
_REROUTE_MAX_S = 1.0
#: See "What "held" means" in the module docstring.
_ACCEPT_WINDOW_S = 0.3

_USER_AGENT = "nullworker-client"
#: A WAITING answer's ``reason`` longer than this is cut (it ends up in one line).
_REASON_MAX_CHARS = 200

ProgressKind = Literal["routing", "waiting", "engine_retry", "rerouting", "held", "ended"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a reservation, for progress displays.

    ``kind`` is one of:

    * ``routing`` -- about to ask the engine for a worker (first call or a re-route);
    * ``waiting`` -- the engine answered WAITING (it has no free worker); ``waited_s``
      counts from the first call, and ``reason`` is why, when the engine says (the
      answer's ``reason``, e.g. ``"at --max-workers 3 (3 busy)"`` from the local engine);
    * ``engine_retry`` -- the engine could not be reached; retry ``attempt`` follows;
    * ``rerouting`` -- a worker refused (429, 503) or could not be reached; ``attempt``
      counts these against ``max_rejections``;
    * ``held`` -- the reservation is held on ``worker_url``;
    * ``ended`` -- the hold ended; ``outcome`` says how.
    """

    kind: ProgressKind
    message: str
    waited_s: float = 0.0
    attempt: int = 0
    worker_url: str | None = None
    request_idx: int | None = None
    outcome: str | None = None
    reason: str | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class _Answer:
    """The worker's answer to ``/reserve``, or the transport error instead of one."""

    status: int | None
    body: Any
    error: Exception | None = None


class Reservation:
    """A reservation held on one worker.

    Attributes:
      worker_url: the worker's base URL, as the engine routed us to it.
      request_idx: the engine's id of this request (``None`` if the engine sent none).
      auth_data: the engine's whole ``/route/`` reply, as sent to the worker.
      ended: set when the hold is over: the worker ended it (duration elapsed, explicit
        release, shutdown), the connection was lost, or the holder left the
        ``async with`` block.
      outcome: ``None`` while held, then the worker's ``released`` value
        (``"duration_elapsed"``, ``"explicit"``, ``"shutdown"``), or
        ``"connection_lost"``, ``"rejected"`` (queued behind another hold, then 429),
        ``"error"`` (the worker failed or answered something unexpected),
        ``"completed"`` (a 200 that does not say how), or ``"client_released"``
        (we left the block first). The values are
        :class:`~nullworker.vast.vocabulary.ClientOutcome`'s (a ``StrEnum``: compare
        with a member or the string alike); a worker's other ``released`` values pass
        through as they are.
      status: the HTTP status of the worker's answer, when there was one.
      body: the worker's answer body (JSON, with the official SDK's
        ``{"result": {"ok": ...}}`` wrapping removed), when there was one.
    """

    def __init__(
        self,
        *,
        worker_url: str,
        auth_data: dict[str, Any],
        notify: Callable[[ProgressEvent], None],
    ) -> None:
        self.worker_url = worker_url
        self.auth_data = auth_data
        self.request_idx = as_int(auth_data.get("request_idx"))
        self.ended = trio.Event()
        self.outcome: str | None = None
        self.status: int | None = None
        self.body: Any = None
        self.held_at: float | None = None
        self.ended_at: float | None = None
        self._notify = notify
        self._answer: _Answer | None = None
        self._answered = trio.Event()
        # Set when the body is on the wire or an answer came, whichever is first.
        self._sent_or_answered = trio.Event()
        self._held = False

    def __repr__(self) -> str:
        return (
            f"<Reservation {self.worker_url} request_idx={self.request_idx} outcome={self.outcome}>"
        )

    @property
    def held_s(self) -> float:
        """Seconds held: the worker's own figure when it sent one, else measured here."""
        if isinstance(self.body, dict):
            held = self.body.get("held")
            if isinstance(held, int | float) and not isinstance(held, bool):
                return float(held)
        if self.held_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else trio.current_time()
        return max(end - self.held_at, 0.0)

    @property
    def error(self) -> str | None:
        """The worker's ``error`` text, if its answer carried one."""
        return _error_text(self.body) if self.body is not None else None

    # -- internals: the /reserve exchange ----------------------------------------------

    async def _post(self, http: httpx.AsyncClient, body: bytes) -> None:
        url = _join(self.worker_url, "/reserve")
        if url.startswith("https://"):
            await trust_vast_root()

        async def stream() -> AsyncIterator[bytes]:
            yield body
            # httpcore asks for the next chunk only after writing this one.
            self._sent_or_answered.set()

        headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "User-Agent": _USER_AGENT,
        }
        try:
            response = await http.post(
                url, content=stream(), headers=headers, timeout=_RESERVE_TIMEOUT
            )
        except httpx.TransportError as exc:
            self._conclude(_Answer(None, None, exc))
            return
        self._conclude(_Answer(response.status_code, _decode(response)))

    def _conclude(self, answer: _Answer) -> None:
        self._answer = answer
        self._answered.set()
        self._sent_or_answered.set()
        if self._held:
            self._end_from_answer(answer)

    async def _decide(self, accept_window_s: float) -> _Answer | None:
        """Wait until refused or held: the answer if one came first, else ``None`` (held)."""
        await self._sent_or_answered.wait()
        if self._answer is None:
            with trio.move_on_after(accept_window_s):
                await self._answered.wait()
        if self._answer is None:
            self._held = True
            self.held_at = trio.current_time()
        return self._answer

    def _mark_held_then_ended(self, answer: _Answer) -> None:
        """A success that came within the accept window (e.g. ``duration=0``)."""
        self._held = True
        self.held_at = trio.current_time()
        self._end_from_answer(answer)

    def _end_from_answer(self, answer: _Answer) -> None:
        self.status = answer.status
        if answer.error is not None:
            self._end(ClientOutcome.CONNECTION_LOST)
            return
        assert answer.status is not None
        body = _unwrap(answer.body)
        self.body = body
        if 200 <= answer.status < 300:
            if isinstance(answer.body, dict) and _is_remote_error(answer.body):
                self._end(ClientOutcome.ERROR)
            elif isinstance(body, dict) and isinstance(body.get("released"), str):
                self._end(body["released"])
            else:
                self._end(ClientOutcome.COMPLETED)
        elif answer.status == 429:
            self._end(ClientOutcome.REJECTED)
        elif answer.status == 503:
            released = body.get("released") if isinstance(body, dict) else None
            self._end(released if isinstance(released, str) else ClientOutcome.SHUTDOWN)
        else:
            self._end(ClientOutcome.ERROR)

    def _end(self, outcome: str) -> None:
        if self.ended.is_set():
            return
        self.outcome = outcome
        self.ended_at = trio.current_time()
        self.ended.set()
        self._notify(
            ProgressEvent(
                "ended",
                _describe_outcome(self),
                worker_url=self.worker_url,
                request_idx=self.request_idx,
                outcome=outcome,
            )
        )


def reserve(
    endpoint: str,
    *,
    duration_s: float | None = None,
    api_key: str | None = None,
    engine_url: str | None = None,
    cost: float = 100.0,
    max_rejections: int = 5,
    route_timeout_s: float | None = None,
    http: httpx.AsyncClient | None = None,
    on_progress: ProgressCallback | None = None,
    duration: float | None = None,
) -> AbstractAsyncContextManager[Reservation]:
    """Reserve a worker of ``endpoint`` and hold it while the ``async with`` block runs.

    Usage::

        async with reserve("my-endpoint", duration_s=300) as reservation:
            ...  # reservation.worker_url is held; reservation.ended fires if it stops early

    Args:
      endpoint: the Vast endpoint name.
      duration_s: seconds to hold; ``None`` holds for the worker's cap
        (``MAX_RESERVATION_SECONDS``). The worker also caps larger values.
      api_key: the endpoint's API key; default ``$VAST_API_KEY``. Sent to the engine
        only.
      engine_url: the engine's base URL; default ``$VAST_ENGINE_URL``, else
        ``https://run.vast.ai``.
      cost: the load this request stands for in the engine's demand maths.
      max_rejections: how many times a refusing worker (429 busy, 503 not ready or
        shutting down, unreachable) makes us ask the engine again, with the same
        request_idx, before giving up.
      route_timeout_s: give up (:class:`RouteTimeout`) if no worker is held within this
        many seconds; ``None`` waits as long as the engine says WAITING.
      http: a client to use (it is not closed); by default one is made and closed. Each
        held reservation occupies one connection of its pool, so size its
        ``httpx.Limits`` for the number of reservations you hold at once.
      on_progress: called synchronously with each :class:`ProgressEvent`; it must not
        block. Exceptions it raises are logged and dropped.
      duration: the old name of ``duration_s``: it still works, with a
        ``DeprecationWarning``, and goes in nullworker 0.2 (``duration_s`` is spelled
        like ``route_timeout_s`` and :func:`~nullworker.client.autoscale`'s options).

    Resource handling:
      Leaving the block -- normally, by an exception or by cancellation -- closes the
      connection to the worker at once, which ends the hold there immediately. If the
      worker ended the hold first (``reservation.ended`` is set), leaving does nothing
      more. The block is never cancelled because the hold ended: check ``ended`` (or
      wait on it) if you need to know.

    Raises (on entering the block):
      EngineUnavailable: the engine could not be reached (after a few quick retries);
        :class:`EngineRefused` if it answered an HTTP error (``status``; 401 is a
        wrong API key); :class:`RouteTimeout` if ``route_timeout_s`` passed, or if
        every try of the ``/route/`` call timed out (the engine accepts the connection
        but never answers).
      ReservationRejected: workers refused more than ``max_rejections`` times.
      ReservationFailed: the worker answered 401, 413, 422 or another error (``status``).
      ConfigError: no API key, or an invalid ``duration_s``/``cost``/``max_rejections``.
      TypeError: both ``duration_s`` and its old name ``duration`` were given.
    """
    duration_s = renamed_option("duration", duration, "duration_s", duration_s)
    options = _Options.build(
        endpoint=endpoint,
        duration=duration_s,
        api_key=api_key,
        engine_url=engine_url,
        cost=cost,
        max_rejections=max_rejections,
        route_timeout_s=route_timeout_s,
    )
    return _reserve(options, http=http, notify=_safe_callback(on_progress))


async def hold(
    endpoint: str,
    *,
    duration_s: float | None = None,
    api_key: str | None = None,
    engine_url: str | None = None,
    cost: float = 100.0,
    max_rejections: int = 5,
    route_timeout_s: float | None = None,
    http: httpx.AsyncClient | None = None,
    on_progress: ProgressCallback | None = None,
    duration: float | None = None,
) -> Reservation:
    """Reserve a worker and wait until the worker ends the hold.

    Takes the same arguments and raises the same errors as :func:`reserve`. Returns the
    ended :class:`Reservation`; its ``outcome`` says how the hold ended
    (``duration_elapsed``, ``explicit``, ``shutdown``, ``connection_lost``, ...).
    Cancel the calling task to let go early: the connection is closed at once.
    """
    duration_s = renamed_option("duration", duration, "duration_s", duration_s)
    async with reserve(
        endpoint,
        duration_s=duration_s,
        api_key=api_key,
        engine_url=engine_url,
        cost=cost,
        max_rejections=max_rejections,
        route_timeout_s=route_timeout_s,
        http=http,
        on_progress=on_progress,
    ) as reservation:
        await reservation.ended.wait()
    return reservation


# -- implementation ------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    endpoint: str
    duration: float | None
    api_key: str
    engine_url: str
    cost: float
    max_rejections: int
    route_timeout_s: float | None
    accept_window_s: float = _ACCEPT_WINDOW_S

    @classmethod
    def build(
        cls,
        *,
        endpoint: str,
        duration: float | None,
        api_key: str | None,
        engine_url: str | None,
        cost: float,
        max_rejections: int,
        route_timeout_s: float | None,
    ) -> _Options:
        if not endpoint:
            raise ConfigError("an endpoint name is required")
        if duration is not None and not (finite(duration) and duration >= 0):
            raise ConfigError(f"duration_s must be a finite number >= 0, got {duration!r}")
        if not (finite(cost) and cost >= 0):
            raise ConfigError(f"cost must be a finite number >= 0, got {cost!r}")
        if max_rejections < 0:
            raise ConfigError(f"max_rejections must be >= 0, got {max_rejections}")
        if route_timeout_s is not None and not (finite(route_timeout_s) and route_timeout_s > 0):
            raise ConfigError(f"route_timeout_s must be a number > 0, got {route_timeout_s!r}")
        key = api_key if api_key is not None else os.environ.get("VAST_API_KEY")
        if not key:
            raise ConfigError("an API key is required: pass api_key or set VAST_API_KEY")
        url = engine_url or os.environ.get("VAST_ENGINE_URL") or DEFAULT_ENGINE_URL
        return cls(
            endpoint=endpoint,
            duration=float(duration) if duration is not None else None,
            api_key=key,
            engine_url=url.rstrip("/"),
            cost=float(cost),
            max_rejections=max_rejections,
            route_timeout_s=route_timeout_s,
        )


@asynccontextmanager
async def _reserve(
    options: _Options,
    *,
    http: httpx.AsyncClient | None,
    notify: Callable[[ProgressEvent], None],
) -> AsyncIterator[Reservation]:
    async with AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(default_client())
        # The nursery wraps even a lone exception (the caller's own, from the block, or
        # ours from _acquire) in a group; callers expect the exception itself.
        with lone_exception_unwrapped():
            async with trio.open_nursery() as nursery:
                reservation = await _acquire(options, http=http, nursery=nursery, notify=notify)
                try:
                    yield reservation
                finally:
                    # Drop the connection now: cancelling the POST closes its socket, and
                    # the worker ends the hold the moment it sees the disconnect.
                    nursery.cancel_scope.cancel()
                    reservation._end(ClientOutcome.CLIENT_RELEASED)


async def _acquire(
    options: _Options,
    *,
    http: httpx.AsyncClient,
    nursery: trio.Nursery,
    notify: Callable[[ProgressEvent], None],
) -> Reservation:
    router = _Router(options, http=http, notify=notify)
    deadline = (
        trio.current_time() + options.route_timeout_s
        if options.route_timeout_s is not None
        else math.inf
    )
    body_payload: dict[str, Any] = {}
    if options.duration is not None:
        body_payload["duration"] = options.duration
    refusals = 0
    while True:
        with trio.move_on_at(deadline) as scope:
            auth_data = await router.route()
        if scope.cancelled_caught:
            assert options.route_timeout_s is not None
            said = f"; the engine said: {router.reason}" if router.reason else ""
            raise RouteTimeout(
                f"no worker became free within {options.route_timeout_s:g} s "
                f"(endpoint {options.endpoint!r}{said})",
                timeout_s=options.route_timeout_s,
                reason=router.reason,
            )
        reservation = Reservation(
            worker_url=str(auth_data["url"]), auth_data=auth_data, notify=notify
        )
        body = json.dumps({"auth_data": auth_data, "payload": body_payload}).encode()
        nursery.start_soon(reservation._post, http, body)
        answer = await reservation._decide(options.accept_window_s)
        if answer is None:
            notify(
                ProgressEvent(
                    "held",
                    f"held: {reservation.worker_url}",
                    waited_s=router.waited_s,
                    worker_url=reservation.worker_url,
                    request_idx=reservation.request_idx,
                )
            )
            return reservation
        if answer.status is not None and 200 <= answer.status < 300:
            reservation._mark_held_then_ended(answer)
            return reservation
        reason = _refusal_reason(answer)
        if reason is None:
            assert answer.status is not None
            raise ReservationFailed(
                f"worker {reservation.worker_url} refused the reservation: "
                f"HTTP {answer.status}: {_error_text(answer.body)}",
                status=answer.status,
            )
        refusals += 1
        if refusals > options.max_rejections:
            raise ReservationRejected(
                f"gave up after {refusals} refusal(s) (max_rejections="
                f"{options.max_rejections}); last: {reservation.worker_url} {reason}"
            )
        notify(
            ProgressEvent(
                "rerouting",
                f"worker {reservation.worker_url} {reason}; asking the engine again "
                f"({refusals}/{options.max_rejections})",
                waited_s=router.waited_s,
                attempt=refusals,
                worker_url=reservation.worker_url,
                request_idx=router.request_idx,
            )
        )
        pause = min(_REROUTE_FIRST_S * 2 ** (refusals - 1), _REROUTE_MAX_S)
        await trio.sleep(pause * random.uniform(0.8, 1.2))


class _Router:
    """Asks the engine for a worker; keeps the request_idx across polls and re-routes."""

    def __init__(
        self,
        options: _Options,
        *,
        http: httpx.AsyncClient,
        notify: Callable[[ProgressEvent], None],
    ) -> None:
        self._options = options
        self._http = http
        self._notify = notify
        self.request_idx = 0
        #: Why the engine last said it has no free worker (``None``: it did not say).
        self.reason: str | None = None
        self._started: float | None = None

    @property
    def waited_s(self) -> float:
        return 0.0 if self._started is None else trio.current_time() - self._started

    async def route(self) -> dict[str, Any]:
        """Return a READY reply (the worker's ``auth_data``), polling while WAITING."""
        if self._started is None:
            self._started = trio.current_time()
        self._notify(
            ProgressEvent(
                "routing",
                f"asking {_redact(self._options.engine_url)} for a worker of endpoint "
                f"{self._options.endpoint!r}",
                waited_s=self.waited_s,
                request_idx=self.request_idx or None,
            )
        )
        polls = 0
        while True:
            reply = await self._call()
            if "url" in reply:
                url = reply["url"]
                if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                    raise EngineUnavailable(
                        f"the engine routed us to an invalid worker url: {url!r}"
                    )
                idx = as_int(reply.get("request_idx"))
                if idx:
                    self.request_idx = idx
                return reply
            idx = as_int(reply.get("request_idx"))
            if idx:
                self.request_idx = idx
            self.reason = _wait_reason(reply)
            why = f"engine: {self.reason}" if self.reason else "the engine has no free worker"
            self._notify(
                ProgressEvent(
                    "waiting",
                    f"waiting for a worker... {self.waited_s:.0f} s ({why})",
                    waited_s=self.waited_s,
                    request_idx=self.request_idx or None,
                    reason=self.reason,
                )
            )
            delay = min(_POLL_FIRST_S * _POLL_GROWTH**polls, _POLL_MAX_S)
            polls += 1
            await trio.sleep(delay * random.uniform(0.8, 1.2))

    async def _call(self) -> dict[str, Any]:
        options = self._options
        url = f"{options.engine_url}/route/"
        body = {
            "endpoint": options.endpoint,
            "api_key": options.api_key,
            "cost": options.cost,
            "request_idx": self.request_idx,
            "replay_timeout": 60.0,
        }
        headers = {"Authorization": f"Bearer {options.api_key}", "User-Agent": _USER_AGENT}
        for attempt in range(1, _ENGINE_TRIES + 1):
            try:
                response = await self._http.post(
                    url, json=body, headers=headers, timeout=_ROUTE_TIMEOUT
                )
            except httpx.TransportError as exc:
                # The exception text names the host, never the key (it is not in the URL).
                problem = _problem(exc)
                if attempt == _ENGINE_TRIES and isinstance(exc, httpx.TimeoutException):
                    timeout_s = _ROUTE_TIMEOUT.read
                    raise RouteTimeout(
                        f"the engine at {_redact(options.engine_url)} did not answer /route/ "
                        f"within {timeout_s:g} s, {attempt} tries: {problem}",
                        timeout_s=timeout_s,
                    ) from exc
                if attempt == _ENGINE_TRIES:
                    raise EngineUnavailable(
                        f"cannot reach the engine at {_redact(options.engine_url)} "
                        f"after {attempt} tries: {problem}"
                    ) from exc
                self._notify(
                    ProgressEvent(
                        "engine_retry",
                        f"cannot reach the engine ({problem}); retry {attempt}/{_ENGINE_TRIES - 1}",
                        waited_s=self.waited_s,
                        attempt=attempt,
                    )
                )
                await trio.sleep(_ENGINE_RETRY_S[min(attempt, len(_ENGINE_RETRY_S)) - 1])
                continue
            status = response.status_code
            if not 200 <= status < 300:
                what = "the API key" if status in (401, 403) else "/route/"
                raise EngineRefused(
                    f"the engine at {_redact(options.engine_url)} refused {what}: "
                    f"HTTP {status}: {_error_text(_decode(response))}",
                    status=status,
                )
            reply = _decode(response)
            if not isinstance(reply, dict):
                raise EngineUnavailable(
                    f"the engine at {_redact(options.engine_url)} answered /route/ with "
                    f"something other than a JSON object: {str(reply)[:200]!r}"
                )
            return reply
        raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def lone_exception_unwrapped() -> Iterator[None]:
    """Re-raise the one exception a nursery's group stands for, as itself.

    Wrap an ``async with trio.open_nursery()`` whose body yields to a caller: an
    exception from the caller's block (or from our own task) comes out of the nursery
    inside a group, and callers of a context manager expect the exception itself. Its
    ``__context__`` is kept as it was. A group that stands for more than one exception
    is raised unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        single = _single_exception(group)
        if single is None:
            raise
        context, suppress = single.__context__, single.__suppress_context__
        try:
            raise single
        finally:
            single.__context__, single.__suppress_context__ = context, suppress


def _single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception worth raising from our nursery's ``group``, or ``None`` to keep it.

    Only the group's direct members are looked at, so an exception group the caller
    raised from the block comes out unchanged. A lone member is itself. Several
    ``Cancelled`` are the same cancellation (any one will do). One real exception beside
    ``Cancelled`` ones wins: Trio cancellation is level-triggered, so the enclosing
    cancelled scope delivers ``Cancelled`` again at the caller's next checkpoint.
    """
    members = group.exceptions
    if len(members) == 1:
        return members[0]
    # Any member but a Cancelled one matches whole: a nested group stays unopened.
    others, cancelled = split_leaves(group, lambda exc: not isinstance(exc, trio.Cancelled))
    if not others:
        return cancelled[0]
    if len(others) == 1:
        return others[0]
    return None


def _safe_callback(callback: ProgressCallback | None) -> Callable[[ProgressEvent], None]:
    def notify(event: ProgressEvent) -> None:
        log.debug("%s: %s", event.kind, event.message)
        if callback is None:
            return
        try:
            callback(event)
        except Exception:
            # A display bug must not leave a worker held or kill the hold.
            log.exception("on_progress callback failed on a %s event", event.kind)

    return notify


def _wait_reason(reply: dict[str, Any]) -> str | None:
    """A WAITING answer's ``reason`` (why the engine has no free worker), on one line."""
    reason = reply.get("reason")
    if not isinstance(reason, str):
        return None
    # Printed on a terminal: no control characters from the engine get there.
    text = " ".join("".join(c if c.isprintable() else " " for c in reason).split())
    if len(text) > _REASON_MAX_CHARS:
        text = text[: _REASON_MAX_CHARS - 3] + "..."
    return text or None


def _refusal_reason(answer: _Answer) -> str | None:
    """Why a worker refused in a way worth asking the engine again, else ``None``."""
    if answer.error is not None:
        exc = answer.error
        return f"could not be reached ({_problem(exc)})"
    if answer.status == 429:
        return f"is busy (429: {_error_text(answer.body)})"
    if answer.status == 503:
        return f"is unavailable (503: {_error_text(answer.body)})"
    return None


def _problem(exc: BaseException) -> str:
    """``Type: text`` for a transport error, for one line.

    A certificate the client does not trust raises an httpx error with no text; the
    reason is on the ``ssl`` error it chains, and the fix is usually ``SSL_CERT_FILE``.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; never loop on a cycle
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            root = vast_root_problem()
            hint = f"{root}; " if root else ""
            return (
                f"{type(exc).__name__}: TLS certificate not trusted: {seen.verify_message} "
                f"({hint}SSL_CERT_FILE names the CA bundle)"
            )
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _decode(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _unwrap(body: Any) -> Any:
    """Remove the official SDK's remote-function wrapping: ``{"result": {"ok": X}}``."""
    if isinstance(body, dict) and "released" not in body and set(body) == {"result"}:
        inner = body["result"]
        if isinstance(inner, dict) and set(inner) == {"ok"}:
            return inner["ok"]
        if isinstance(inner, dict) and set(inner) == {"err"}:
            return {"error": inner["err"]}
        return inner
    return body


def _is_remote_error(body: dict[str, Any]) -> bool:
    inner = body.get("result")
    return set(body) == {"result"} and isinstance(inner, dict) and set(inner) == {"err"}


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if error is not None:
            return error if isinstance(error, str) else json.dumps(error)
        return json.dumps(body)[:300]
    text = str(body or "").strip()
    return text[:300] if text else "(empty body)"


def _describe_outcome(reservation: Reservation) -> str:
    held = f"after {reservation.held_s:.0f} s"
    outcome = reservation.outcome
    if outcome == ClientOutcome.ELAPSED:
        return f"elapsed {held}"
    if outcome == ClientOutcome.EXPLICIT:
        return f"released by the worker {held}"
    if outcome == ClientOutcome.SHUTDOWN:
        return f"the worker shut down {held}"
    if outcome == ClientOutcome.CONNECTION_LOST:
        return f"connection to the worker lost {held}"
    if outcome == ClientOutcome.CLIENT_RELEASED:
        return f"released {held}"
    if outcome == ClientOutcome.REJECTED:
        return f"rejected by the worker {held}: {reservation.error}"
    if outcome == ClientOutcome.COMPLETED:
        return f"ended {held}"
    detail = f" (HTTP {reservation.status}: {reservation.error})" if reservation.status else ""
    return f"ended {held}: {outcome}{detail}"


def _join(base: str, path: str) -> str:
    return base.rstrip("/") + path


def _redact(url: str) -> str:
    """``url`` without user info, query or fragment, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
