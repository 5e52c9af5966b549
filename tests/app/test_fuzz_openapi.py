"""Schemathesis against the API's own OpenAPI document, over real HTTP, with a real token.

Bounded: a fixed number of examples per operation, derandomized (the same cases on
every run, so CI is repeatable), no example database. Every operation must answer
without a 5xx, and every documented answer must match its schema. The SSE stream
is not a JSON body, so only the 5xx check applies to it.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.app.conftest import upload

MAX_EXAMPLES = 12
STREAMS = {"/api/v1/jobs/{job_id}/events"}


def operations(server):
    schema = schemathesis.openapi.from_dict(server.app.openapi())
    return [result.ok() for result in schema.get_all_operations()]


def fuzz(operation, base_url: str, headers: dict[str, str]) -> None:
    """Run MAX_EXAMPLES generated requests against one operation; raise on the first failure."""
    checks = [not_a_server_error]
    if operation.path not in STREAMS:
        checks.append(response_schema_conformance)

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        case.validate_response(response, checks=checks, headers=headers)

    run()


def test_no_operation_answers_5xx_and_every_answer_matches_the_schema(server, user):
    token = user.headers["authorization"].removeprefix("Bearer ")
    upload(user)  # something to list, so list answers are checked with content
    headers = {"Authorization": f"Bearer {token}"}
    ops = operations(server)
    assert len(ops) >= 15, [op.label for op in ops]
    failures: dict[str, str] = {}
    for operation in ops:
        try:
            fuzz(operation, server.url, headers)
        except Exception as exc:  # every operation's failure, reported together
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/datasets"])
def test_the_openapi_document_says_every_route_needs_a_bearer_token(server, path):
    document = server.app.openapi()
    for method, operation in document["paths"][path].items():
        assert operation.get("security"), (method, path)
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
