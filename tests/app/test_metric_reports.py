"""The metrics report's two paths on Postgres store the same rows: the writes one by one
(the generic path, SQLite's) and in one pipeline with the COMMIT (app/store/metric_reports.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from sqlalchemy import text

from app.db import session_scope
from app.errors import DatabaseUnavailable
from app.protocol import record_metrics
from app.store import attempts
from tests.app.conftest import claim, job_spec, submit


def batch(name: str, steps: Iterable[int], value: Any = None, epoch_every: int = 100) -> list[dict]:
    return [
        {
            "name": name,
            "step": s,
            "epoch": s // epoch_every,
            "value": value if value is not None else 1.0 / (s + 1),
            "time": 1.7e9 + s,
        }
        for s in steps
    ]


# First batches of two series (a repeated step, NaN and Inf among them), their retry,
# small batches appended to the last chunk, one overlapping what is stored, late points
# between stored ones, and a new series: every branch of the store's write plan.
REPORTS = [
    batch("loss", range(0, 600))
    + batch("acc", range(0, 600, 3))
    + batch("loss", range(10, 12), value=9.0)
    + batch("acc", range(600, 602), value=float("nan"))
    + batch("acc", range(602, 603), value=float("inf")),
    batch("loss", range(0, 600)),
    batch("loss", range(600, 610)),
    batch("loss", range(610, 620)) + batch("acc", range(603, 605)),
    batch("loss", range(615, 900)),
    batch("acc", [s for s in range(1, 40) if s % 3]),
    batch("lr", range(0, 2000, 7)),
    [],
]


def test_pipelined_reports_store_what_the_generic_path_stores(server, user, dataset):
    if server.sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("the pipeline is Postgres's")
    jobs = {}
    for pipeline in (False, True):
        job = submit(user, job_spec(dataset["id"]))
        jobs[pipeline] = (job["id"], claim(server, job["id"]).claim["token"])

    answers: dict[bool, list[tuple[int, bool]]] = {False: [], True: []}
    for points in REPORTS:
        for pipeline, (job_id, token) in jobs.items():
            with session_scope(server.sessions) as session:
                job = attempts.lock_by_token(session, token, job_id)
                answer = record_metrics(session, job, points, 60.0, pipeline=pipeline)
            answers[pipeline].append(answer)
    assert answers[True] == answers[False]
    assert [count for count, _ in answers[True]][:3] == [803, 0, 10]

    def stored(job_id: str) -> dict[str, Any]:
        with server.sessions() as session:

            def rows(sql: str) -> list[tuple]:
                return [tuple(r) for r in session.execute(text(sql), {"id": job_id})]

            return {
                "chunks": rows(
                    'SELECT name, first_step, last_step, count, steps, epochs, "values", times '
                    "FROM metric_chunks WHERE job_id = :id ORDER BY name, first_step"
                ),
                "rollups": rows(
                    "SELECT * FROM metric_rollups WHERE job_id = :id ORDER BY name, level, bucket"
                ),
                "job": rows(
                    "SELECT latest_metrics, progress, lease_expires_at IS NOT NULL "
                    "FROM jobs WHERE id = :id"
                ),
                "events": rows(
                    "SELECT kind, data FROM job_events WHERE job_id = :id AND kind = 'metrics' "
                    "ORDER BY id"
                ),
            }

    generic, pipelined = stored(jobs[False][0]), stored(jobs[True][0])
    for what in ("chunks", "job", "events"):
        assert pipelined[what] == generic[what], what
    # the rollups name their job: compare what follows the job id
    assert [r[1:] for r in pipelined["rollups"]] == [r[1:] for r in generic["rollups"]]
    assert len(generic["events"]) == len(REPORTS) - 2  # not the retry, not the empty one
    assert generic["job"][0][1]["step"] == 1995


def test_a_database_lost_during_a_pipelined_report_is_unavailable_and_stores_nothing(
    server, user, dataset
):
    if server.sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("the pipeline is Postgres's")
    job_id = submit(user, job_spec(dataset["id"]))["id"]
    token = claim(server, job_id).claim["token"]
    with pytest.raises(DatabaseUnavailable), session_scope(server.sessions) as session:
        job = attempts.lock_by_token(session, token, job_id)
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with server.sessions() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        record_metrics(session, job, batch("loss", range(100)), 60.0, pipeline=True)
    with server.sessions() as session:
        count = session.execute(
            text("SELECT count(*) FROM metric_chunks WHERE job_id = :id"), {"id": job_id}
        ).scalar_one()
    assert count == 0
    # the pool let the dead connection go: the next report is stored
    with session_scope(server.sessions) as session:
        job = attempts.lock_by_token(session, token, job_id)
        assert record_metrics(session, job, batch("loss", range(100)), 60.0)[0] == 100
