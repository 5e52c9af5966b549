"""Reads for the hottest routes (the polls of GET /jobs/{id}, its metrics, its events).

`AsyncReads`: reads of one statement on the event loop. On Postgres a small pool of psycopg async connections answers them without a
thread hop: under load, each request's hop to the thread pool (and the GIL
handed back and forth with it) costs more than the query. On SQLite, whose
driver has no async API, the same read runs in the thread pool.

The pool is ours and small on purpose: a connection is made when none is idle
(a refused connection is at once a 503, as on the synchronous path, rather than
a wait for a pool that retries in the background); one that fails is dropped;
a read that fails on a connection idle across a database restart is retried
once on a fresh one. psycopg_pool does neither: its callers wait for a background
reconnect up to a timeout, and a retry gets the next idle (equally dead) connection
unless every checkout pays a check round trip (docs/architecture.md).

`Coalesced`: lookups made at the same moment answered by one batch read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from app.errors import DatabaseUnavailable

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class AsyncReads:
    """`fetch_all(sql, params, fallback)`: rows with attribute access."""

    def __init__(self, engine: Engine, size: int = 10):
        self.engine = engine
        self.size = size
        self._conninfo: str | None = None
        if engine.dialect.name == "postgresql":
            url = engine.url.set(drivername="postgresql")
            self._conninfo = url.render_as_string(hide_password=False)
        self._idle: list[tuple[float, Any]] = []  # (returned at, connection)
        self._slots: asyncio.Semaphore | None = None

    async def fetch_all(
        self, sql: str, params: tuple[Any, ...], fallback: Callable[[], T]
    ) -> list[Any] | T:
        """The rows `sql` selects (Postgres), or what `fallback()` returns in a thread (SQLite)."""
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
                    rows = await cursor.fetchall()
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    await _close(connection)
                    if attempt == 1 and returned_at > 0:
                        continue  # a pooled connection the database dropped: once more, fresh
                    raise DatabaseUnavailable() from exc
                except BaseException:
                    await _close(connection)
                    raise
                self._idle.append((time.monotonic(), connection))
                return rows
        raise AssertionError("unreachable")

    async def _checkout(self) -> tuple[float, Any]:
        if self._idle:
            return self._idle.pop()
        import psycopg
        from psycopg.rows import namedtuple_row

        try:
            connection = await psycopg.AsyncConnection.connect(
                self._conninfo or "",
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


class Coalesced(Generic[K, V]):
    """Lookups of keys made concurrently, answered together by batch queries.

    `get(key)` joins the next batch, never one already running, so its answer
    is read after it was asked: a client sees its own writes. At most
    `in_flight` batches run at once; lookups made meanwhile wait and go together
    in the next. Under load, dozens of polls cost one query (and one rendering
    of each distinct answer) instead of one each.
    """

    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[dict[K, V]]],
        in_flight: int = 4,
        *,
        gather: bool = False,
    ):
        self.fetch = fetch
        self.in_flight = in_flight
        # gather: a batch waits one turn of the event loop before it takes the lookups,
        # so that all made by tasks woken at the same moment go in it together
        self.gather = gather
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._running = 0
        self._gathering = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V | None:
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        self._start()
        return await future

    def _start(self) -> None:
        while self._waiting and self._running < self.in_flight and not self._gathering:
            self._running += 1
            if self.gather:
                self._gathering = True  # the lookups made until it takes them are its own
                task = asyncio.ensure_future(self._run(None))
            else:
                task = asyncio.ensure_future(self._run(self._take()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> dict[K, list[asyncio.Future[V | None]]]:
        batch, self._waiting = self._waiting, {}
        self._gathering = False
        return batch

    async def _run(self, batch: dict[K, list[asyncio.Future[V | None]]] | None) -> None:
        try:
            if batch is None:
                await asyncio.sleep(0)
                batch = self._take()
            found = await self.fetch(list(batch)) if batch else {}
        except BaseException as exc:  # every waiter gets the error (a 503, say)
            if batch is None:
                batch = self._take()
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for key, futures in batch.items():
                value = found.get(key)
                for future in futures:
                    if not future.done():  # a waiter that went away is cancelled
                        future.set_result(value)
        finally:
            self._running -= 1
            self._start()
