"""Several sources read as one: a queue and its retry queue, two shards, a backlog.

``CombinedDemand`` is itself a :class:`DemandSource`, so everything that takes a source
(``autoscale(demand=...)``, the command line) takes a combination without knowing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Literal, Self

import trio

from ...errors import DemandError
from .._redact import reason
from ._base import DemandSource

#: How the parts' counts become one: ``sum`` (jobs spread over several queues, each
#: needing a worker) or ``max`` (several views of the same jobs; count them once).
Combine = Literal["sum", "max"]
COMBINE: tuple[Combine, ...] = ("sum", "max")


class CombinedDemand(DemandSource):
    """The ``sum`` or ``max`` of several sources' counts, read together.

    Usage::

        async with CombinedDemand([RedisList(url, "jobs"), RedisList(url, "jobs:retry")]) as src:
            await autoscale("my-endpoint", demand=src, max_workers=8)

    All parts are read concurrently, each bounded by its own ``timeout_s``; the
    combination's own bound is the longest of theirs, so it never cuts a part short.

    **A failed read of any part is a failed read of the whole**: a :class:`DemandError`
    naming the part (the first that failed, in the order given). The sum of the parts
    that answered would be too low, and an autoscaler acting on it would release workers
    that still have jobs; failing keeps the autoscaler's last reading (it fails static).

    Args:
      sources: two or more sources (one is allowed, and reads as itself). The
        combination owns them: ``async with`` enters each, and closing it closes each.
      how: ``"sum"`` (the default) or ``"max"``.

    Raises:
      ValueError: no sources, a part that is not a :class:`DemandSource`, the same
        source twice, or an unknown ``how``.
    """

    def __init__(self, sources: Sequence[DemandSource], *, how: Combine = "sum") -> None:
        parts = list(sources)
        if not parts:
            raise ValueError("CombinedDemand needs at least one source")
        for part in parts:
            if not isinstance(part, DemandSource):
                raise ValueError(f"CombinedDemand takes demand sources, not {part!r}")
        if len({id(part) for part in parts}) != len(parts):
            # One source read twice at once would wait on its own lock, and count twice.
            raise ValueError("CombinedDemand got the same source twice")
        if how not in COMBINE:
            raise ValueError(f"how must be 'sum' or 'max', not {how!r}")
        super().__init__(timeout_s=max(part.timeout_s for part in parts))
        self.sources: tuple[DemandSource, ...] = tuple(parts)
        self.how: Combine = how
        self._stack: AsyncExitStack | None = None

    def describe(self) -> str:
        if len(self.sources) == 1:
            return self.sources[0].describe()
        return f"{self.how} of ({', '.join(part.describe() for part in self.sources)})"

    async def _read(self) -> int:
        counts: list[int | None] = [None] * len(self.sources)
        errors: list[BaseException | None] = [None] * len(self.sources)

        async def read_one(index: int) -> None:
            try:
                counts[index] = await self.sources[index].read()
            except Exception as exc:  # trio.Cancelled is a BaseException: it passes
                errors[index] = exc

        async with trio.open_nursery() as nursery:
            for index in range(len(self.sources)):
                nursery.start_soon(read_one, index)
        for part, error in zip(self.sources, errors, strict=True):
            if error is None:
                continue
            # Name the part (a source's own errors do; a function's may not), keeping
            # the error's kind (a timeout, a missing queue). Texts are password-free.
            name = part.describe()
            text = str(error) if isinstance(error, DemandError) else reason(error)
            if not text.startswith(name):
                text = f"{name}: {text}"
            kind = type(error) if isinstance(error, DemandError) else DemandError
            raise kind(text) from error
        values = [count for count in counts if count is not None]
        return sum(values) if self.how == "sum" else max(values)

    async def _oldest_age(self) -> float | None:
        """The oldest of the parts' ages that are known (each part bounds its own)."""
        ages: list[float | None] = [None] * len(self.sources)

        async def read_one(index: int) -> None:
            ages[index] = await self.sources[index].oldest_age()

        async with trio.open_nursery() as nursery:
            for index in range(len(self.sources)):
                nursery.start_soon(read_one, index)
        known = [age for age in ages if age is not None]
        return max(known) if known else None

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            for part in self.sources:
                await stack.enter_async_context(part)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)
        else:
            await self._close()

    async def _close(self) -> None:
        # Not entered (or closed with aclose()): close each part, the last first.
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
            return
        for part in reversed(self.sources):
            await part.aclose()
