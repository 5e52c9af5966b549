"""The CLI's service commands as a user runs them: real `torchyard` processes against the
real API (served by this test process over real HTTP), through `torchyard.Client`."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import pytest

from app.db import session_scope
from app.store import users
from tests.app.conftest import Server, job_spec, server_settings
from tests.test_cli import torchyard
from tests.torchyard.conftest import uploads_seen
from tests.torchyard.finished import WEIGHTS, finish
from tests.torchyard.local_specs import sources_of, write_local_spec

JOB_LINE = r"^([0-9a-f]{20})  queued$"


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One SQLite-backed server: the commands are clients, the backends are tested elsewhere."""
    home = tmp_path_factory.mktemp("cli-home")
    srv = Server(server_settings(home, f"sqlite:///{home / 'torchyard.db'}"))
    yield srv
    srv.stop()


@pytest.fixture
def env(sqlite_server: Server) -> dict[str, str]:
    with session_scope(sqlite_server.sessions) as session:
        # a fresh name each: id() of a collected session may come back for the next test
        _, token = users.create_user_with_token(session, f"cli-{secrets.token_hex(6)}")
    return {"TORCHYARD_URL": sqlite_server.url, "TORCHYARD_TOKEN": token}


def submitted(run) -> str:
    assert run.returncode == 0, run.stderr
    job_id, status = run.stdout.split()[:2]
    assert status == "queued"
    return job_id


def test_submit_of_a_local_spec_uploads_each_file_once_and_leaves_the_file_as_it_was(
    sqlite_server, env, tmp_path
):
    spec_path = write_local_spec(tmp_path)
    as_written = spec_path.read_bytes()
    before = uploads_seen(sqlite_server)
    first = submitted(torchyard("submit", str(spec_path), env=env))
    assert uploads_seen(sqlite_server) - before == 2
    # from another folder, by a relative path: the datasets are found beside the spec
    second = submitted(torchyard("submit", "spec.json", cwd=tmp_path, env=env))
    assert uploads_seen(sqlite_server) - before == 2  # the resubmit sent no dataset bytes
    assert first != second
    assert spec_path.read_bytes() == as_written

    status = torchyard("status", second, env=env)
    assert status.returncode == 0, status.stderr
    for where, source in sources_of(tmp_path).items():
        assert f"  {where} from {source}" in status.stdout


def test_submit_of_a_spec_of_ids_still_works(sqlite_server, env, tmp_path):
    write_local_spec(tmp_path)
    upload = torchyard("upload", str(tmp_path / "data" / "train.npz"), env=env)
    assert upload.returncode == 0, upload.stderr
    dataset_id = upload.stdout.split()[0]
    (tmp_path / "ids.json").write_text(json.dumps(job_spec(dataset_id)))
    submitted(torchyard("submit", str(tmp_path / "ids.json"), env=env))


def test_a_bad_spec_or_a_missing_file_is_a_line_with_its_json_path(sqlite_server, env, tmp_path):
    spec_path = write_local_spec(
        tmp_path, model={"layers": [{"type": "linear", "out_features": "ten"}]}
    )
    bad = torchyard("submit", str(spec_path), env=env)
    assert bad.returncode == 1
    assert "error: model.layers[0].out_features: expected an integer" in bad.stderr
    (tmp_path / "data" / "train.npz").unlink()
    missing = torchyard("submit", str(spec_path), env=env)
    assert missing.returncode == 1
    assert "error: data.train: no such file 'data/train.npz'" in missing.stderr
    for run in (bad, missing):
        assert "Traceback" not in run.stderr + run.stdout


def test_jobs_cancel_metrics_download_through_the_client(sqlite_server, env, tmp_path):
    spec_path = write_local_spec(tmp_path)
    done = submitted(torchyard("submit", str(spec_path), env=env))
    waiting = submitted(torchyard("submit", str(spec_path), env=env))
    finish(sqlite_server, done)

    listed = torchyard("jobs", env=env)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [waiting, done]
    only = torchyard("jobs", "--status", "succeeded", "--limit", "1", env=env)
    assert [line.split()[0] for line in only.stdout.splitlines()] == [done]

    history = json.loads(torchyard("metrics", done, "--names", "loss", env=env).stdout)
    assert [p["value"] for p in history["loss"]] == [1.0, 0.5, 0.25]
    out = tmp_path / "best.safetensors"
    downloaded = torchyard("download", done, "-o", str(out), env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    assert out.read_bytes() == WEIGHTS

    cancelled = torchyard("cancel", waiting, env=env)
    assert cancelled.stdout.split() == [waiting, "cancelled"]
    gone = torchyard("status", "0" * 20, env=env)
    assert gone.returncode == 1 and f"error: no job '{'0' * 20}'" in gone.stderr


# ------------------------------------------------- projects, tags, notes (issue 13, part 3)


def test_submit_labels_list_by_project_tag_and_note(env, tmp_path):
    spec_path = write_local_spec(tmp_path)
    as_written = spec_path.read_bytes()
    labelled = submitted(
        torchyard(
            "submit",
            str(spec_path),
            "--project",
            "digits",
            "--tag",
            "a",
            "--tag",
            "b",
            "--note",
            "first try",
            env=env,
        )
    )
    plain = submitted(torchyard("submit", str(spec_path), env=env))
    assert spec_path.read_bytes() == as_written

    def ids(*args: str) -> list[str]:
        run = torchyard("jobs", *args, env=env)
        assert run.returncode == 0, run.stderr
        return [line.split()[0] for line in run.stdout.splitlines()]

    assert ids("--project", "digits") == [labelled]
    assert ids("--tag", "b") == [labelled]
    assert ids() == [plain, labelled]
    projects = torchyard("projects", env=env).stdout.splitlines()
    assert "digits  1 jobs" in projects and "default  1 jobs" in projects

    retagged = torchyard("tag", labelled, "--add", "c", "--remove", "a", env=env)
    assert retagged.returncode == 0, retagged.stderr
    assert retagged.stdout.split() == [labelled, "#b", "#c"]
    assert ids("--tag", "a") == [] and ids("--tag", "c") == [labelled]
    noted = torchyard("note", labelled, "second thoughts", env=env)
    assert noted.returncode == 0, noted.stderr
    assert "note: second thoughts" in torchyard("status", labelled, env=env).stdout


def test_rm_deletes_finished_jobs_and_refuses_a_queued_one(sqlite_server, env, tmp_path):
    spec_path = write_local_spec(tmp_path)
    done = submitted(torchyard("submit", str(spec_path), env=env))
    queued = submitted(torchyard("submit", str(spec_path), env=env))
    finish(sqlite_server, done)
    run = torchyard("rm", done, queued, env=env)
    assert run.returncode == 1
    assert f"deleted {done}" in run.stdout
    assert f"error: {queued}: " in run.stderr
    listed = torchyard("jobs", env=env).stdout
    assert done not in listed and queued in listed
