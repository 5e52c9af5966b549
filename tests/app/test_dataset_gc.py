"""`torchyard admin gc-datasets`, run as the command it is, on a database of its own
(it collects across all users): datasets no job names and older than the grace go,
rows and files; named and fresh ones stay."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from app.db import session_scope
from app.models import Dataset, utcnow
from tests.app.conftest import (
    ADMIN_TOKEN,
    WORKER_TOKEN,
    Server,
    job_spec,
    npz_bytes,
    server_settings,
    submit,
    upload,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgres"])
def own_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'torchyard.db'}"
        return
    postgres = request.getfixturevalue("postgres")
    name = f"torchyard_gc_{secrets.token_hex(4)}"
    yield postgres.create(name)
    postgres.drop(name)


def gc(home: Path, database_url: str, *args: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TORCHYARD_HOME": str(home),
        "TORCHYARD_DATABASE_URL": database_url,
        "TORCHYARD_BROKER_URL": "filesystem://",
        "TORCHYARD_TOKEN": ADMIN_TOKEN,
        "TORCHYARD_WORKER_TOKEN": WORKER_TOKEN,
    }
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "admin", "gc-datasets", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gc_datasets_removes_only_unnamed_datasets_past_the_grace(own_database, tmp_path):
    home = tmp_path / "home"
    server = Server(server_settings(home, own_database))
    try:
        with server.new_user() as alice, server.new_user() as bob:
            named = upload(alice)
            submit(alice, job_spec(named["id"]))
            old = upload(alice, npz_bytes(seed=1), filename="old.npz")
            fresh = upload(alice, npz_bytes(seed=2), filename="fresh.npz")
            bobs_old = upload(bob, npz_bytes(rows=128), filename="bobs.npz")
            with session_scope(server.sessions) as session:
                for dataset in (named, old, bobs_old):
                    row = session.get(Dataset, dataset["id"])
                    assert row is not None
                    row.created_at = utcnow() - timedelta(days=2)  # uploaded two days ago
            folders = home / "artifacts" / "datasets"

            dry = gc(home, own_database, "--dry-run")
            assert {line.split()[0] for line in dry.splitlines()[:-1]} == {
                old["id"],
                bobs_old["id"],
            }
            freed = old["size"] + bobs_old["size"]
            assert dry.splitlines()[-1] == f"would free 2 dataset(s), {freed:,} bytes"
            assert alice.get(f"/datasets/{old['id']}").status_code == 200
            assert (folders / old["id"]).exists()

            done = gc(home, own_database)
            assert done.splitlines()[-1] == f"freed 2 dataset(s), {freed:,} bytes"
            assert alice.get(f"/datasets/{old['id']}").status_code == 404
            assert bob.get(f"/datasets/{bobs_old['id']}").status_code == 404
            assert not (folders / old["id"]).exists() and not (folders / bobs_old["id"]).exists()
            for kept in (named, fresh):
                assert alice.get(f"/datasets/{kept['id']}").status_code == 200
                assert (folders / kept["id"]).exists()

            assert gc(home, own_database).splitlines() == ["freed 0 dataset(s), 0 bytes"]
            # without the grace the fresh upload goes too; the named one never does
            again = gc(home, own_database, "--older-than-hours", "0")
            assert again.splitlines()[0].split()[0] == fresh["id"]
            assert alice.get(f"/datasets/{named['id']}").status_code == 200
    finally:
        server.stop()
