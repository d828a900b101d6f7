"""Parsing the Vast request envelope and checking its signature.

A client's request to a worker is ``{"auth_data": {...}, "payload": {...},
"session_id": null}``. ``auth_data`` is the engine's ``/route/`` answer; only its
``url`` is signed (see :mod:`nullworker.vast.signing`). This module is sans-IO: it turns
bytes into an :class:`Envelope` or an :class:`~nullworker.errors.EnvelopeError` whose
``detail`` names every bad field, and never touches the network.

``request_idx`` and ``reqnum`` are the engine's ids: integers from 0 to 2**63 - 1 (a
signed 64-bit int, the engine's range), given as JSON integers or as ASCII digit
strings. Anything else (null, a boolean, a float such as ``1.5``, another string, a
negative or larger number) is refused: the worker could not report the request to
the engine under that id. They are not signed, so this is a shape check only.

A worker with no engine (standalone: nothing is signed or reported) also takes the bare
payload, as Vast's own null-worker examples send it: ``{"duration": 5}``, ``{}`` or an
empty body (``parse_envelope(body, bare_payload=True)``). A body is an envelope as soon
as it has one of the envelope's keys (``auth_data``, ``payload``, ``session_id``), and is
then checked as one: a malformed envelope is never taken for a payload by accident.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import EnvelopeError
from .signing import verify_url

__all__ = [
    "AUTH_KEYS",
    "ENVELOPE_KEYS",
    "MAX_ENGINE_ID",
    "Envelope",
    "as_int",
    "parse_duration",
    "parse_envelope",
    "signature_ok",
]

#: ASCII digits only: ``str.isdigit`` also accepts "²", which ``int()`` refuses.
_INT_TEXT = re.compile(r"-?[0-9]{1,30}")

#: The keys every ``auth_data`` must carry, as the official worker requires.
AUTH_KEYS = ("signature", "url", "cost", "endpoint", "reqnum", "request_idx")

#: The top-level keys of the envelope; a body with none of them is a bare payload.
ENVELOPE_KEYS = ("auth_data", "payload", "session_id")

#: The largest engine id: the engine stores ids as signed 64-bit integers.
MAX_ENGINE_ID = 2**63 - 1

#: The ``auth_data`` keys that hold engine ids.
_ID_KEYS = ("request_idx", "reqnum")


@dataclass(frozen=True)
class Envelope:
    auth_data: dict[str, Any]
    payload: dict[str, Any]
    session_id: str | None
    #: A bare payload (standalone only): no ``auth_data``, nothing to check or report.
    bare: bool = False

    def __repr__(self) -> str:
        # The signature admits its holder to the worker it names (it never expires):
        # a credential, kept out of reprs and so out of log lines.
        auth = {k: ("<redacted>" if k == "signature" else v) for k, v in self.auth_data.items()}
        return (
            f"Envelope(auth_data={auth!r}, payload={self.payload!r}, "
            f"session_id={self.session_id!r}" + (", bare=True)" if self.bare else ")")
        )

    @property
    def request_idx(self) -> int | None:
        return as_int(self.auth_data.get("request_idx"))

    @property
    def reqnum(self) -> int | None:
        return as_int(self.auth_data.get("reqnum"))


def as_int(value: Any) -> int | None:
    """An engine id (``request_idx``, ``reqnum``) as an int: ints and digit strings; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value)
    return None


def _engine_id(value: Any) -> int | None:
    """``value`` as an engine id (see :func:`as_int`) if it is in 0..MAX_ENGINE_ID, else None."""
    number = as_int(value)
    if number is None or not 0 <= number <= MAX_ENGINE_ID:
        return None
    return number


def parse_envelope(body: bytes | str, *, bare_payload: bool = False) -> Envelope:
    """Parse and validate a request body.

    With ``bare_payload`` (a standalone worker), an empty body or a JSON object with
    none of :data:`ENVELOPE_KEYS` is the payload itself: the result has ``bare`` set,
    an empty ``auth_data`` and no engine ids. A body with an envelope key is parsed
    as an envelope either way, so an envelope wins over stray top-level fields.

    ``auth_data.request_idx`` and ``auth_data.reqnum`` must be engine ids (an int or
    an ASCII digit string in 0..2**63 - 1); :attr:`Envelope.request_idx` and
    :attr:`Envelope.reqnum` of a parsed envelope are then ints.

    Raises:
      EnvelopeError: ``detail`` is ``{"error": "invalid JSON"}`` for unparsable bytes,
        else a map naming each bad field.
    """
    if bare_payload and not body.strip():
        return Envelope(auth_data={}, payload={}, session_id=None, bare=True)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: not JSON we take
        raise EnvelopeError({"error": "invalid JSON"}) from None
    if not isinstance(data, dict):
        what = "the Vast envelope" + (" or, standalone, its payload" if bare_payload else "")
        raise EnvelopeError({"error": f"the body must be a JSON object ({what})"})
    if bare_payload and not any(key in data for key in ENVELOPE_KEYS):
        return Envelope(auth_data={}, payload=data, session_id=None, bare=True)

    problems: dict[str, Any] = {}
    auth = data.get("auth_data")
    if auth is None:
        problems["auth_data"] = "field missing"
    elif not isinstance(auth, dict):
        problems["auth_data"] = "auth_data must be an object"
    else:
        missing = {key: "missing parameter" for key in AUTH_KEYS if key not in auth}
        if missing:
            problems["auth_data"] = missing
        else:
            bad: dict[str, str] = {}
            for key in ("signature", "url"):
                if not isinstance(auth[key], str):
                    bad[key] = f"{key} must be a string"
            for key in _ID_KEYS:
                if _engine_id(auth[key]) is None:
                    bad[key] = f"{key} must be an integer from 0 to {MAX_ENGINE_ID}"
            if bad:
                problems["auth_data"] = bad

    payload = data.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        problems["payload"] = {"data": "payload must be a dictionary"}

    session_id = data.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        problems["session_id"] = "session_id must be a string or null"

    if problems:
        raise EnvelopeError(problems)
    assert isinstance(auth, dict) and isinstance(payload, dict)
    return Envelope(auth_data=auth, payload=payload, session_id=session_id)


def parse_duration(payload: dict[str, Any], *, bare: bool = False) -> float | None:
    """The requested duration in seconds, or ``None`` when omitted (or null).

    Raises:
      EnvelopeError: not a finite number >= 0 (booleans and strings are refused); the
        detail names ``payload.duration``, or ``duration`` for a bare payload (where
        the client wrote it).
    """
    if "duration" not in payload or payload["duration"] is None:
        return None
    value = payload["duration"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _duration_error("duration must be a number of seconds", bare=bare)
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise _duration_error("duration must be a finite number >= 0", bare=bare)
    return seconds


def _duration_error(message: str, *, bare: bool) -> EnvelopeError:
    field = {"duration": message}
    return EnvelopeError(field if bare else {"payload": field})


def signature_ok(envelope: Envelope, key: rsa.RSAPublicKey) -> bool:
    """True if ``auth_data.signature`` is the engine's signature of ``auth_data.url``."""
    return verify_url(key, envelope.auth_data["url"], envelope.auth_data["signature"])
