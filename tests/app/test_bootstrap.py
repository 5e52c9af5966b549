"""First start: a token for the first user, or the one TORCHYARD_TOKEN names."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from app.bootstrap import bootstrap
from app.config import Settings
from app.db import make_engine
from app.main import migrate_when_reachable
from tests.app.conftest import Server, server_settings


def test_first_start_creates_one_token_and_later_starts_none(tmp_path):
    settings = Settings(home=tmp_path)
    token = bootstrap(settings)
    assert token and token.startswith("ty_")
    assert bootstrap(settings) is None
    srv = Server(server_settings(tmp_path, settings.database_url))
    try:
        with srv.client(token) as client:
            assert client.get("/jobs").status_code == 200
    finally:
        srv.stop()


def test_an_environment_token_is_honoured_and_stays_valid(tmp_path):
    settings = Settings(home=tmp_path, token="a-token-from-the-environment")
    assert bootstrap(settings) is None
    assert bootstrap(settings) is None  # idempotent
    srv = Server(server_settings(tmp_path, settings.database_url))
    try:
        with httpx.Client(base_url=srv.url + "/api/v1") as client:
            headers = {"Authorization": "Bearer a-token-from-the-environment"}
            assert client.get("/datasets", headers=headers).status_code == 200
    finally:
        srv.stop()


def test_startup_waits_for_an_unreachable_database_then_gives_up_with_its_error(caplog):
    with socket.socket() as probe:  # a port nothing listens on: the database is not up yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    try:
        with caplog.at_level(logging.WARNING, logger="app.main"), pytest.raises(OperationalError):
            migrate_when_reachable(engine, wait_s=1.5)
    finally:
        engine.dispose()
    waits = [r for r in caplog.records if "database not reachable yet" in r.getMessage()]
    assert waits  # it retried before giving up
