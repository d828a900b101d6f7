"""The words on the wire, in one place: how holds end, and a request's status at the engine.

Each is a :class:`~enum.StrEnum`, so a member *is* its string: it compares equal to the
bare value, serialises to it (``json.dumps``, f-strings, ``%s``) and can be sent or
matched as it is. Code names the member; the wire, logs and metrics see the same
strings as before.

* :class:`Outcome` -- how a reservation on a worker ended (``/status`` counts, log
  lines, metrics); ``ELAPSED``, ``RELEASED`` and ``SHUTDOWN`` are the ``released``
  value of a ``POST /reserve`` answer (the others never reach the holder).
* :class:`HoldOutcome` -- how a local hold (``POST /hold`` on the control listener)
  ended; the ``released`` value of its answer.
* :class:`ClientOutcome` -- how a client saw its hold end: the worker's ``released``
  value, or what only the client can know (the connection was lost, it let go itself).
* :class:`RequestStatus` -- a request's status at the engine: the worker reports
  ``Success``, ``Error`` or ``Cancelled`` in ``/delete_requests/``; the engine's own
  records also go through ``Created``, ``Started``, ``Rejected`` and ``SessionActive``.

Role-free, like the rest of :mod:`nullworker.vast`: the worker, the client and the engine
all import it.
"""

from __future__ import annotations

import enum

__all__ = [
    "ClientOutcome",
    "HoldOutcome",
    "Outcome",
    "RequestStatus",
]


class Outcome(enum.StrEnum):
    """How a reservation ended. The values are what the HTTP API and logs show."""

    ELAPSED = "duration_elapsed"
    RELEASED = "explicit"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"
    REJECTED = "rejected"
    ERROR = "error"


class HoldOutcome(enum.StrEnum):
    """How a local hold ended. The values are what ``/hold``, logs and metrics show."""

    ELAPSED = "duration_elapsed"
    SHUTDOWN = "shutdown"
    DISCONNECTED = "disconnected"
    RELEASED = "released"
    ERROR = "error"


class ClientOutcome(enum.StrEnum):
    """How a client saw its reservation or local hold end.

    The first three are a worker's ``released`` values (``/reserve`` and ``/hold``
    share them); the rest the client decides itself.
    """

    ELAPSED = Outcome.ELAPSED.value
    EXPLICIT = Outcome.RELEASED.value
    SHUTDOWN = Outcome.SHUTDOWN.value
    #: The connection to the worker broke (or its answer was cut short) while held.
    CONNECTION_LOST = "connection_lost"
    #: Queued behind another hold on the worker, then answered 429.
    REJECTED = "rejected"
    #: A 200 that does not say how the hold ended.
    COMPLETED = "completed"
    #: The client let go itself (left the block, Ctrl-C, a scale-down).
    CLIENT_RELEASED = "client_released"
    #: A local hold the worker refused when it was taken again (after a lapse).
    REFUSED = "refused"
    #: Any other answer: an error status, or a remote error in a 200.
    ERROR = "error"


class RequestStatus(enum.StrEnum):
    """A request's status at the engine (the spelling is the engine's)."""

    CREATED = "Created"
    STARTED = "Started"
    SUCCESS = "Success"
    ERROR = "Error"
    CANCELLED = "Cancelled"
    REJECTED = "Rejected"
    SESSION_ACTIVE = "SessionActive"
