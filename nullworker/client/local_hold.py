"""Local holds from a Trio program: keep this instance's worker busy while a job runs.

Usage, in the consumer that runs beside the worker on the instance::

    async with nullworker.local_hold(label="job 42") as hold:
        ...  # run the job: the worker counts as busy, so the engine does not scale it in
    # leaving the block by any path drops the connection, which ends the hold at once

A reservation brings a machine; a local hold keeps it while a job runs, even after the
reservation that brought it was closed. The hold is ``POST /hold`` on the worker's
control listener (:func:`control_url`), a request kept open for as long as the block
runs.

Finding the control listener
----------------------------
:func:`control_url` reads the environment the worker runs with:
``NULLWORKER_CONTROL_URL`` if set, else ``http://127.0.0.1:$NULLWORKER_CONTROL_PORT``
(or the official worker's ``NULL_CONTROL_PORT``, which the worker accepts too), else
``http://127.0.0.1:18999``. A consumer started with the worker's environment finds it
on any port. When nothing answers there, :class:`LocalHoldFailed` names the URL tried
and both variables.

Knowing the hold is there
-------------------------
The worker sends ``/hold``'s status line and headers as soon as the hold is registered,
and its JSON body only when the hold ends. The block is entered once the ``200`` and
its headers (``nullworker-hold-id``) have arrived: from then on the worker counts as
busy, and reports say so within its 20 ms coalescing window. A refusal (``422`` bad
input, ``503`` shutting down) or a control listener that cannot be reached raises
:class:`LocalHoldFailed` before the block runs.

Durations
---------
* ``duration_s=None`` (the default): held until the block exits, however long. The worker
  puts no cap on a hold without a duration (its holder is on this machine, and its
  socket closes when it dies). If the worker goes away meanwhile (a restart, a
  shutdown), a new hold is tried every second until it is accepted again; ``hold.held``
  is false in between, and one warning says so.
* ``duration_s=S``: one hold of ``S`` seconds. When it ends, ``hold.ended`` is set and
  ``hold.outcome`` says why; the block is not interrupted.

Ending the reservation
----------------------
:func:`release_reservation` is ``POST /release`` naming what it ends: a reservation's
``id`` (``GET /status``'s ``active.id``), or ``started_before`` (the moment the caller
decided, by default the call): a reservation that started after that is left alone
(``409``), so a release racing the next reservation's start never ends it.

Taking jobs only while reserved
-------------------------------
:func:`wait_reserved` is ``GET /reservation?wait=S`` in a loop of bounded long-polls: it
returns once the worker holds a reservation. A consumer that waits for it before taking
each job pairs reservations and jobs one to one: the reservation brought this machine,
its consumer takes one job and holds it locally. Without the wait, a consumer on a fresh
machine takes a job before the engine has routed the reservation to it, its local hold
makes the worker busy, and the engine starts another machine for that reservation.

Concurrency invariants
----------------------
* One background task per :func:`local_hold` owns the HTTP exchange(s), in a nursery
  owned by the context manager; it never raises once the block has been entered.
* Leaving the block cancels that nursery: httpcore closes a cancelled HTTP/1.1
  exchange's socket, and the worker ends the hold the moment it sees the disconnect.
* ``trio.Cancelled`` is never swallowed; the nursery's exception group is unwrapped so
  callers get their own exception (or :class:`LocalHoldFailed`) itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import trio

from .._support import describe_error, renamed_option
from ..errors import LocalHoldFailed, ReleaseFailed
from ..vast.vocabulary import ClientOutcome
from .reservation import lone_exception_unwrapped

__all__ = [
    "CONTROL_PORT_ALIAS_ENV",
    "CONTROL_PORT_ENV",
    "CONTROL_URL_ENV",
    "DEFAULT_CONTROL_URL",
    "LocalHold",
    "LocalHoldFailed",
    "ReleaseFailed",
    "control_url",
    "local_hold",
    "release_reservation",
    "wait_reserved",
]

log = logging.getLogger("nullworker.local_hold")

#: The worker's control listener when neither variable below is set.
DEFAULT_CONTROL_URL = "http://127.0.0.1:18999"
CONTROL_URL_ENV = "NULLWORKER_CONTROL_URL"
#: The worker's own setting; ``NULL_CONTROL_PORT`` (the official worker's) when unset.
CONTROL_PORT_ENV = "NULLWORKER_CONTROL_PORT"
CONTROL_PORT_ALIAS_ENV = "NULL_CONTROL_PORT"
#: Said when nothing answers: where the URL comes from.
_WHERE = (
    f"the URL is ${CONTROL_URL_ENV}, else http://127.0.0.1:${CONTROL_PORT_ENV}; "
    "set them as the worker runs"
)
#: Connect, write and pool bounded; no read timeout (the answer comes when the hold ends).
_TIMEOUT = httpx.Timeout(5.0, read=None)
#: After the worker went away or refused mid-block: the pause before holding again.
_RETRY_S = 1.0
_USER_AGENT = "nullworker-local-hold"
#: One ``GET /reservation?wait=`` at most this long (the worker takes up to 300 s);
#: a longer wait is several, so a worker that went away is noticed within it.
_RESERVED_POLL_S = 60.0


def control_url(environ: Mapping[str, str] | None = None) -> str:
    """The worker's control listener, found from the environment the worker runs with.

    ``NULLWORKER_CONTROL_URL`` wins; else ``http://127.0.0.1:`` and the port the worker
    reads (``NULLWORKER_CONTROL_PORT``, else ``NULL_CONTROL_PORT``); else
    :data:`DEFAULT_CONTROL_URL`. An empty variable counts as unset, as for the worker.

    Raises:
      ValueError: a variable cannot lead to a listener (not an http(s) URL, not a port,
        ``off``, or ``0``, a port picked at start); the message names it.
    """
    env = os.environ if environ is None else environ
    url = env.get(CONTROL_URL_ENV, "").strip()
    if url:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{CONTROL_URL_ENV} must be an http(s) URL, got {url!r}")
        return url.rstrip("/")
    name = CONTROL_PORT_ENV if CONTROL_PORT_ENV in env else CONTROL_PORT_ALIAS_ENV
    raw = env.get(name, "").strip()
    if not raw:
        return DEFAULT_CONTROL_URL
    if raw.lower() in ("off", "none", "-"):
        raise ValueError(f"{name}={raw}: the worker runs without a control listener")
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a port number, got {raw!r}") from None
    if port == 0:
        raise ValueError(
            f"{name}=0: the worker picks a free port at start; set {CONTROL_URL_ENV} to "
            "the control URL it logs"
        )
    if not 0 < port <= 65535:
        raise ValueError(f"{name} must be between 1 and 65535, got {port}")
    return f"http://127.0.0.1:{port}"


def _base_url(given: str | None) -> str:
    base = (given or control_url()).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"the control URL must be an http(s) URL, got {base!r}")
    return base


class LocalHold:
    """A local hold on this instance's worker, as :func:`local_hold` yields it.

    Attributes:
      label: the label the worker logs and shows in ``/status``.
      duration_s: the requested seconds, or ``None`` (held until the block exits).
      control_url: the control listener's base URL.
      id: the worker's id of the current (or last) hold.
      held_for_s: the current hold's duration from the worker's answer (``None``: until
        the block exits).
      held: True while the worker holds for us.
      holds: how many holds the worker accepted so far (after a worker restart, more
        than one).
      ended: set once no hold is left and none will follow: a ``duration_s`` hold ended,
        or the block was left.
      outcome: how the last hold ended: the worker's ``released`` value
        (``"duration_elapsed"``, ``"shutdown"``), ``"connection_lost"``, ``"refused"``,
        or ``"client_released"`` (we left the block); ``None`` while held. See
        :class:`~nullworker.vast.vocabulary.ClientOutcome`.
    """

    def __init__(self, *, label: str, duration_s: float | None, control_url: str) -> None:
        self.label = label
        self.duration_s = duration_s
        self.control_url = control_url
        self.id: int | None = None
        self.held_for_s: float | None = None
        self.held = False
        self.holds = 0
        self.ended = trio.Event()
        self.outcome: str | None = None

    def __repr__(self) -> str:
        return f"<LocalHold id={self.id} label={self.label!r} held={self.held}>"

    @property
    def duration(self) -> float | None:
        """The old name of :attr:`duration_s` (deprecated; goes in nullworker 0.2)."""
        warnings.warn(
            "LocalHold.duration is deprecated, use LocalHold.duration_s; "
            "it will be removed in nullworker 0.2",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.duration_s

    def _begin(self, headers: httpx.Headers) -> None:
        self.id = _as_int(headers.get("nullworker-hold-id"))
        self.held_for_s = _as_float(headers.get("nullworker-hold-duration"))
        self.held = True
        self.holds += 1
        self.outcome = None

    def _lapse(self, outcome: str) -> None:
        self.held = False
        self.outcome = outcome

    def _finish(self, outcome: str) -> None:
        if self.ended.is_set():
            return
        if self.held or self.outcome is None:
            self.outcome = outcome
        self.held = False
        self.ended.set()


def local_hold(
    duration_s: float | None = None,
    *,
    label: str | None = None,
    control_url: str | None = None,
    http: httpx.AsyncClient | None = None,
    duration: float | None = None,
) -> AbstractAsyncContextManager[LocalHold]:
    """Keep this instance's worker busy while the ``async with`` block runs.

    Args:
      duration_s: seconds to hold at most; ``None`` holds until the block exits, however
        long (the worker puts no cap on it), holding again after a worker restart.
      label: shown in the worker's logs and ``/status`` (at most 200 printable
        characters).
      control_url: the worker's control listener; default :func:`control_url` (from
        ``NULLWORKER_CONTROL_URL`` or ``NULLWORKER_CONTROL_PORT``).
      http: a client to use (the caller keeps ownership; each hold keeps one of its
        connections open, so give it ``httpx.Limits(max_connections=None)`` for many
        holds at once); by default one of our own, closed on exit.
      duration: the old name of ``duration_s``: it still works, with a
        ``DeprecationWarning``, and goes in nullworker 0.2.

    Raises:
      LocalHoldFailed: before the block runs: the control listener could not be reached
        (``status`` None), or it refused the hold (``status`` 422 bad input, 503 shutting
        down).
      ValueError: (when called) ``duration_s`` is negative, NaN or infinite, or the
        control URL cannot be found (:func:`control_url`).
      TypeError: (when called) both ``duration_s`` and its old name ``duration`` given.

    Resource handling: leaving the block by any path (normal exit, exception,
    cancellation) closes the connection, and the worker ends the hold at once.
    """
    duration_s = renamed_option("duration", duration, "duration_s", duration_s)
    if duration_s is not None:
        duration_s = float(duration_s)
        if not math.isfinite(duration_s) or duration_s < 0:
            raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s}")
    base = _base_url(control_url)
    return _local_hold(duration_s, label=label, base=base, http=http)


@asynccontextmanager
async def _local_hold(
    duration_s: float | None, *, label: str | None, base: str, http: httpx.AsyncClient | None
) -> AsyncIterator[LocalHold]:
    body: dict[str, Any] = {}
    if duration_s is not None:
        body["duration"] = duration_s
    if label:
        body["label"] = label
    hold = LocalHold(label=label or "", duration_s=duration_s, control_url=base)
    async with AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(_loopback_client(_TIMEOUT))
        # The nursery wraps even a lone exception (the caller's own, from the block, or
        # ours from the first try) in a group; callers expect the exception itself.
        with lone_exception_unwrapped():
            async with trio.open_nursery() as nursery:
                await nursery.start(_keep, http, f"{base}/hold", body, hold)
                try:
                    yield hold
                finally:
                    # Drop the connection now: the worker ends the hold when it sees it go.
                    nursery.cancel_scope.cancel()
                    hold._finish(ClientOutcome.CLIENT_RELEASED)


async def release_reservation(
    *,
    id: int | None = None,
    started_before: float | None = None,
    control_url: str | None = None,
    http: httpx.AsyncClient | None = None,
) -> dict[str, Any]:
    """End this worker's reservation early, naming which: ``POST /release``.

    A release that names nothing could end a reservation that started after the caller
    decided to release (the one it meant ended meanwhile, and the next one began).
    So it names one:

    Args:
      id: the reservation's id (``GET /status``'s ``active.id``): only that one ends.
      started_before: wall-clock epoch seconds: only a reservation that started
        before then ends. Default, when ``id`` is not given either: now, the moment
        of this call.
      control_url: default :func:`control_url`.
      http: a client to use (the caller keeps ownership).

    Returns:
      The worker's JSON answer: ``{"released": true, "reservation": id, ...}``;
      ``{"released": false, "reason": "no active reservation"}``; or, when another
      reservation is active (HTTP 409), ``{"released": false, "error": ..., "active":
      {"id", "started_at", ...}}``: that one was left alone.

    Raises:
      ReleaseFailed: the worker could not be reached, or answered something else.
    """
    if id is None and started_before is None:
        started_before = time.time()
    body: dict[str, Any] = {}
    if id is not None:
        body["id"] = id
    if started_before is not None:
        body["started_before"] = started_before
    url = f"{_base_url(control_url)}/release"
    async with AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(_loopback_client(5.0))
        try:
            response = await http.post(url, json=body)
        except httpx.TransportError as exc:
            raise ReleaseFailed(
                f"cannot reach the worker's control listener at {url} "
                f"({describe_error(exc)}); {_WHERE}"
            ) from None
    if response.status_code not in (200, 409):
        raise ReleaseFailed(
            f"POST {url}: HTTP {response.status_code}: {_error_text(response.content)}",
            status=response.status_code,
        )
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ReleaseFailed(f"POST {url}: not a JSON object", status=response.status_code)
    return answer


async def wait_reserved(
    timeout_s: float | None = None,
    *,
    control_url: str | None = None,
    http: httpx.AsyncClient | None = None,
) -> dict[str, Any] | None:
    """Wait until this instance's worker holds a reservation: ``GET /reservation``.

    Call it before taking each job from the queue, then take the job and open a
    :func:`local_hold` for it. A consumer that takes jobs only while its worker is
    reserved takes one job per reservation: the machine the reservation brought does
    the job, and no second machine is started for that reservation.

    Args:
      timeout_s: seconds to wait at most (``0``: ask and answer at once); ``None``
        waits as long as it takes, as a series of long-polls of at most a minute each.
      control_url: default :func:`control_url`.
      http: a client to use (the caller keeps ownership; give it no read timeout
        shorter than a long-poll, or ``timeout_s``).

    Returns:
      The reservation held (``{"id", "request_idx", "started_at", "duration",
      "ends_at"}``, as the worker tells it), or ``None`` when ``timeout_s`` passed
      without one.

    Raises:
      LocalHoldFailed: the control listener could not be reached (``status`` None),
        is shutting down (``503``) or answered something else.
      ValueError: (when called) ``timeout_s`` is negative or NaN, or the control URL
        cannot be found (:func:`control_url`).
    """
    if timeout_s is not None:
        timeout_s = float(timeout_s)
        if math.isnan(timeout_s) or timeout_s < 0:
            raise ValueError(f"timeout_s must be a number >= 0 or None, got {timeout_s}")
    url = f"{_base_url(control_url)}/reservation"
    deadline = math.inf if timeout_s is None else trio.current_time() + timeout_s
    async with AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(_loopback_client(_TIMEOUT))
        while True:
            poll_s = min(_RESERVED_POLL_S, max(deadline - trio.current_time(), 0.0))
            try:
                response = await http.get(url, params={"wait": f"{poll_s:.3f}"}, timeout=_TIMEOUT)
            except httpx.TransportError as exc:
                raise LocalHoldFailed(
                    f"cannot reach the worker's control listener at {url} "
                    f"({describe_error(exc)}); {_WHERE}"
                ) from None
            answer = _json_object(response.content)
            if response.status_code != 200 or answer is None:
                raise LocalHoldFailed(
                    f"GET {url}: HTTP {response.status_code}: {_error_text(response.content)}",
                    status=response.status_code,
                )
            held = answer.get("reservation")
            if answer.get("reserved") is True and isinstance(held, dict):
                return held
            if trio.current_time() >= deadline:
                return None


def _loopback_client(timeout: float | httpx.Timeout) -> httpx.AsyncClient:
    """The client for the worker's control listener when the caller gives none. It is
    on loopback: never through an ``http_proxy`` from the environment (an image that
    sets one for its downloads would otherwise send holds and releases to the proxy)."""
    return httpx.AsyncClient(timeout=timeout, trust_env=False, headers={"User-Agent": _USER_AGENT})


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(data)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _keep(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    hold: LocalHold,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Hold; ``started()`` once the worker accepted the first hold; hold again after the
    worker went away, while the block runs without a duration."""
    started = False
    warned = False

    def on_held() -> None:
        nonlocal started, warned
        warned = False  # a later lapse is worth a warning again
        if not started:
            started = True
            task_status.started()

    while True:
        try:
            outcome = await _one_hold(http, url, body, hold, on_held)
        except httpx.TransportError as exc:
            if not started:
                raise LocalHoldFailed(
                    f"cannot reach the worker's control listener at {url} "
                    f"({describe_error(exc)}); {_WHERE}"
                ) from None
            outcome, why = ClientOutcome.CONNECTION_LOST, describe_error(exc)
        except _Refused as exc:
            if not started:
                raise LocalHoldFailed(
                    f"the worker refused the hold (HTTP {exc.status}): {exc}", status=exc.status
                ) from None
            outcome, why = ClientOutcome.REFUSED, f"HTTP {exc.status}: {exc}"
        else:
            why = outcome
        if hold.duration_s is not None:  # one hold of that length, whatever its end
            hold._finish(outcome)
            return
        if not warned:
            log.warning(
                "local hold%s lapsed (%s); trying again every %g s",
                f" {hold.label!r}" if hold.label else "",
                why,
                _RETRY_S,
            )
            warned = True
        await trio.sleep(_RETRY_S)


