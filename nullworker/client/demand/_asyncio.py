"""Sources whose client is an asyncio library, run through the trio-asyncio bridge."""

from __future__ import annotations

import logging
from abc import abstractmethod
from contextlib import AsyncExitStack
from typing import ClassVar, Generic, Self, TypeVar

import trio

from ...errors import DemandError
from .._aio import AsyncioLoop, current_asyncio_loop, open_asyncio_loop, run_aio
from .._redact import reason
from .._urls import check_url
from ._base import CLOSE_TIMEOUT_S, DemandSource

log = logging.getLogger("nullworker.demand")


# -- asyncio-backed sources ------------------------------------------------------------

C = TypeVar("C")


class AsyncioSource(DemandSource, Generic[C]):
    """A source whose client is an asyncio library object of type ``C``.

    ``_aio_*`` methods run on the asyncio loop (through :func:`run_aio`); the others run
    in Trio. ``_aio_query`` raises :class:`DemandError` for an answer the server gave
    (the client is kept) and lets transport errors through (the client is dropped).
    """

    _scheme_names: ClassVar[tuple[str, ...]] = ()
    #: Those of ``_scheme_names`` that name a Unix socket by path instead of a host.
    _socket_schemes: ClassVar[tuple[str, ...]] = ()
    #: Whether the URL's path, if any, is a database number (``redis://host/0``).
    _numeric_path: ClassVar[bool] = False

    def __init__(self, url: str, *, timeout_s: float) -> None:
        super().__init__(timeout_s=timeout_s)
        # Refused here, not at the first read: see nullworker.client._urls.
        check_url(
            url,
            schemes=self._scheme_names,
            socket_schemes=self._socket_schemes,
            numeric_path=self._numeric_path,
        )
        self.url = url
        self._client: C | None = None
        self._loop: AsyncioLoop | None = None
        self._stack = AsyncExitStack()

    @abstractmethod
    def _new_client(self) -> C:
        """A new, not yet connected client (no I/O): called on the asyncio loop."""

    @abstractmethod
    async def _aio_query(self, client: C) -> int: ...

    @abstractmethod
    async def _aio_close(self, client: C) -> None: ...

    def _usable(self, client: C) -> bool:
        return True

    async def __aenter__(self) -> Self:
        if self._closed:
            raise trio.ClosedResourceError(f"{self.describe()} is closed")
        if self._loop is not None:
            raise RuntimeError(f"{self.describe()} is already entered")
        self._loop = await self._stack.enter_async_context(open_asyncio_loop())
        return self

    def _current_loop(self) -> AsyncioLoop | None:
        if self._loop is not None and not self._loop.is_closed():
            return self._loop
        return current_asyncio_loop()

    async def _read(self) -> int:
        loop = self._current_loop()
        if loop is None:
            raise RuntimeError(
                f"{self.describe()}: no asyncio loop; use `async with source:` "
                "(or read inside `async with open_asyncio_loop():`)"
            )
        try:
            return await run_aio(self._aio_read, loop=loop)
        except DemandError:
            raise
        except BaseException:
            await self._drop_client()
            raise

    async def _aio_read(self) -> int:
        return await self._aio_query(await self._aio_client())

    async def _aio_client(self) -> C:
        client = self._client
        if client is not None and not self._usable(client):
            self._client = None
            await self._aio_close(client)
            client = None
        if client is None:
            client = self._client = self._new_client()
        return client

    async def _aio_oldest_age(self, client: C) -> float | None:
        """The oldest waiting job's age (on the asyncio loop); ``None``: cannot tell."""
        return None

    async def _oldest_age(self) -> float | None:
        loop = self._current_loop()
        if loop is None or type(self)._aio_oldest_age is AsyncioSource._aio_oldest_age:
            # No loop, or a source that cannot tell: no round trip for nothing.
            return None
        try:
            return await run_aio(self._aio_age, loop=loop)
        except DemandError:
            raise
        except BaseException:
            await self._drop_client()
            raise

    async def _aio_age(self) -> float | None:
        return await self._aio_oldest_age(await self._aio_client())

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        loop = self._current_loop()
        if client is None or loop is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await run_aio(self._aio_close, client, loop=loop)
            except Exception as exc:
                log.debug("%s: closing the client failed: %s", self.describe(), reason(exc))

    async def _close(self) -> None:
        try:
            await self._drop_client()
        finally:
            self._loop = None
            await self._stack.aclose()
