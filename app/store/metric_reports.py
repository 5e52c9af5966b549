"""A metrics report's writes on Postgres: sent with the transaction's COMMIT in one round trip.

The generic path (app/protocol.py) runs a report's statements one at a time:
the chunk INSERT, the rollups upsert, then at commit the ORM's UPDATE of the job
row and the event's INSERT, then COMMIT; five round trips after the one that
locks the job, each a wait for the server (and, on a busy machine, for a CPU on
both sides). psycopg's pipeline mode sends them all at once and reads the
answers after: the same statements, in the same transaction and order, one
round trip. The job row and the event are written here in SQL (the ORM flushes
only outside a pipeline), with the values the ORM object holds; the two paths
are tested to store the same rows (tests/app/test_metric_reports.py).

Durability is unchanged: the COMMIT is the pipeline's last statement, and its
answer (the WAL flushed, `synchronous_commit` as the server has it) is read
before the report is answered.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from sqlalchemy import Executable, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.models import Job, utcnow
from app.store.metrics import Stored

# COALESCE: an attribute the report did not set keeps its stored value (a SQL NULL
# stays NULL), as the ORM's UPDATE, which names only changed columns, leaves it.
_JOB_ROW = text(
    "UPDATE jobs SET lease_expires_at = :lease_expires_at, "
    "latest_metrics = COALESCE(CAST(:latest_metrics AS jsonb), latest_metrics), "
    "progress = COALESCE(CAST(:progress AS jsonb), progress) WHERE id = :id"
)
_EVENT = text(
    "INSERT INTO job_events (job_id, kind, data, created_at) "
    "VALUES (:job_id, 'metrics', CAST(:data AS jsonb), :created_at)"
)
# What a report may change on the job row; anything else is left to the ORM.
JOB_COLUMNS = frozenset({"lease_expires_at", "latest_metrics", "progress"})


def can_pipeline(session: Session) -> bool:
    """Whether the session's driver has a pipeline mode (psycopg 3, on Postgres)."""
    return session.get_bind().dialect.driver == "psycopg"


def commit(session: Session, job: Job, stored: Stored) -> None:
    """Write `stored` (its statements), the job row's changes and the metrics event, and
    COMMIT, in one round trip. The session's transaction is then over: its own commit
    finds nothing to do, and `job` is no longer in it (the row is written here)."""
    state = inspect(job)
    changed = set(state.committed_state)
    if not changed <= JOB_COLUMNS:
        raise AssertionError(f"a metrics report changed {sorted(changed - JOB_COLUMNS)}")
    writes = list(stored.writes)
    writes.append(
        (
            _JOB_ROW,
            {
                "id": job.id,
                "lease_expires_at": job.lease_expires_at,
                "latest_metrics": _json(
                    job.latest_metrics if "latest_metrics" in changed else None
                ),
                "progress": _json(job.progress if "progress" in changed else None),
            },
        )
    )
    if stored.series:
        # The event names the chunks the points went to (app.event_stream reads them).
        data = {"chunks": stored.chunk_keys()}
        writes.append((_EVENT, {"job_id": job.id, "data": _json(data), "created_at": utcnow()}))
    connection = session.connection()
    driver = connection.connection.driver_connection
    dialect = connection.dialect
    try:
        with driver.pipeline(), driver.cursor() as cursor:  # type: ignore[union-attr]
            for statement, params in writes:
                sql = _sql(statement, dialect)
                if isinstance(params, list):
                    cursor.executemany(sql, params)
                else:
                    cursor.execute(sql, params)
            driver.commit()  # type: ignore[union-attr]
    except dialect.loaded_dbapi.Error as exc:
        # as SQLAlchemy's own errors, so the session scope maps a lost database to a 503
        raise DBAPIError.instance(
            None, None, exc, dialect.loaded_dbapi.Error, dialect=dialect
        ) from exc
    session.expunge(job)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


@cache
def _sql(statement: Executable, dialect: Any) -> str:
    """The statement as the driver's SQL (named `%(x)s` parameters): compiled once."""
    return str(statement.compile(dialect=dialect))  # type: ignore[attr-defined]
