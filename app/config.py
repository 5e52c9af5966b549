"""One settings object: pydantic-settings, env prefix TORCHYARD_, validated at start.

Paths and URLs that are not given derive from `home` (the embedded layout of
docs/service.md). Outside local mode the service refuses to start without real
secrets; local mode is the embedded setup (SQLite and the filesystem broker)
unless `TORCHYARD_LOCAL_MODE` says otherwise, so a deployment that points at
Postgres or Redis is secure by default.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from worker.settings import DEFAULT_BROKER_URL, DEFAULT_HOME, CommonSettings

GIB = 1 << 30
MIB = 1 << 20
MIN_SECRET_LENGTH = 16
_PLACEHOLDER_SECRETS = {"changethis", "changeme", "secret", "password", "token"}


class Settings(CommonSettings):
    """The API's settings: those shared with workers (`home`, `broker_url`, `api_url`,
    `worker_token`: worker.settings.CommonSettings) and its own."""

    max_params: int = Field(default=500_000_000, ge=1, description="Largest model a spec may build")

    database_url: str = Field(description="SQLAlchemy URL; default sqlite:///$HOME/torchyard.db")
    artifact_dir: Path = Field(description="Datasets and checkpoints; default $HOME/artifacts")
    token: str | None = Field(
        default=None, description="A user's bearer token (CLI; ensured by serve)"
    )

    lease_s: float = Field(default=30, gt=0, description="Heartbeat lease of a running job")
    requeue_after_s: float = Field(
        default=60, gt=0, description="Re-send queued jobs unclaimed this long"
    )
    reconcile_interval_s: float = Field(
        default=5, gt=0, description="How often the reconciler runs"
    )
    auto_gpu_wait_s: float = Field(
        default=15,
        ge=0,
        description="How long a job with device auto waits for a free GPU worker before a CPU "
        "worker may take it (0: CPU workers at once; use 0 where no GPU worker runs)",
    )
    gang_wait_s: float = Field(
        default=60,
        gt=0,
        description="How long a worker holds its claim on a job of several nodes while the "
        "gang gathers; then it lets go, so partial gangs cannot deadlock the pool",
    )
    db_wait_s: float = Field(
        default=30, ge=0, description="How long startup waits for the database"
    )
    token_cache_s: float = Field(
        default=5,
        ge=0,
        description="How long an API process trusts a user token it verified (0: ask every time)",
    )

    web_session_s: float = Field(
        default=7 * 24 * 3600, gt=0, description="How long a dashboard sign-in lasts"
    )

    orphan_grace_s: float = Field(
        default=3600,
        ge=0,
        description="The start-up sweep removes artifact files no row names once they are "
        "this old (younger ones may belong to an upload committing right now)",
    )

    max_upload_bytes: int = Field(default=GIB, ge=1, description="Largest dataset upload")
    max_unpacked_bytes: int = Field(
        default=8 * GIB,
        ge=1,
        description="Largest dataset once unpacked (NPZ members, Parquet columns): "
        "a zip bomb is refused from its index, before anything is inflated",
    )
    max_dataset_columns: int = Field(
        default=10_000,
        ge=1,
        description="Most fields a dataset may have (CSV and Parquet columns, NPY record "
        "fields): a wider CSV header is refused before the file is parsed",
    )
    max_dataset_members: int = Field(
        default=10_000,
        ge=1,
        description="Most members an NPZ may hold: counted from the zip's end record, "
        "before its index is read",
    )
    max_class_scan_bytes: int = Field(
        default=256 * MIB,
        ge=0,
        description="Integer data an upload reads to count classes, smallest fields first; "
        "a field past it is described without num_classes (a job checks its labels)",
    )
    max_spec_bytes: int = Field(default=MIB, ge=1, description="Largest job spec document")
    max_epochs: int = Field(default=100_000, ge=1, description="Most epochs a job may ask for")
    max_running_jobs_per_user: int | None = Field(
        default=None, ge=1, description="Running jobs one user may have at once (none: no limit)"
    )
    local_mode: bool = Field(
        description="Embedded single-user mode; default true with SQLite and the filesystem broker"
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_from_home(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        home = Path(data.get("home") or DEFAULT_HOME).expanduser().resolve()
        data["home"] = home
        if not data.get("database_url"):
            data["database_url"] = f"sqlite:///{home / 'torchyard.db'}"
        if not data.get("artifact_dir"):
            data["artifact_dir"] = home / "artifacts"
        if data.get("local_mode") in (None, ""):
            url = str(data["database_url"])
            broker = str(data.get("broker_url") or DEFAULT_BROKER_URL)
            data["local_mode"] = url.startswith("sqlite") and broker.startswith("filesystem")
        return data

    @model_validator(mode="after")
    def _refuse_insecure_defaults(self) -> Settings:
        if self.local_mode:
            return self
        for name in ("token", "worker_token"):
            value = getattr(self, name)
            if not value:
                raise ValueError(
                    f"TORCHYARD_{name.upper()} must be set outside local mode (generate one "
                    f"with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            if len(value) < MIN_SECRET_LENGTH or value.lower() in _PLACEHOLDER_SECRETS:
                raise ValueError(
                    f"TORCHYARD_{name.upper()} is too weak: "
                    f"use at least {MIN_SECRET_LENGTH} random characters"
                )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  # derived fields are filled by the validator


def with_worker_token(settings: Settings) -> Settings:
    """Give a local-mode service a worker token that survives restarts.

    The embedded `serve` starts workers on the same machine; they read the token
    from `$HOME/worker_token` (or are handed it), so the user never has to set one.
    """
    if settings.worker_token:
        return settings
    path = settings.home / "worker_token"
    settings.home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # Written under a temp name, then linked into place: two processes starting
    # at once agree on the first token, and neither ever reads a half-written file.
    tmp = path.with_name(f".worker_token.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        token = path.read_text().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return settings.model_copy(update={"worker_token": token})
