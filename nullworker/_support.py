"""Small helpers every part of the package uses, written once.

They are here, with public names in a private module, so that the worker, the client
and the local engine share them without importing each other (``tests/test_layout.py``
lets every part import this module, and this module nothing of nullworker). Nothing
here is part of the package's public API.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["describe_error", "finite", "public_module", "renamed_option"]

T = TypeVar("T")


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


def renamed_option(
    old: str, old_value: T | None, new: str, new_value: T | None, *, stacklevel: int = 2
) -> T | None:
    """The value of a keyword option that was renamed from ``old`` to ``new``.

    The old name keeps working for one release, with a :class:`DeprecationWarning`
    that points at the caller's line (``stacklevel`` counts as for :func:`warnings.warn`,
    from the function that calls this one). ``None`` means "not given" for both: the
    renamed options are ones whose default is ``None``.

    Raises:
      TypeError: both names were given.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"pass {new}= only ({old}= is its old name)")
    warnings.warn(
        f"{old}= is deprecated, use {new}= (the same number of seconds); "
        f"{old}= will be removed in nullworker 0.2",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
    return old_value


def public_module(module: str, objects: Iterable[Any]) -> None:
    """Name ``module`` as the home of ``objects`` defined in its private submodules.

    A public module that gathers names from private ones (``lease`` from ``_lease``)
    sets their ``__module__`` to itself, as trio does for its own: reprs, tracebacks,
    pickles and the docs then show the name users import, not the file it lives in.
    Only what is defined in a private module (a ``_`` name in its path) is changed.
    """
    for obj in objects:
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        home = getattr(obj, "__module__", None)
        if isinstance(home, str) and any(part.startswith("_") for part in home.split(".")):
            obj.__module__ = module
