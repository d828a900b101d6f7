"""Demand sources: how many jobs a queue holds right now.

``nullworker autoscale`` holds one reservation per job; a demand source tells it how
many that is. Every source has the same small interface::

    async with RedisList("redis://:secret@queue:6379/0", "jobs", "jobs:processing") as source:
        log.info("reading demand from %s", source.describe())  # no password in it
        n = await source.read()                                 # an int >= 0

Sources
-------
* :class:`RedisList` — ``LLEN key`` (+ ``LLEN processing``), one round trip.
* :class:`RedisStream` — a consumer group's ``lag`` + ``pending`` (``XINFO GROUPS``).
* :class:`NatsConsumer` — a JetStream consumer's ``num_pending + num_ack_pending``.
* :class:`CommandDemand` — a shell command that prints one integer.
* :class:`CallableDemand` — any async function returning an int.

Errors
------
::

    DemandError            a read failed; the message names the source (password-free) and why
    ├── DemandTimeout      no answer within the source's timeout_s
    └── DemandNotFound     the stream, group or consumer to read does not exist

A failed read raises a :class:`DemandError` (with the library's exception as
``__cause__``) and nothing else: a caller logs it and tries again on its next poll.
Programming errors are not demand errors: a bad URL or name raises ``ValueError`` in the
constructor, and reading a closed source raises ``trio.ClosedResourceError``.

Concurrency invariants
----------------------
* Every :meth:`DemandSource.read` is bounded by the source's ``timeout_s`` (a Trio cancel
  scope), so a server that accepts connections and never answers cannot stall the
  caller. Reads of one source are serialized (a lock): a second concurrent read waits
  for the first, and its wait counts against its own timeout.
* Redis and NATS clients are asyncio libraries, run through :mod:`nullworker.client._aio`.
  ``async with source:`` opens (or reuses) the trio-asyncio loop; the client itself is
  created lazily inside that loop by the first read.
* A read that fails for any reason other than the server's own answer (connection
  refused or lost, timeout, cancellation) throws the client away, closing it under a
  short shielded bound. The next read connects anew: a source recovers from a server
  restart by itself, with no background reconnect loop and no state left over from a
  request that was cut off half-way.
* ``trio.Cancelled`` is never swallowed or turned into a :class:`DemandError`. A
  cancelled read leaves the source usable.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
import redis.asyncio
import redis.exceptions
import trio
from nats.aio.client import Client as NatsClient
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import DemandError, DemandNotFound, DemandTimeout
from ._aio import AsyncioLoop, current_asyncio_loop, open_asyncio_loop, run_aio
from ._redact import redact

__all__ = [
    "CallableDemand",
    "CommandDemand",
    "DemandError",
    "DemandNotFound",
    "DemandSource",
    "DemandTimeout",
    "NatsConsumer",
    "RedisList",
    "RedisStream",
    "redact",
]

log = logging.getLogger("nullworker.demand")

#: Default bound on one read of a queue server.
DEFAULT_TIMEOUT_S = 5.0
#: Default bound on one run of a demand command (then it is killed).
COMMAND_TIMEOUT_S = 10.0
#: Bound on closing a client that is being thrown away (shielded from cancellation).
CLOSE_TIMEOUT_S = 1.0
#: RedisStream without a usable ``lag``: entries fetched per XRANGE while counting ...
STREAM_SCAN_BATCH = 1000
#: ... and the count at which it stops (the demand then reads as this number).
STREAM_SCAN_LIMIT = 10_000
#: How much of a command's stdout is kept (a count is a few bytes; the rest is drained).
COMMAND_STDOUT_LIMIT = 4096
#: How much of the end of a command's stderr goes into an error message.
COMMAND_STDERR_TAIL = 500

_NATS_STREAM_NOT_FOUND = 10059
_NATS_CONSUMER_NOT_FOUND = 10014
#: Characters NATS refuses in stream and consumer names.
_NATS_BAD_NAME_CHARS = frozenset(">*. /\\\t\r\n")


# -- the interface ---------------------------------------------------------------------


def _check_count(value: object, source: str) -> int:
    # bool is an int subclass, and True is no job count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise DemandError(f"{source}: got {value!r} ({type(value).__name__}), not an int")
    if value < 0:
        raise DemandError(f"{source}: got {value}, a negative count")
    return value


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return redact(f"{name}: {text}" if text else name)


class DemandSource(ABC):
    """A number of jobs to read, at most ``timeout_s`` per read.

    Subclasses implement :meth:`describe` and ``_read`` (one unbounded attempt), and may
    override ``_close``. Exceptions of the types in ``_wrapped_errors`` raised by
    ``_read`` become :class:`DemandError` (:class:`DemandTimeout` for timeouts).
    """

    #: What ``_read`` may raise that means "this read failed" rather than a bug.
    _wrapped_errors: ClassVar[tuple[type[BaseException], ...]] = ()

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
                    kind = DemandTimeout if _is_timeout(exc) else DemandError
                    raise kind(f"{self.describe()}: {_reason(exc)}") from exc
                return _check_count(value, self.describe())
            raise DemandTimeout(self._timeout_message())

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


def _is_timeout(exc: BaseException) -> bool:
    # asyncio.TimeoutError is TimeoutError (3.11+); nats' TimeoutError subclasses it.
    return isinstance(exc, TimeoutError | redis.exceptions.TimeoutError)


# -- asyncio-backed sources ------------------------------------------------------------

C = TypeVar("C")


class _AsyncioSource(DemandSource, Generic[C]):
    """A source whose client is an asyncio library object of type ``C``.

    ``_aio_*`` methods run on the asyncio loop (through :func:`run_aio`); the others run
    in Trio. ``_aio_query`` raises :class:`DemandError` for an answer the server gave
    (the client is kept) and lets transport errors through (the client is dropped).
    """

    _scheme_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str, *, timeout_s: float) -> None:
        super().__init__(timeout_s=timeout_s)
        if urlsplit(url).scheme not in self._scheme_names:
            raise ValueError(
                f"{redact(url)!r}: the URL scheme must be one of {', '.join(self._scheme_names)}"
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
        client = self._client
        if client is not None and not self._usable(client):
            self._client = None
            await self._aio_close(client)
            client = None
        if client is None:
            client = self._client = self._new_client()
        return await self._aio_query(client)

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        loop = self._current_loop()
        if client is None or loop is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await run_aio(self._aio_close, client, loop=loop)
            except Exception as exc:
                log.debug("%s: closing the client failed: %s", self.describe(), _reason(exc))

    async def _close(self) -> None:
        try:
            await self._drop_client()
        finally:
            self._loop = None
            await self._stack.aclose()


class _RedisSource(_AsyncioSource[redis.asyncio.Redis]):
    _scheme_names = ("redis", "rediss", "unix")
    _wrapped_errors = (redis.exceptions.RedisError, OSError, TimeoutError)

    def _new_client(self) -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            # One immediate retry: the pooled connection may predate a server restart
            # (the retry reconnects); more would only spend the read's time budget.
            retry=Retry(NoBackoff(), 1),
            client_name="nullworker-demand",
        )

    async def _aio_close(self, client: redis.asyncio.Redis) -> None:
        await client.aclose()

    def _answer_error(self, exc: redis.exceptions.ResponseError) -> DemandError:
        return DemandError(f"{self.describe()}: the server answered {_reason(exc)}")


class RedisList(_RedisSource):
    """The length of a Redis list, plus that of its "processing" list when given.

    The usual Redis work queue: producers ``LPUSH`` jobs onto ``key``, consumers
    ``BLMOVE`` them onto ``processing`` while they work and ``LREM`` them when done.
    Demand is ``LLEN key + LLEN processing``, read in one round trip (a pipeline). A
    missing key is an empty list (0), as in Redis.

    Args:
      url: ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``, ``unix://``).
      key: the list of waiting jobs.
      processing: the list of jobs being worked on, if any.
      timeout_s: bound on one read.
    """

    def __init__(
        self,
        url: str,
        key: str,
        processing: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not key or processing == "":
            raise ValueError("RedisList needs a key (and a non-empty processing key if any)")
        super().__init__(url, timeout_s=timeout_s)
        self.key = key
        self.processing = processing

    def describe(self) -> str:
        keys = repr(self.key) if self.processing is None else f"{self.key!r} + {self.processing!r}"
        return f"redis list {keys} at {redact(self.url)}"

    async def _aio_query(self, client: redis.asyncio.Redis) -> int:
        keys = [self.key] if self.processing is None else [self.key, self.processing]
        try:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                lengths: list[Any] = await pipe.execute()
        except redis.exceptions.ResponseError as exc:
            # WRONGTYPE and the like: the server answered, the connection is fine.
            raise self._answer_error(exc) from exc
        return sum(int(length) for length in lengths)


class RedisStream(_RedisSource):
    """Entries of a Redis stream that a consumer group has not finished with.

    Demand is the group's ``lag`` (entries not yet delivered to any consumer of the
    group) plus its ``pending`` (delivered, not yet acknowledged), both from one
    ``XINFO GROUPS``.

    Redis reports ``lag`` as null when it cannot compute it: the group was created at
    (or moved to) an arbitrary ID, or entries after the group's last-delivered-id were
    deleted (``XDEL``); Redis before 7.0 has no ``lag`` at all. The source then counts
    the entries after last-delivered-id itself with ``XRANGE`` (Redis 6.2+), in batches
    of :data:`STREAM_SCAN_BATCH`, and stops at ``scan_limit``: past that, the lag reads
    as ``scan_limit`` (set it above the most reservations you would ever hold). Such a
    read costs a few more round trips and transfers the entries' fields.

    Args:
      url: ``redis://…`` as for :class:`RedisList`.
      stream: the stream's key.
      group: the consumer group.
      timeout_s: bound on one read.
      scan_limit: the cap on counting entries when ``lag`` is unknown.

    A missing stream or group raises :class:`DemandNotFound`.
    """

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        scan_limit: int = STREAM_SCAN_LIMIT,
    ) -> None:
        if not stream or not group:
            raise ValueError("RedisStream needs a stream and a group")
        if isinstance(scan_limit, bool) or not isinstance(scan_limit, int) or scan_limit < 1:
            raise ValueError(f"scan_limit must be an int >= 1, not {scan_limit!r}")
        super().__init__(url, timeout_s=timeout_s)
        self.stream = stream
        self.group = group
        self.scan_limit = scan_limit

    def describe(self) -> str:
        return f"redis stream {self.stream!r} group {self.group!r} at {redact(self.url)}"

    async def _aio_query(self, client: redis.asyncio.Redis) -> int:
        try:
            groups = await client.xinfo_groups(self.stream)
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                raise DemandNotFound(
                    f"{self.describe()}: the stream {self.stream!r} does not exist"
                ) from exc
            raise self._answer_error(exc) from exc
        for info in groups:
            if info.get("name") == self.group:
                break
        else:
            raise DemandNotFound(
                f"{self.describe()}: the stream has no consumer group {self.group!r}"
            )
        pending = int(info["pending"])
        lag = info.get("lag")
        if lag is None:
            lag = await self._aio_count_after(client, str(info["last-delivered-id"]))
        return int(lag) + pending

    async def _aio_count_after(self, client: redis.asyncio.Redis, last_id: str) -> int:
        count = 0
        start = f"({last_id}"  # exclusive range start (Redis 6.2+)
        while count < self.scan_limit:
            want = min(STREAM_SCAN_BATCH, self.scan_limit - count)
            try:
                batch = await client.xrange(self.stream, min=start, max="+", count=want) or []
            except redis.exceptions.ResponseError as exc:
                raise self._answer_error(exc) from exc
            count += len(batch)
            if len(batch) < want:
                break
            last = batch[-1][0]
            start = f"({last.decode() if isinstance(last, bytes) else last}"
        return count


class NatsConsumer(_AsyncioSource[NatsClient]):
    """Messages a NATS JetStream durable consumer has not finished with.

    Demand is the consumer's ``num_pending`` (messages in its stream not yet delivered
    to it) plus ``num_ack_pending`` (delivered, not yet acknowledged), from one consumer
    info request.

    The client connects without nats-py's own reconnect loop: when the server goes away
    the connection closes, the read fails with :class:`DemandError`, and the next read
    connects anew. (A server that dies while a request is in flight leaves that request
    unanswered: the read ends as a :class:`DemandTimeout`.)

    Args:
      url: ``nats://[user:password@ | token@]host[:port]`` (or ``tls://``, ``ws://``,
        ``wss://``).
      stream: the JetStream stream.
      consumer: the durable consumer.
      timeout_s: bound on one read (connecting included).

    A missing stream or consumer raises :class:`DemandNotFound`.
    """

    _scheme_names = ("nats", "tls", "ws", "wss")
    _wrapped_errors = (nats.errors.Error, OSError, TimeoutError)

    def __init__(
        self,
        url: str,
        stream: str,
        consumer: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        for what, name in (("stream", stream), ("consumer", consumer)):
            if not name or _NATS_BAD_NAME_CHARS.intersection(name):
                raise ValueError(f"invalid NATS {what} name: {name!r}")
        super().__init__(url, timeout_s=timeout_s)
        self.stream = stream
        self.consumer = consumer
        self._connect_error: Exception | None = None

    def describe(self) -> str:
        return f"nats consumer {self.consumer!r} on stream {self.stream!r} at {redact(self.url)}"

    def _new_client(self) -> NatsClient:
        return NatsClient()

    def _usable(self, client: NatsClient) -> bool:
        return not client.is_closed

    async def _aio_on_error(self, exc: Exception) -> None:
        # nats-py reports connection trouble here as well as raising it; the read's
        # DemandError is what callers see, so this stays at debug level.
        self._connect_error = exc
        log.debug("%s: %s", self.describe(), _reason(exc))

    async def _aio_query(self, client: NatsClient) -> int:
        if not client.is_connected:
            self._connect_error = None
            try:
                await client.connect(
                    servers=[self.url],
                    name="nullworker-demand",
                    allow_reconnect=False,
                    # nats-py tries each server up to max_reconnect_attempts + 1 times
                    # before NoServersError (0 means forever), reconnect_time_wait apart.
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    connect_timeout=max(1, math.ceil(self.timeout_s)),
                    error_cb=self._aio_on_error,
                )
            except nats.errors.NoServersError:
                # Say why (connection refused, ...) rather than "no servers available".
                last, self._connect_error = self._connect_error, None
                if isinstance(last, OSError | TimeoutError | nats.errors.Error):
                    raise last from None
                raise
        try:
            info = await client.jsm(timeout=self.timeout_s).consumer_info(
                self.stream, self.consumer, timeout=self.timeout_s
            )
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _NATS_STREAM_NOT_FOUND:
                what = f"the stream {self.stream!r} does not exist"
            elif exc.err_code == _NATS_CONSUMER_NOT_FOUND:
                what = f"the stream has no consumer {self.consumer!r}"
            else:
                what = f"not found ({exc.description})"
            raise DemandNotFound(f"{self.describe()}: {what}") from exc
        except nats.js.errors.APIError as exc:
            raise DemandError(f"{self.describe()}: the server answered {_reason(exc)}") from exc
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    async def _aio_close(self, client: NatsClient) -> None:
        await client.close()


# -- a command, a callable -------------------------------------------------------------


def _kill_group(process: trio.Process) -> None:
    # The command runs as the leader of its own process group, so this also reaches
    # the children a shell started (a pipeline, a subshell).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _collect(stream: trio.abc.ReceiveStream, into: bytearray, limit: int) -> None:
    """Read ``stream`` to its end, keeping its first ``limit`` bytes in ``into``."""
    while chunk := await stream.receive_some(65536):
        if len(into) < limit:
            into += chunk[: limit - len(into)]


async def _collect_tail(stream: trio.abc.ReceiveStream, into: bytearray, limit: int) -> None:
    """Read ``stream`` to its end, keeping its last ``limit`` bytes in ``into``."""
    while chunk := await stream.receive_some(65536):
        into += chunk
        del into[:-limit]


def _tail(data: bytes | bytearray) -> str:
    text = bytes(data).decode("utf-8", "replace").strip()
    if not text:
        return "nothing on stderr"
    if len(data) >= COMMAND_STDERR_TAIL:
        text = "…" + text
    return f"stderr: {redact(text)!r}"


class CommandDemand(DemandSource):
    """The integer a shell command prints.

    Each read runs ``cmd`` with ``/bin/sh -c`` (inheriting the environment, stdin from
    /dev/null) and parses its stdout, stripped, as one non-negative decimal integer::

        CommandDemand("redis-cli -h queue LLEN jobs")
        CommandDemand("aws sqs get-queue-attributes ... --query ... --output text")

    A non-zero exit, output that is not such an integer, or a run longer than
    ``timeout_s`` raises :class:`DemandError` (:class:`DemandTimeout` for the last)
    whose message ends with the tail of the command's stderr. On a timeout or a
    cancellation the command's whole process group is killed (SIGKILL): it runs in a
    new session so that the shell's children go too.

    Args:
      cmd: the shell command line.
      timeout_s: bound on one run.
    """

    def __init__(self, cmd: str, *, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        if not cmd.strip():
            raise ValueError("CommandDemand needs a command")
        super().__init__(timeout_s=timeout_s)
        self.cmd = cmd
        self._stderr = bytearray()

    def describe(self) -> str:
        shown = self.cmd if len(self.cmd) <= 200 else self.cmd[:199] + "…"
        return f"command {redact(shown)!r}"

    def _timeout_message(self) -> str:
        return (
            f"{self.describe()}: did not finish within {self.timeout_s:g} s and was killed "
            f"({_tail(self._stderr)})"
        )

    async def _read(self) -> int:
        stdout = bytearray()
        stderr = self._stderr = bytearray()
        try:
            process = await trio.lowlevel.open_process(
                self.cmd,
                shell=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise DemandError(f"{self.describe()}: could not start: {_reason(exc)}") from exc
        assert process.stdout is not None and process.stderr is not None
        try:
            async with process.stdout, process.stderr, trio.open_nursery() as nursery:
                nursery.start_soon(_collect, process.stdout, stdout, COMMAND_STDOUT_LIMIT)
                nursery.start_soon(_collect_tail, process.stderr, stderr, COMMAND_STDERR_TAIL)
            returncode = await process.wait()
        except BaseException:
            # Cut off (timeout or cancellation): kill the group, stragglers included,
            # and reap the shell before the exception goes on.
            _kill_group(process)
            with trio.CancelScope(shield=True):
                await process.wait()
            raise
        if returncode != 0:
            if returncode < 0:
                try:
                    how = f"was killed by {signal.Signals(-returncode).name}"
                except ValueError:
                    how = f"was killed by signal {-returncode}"
            else:
                how = f"exited with status {returncode}"
            raise DemandError(f"{self.describe()}: {how} ({_tail(stderr)})")
        text = bytes(stdout).decode("utf-8", "replace").strip()
        if not re.fullmatch(r"[0-9]+", text):
            shown = text if len(text) <= 80 else text[:79] + "…"
            said = f"printed {shown!r}" if text else "printed nothing"
            raise DemandError(
                f"{self.describe()}: {said}, not a non-negative integer ({_tail(stderr)})"
            )
        return int(text)


class CallableDemand(DemandSource):
    """Demand from an async function: ``await fn()`` must return an int >= 0.

    For queues with no built-in source::

        async def sqs_depth() -> int: ...
        source = CallableDemand(sqs_depth)

    A result that is not an int (``True`` and ``3.0`` are refused) or is negative, and
    any ``Exception`` the function raises, become :class:`DemandError` (the function's
    exception as ``__cause__``); ``trio.Cancelled`` and other ``BaseException`` pass
    through. ``fn`` runs in Trio: to call an asyncio library, go through
    ``nullworker.client._aio``.

    Args:
      fn: a Trio-flavoured async function of no arguments.
      timeout_s: bound on one call.
      name: what :meth:`describe` calls it (default: the function's qualified name).
    """

    _wrapped_errors = (Exception,)

    def __init__(
        self,
        fn: Callable[[], Awaitable[int]],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise ValueError(f"CallableDemand needs an async function, not {fn!r}")
        super().__init__(timeout_s=timeout_s)
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__qualname__", repr(fn))

    def describe(self) -> str:
        return f"callable {redact(self.name)}"

    async def _read(self) -> int:
        return await self.fn()