async def _one_hold(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    hold: LocalHold,
    on_held: Callable[[], None],
) -> str:
    """One ``/hold`` exchange: ``on_held()`` once accepted, then how it ended.

    Raises :class:`_Refused` for a non-200 answer and ``httpx.TransportError`` when the
    exchange failed (before or after the worker accepted: see ``hold.held``).
    """
    async with http.stream("POST", url, json=body, timeout=_TIMEOUT) as response:
        if response.status_code != 200:
            await response.aread()
            raise _Refused(response.status_code, _error_text(response.content))
        hold._begin(response.headers)
        on_held()
        try:
            data = await response.aread()
        except httpx.TransportError:
            hold._lapse(ClientOutcome.CONNECTION_LOST)
            raise
    outcome = _released(data)
    hold._lapse(outcome)
    return outcome


def _released(data: bytes) -> str:
    try:
        answer = json.loads(data)
    except ValueError:
        return ClientOutcome.CONNECTION_LOST  # the worker went away mid-answer
    released = answer.get("released") if isinstance(answer, dict) else None
    return released if isinstance(released, str) else ClientOutcome.CONNECTION_LOST


def _error_text(data: bytes) -> str:
    try:
        answer = json.loads(data)
    except ValueError:
        return data[:200].decode("utf-8", "replace") or "no body"
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        field = answer.get("field")
        return f"{answer['error']} (field {field})" if isinstance(field, str) else answer["error"]
    return str(answer)[:200]


def _as_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _as_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
