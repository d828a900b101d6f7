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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar, TypeVarTuple

import trio_asyncio

__all__ = ["AsyncioLoop", "current_asyncio_loop", "open_asyncio_loop", "run_aio"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

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
