"""Reads of one statement on the event loop, for the hottest route (GET /jobs/{id}).

On Postgres a small pool of psycopg async connections answers them without a
thread hop: under load, each request's hop to the thread pool (and the GIL
handed back and forth with it) costs more than the query. On SQLite, whose
driver has no async API, the same read runs in the thread pool.

The pool is ours and small on purpose: a connection is made when none is idle
(a refused connection is at once a 503, as on the synchronous path, rather than
a wait for a pool that retries in the background); one that fails is dropped;
a read that fails on a connection idle across a database restart is retried
once on a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from app.errors import DatabaseUnavailable

T = TypeVar("T")


class AsyncReads:
    """`fetch_one(sql, params, fallback)`: a row (attribute access) or None."""

    def __init__(self, engine: Engine, size: int = 10):
        self.engine = engine
        self.size = size
        self._conninfo: str | None = None
        if engine.dialect.name == "postgresql":
            url = engine.url.set(drivername="postgresql")
            self._conninfo = url.render_as_string(hide_password=False)
        self._idle: list[tuple[float, Any]] = []  # (returned at, connection)
        self._slots: asyncio.Semaphore | None = None

    @property
    def native(self) -> bool:
        return self._conninfo is not None

    async def fetch_one(
        self, sql: str, params: tuple[Any, ...], fallback: Callable[[], T]
    ) -> Any | T:
        """The row `sql` selects (Postgres), or what `fallback()` returns in a thread (SQLite)."""
        if self._conninfo is None:
            return await run_in_threadpool(fallback)
        import psycopg

        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            for attempt in (1, 2):
                returned_at, connection = await self._checkout()
                try:
                    cursor = await connection.execute(sql, params)
                    row = await cursor.fetchone()
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    await _close(connection)
                    if attempt == 1 and returned_at > 0:
                        continue  # a pooled connection the database dropped: once more, fresh
                    raise DatabaseUnavailable() from exc
                except BaseException:
                    await _close(connection)
                    raise
                self._idle.append((time.monotonic(), connection))
                return row
        raise AssertionError("unreachable")

    async def _checkout(self) -> tuple[float, Any]:
        if self._idle:
            return self._idle.pop()
        import psycopg
        from psycopg.rows import namedtuple_row

        try:
            connection = await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                row_factory=namedtuple_row,
                options="-c TimeZone=UTC",
                connect_timeout=10,
            )
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise DatabaseUnavailable() from exc
        return 0.0, connection  # 0: new, so a failure is the database's, not staleness

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, connection in idle:
            await _close(connection)


async def _close(connection: Any) -> None:
    # closing a broken connection may fail too; it is gone either way
    with contextlib.suppress(Exception):
        await connection.close()
