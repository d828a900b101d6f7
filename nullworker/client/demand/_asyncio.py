"""Sources whose client is an asyncio library, run through the trio-asyncio bridge."""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable
from functools import cached_property
from typing import Any, ClassVar, Generic, Self, TypeVar

import trio

from ...errors import DemandError
from .._aio import AsyncioClient, AsyncioLoop, close_aio_quietly, run_aio
from .._redact import reason
from .._urls import check_url
from ._base import (
    WATCH_BACKOFF_FIRST_S,
    WATCH_BACKOFF_MAX_S,
    WATCH_HEALTHY_S,
    DemandSource,
)

log = logging.getLogger("nullworker.demand")

#: A subscription the server cannot give now (Redis with keyspace notifications off) is
#: asked for again after this, quietly: it may have been turned on meanwhile.
UNAVAILABLE_RECHECK_S = 60.0


class SubscriptionLost(Exception):
    """The server ended a push subscription (it closed the connection)."""


# -- asyncio-backed sources ------------------------------------------------------------

C = TypeVar("C")


class AsyncioSource(DemandSource, Generic[C]):
    """A source whose client is an asyncio library object of type ``C``.

    ``_aio_*`` methods run on the asyncio loop (through :func:`run_aio`); the others run
    in Trio. ``_aio_query`` raises :class:`DemandError` for an answer the server gave
    (the client is kept) and lets transport errors through (the client is dropped).
    The client's lifecycle (the loop, made at the first read, thrown away after a
    failure, closed shielded and bounded) is an :class:`~.._aio.AsyncioClient`'s.
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

    @cached_property
    def _client(self) -> AsyncioClient[C]:
        # Made at first use, not in __init__: describe() needs the subclass's attributes.
        return AsyncioClient(
            self._new_client,
            close=self._aio_close,
            what=self.describe(),
            keep_after=(DemandError,),
            usable=self._usable,
        )

    @abstractmethod
    def _new_client(self) -> C:
        """A new, not yet connected client (no I/O): called on the asyncio loop."""

    @abstractmethod
    async def _aio_query(self, client: C) -> int: ...

    @abstractmethod
    async def _aio_close(self, client: C) -> None: ...

    def _usable(self, client: C) -> bool:
        """Whether a kept client can serve the next read (on the loop, no I/O); one that
        cannot (its server closed it) is closed and replaced before the read."""
        return True

    # -- push (see DemandSource.watch) -----------------------------------------------------
    #
    # A subclass that can push overrides can_push() and the three hooks below. The
    # subscription has a connection of its own, never the reads' client: a read must not
    # wait behind notifications, and losing one must not throw the other away.

    async def _aio_subscribe(self, changed: Callable[[], None], lost: Callable[[], None]) -> Any:
        """On the asyncio loop: connect and subscribe. Call ``changed()`` for every
        notification and ``lost()`` if the server closes the subscription. Returns a
        handle for :meth:`_follow` and :meth:`_aio_unsubscribe`, or None when the server
        cannot push now (say why in the log, once)."""
        raise NotImplementedError

    async def _aio_unsubscribe(self, handle: Any) -> None:
        """On the asyncio loop: close what :meth:`_aio_subscribe` opened."""
        raise NotImplementedError

    async def _follow(
        self, handle: Any, changed: Callable[[], None], lost: trio.Event, loop: AsyncioLoop
    ) -> None:
        """In Trio: wait until the subscription is lost, and raise why.

        By default the client calls back (``lost``); a client that must be read for its
        notifications (Redis pub/sub) reads here instead.
        """
        await lost.wait()
        raise SubscriptionLost("the server closed the connection")

    async def watch(self, changed: Callable[[], None]) -> None:
        if self._closed or not self.can_push():
            return
        loop = self._client.loop
        if loop is None:
            log.warning(
                "%s: no asyncio loop (use `async with source:`); polling only", self.describe()
            )
            return
        failures = 0
        while True:
            lost = trio.Event()
            started = trio.current_time()
            handle: Any = None
            try:
                with trio.fail_after(self.timeout_s):
                    handle = await run_aio(self._aio_subscribe, changed, lost.set, loop=loop)
                if handle is None:
                    failures = 0
                    await trio.sleep(UNAVAILABLE_RECHECK_S)
                    continue
                if failures:
                    # At the loss's level: whoever saw that it was lost sees it is back.
                    log.warning("%s: push subscription restored", self.describe())
                # What happened while we were not subscribed went unheard: read now.
                changed()
                await self._follow(handle, changed, lost, loop)
                raise SubscriptionLost("the subscription ended")
            except trio.TooSlowError:
                error = f"no subscription within {self.timeout_s:g} s"
            except Exception as exc:
                error = reason(exc)
            finally:
                if handle is not None:
                    await close_aio_quietly(
                        self._aio_unsubscribe,
                        handle,
                        loop=loop,
                        what=self.describe(),
                        kind="subscription",
                    )
            if trio.current_time() - started >= WATCH_HEALTHY_S:
                failures = 0
            failures += 1
            delay = min(WATCH_BACKOFF_FIRST_S * 2.0 ** min(failures - 1, 32), WATCH_BACKOFF_MAX_S)
            # Once per streak: a server that stays down must not fill the log.
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(
                level,
                "%s: no push subscription (%s); polling meanwhile, retrying in %.1f s",
                self.describe(),
                error,
                delay,
            )
            await trio.sleep(delay)

    async def __aenter__(self) -> Self:
        if self._closed:
            raise trio.ClosedResourceError(f"{self.describe()} is closed")
        if self._client.is_open:
            raise RuntimeError(f"{self.describe()} is already entered")
        await self._client.open()
        return self

    async def _read(self) -> int:
        if self._client.loop is None:
            raise RuntimeError(
                f"{self.describe()}: no asyncio loop; use `async with source:` "
                "(or read inside `async with open_asyncio_loop():`)"
            )
        return await self._client.run(self._aio_query)

    async def _aio_oldest_age(self, client: C) -> float | None:
        """The oldest waiting job's age (on the asyncio loop); ``None``: cannot tell."""
        return None

    async def _oldest_age(self) -> float | None:
        if self._client.loop is None or type(self)._aio_oldest_age is AsyncioSource._aio_oldest_age:
            # No loop, or a source that cannot tell: no round trip for nothing.
            return None
        return await self._client.run(self._aio_oldest_age)

    async def _close(self) -> None:
        await self._client.aclose()
