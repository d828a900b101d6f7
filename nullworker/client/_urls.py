"""Checking a server URL before it is used, so that a typo is refused at start.

``urlsplit`` accepts almost anything: ``redis:/queue:6379`` has no network location at
all, and redis-py then silently connects to localhost; ``redis://queue:63a9`` fails
only at the first read, and ``redis://:6379`` reads localhost again. A client reads
its URL lazily, so each of these would surface as a source error on every poll (or not
at all) instead of as a one-line usage error. :func:`check_url` refuses them in the
constructor of the source or lease that takes the URL.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from ._redact import redact

__all__ = ["check_url"]


def check_url(
    url: str,
    *,
    schemes: tuple[str, ...],
    socket_schemes: tuple[str, ...] = (),
    numeric_path: bool = False,
) -> SplitResult:
    """``url`` split, or ``ValueError`` naming what is wrong (never showing a password).

    Args:
      url: the URL to check.
      schemes: the schemes allowed.
      socket_schemes: those of ``schemes`` that name a Unix socket by path
        (``unix:///run/redis.sock``): these need a path instead of a host.
      numeric_path: the path, if any, must be ``/<integer>`` (a Redis database number).

    Raises:
      ValueError: the scheme is not one of ``schemes``; a host URL has no ``//host``, an
        empty host or a port that is not 1..65535; a socket URL has no path; a database
        path is not a number.
    """
    shown = repr(redact(url))
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        raise ValueError(f"{shown}: not a URL ({exc})") from None
    if parts.scheme not in schemes:
        raise ValueError(f"{shown}: the URL scheme must be one of {', '.join(schemes)}")
    if parts.scheme in socket_schemes:
        if not parts.path or parts.path == "/":
            raise ValueError(f"{shown}: a {parts.scheme}:// URL needs the socket's path")
        return parts
    if not url.startswith(f"{parts.scheme}://"):
        raise ValueError(f"{shown}: expected {parts.scheme}://host[:port]")
    if not parts.hostname:
        raise ValueError(f"{shown}: the URL has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown}: the port must be a number in 1..65535") from None
    if port == 0:
        raise ValueError(f"{shown}: the port must be a number in 1..65535")
    db = parts.path[1:]
    if numeric_path and db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"{shown}: the path must be a database number, like /0")
    return parts
