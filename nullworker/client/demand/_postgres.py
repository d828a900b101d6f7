"""The PostgreSQL source: the number one SQL query returns."""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from ...errors import DemandError, DemandTimeout
from .._redact import reason, redact
from ._asyncio import AsyncioSource
from ._base import CLOSE_TIMEOUT_S, DEFAULT_TIMEOUT_S

#: The share of ``timeout_s`` given to the server as ``statement_timeout``: the server
#: cancels a slow query itself, before the read's own timeout cuts the connection.
STATEMENT_TIMEOUT_SHARE = 0.8
#: ``application_name`` of the source's connections (seen in ``pg_stat_activity``).
APPLICATION_NAME = "nullworker-demand"

#: What a dropped or refused connection raises (then the client is thrown away).
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    OSError,
)


@dataclass
class _PgClient:
    """The source's one connection, opened by the first read that needs it."""

    conn: Any = None  # asyncpg.Connection (asyncpg ships no type information)


def _as_count(value: object) -> int | None:
    """``value`` as a job count, or None when it is not a whole number >= 0."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float | decimal.Decimal):
        if not (math.isfinite(value) and value >= 0 and value == int(value)):
            return None
        return int(value)
    return None


class PostgresQuery(AsyncioSource[_PgClient]):
    """The number a PostgreSQL query returns: one row, one column.

    For job queues that live in PostgreSQL tables::

        PostgresQuery(
            "postgresql://demand:secret@db/app",
            "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
        )

    The value must be a whole number >= 0: an integer, or a ``numeric``/``float``
    without a fractional part (``sum()`` of integers is ``numeric``). NULL, a fraction,
    a negative number, text, no row, several rows or several columns are a
    :class:`DemandError`, never 0: put ``coalesce(…, 0)`` in the query where NULL means
    none.

    The query runs on one connection, kept between reads, opened with
    ``statement_timeout`` at :data:`STATEMENT_TIMEOUT_SHARE` of ``timeout_s`` (the server
    cancels a slow query itself, so none is left running; the read is a
    :class:`DemandTimeout`) and ``default_transaction_read_only`` on (a demand query
    reads; a mistaken ``DELETE`` is refused). asyncpg runs through the trio-asyncio
    bridge. A connection the server closed (a restart, ``pg_terminate_backend``) is
    replaced by the next read; any failure on the way (refused, lost, timed out,
    cancelled) throws the connection away, and the next read connects anew.

    With ``age_query``, :meth:`oldest_age` runs it on the same connection: one row, one
    column, the oldest waiting job's age in seconds (a number >= 0), or NULL when none
    waits. For example
    ``SELECT extract(epoch FROM now() - min(created_at)) FROM jobs WHERE status = 'todo'``.

    Args:
      dsn: ``postgresql://[user[:password]@]host[:port]/database[?param=…]`` (libpq's
        URL form, as asyncpg reads it; ``PGPASSWORD``, ``PGUSER``, ``~/.pgpass`` … fill
        what it lacks).
      query: the SQL query (no parameters).
      age_query: the SQL query of the oldest waiting job's age, if any.
      timeout_s: bound on one read (connecting included).
    """

    _scheme_names = ("postgresql", "postgres")
    _wrapped_errors = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
    _timeout_errors = (TimeoutError, asyncpg.QueryCanceledError)

    def __init__(
        self,
        dsn: str,
        query: str,
        *,
        age_query: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not query.strip():
            raise ValueError("PostgresQuery needs a query")
        if age_query is not None and not age_query.strip():
            raise ValueError("PostgresQuery: the age query is empty")
        self.age_query = age_query
        super().__init__(dsn, timeout_s=timeout_s)
        try:
            urlsplit(dsn).port  # noqa: B018  (raises ValueError on a port that is no number)
        except ValueError:
            raise ValueError(f"{redact(dsn)!r}: the port is not a number") from None
        self.query = query
        self._statement_timeout_ms = max(1, int(timeout_s * 1000 * STATEMENT_TIMEOUT_SHARE))

    def describe(self) -> str:
        shown = " ".join(self.query.split())
        shown = shown if len(shown) <= 120 else shown[:119] + "…"
        return f"postgres query {redact(shown)!r} at {redact(self.url)}"

    def _new_client(self) -> _PgClient:
        return _PgClient()

    def _usable(self, client: _PgClient) -> bool:
        return client.conn is None or not client.conn.is_closed()

    async def _aio_connect(self) -> Any:
        return await asyncpg.connect(
            self.url,
            timeout=self.timeout_s,
            # One query, run every poll: nothing to gain from prepared statements, and
            # none left behind for a pooler in transaction mode (PgBouncer) to trip on.
            statement_cache_size=0,
            server_settings={
                "application_name": APPLICATION_NAME,
                "statement_timeout": str(self._statement_timeout_ms),
                "default_transaction_read_only": "on",
            },
        )

    async def _aio_query(self, client: _PgClient) -> int:
        if client.conn is None:
            client.conn = await self._aio_connect()
        return self._count(await self._aio_fetch(client.conn))

    async def _aio_oldest_age(self, client: _PgClient) -> float | None:
        if self.age_query is None:
            return None
        if client.conn is None:
            client.conn = await self._aio_connect()
        rows = await self._aio_fetch(client.conn, self.age_query)
        if len(rows) != 1 or len(rows[0]) != 1:
            raise DemandError(f"{self.describe()}: the age query must return one row, one column")
        value = rows[0][0]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | decimal.Decimal):
            raise DemandError(
                f"{self.describe()}: the age query returned {type(value).__name__}, not seconds"
            )
        return float(value)

    async def _aio_fetch(self, conn: Any, query: str | None = None) -> list[Any]:
        try:
            rows: list[Any] = await conn.fetch(self.query if query is None else query)
        except asyncpg.QueryCanceledError as exc:
            raise DemandTimeout(
                f"{self.describe()}: the server cancelled the query after its "
                f"statement_timeout ({self._statement_timeout_ms} ms)"
            ) from exc
        except _CONNECTION_ERRORS:
            raise
        except asyncpg.PostgresError as exc:
            # The server answered (a syntax error, a missing table, …); the connection
            # is fine and kept.
            raise DemandError(f"{self.describe()}: the server answered {reason(exc)}") from exc
        return rows

    def _count(self, rows: list[Any]) -> int:
        if len(rows) != 1:
            raise DemandError(f"{self.describe()}: returned {len(rows)} rows, not one")
        row = rows[0]
        if len(row) != 1:
            raise DemandError(f"{self.describe()}: returned {len(row)} columns, not one")
        value = row[0]
        if value is None:
            raise DemandError(f"{self.describe()}: returned NULL, not a count")
        count = _as_count(value)
        if count is None:
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:79] + "…"
            raise DemandError(
                f"{self.describe()}: returned {shown} ({type(value).__name__}), "
                "not a whole number >= 0"
            )
        return count

    async def _aio_close(self, client: _PgClient) -> None:
        conn, client.conn = client.conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=CLOSE_TIMEOUT_S)
        except BaseException as exc:
            # A connection cut off mid-query, a server gone, or this close cancelled:
            # drop the socket.
            conn.terminate()
            if not isinstance(exc, Exception):
                raise
