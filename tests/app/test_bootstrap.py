"""First start: a token for the first user, or the one TORCHYARD_TOKEN names."""

from __future__ import annotations

import httpx

from app.bootstrap import bootstrap
from app.config import Settings
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
