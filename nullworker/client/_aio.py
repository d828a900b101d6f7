"""The one bridge from Trio to asyncio libraries (redis.asyncio, nats-py), via trio-asyncio.

Nothing else in the package imports ``asyncio`` or ``trio_asyncio``: code that needs an
asyncio library writes a plain ``async def`` that awaits only that library, and calls
it from Trio with :func:`run_aio`::

    async with open_asyncio_loop():
        n = await run_aio(client.llen, "jobs")

Concurrency invariants
----------------------
* The asyncio loop runs *inside* the Trio run, in the task that opened it, and lives
  exactly as long as the ``async with open_asyncio_loop()`` block. Closing it cancels
  the asyncio tasks still running on it and waits for them.
* Only one trio-asyncio loop is open per task context: :func:`open_asyncio_loop` reuses
  the one already open (opened by this task or inherited by a child task started inside
  the block) instead of nesting another one.
* :func:`run_aio` is cancellable like any Trio call. Cancelling it cancels the asyncio
  task (one ``asyncio.CancelledError`` thrown into the coroutine) and **waits for that
  task to finish**, so the asyncio side has run its ``finally`` blocks and closed what it
  had to close before Trio sees ``trio.Cancelled``. A coroutine that ignores the
  cancellation therefore delays it: code run through here must not swallow
  ``CancelledError``.
* An :class:`AsyncioClient` holds one client across calls: made on the loop at the
  first call, thrown away after any call that fails (cancelled ones included) and
  closed then, shielded and bounded, so that the next call connects anew. The only
  failures that keep it are those its owner names (``keep_after``): answers the server
  gave on a connection that is fine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Generic, Self, TypeVar, TypeVarTuple

import trio
import trio_asyncio

from ._redact import reason

__all__ = [
    "CLOSE_TIMEOUT_S",
    "AsyncioClient",
    "AsyncioLoop",
    "close_aio_quietly",
    "current_asyncio_loop",
    "open_asyncio_loop",
    "run_aio",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
C = TypeVar("C")

#: Bound on closing a client that is being thrown away (shielded from cancellation).
CLOSE_TIMEOUT_S = 1.0

#: The loop object handed out (a ``trio_asyncio.TrioEventLoop``).
AsyncioLoop = asyncio.AbstractEventLoop


def current_asyncio_loop() -> AsyncioLoop | None:
    """The trio-asyncio loop open in this task's context, or None."""
    loop: AsyncioLoop | None = trio_asyncio.current_loop.get()
    if loop is None or loop.is_closed():
        return None
    return loop


@asynccontextmanager
async def open_asyncio_loop() -> AsyncIterator[AsyncioLoop]:
    """Make an asyncio event loop available to this block, on top of the Trio run.

    Reuses the loop already open in this context (then leaving the block does not
    close it); otherwise opens one with ``trio_asyncio.open_loop()`` and closes it on
    the way out, after cancelling and awaiting whatever asyncio tasks it still runs.

    Yields:
      The loop, to pass to :func:`run_aio` from tasks that do not inherit it (tasks
      started in a nursery opened *outside* the block).
    """
    loop = current_asyncio_loop()
    if loop is not None:
        yield loop
        return
    async with trio_asyncio.open_loop() as new_loop:
        yield new_loop


async def run_aio(
    async_fn: Callable[[*Ts], Awaitable[T]],
    *args: *Ts,
    loop: AsyncioLoop | None = None,
) -> T:
    """Run the asyncio coroutine function ``async_fn(*args)`` to completion from Trio.

    ``async_fn`` is called inside the asyncio task, so the coroutine is created (and
    anything it creates lazily, such as a client) in asyncio context.

    Args:
      async_fn: an asyncio-flavoured coroutine function.
      *args: its positional arguments (use ``functools.partial`` for keywords).
      loop: the loop to run on; by default the one open in this task's context.

    Returns:
      What the coroutine returned; its exception, if it raised one, is raised here.

    Raises:
      RuntimeError: no loop was given and none is open in this context.
      trio.Cancelled: the surrounding Trio scope was cancelled. The asyncio task was
        cancelled and has finished by then.
    """
    if loop is None:
        loop = current_asyncio_loop()
        if loop is None:
            raise RuntimeError(
                "no asyncio loop is open here: wrap the caller in `async with open_asyncio_loop():`"
            )
    result: T = await trio_asyncio.aio_as_trio(async_fn, loop=loop)(*args)
    return result


