"""The training child through the real worker: claimed over HTTP, trained in a spawned child."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from tests.app.conftest import Server, job_spec, npz_bytes, server_settings, submit, upload
from worker.settings import WorkerSettings
from worker.task import run_claimed_job


def _run(tmp_path: Path, spec_changes: dict, before=None) -> tuple[str, dict, list[str]]:
    """Submit a job, run it with the real worker code, return (outcome, job, log lines)."""
    srv = Server(server_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'torchyard.db'}"))
    try:
        with srv.new_user() as client:
            dataset = upload(client, npz_bytes(rows=256))
            job = submit(client, job_spec(dataset["id"], **spec_changes))
            settings = WorkerSettings(
                api_url=srv.url,
                worker_token=srv.settings.worker_token or "",
                work_dir=tmp_path / "worker",
            )
            if before is not None:
                before(settings.resolved_work_dir / "jobs" / job["id"] / "attempt-1")
            outcome = run_claimed_job(job["id"], settings)
            done = client.get(f"/jobs/{job['id']}").json()
            lines = client.get(f"/jobs/{job['id']}/logs").json()["lines"]
    finally:
        srv.stop()
    return outcome, done, lines


def test_a_job_streaming_through_dataloader_workers_succeeds(tmp_path):
    """The child is not daemonic, so its DataLoader may start worker processes."""
    outcome, job, lines = _run(
        tmp_path,
        {"data__in_memory": "never", "data__num_workers": 2, "training__epochs": 2},
    )
    assert (outcome, job["status"], job["error"]) == ("succeeded", "succeeded", None), lines
    assert any(line.startswith("epoch 1 of 2:") for line in lines)
    assert multiprocessing.active_children() == []  # the child and its workers are gone


def test_an_exception_in_the_child_is_the_jobs_error_in_one_line_and_its_traceback_is_logged(
    tmp_path,
):
    """An error run_job does not turn into a result (here: an OSError from the run folder)."""

    def block_the_outbox(run_dir: Path) -> None:
        run_dir.mkdir(parents=True)
        (run_dir / "outbox").write_text("a file where the child makes a folder")

    outcome, job, lines = _run(tmp_path, {"training__epochs": 1}, before=block_the_outbox)
    assert (outcome, job["status"]) == ("failed", "failed")
    assert job["error"].startswith("training process failed: FileExistsError: [Errno 17]")
    assert job["error"].endswith("outbox'")
    assert "\n" not in job["error"]
    assert "exited with code" not in job["error"]
    assert job["error"] in lines
    traceback = "\n".join(lines)
    assert "Traceback (most recent call last):" in traceback
    assert "in train_in_child" in traceback
