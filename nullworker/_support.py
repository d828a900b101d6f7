"""Small helpers every part of the package uses, written once.

They are here, with public names in a private module, so that the worker, the client
and the local engine share them without importing each other (``tests/test_layout.py``
lets every part import this module, and this module nothing of nullworker). Nothing
here is part of the package's public API.
"""

from __future__ import annotations

import math

__all__ = ["describe_error", "finite"]


def finite(value: object) -> bool:
    """Whether ``value`` is a real, finite number: an int or a float, not a bool, not
    NaN, not infinite. Settings in seconds are checked with it before any arithmetic,
    since ``nan > 0`` is false and ``inf`` never elapses."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def describe_error(exc: BaseException) -> str:
    """``exc`` in one short phrase for a log line or an error message: ``"Name: text"``,
    or the bare class name when the exception has no text (``httpx.ReadTimeout()`` and
    many OS errors do not). It masks nothing: a message that may name a URL with
    credentials goes through the client's ``redact`` too."""
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
