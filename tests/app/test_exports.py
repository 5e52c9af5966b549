"""Checkpoints exported on the fly: a torch.export program that loads, cached beside the weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.app.conftest import Server, claim, job_spec, server_settings, submit, upload


@pytest.fixture
def sqlite_server(tmp_path):
    # Export does not touch the database: one backend is enough for this slow test.
    srv = Server(server_settings(tmp_path, f"sqlite:///{tmp_path / 'torchyard.db'}"))
    yield srv
    srv.stop()


def trained_weights(spec: dict) -> bytes:
    from safetensors.torch import save

    from worker.engine.build import build_model
    from worker.engine.fields import FieldInfo
    from worker.engine.spec import parse_spec

    model = build_model(parse_spec(spec), {"input": FieldInfo((4,), "float32")}, None, device="cpu")
    return save({k: v.contiguous() for k, v in model.module.state_dict().items()})


def test_best_weights_export_as_pt2_once_and_then_come_from_the_cache(sqlite_server, tmp_path):
    import torch

    with sqlite_server.new_user() as user:
        dataset = upload(user)
        spec = job_spec(dataset["id"])
        job = submit(user, spec)
        attempt = claim(sqlite_server, job["id"])
        weights = trained_weights(spec)
        headers = {"X-Sha256": hashlib.sha256(weights).hexdigest(), "X-Step": "4"}
        url = f"/worker/jobs/{job['id']}/checkpoints/best/1"
        assert attempt.client.put(url, content=weights, headers=headers).status_code == 201

        best = f"/jobs/{job['id']}/checkpoints/best"
        first = user.get(best, params={"format": "pt2"})
        assert first.status_code == 200, first.text
        assert first.headers["content-disposition"].endswith('-best-epoch1.pt2"')
        path = tmp_path / "model.pt2"
        path.write_bytes(first.content)
        program = torch.export.load(str(path))
        assert program.module()(torch.randn(5, 4)).shape == (5, 3)

        # served from the cache, not exported again: the cached file is untouched
        (cached,) = Path(sqlite_server.settings.artifact_dir).rglob("*.pt2")
        before = cached.stat()
        again = user.get(best, params={"format": "pt2"})
        assert again.content == first.content
        after = cached.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert (
            user.get(
                best, params={"format": "pt2"}, headers={"If-None-Match": again.headers["etag"]}
            ).status_code
            == 304
        )
        assert user.get(best, params={"format": "zip"}).status_code == 422


def test_training_state_and_bad_weights_do_not_export(sqlite_server):
    with sqlite_server.new_user() as user:
        dataset = upload(user)
        job = submit(user, job_spec(dataset["id"]))
        attempt = claim(sqlite_server, job["id"])
        for kind, body in (("last", b"training state"), ("best", b"not safetensors")):
            headers = {"X-Sha256": hashlib.sha256(body).hexdigest()}
            attempt.client.put(
                f"/worker/jobs/{job['id']}/checkpoints/{kind}/0", content=body, headers=headers
            )
        for checkpoint in user.get(f"/jobs/{job['id']}/checkpoints").json():
            response = user.get(
                f"/jobs/{job['id']}/checkpoints/{checkpoint['id']}", params={"format": "pt2"}
            )
            assert response.status_code == 422, response.text
            assert isinstance(response.json()["detail"], str)


def test_an_export_counts_in_disk_bytes_and_goes_with_its_checkpoint(sqlite_server):
    from safetensors.torch import load, save

    with sqlite_server.new_user() as user:
        dataset = upload(user)
        spec = job_spec(dataset["id"])
        job = submit(user, spec)
        attempt = claim(sqlite_server, job["id"])
        tensors = load(trained_weights(spec))
        folder = sqlite_server.settings.artifact_dir / "jobs" / job["id"] / "checkpoints"

        def put_best(epoch: int, value: float) -> bytes:
            body = save(tensors, metadata={"epoch": str(epoch)})  # other bytes each epoch
            headers = {
                "X-Sha256": hashlib.sha256(body).hexdigest(),
                "X-Monitor": "val_loss",
                "X-Value": str(value),
            }
            url = f"/worker/jobs/{job['id']}/checkpoints/best/{epoch}"
            assert attempt.client.put(url, content=body, headers=headers).status_code == 201
            return body

        first = put_best(0, 0.5)
        best = f"/jobs/{job['id']}/checkpoints/best"
        exported = user.get(best, params={"format": "pt2"})
        assert exported.status_code == 200, exported.text
        assert {p.suffix for p in folder.iterdir()} == {".safetensors", ".pt2"}
        shown = user.get(f"/jobs/{job['id']}").json()
        assert shown["disk_bytes"] == len(first) + len(exported.content)

        second = put_best(1, 0.4)  # a better epoch: the first and its export go
        assert [p.read_bytes() for p in folder.iterdir()] == [second]
        assert user.get(f"/jobs/{job['id']}").json()["disk_bytes"] == len(second)
