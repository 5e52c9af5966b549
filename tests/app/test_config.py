"""Settings: defaults derive from home; outside local mode, real secrets are required."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings, with_worker_token


def test_defaults_derive_from_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHYARD_HOME", str(tmp_path / "state"))
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'state' / 'torchyard.db'}"
    assert settings.artifact_dir == tmp_path / "state" / "artifacts"
    assert settings.broker_url == "filesystem://"
    assert settings.lease_s == 30
    assert settings.local_mode is True


def test_a_deployment_without_secrets_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="TORCHYARD_TOKEN must be set"):
        Settings(home=tmp_path, database_url="postgresql+psycopg://db/torchyard")
    with pytest.raises(ValidationError, match="TORCHYARD_WORKER_TOKEN is too weak"):
        Settings(
            home=tmp_path,
            broker_url="redis://redis:6379/0",
            token="x" * 32,
            worker_token="changethis",
        )
    deployed = Settings(
        home=tmp_path, broker_url="redis://r/0", token="t" * 32, worker_token="w" * 32
    )
    assert deployed.local_mode is False


def test_local_mode_can_be_forced_either_way(tmp_path):
    assert Settings(home=tmp_path, database_url="postgresql://db/x", local_mode=True).local_mode
    with pytest.raises(ValidationError):
        Settings(home=tmp_path, local_mode=False)


def test_local_mode_gets_a_worker_token_that_survives_restarts(tmp_path):
    first = with_worker_token(Settings(home=tmp_path))
    assert first.worker_token and len(first.worker_token) >= 32
    assert (tmp_path / "worker_token").stat().st_mode & 0o077 == 0
    assert with_worker_token(Settings(home=tmp_path)).worker_token == first.worker_token
    assert (
        with_worker_token(Settings(home=tmp_path, worker_token="given" * 4)).worker_token
        == "given" * 4
    )


def test_the_api_and_its_workers_read_the_shared_names_alike(tmp_path, monkeypatch):
    from worker.settings import WorkerSettings

    shared = ("broker_url", "api_url", "worker_token")
    for name in (*shared, "home"):
        monkeypatch.delenv(f"TORCHYARD_{name.upper()}", raising=False)
    api, worker = Settings(), WorkerSettings()
    assert {n: getattr(api, n) for n in shared} == {n: getattr(worker, n) for n in shared}
    assert api.worker_token == ""  # unset: made by with_worker_token in local mode
    assert api.home == worker.home.resolve()

    monkeypatch.setenv("TORCHYARD_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHYARD_BROKER_URL", "redis://r:6379/0")
    monkeypatch.setenv("TORCHYARD_API_URL", "http://api:8000")
    monkeypatch.setenv("TORCHYARD_WORKER_TOKEN", "w" * 32)
    monkeypatch.setenv("TORCHYARD_TOKEN", "t" * 32)
    api, worker = Settings(), WorkerSettings()
    assert {n: getattr(api, n) for n in shared} == {n: getattr(worker, n) for n in shared}
    assert api.home == worker.home == tmp_path
    assert api.local_mode is False
