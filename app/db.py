"""Engine factory and the one session scope used by routes and background work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from app.errors import DatabaseUnavailable

SQLITE_BUSY_TIMEOUT_MS = 10_000

Sessions = sessionmaker[Session]


def make_engine(url: str) -> Engine:
    """An engine tuned per backend: SQLite in WAL mode with write transactions, Postgres pinged."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10)


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (the driver we ship), not psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own is deferred).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    # A deferred transaction that reads and then writes fails at once with
    # SQLITE_BUSY when another writer committed in between (busy_timeout does not
    # apply); taking the write lock up front makes writers wait their turn instead.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessions(engine: Engine) -> Sessions:
    # expire_on_commit=False: rows returned from a scope stay readable after it closes
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def session_scope(sessions: Sessions) -> Iterator[Session]:
    """Commit on success, roll back on error; a lost database becomes DatabaseUnavailable."""
    session = sessions()
    try:
        yield session
        session.commit()
    except BaseException as exc:
        _safe_rollback(session)
        if is_connection_error(exc):
            raise DatabaseUnavailable() from exc
        raise
    finally:
        session.close()


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that mean 'try again later', not 'this request is wrong'."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _safe_rollback(session: Session) -> None:
    with contextlib.suppress(Exception):  # the connection may already be gone
        session.rollback()


def ping(engine: Engine) -> None:
    """Raise DatabaseUnavailable unless a round trip to the database works."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        if is_connection_error(exc):
            raise DatabaseUnavailable() from exc
        raise
