"""The demand source interface: a bounded, serialized read of one job count."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Any, ClassVar, Self

import trio

from ...errors import DemandError, DemandTimeout
from .._redact import reason

#: Default bound on one read of a queue server.
DEFAULT_TIMEOUT_S = 5.0
#: Bound on closing a client that is being thrown away (shielded from cancellation).
CLOSE_TIMEOUT_S = 1.0

log = logging.getLogger("nullworker.demand")

# -- the interface ---------------------------------------------------------------------


def check_count(value: object, source: str) -> int:
    # bool is an int subclass, and True is no job count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise DemandError(f"{source}: got {value!r} ({type(value).__name__}), not an int")
    if value < 0:
        raise DemandError(f"{source}: got {value}, a negative count")
    return value


async def aclose_quietly(client: Any, what: str) -> None:
    """``await client.aclose()`` for a client being thrown away: shielded from
    cancellation, bounded by :data:`CLOSE_TIMEOUT_S`, a failure only logged (debug)."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await client.aclose()
        except Exception as exc:
            log.debug("%s: closing the client failed: %s", what, reason(exc))


class DemandSource(ABC):
    """A number of jobs to read, at most ``timeout_s`` per read.

    Subclasses implement :meth:`describe` and ``_read`` (one unbounded attempt), and may
    override ``_close`` and ``_oldest_age`` (for :meth:`oldest_age`). Exceptions of the
    types in ``_wrapped_errors`` raised by ``_read`` become :class:`DemandError`
    (:class:`DemandTimeout` for timeouts).
    """

    #: What ``_read`` may raise that means "this read failed" rather than a bug.
    _wrapped_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Which of those mean "no answer in time" (:class:`DemandTimeout`). asyncio's
    #: TimeoutError is the built-in one (3.11+); a client with its own adds it.
    _timeout_errors: ClassVar[tuple[type[BaseException], ...]] = (TimeoutError,)

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, not {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._lock = trio.Lock()
        self._closed = False

    @abstractmethod
    def describe(self) -> str:
        """What this source reads, for logs: never includes a password."""

    @abstractmethod
    async def _read(self) -> int: ...

    async def _close(self) -> None:
        return None

    async def _oldest_age(self) -> float | None:
        """One unbounded attempt at :meth:`oldest_age`; this source cannot tell."""
        return None

    def _timeout_message(self) -> str:
        return f"{self.describe()}: no answer within {self.timeout_s:g} s"

    async def read(self) -> int:
        """The number of jobs now.

        Returns:
          An int >= 0.

        Raises:
          DemandError: the read failed (server down, bad answer, …); the source stays
            usable and the next read tries again from scratch.
          DemandTimeout: no answer within ``timeout_s``.
          DemandNotFound: the stream, group or consumer does not exist.
          trio.ClosedResourceError: the source was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError(f"{self.describe()} is closed")
        async with self._lock:
            with trio.move_on_after(self.timeout_s):
                try:
                    value = await self._read()
                except DemandError:
                    raise
                except self._wrapped_errors as exc:
                    kind = DemandTimeout if isinstance(exc, self._timeout_errors) else DemandError
                    raise kind(f"{self.describe()}: {reason(exc)}") from exc
                return check_count(value, self.describe())
            raise DemandTimeout(self._timeout_message())

    async def oldest_age(self) -> float | None:
        """The age in seconds of the oldest job waiting, or ``None``: none waits, or the
        source cannot tell.

        For the autoscaler's age boost, which only ever adds workers: so this never
        raises for a failed read, it returns ``None`` (the failure is logged at debug
        level). Bounded by ``timeout_s`` and serialized with :meth:`read`.

        Raises:
          trio.ClosedResourceError: the source was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError(f"{self.describe()} is closed")
        failed: tuple[type[BaseException], ...] = (DemandError, *self._wrapped_errors)
        async with self._lock:
            with trio.move_on_after(self.timeout_s):
                try:
                    age = await self._oldest_age()
                except failed as exc:
                    log.debug(
                        "%s: the oldest job's age is unknown: %s", self.describe(), reason(exc)
                    )
                    return None
                if age is None or not math.isfinite(age):
                    return None
                return max(0.0, float(age))
            log.debug("%s: the oldest job's age: no answer in time", self.describe())
            return None

    async def aclose(self) -> None:
        """Release the source's connections. Idempotent; reading afterwards is an error.

        Call it from the task that entered ``async with source:`` (``__aexit__`` does).
        """
        if self._closed:
            return
        self._closed = True
        await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
