"""The client against the real API served over real HTTP (tests/app/conftest.py's servers)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from app.db import session_scope
from app.store import users
from tests.app import conftest as app_fixtures
from tests.app.conftest import Server
from torchyard import Client

# The servers of tests/app (SQLite and Postgres), for these tests too.
postgres = app_fixtures.postgres
postgres_url = app_fixtures.postgres_url
database_url = app_fixtures.database_url
server = app_fixtures.server


def new_token(server: Server) -> str:
    """A bearer token of a new user of its own."""
    with session_scope(server.sessions) as session:
        _, token = users.create_user_with_token(session, f"client-{secrets.token_hex(4)}")
    return token


@pytest.fixture
def token(server: Server) -> str:
    return new_token(server)


@pytest.fixture
def api(server: Server, token: str) -> Iterator[Client]:
    with Client(server.url, token) as client:
        yield client


def uploads_seen(server: Server) -> float:
    """Dataset uploads the server has answered 201 so far, from its own request metrics."""
    registry = server.app.state.telemetry.registry
    labels = {"method": "POST", "route": "/api/v1/datasets", "status": "201"}
    return registry.get_sample_value("torchyard_http_request_duration_seconds_count", labels) or 0