async def close_aio_quietly(
    close: Callable[[C], Awaitable[object]],
    client: C,
    *,
    loop: AsyncioLoop,
    what: str,
    kind: str = "client",
) -> None:
    """``await close(client)`` on ``loop`` for something being thrown away: shielded
    from cancellation (a cancelled caller still closes what it opened) and bounded by
    :data:`CLOSE_TIMEOUT_S` (a server that hangs cannot hold the caller); a failure to
    close is only logged (debug), as ``"{what}: closing the {kind} failed"``."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await run_aio(close, client, loop=loop)
        except Exception as exc:
            log.debug("%s: closing the %s failed: %s", what, kind, reason(exc))


class AsyncioClient(Generic[C]):
    """One client of an asyncio library (a ``redis.asyncio.Redis``), kept across calls
    made from Trio: the lifecycle every such client needs, written once.

    * ``async with client:`` (or :meth:`open`) opens the trio-asyncio loop, or reuses
      the one open in this context; leaving it (or :meth:`aclose`) closes the client,
      then the loop if this opened it.
    * :meth:`run` calls ``fn(client, *args)`` on that loop. The client is made there by
      ``new()`` at the first call (without I/O: it connects on first use).
    * A call that fails in any way, ``trio.Cancelled`` included, throws the client away
      (:meth:`drop`), so that the next call connects anew: one failed call is what a
      server restart or a half-read answer costs, and no connection is left in an
      unknown state. Only the exceptions of ``keep_after`` keep it.

    Args:
      new: makes a new client, not connected yet; called on the asyncio loop.
      close: closes a client (``redis.asyncio.Redis.aclose``); run on the loop.
      what: what the client talks to, for messages (never a password).
      keep_after: exceptions that leave the client held: those ``fn`` raises for an
        answer the server gave (a wrong type, a missing stream), after which the
        connection is known to be fine and reconnecting would only cost a round trip.
      usable: checks a held client on the loop before each call (no I/O: a flag the
        library keeps, such as "closed by the server"); one it rejects is closed there
        and a new one made, so a connection the server ended between calls costs no
        failed call.
    """

    def __init__(
        self,
        new: Callable[[], C],
        *,
        close: Callable[[C], Awaitable[object]],
        what: str,
        keep_after: tuple[type[BaseException], ...] = (),
        usable: Callable[[C], bool] | None = None,
    ) -> None:
        self._new = new
        self._close = close
        self.what = what
        self._keep_after = keep_after
        self._usable = usable
        self._client: C | None = None
        self._loop: AsyncioLoop | None = None
        self._stack = AsyncExitStack()

    async def open(self) -> None:
        """Open the trio-asyncio loop, or reuse the one open in this context; idempotent."""
        if self._loop is None:
            self._loop = await self._stack.enter_async_context(open_asyncio_loop())

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` was called, and :meth:`aclose` not since."""
        return self._loop is not None

    @property
    def loop(self) -> AsyncioLoop | None:
        """The loop :meth:`run` runs on: the one :meth:`open` opened or reused, else the
        one open in the calling task's context; None when there is neither."""
        if self._loop is not None and not self._loop.is_closed():
            return self._loop
        return current_asyncio_loop()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def run(self, fn: Callable[[C, *Ts], Awaitable[T]], *args: *Ts) -> T:
        """``await fn(client, *args)`` on the asyncio loop, with the client held (or a
        new one); cancellable like any Trio call.

        Raises:
          RuntimeError: neither :meth:`open` was called nor is a loop open here.
          BaseException: whatever ``fn`` raised, after the client was thrown away
            (unless it is one of ``keep_after``).
        """
        loop = self.loop
        if loop is None:
            raise RuntimeError(f"{self.what}: no asyncio loop; use `async with` first")
        try:
            return await run_aio(self._aio_run, fn, args, loop=loop)
        except self._keep_after:
            raise
        except BaseException:
            await self.drop()
            raise

    async def _aio_run(self, fn: Callable[[C, *Ts], Awaitable[T]], args: tuple[*Ts]) -> T:
        client = self._client
        if client is not None and self._usable is not None and not self._usable(client):
            # Forgotten before the close: a close that fails leaves nothing held. Not
            # shielded: it is part of this call, and bounded by the caller's deadline.
            self._client = None
            await self._close(client)
            client = None
        if client is None:
            client = self._client = self._new()
        return await fn(client, *args)

    async def drop(self) -> None:
        """Throw the client away: close it, shielded from cancellation and bounded by
        :data:`CLOSE_TIMEOUT_S`; a failure to close is only logged (debug)."""
        client, self._client = self._client, None
        loop = self.loop
        if client is None or loop is None:
            return
        await close_aio_quietly(self._close, client, loop=loop, what=self.what)

    async def aclose(self) -> None:
        """Close the client, then the loop if :meth:`open` opened it. Call it from the
        task that opened it; the client can be opened again afterwards."""
        try:
            await self.drop()
        finally:
            self._loop = None
            await self._stack.aclose()
