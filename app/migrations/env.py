"""Alembic environment: runs on the connection `app.migrate.upgrade` hands over."""

from __future__ import annotations

from alembic import context

from app.models import Base

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch mode recreates a table (copy, drop, rename); with foreign keys on, the
        # drop would cascade to every row referencing it: a job's metrics, its events.
        # On the driver's connection, outside a transaction (where a PRAGMA is a no-op).
        connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if sqlite:
            connection.commit()
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run app.migrate.upgrade(url)")
run_migrations_online()
