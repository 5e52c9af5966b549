"""Engine factory and the one session scope used by routes and background work."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from app.errors import DatabaseUnavailable

SQLITE_BUSY_TIMEOUT_MS = 10_000
# A pooled Postgres connection unused this long is pinged before it is handed out.
PING_AFTER_IDLE_S = 5.0
_READ_ONLY = "torchyard_read_only"

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
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # Up to 40 request threads (anyio's default) may want a connection at once: an
    # overflow connection is closed when it comes back, so a small pool under load
    # keeps opening Postgres connections (a process fork each). 20 kept, 30 at most.
    engine = create_engine(parsed, pool_size=20, max_overflow=10, pool_timeout=10)
    event.listen(engine, "connect", _postgres_on_connect)
    event.listen(engine, "checkin", _stamp_idle)
    event.listen(engine, "checkout", _ping_when_idle)
    return engine


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


def _postgres_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """lz4 for the values this connection compresses (TOAST), where the server has it.

    A metric chunk's arrays (~28 kB a 1,000-point batch) are compressed on insert;
    pglz, the default, took a third of a batch's time in the database
    (bench/README.md, "where a batch goes"), lz4 an eighth of that for 25% more
    bytes. Columns without a method of their own (all of ours) use this setting at
    write time; values already stored keep theirs, and reads decompress either.
    """
    try:
        dbapi_connection.execute("SET default_toast_compression = lz4")
        dbapi_connection.commit()  # a SET outlives its transaction only once committed
    except Exception:  # a server built without lz4: keep pglz
        dbapi_connection.rollback()


def _sqlite_begin(connection: Any) -> None:
    if connection.get_execution_options().get(_READ_ONLY):
        # a reader needs no write lock (WAL: it never waits for writers)
        connection.exec_driver_sql("BEGIN")
        return
    # A deferred transaction that reads and then writes fails at once with
    # SQLITE_BUSY when another writer committed in between (busy_timeout does not
    # apply); taking the write lock up front makes writers wait their turn instead.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _stamp_idle(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_when_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Pessimistic disconnect handling, paid only by connections that sat idle.

    `pool_pre_ping` would cost every checkout a round trip. A connection in
    steady use proves itself alive; one idle for a while (the database may have
    restarted, a firewall may have dropped it) is pinged, and replaced when dead.
    A connection that dies in use fails its request (503), and SQLAlchemy then
    invalidates the whole pool, so the next requests reconnect.
    """
    idle_since = record.info.pop("idle_since", None)
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
        return
    try:
        # autocommit for the ping: one round trip, no transaction left open
        dbapi_connection.autocommit = True
        try:
            dbapi_connection.execute("SELECT 1")
        finally:
            if not dbapi_connection.closed:
                dbapi_connection.autocommit = False
    except Exception as exc:
        raise DisconnectionError(str(exc)) from exc  # the pool retries with a new connection


def make_sessions(engine: Engine) -> Sessions:
    # expire_on_commit=False: rows returned from a scope stay readable after it closes
    return sessionmaker(engine, expire_on_commit=False)


def read_engine(engine: Engine) -> Engine:
    """The same pool, for reads of one statement (no snapshot shared between statements).

    On Postgres its connections run in autocommit: the query is the only round
    trip, with no BEGIN and COMMIT around it. On SQLite they take a deferred
    transaction, not the write lock, so readers do not queue behind writers.
    """
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{_READ_ONLY: True})
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def make_read_sessions(engine: Engine) -> Sessions:
    """Sessions on `read_engine(engine)`: for a read of one statement."""
    return sessionmaker(read_engine(engine), expire_on_commit=False)


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


@contextlib.contextmanager
def read_scope(engine: Engine) -> Iterator[Connection]:
    """A pooled connection of a `read_engine` for the hottest reads, without an ORM session
    (a Session costs more Python than the query); a lost database becomes DatabaseUnavailable."""
    try:
        with engine.connect() as connection:
            yield connection
    except Exception as exc:
        if is_connection_error(exc):
            raise DatabaseUnavailable() from exc
        raise


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
