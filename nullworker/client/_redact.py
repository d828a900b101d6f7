"""Masking credentials in URLs before they reach a log line, an error or a metric label.

Every client-side message that names a queue server goes through :func:`redact`: the
autoscaler's logs, the demand sources' and the lease's errors. It lives apart from the
demand sources so that code needing it does not import the queue clients.
"""

from __future__ import annotations

import re

from .._support import describe_error

__all__ = ["reason", "redact"]

_URL_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>]*)")
_SECRET_PARAM_RE = re.compile(
    r"(?P<key>(?:^|[?&;])(?:password|passwd|pass|token|secret|auth|auth_token)=)[^&;#]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it masked.

    ``redis://:secret@host`` -> ``redis://:***@host``, ``redis://user:pw@host`` ->
    ``redis://user:***@host``, ``nats://TOKEN@host`` -> ``nats://***@host`` (a lone
    user-info part may be a token), and ``?password=…``/``?token=…`` query values ->
    ``***``. The user-info runs to the *last* ``@`` before the query, so a password
    holding an unescaped ``@`` or ``/`` is masked whole too.
    """
    return _URL_RE.sub(_redact_url_match, text)


def reason(exc: BaseException) -> str:
    """``exc`` in one phrase (``"Name: text"``) with every URL's credentials masked: how
    the demand sources and the lease say why a server call failed."""
    return redact(describe_error(exc))


def _redact_url_match(match: re.Match[str]) -> str:
    rest = match["rest"]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    head, query = rest[:cut], rest[cut:]
    if "@" in head:
        userinfo, host_and_path = head.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        head = f"{user}:***@{host_and_path}" if colon else f"***@{host_and_path}"
    query = _SECRET_PARAM_RE.sub(r"\g<key>***", query)
    return match["scheme"] + head + query
