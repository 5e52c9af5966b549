"""The migrations build exactly the tables the models describe, running them again is a
no-op, and rows stored before a revision come through it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from app.db import make_engine
from app.migrate import upgrade
from app.models import Base


def test_migrations_match_the_models_and_rerun_cleanly(database_url):
    upgrade(database_url)
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own, for a test that walks the revisions."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    postgres = request.getfixturevalue("postgres")
    name = f"torchyard_migrate_{secrets.token_hex(4)}"
    url = postgres.create(name)
    yield url
    postgres.drop(name)


def test_jobs_stored_before_projects_land_in_the_default_project(fresh_database_url):
    upgrade(fresh_database_url, "0003")
    engine = make_engine(fresh_database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO users (id, name, admin, created_at) "
                    "VALUES (1, 'old', false, CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO jobs (id, user_id, name, status, spec, fields, queue, attempt,"
                    " max_restarts, created_at, cancel_requested, latest_metrics, stopped_early)"
                    " VALUES ('01a0000000000000000a', 1, 'old job', 'succeeded', '{}', '{}',"
                    " 'cpu', 1, 3, CURRENT_TIMESTAMP, false, '{}', false)"
                )
            )
        upgrade(fresh_database_url)
        with engine.connect() as connection:
            row = connection.execute(text("SELECT project, tags, note FROM jobs")).one()
            tags = connection.execute(text("SELECT count(*) FROM job_tags")).scalar_one()
    finally:
        engine.dispose()
    assert (row.project, row.note, tags) == ("default", "", 0)
    assert row.tags in ([], "[]")  # JSONB reads as a list; SQLite's JSON text as written
