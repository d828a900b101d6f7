"""Exceptions raised by nullworker.

The tree::

    NullworkerError
    ├── ConfigError              bad settings (env or flags); raised at start, never later
    ├── StartupFailed            could not start (a port in use, the port's lock held)
    ├── PubkeyUnavailable        the worker could not get the engine's public key
    ├── EnvelopeError            a request body that is not a valid Vast envelope (-> 422)
    ├── QueueTimeout             the slot did not free up within max_queue_time (-> 429)
    ├── DuplicateRequest         the same request_idx is already held or queued (-> 409)
    ├── ReleaseConflict          a release named another reservation than the active one (-> 409)
    ├── ShuttingDown             the worker is stopping and takes no new reservations (-> 503)
    ├── WorkerFailed             the worker's background work failed; serve() stops with it
    ├── DemandError              a demand source of the autoscaler could not be read
    │   ├── DemandTimeout        the source did not answer within its timeout
    │   └── DemandNotFound       what the source reads (stream, consumer) does not exist
    ├── LeaseError               a command of the autoscaler's Redis lease failed
    └── ClientError              raised by the client side (reservations, local holds)
        ├── EngineUnavailable    the engine could not be reached or refused the route
        │   ├── EngineRefused    the engine answered /route/ with an HTTP error (401: the key)
        │   └── RouteTimeout     no worker within route_timeout_s, or /route/ never answered
        ├── ReservationRejected  workers kept answering 429 (or another refusal)
        ├── ReservationFailed    the worker answered something we cannot use
        ├── LocalHoldFailed      a local hold could not be taken (listener down, refused)
        └── ReleaseFailed        POST /release could not be sent or got an unusable answer

Every class is exported from :mod:`nullworker`; the client's also from
:mod:`nullworker.client`. Catch the base that fits: ``ClientError`` for "this
reservation did not happen", ``EngineUnavailable`` for "the engine is the problem",
``NullworkerError`` for anything nullworker raised on purpose. Messages never hold an
API key, a password or a token.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ClientError",
    "ConfigError",
    "DemandError",
    "DemandNotFound",
    "DemandTimeout",
    "DuplicateRequest",
    "EngineRefused",
    "EngineUnavailable",
    "EnvelopeError",
    "LeaseError",
    "LocalHoldFailed",
    "NullworkerError",
    "PubkeyUnavailable",
    "QueueTimeout",
    "ReleaseConflict",
    "ReleaseFailed",
    "ReservationFailed",
    "ReservationRejected",
    "RouteTimeout",
    "ShuttingDown",
    "StartupFailed",
    "WorkerFailed",
]


class NullworkerError(Exception):
    """Base class of every error nullworker raises on purpose."""


class ConfigError(NullworkerError, ValueError):
    """A setting is missing or invalid; the message names the variable."""


class StartupFailed(NullworkerError, OSError):
    """The worker could not start for a reason a later start may not have: a port in use,
    the port's single-process lock held by another process. The message says which
    port (or lock) in one line; ``nullworker serve`` exits 1 (a supervisor may retry),
    where a :class:`ConfigError` exits 2. An :class:`OSError`, as a failed bind always was.
    """


class PubkeyUnavailable(NullworkerError):
    """No engine address served a usable public key within the retry bound.

    Raised by the worker's reporter (``fetch_pubkey``) when every ``GET /pubkey/`` of
    every round failed; the message names the last address and why (``HTTP 403``,
    ``connection refused``, ``not an RSA public key``). The worker keeps running and
    tries again later; until a key arrives, signed requests are answered ``503``.
    """


class EnvelopeError(NullworkerError):
    """The request is not a valid Vast envelope.

    ``detail`` is a JSON-ready map naming each bad field, in the official worker's
    shape (``{"auth_data": {"signature": "missing parameter"}}``).
    """

    def __init__(self, detail: dict[str, Any]) -> None:
        super().__init__(detail)
        self.detail = detail


class QueueTimeout(NullworkerError):
    """The slot stayed busy for the whole of ``max_queue_time``."""


class DuplicateRequest(NullworkerError):
    """A reservation with the same key (the engine's ``request_idx``) is already held or queued.

    Raised by :meth:`~nullworker.worker.reservations.ReservationSlot.hold` before anything is
    queued or reported: a replayed envelope must not hold twice, nor give the engine two
    delete entries for one request. ``key`` is the key in use.
    """

    def __init__(self, message: str, *, key: object) -> None:
        super().__init__(message)
        self.key = key


class ReleaseConflict(NullworkerError):
    """A release named a reservation (by id, or by its start) that is not the active one.

    Raised by :meth:`~nullworker.worker.reservations.ReservationSlot.release`; nothing was
    released. ``active`` is the reservation that is held now (an ``ActiveInfo``).
    """

    def __init__(self, message: str, *, active: Any) -> None:
        super().__init__(message)
        self.active = active


class ShuttingDown(NullworkerError):
    """The worker is shutting down and admits no new reservations."""


class WorkerFailed(NullworkerError):
    """The worker's background work (reporter, readiness, control listener) failed.

    A worker that can no longer report or be released must not go on looking alive:
    :func:`nullworker.serve` stops and raises this, and ``nullworker serve`` exits 1.
    """


class DemandError(NullworkerError):
    """A demand source could not be read; the message names the source and the reason."""


class DemandTimeout(DemandError):
    """The source did not answer within its ``timeout_s``."""


class DemandNotFound(DemandError):
    """What the source reads (a stream, a consumer group, a consumer) does not exist."""


class LeaseError(NullworkerError):
    """A lease command failed: the server unreachable, no answer in time, an error answer.

    Raised by the autoscaler's lease store (:mod:`nullworker.client.lease`); the
    :class:`~nullworker.client.lease.Lease` treats it as "the lease may be lost" and
    stops scaling until a command succeeds again.
    """


class ClientError(NullworkerError):
    """Base class of the client side's errors: reservations and local holds."""


class EngineUnavailable(ClientError):
    """The engine's ``/route/`` could not be reached or refused the request."""


class EngineRefused(EngineUnavailable):
    """The engine answered ``/route/`` with an HTTP error.

    ``status`` is that status: 401 (or 403) means the engine refused the API key.
    """

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def api_key_refused(self) -> bool:
        """Whether the engine refused the API key (401 or 403)."""
        return self.status in (401, 403)


class RouteTimeout(EngineUnavailable):
    """No worker was routed to us in time.

    Either no worker became free within ``route_timeout_s`` (the engine kept answering
    WAITING), or the engine never answered ``/route/`` itself: every try of the call
    timed out. ``timeout_s`` is the bound that passed; ``reason`` the last reason the
    engine gave for having no free worker (its WAITING answer's ``reason``), ``None``
    when it gave none.
    """

    def __init__(
        self, message: str, *, timeout_s: float | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s
        self.reason = reason


class ReservationRejected(ClientError):
    """Every worker tried answered 429 (busy), up to the retry bound."""


class ReservationFailed(ClientError):
    """The worker answered with a status or body the client cannot use."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LocalHoldFailed(ClientError):
    """The worker's control listener could not be reached, or it refused the hold.

    Raised by :func:`nullworker.local_hold` before its block runs. ``status`` is the
    HTTP status of a refusal (``None`` when nothing answered).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ReleaseFailed(ClientError):
    """``POST /release`` could not be sent, or the worker answered neither 200 nor 409.

    ``status`` is the HTTP status of the answer (``None`` when nothing answered).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
