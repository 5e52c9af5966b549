"""The artifact store: paths stay inside the root; an interrupted write leaves nothing to serve."""

from __future__ import annotations

import hashlib
import io

import pytest

from app.artifacts import ArtifactStore
from app.errors import NotFound, TooLarge


def test_paths_outside_the_root_are_refused(tmp_path):
    store = ArtifactStore(tmp_path / "root")
    (tmp_path / "secret").write_text("x")
    for bad in ("../secret", "/etc/passwd", "datasets/../../secret", "tmp/upload.part", "."):
        with pytest.raises(NotFound):
            store.path(bad)
    (tmp_path / "root" / "jobs").mkdir()
    (tmp_path / "root" / "jobs" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(NotFound):
        store.path("jobs/link")
    assert store.path("datasets/a/data.npz") == (tmp_path / "root" / "datasets" / "a" / "data.npz")


def test_a_committed_write_has_its_sha256_and_lands_atomically(tmp_path):
    store = ArtifactStore(tmp_path)
    data = b"abc" * 100_000
    with store.writing() as temp:
        temp.copy_from(io.BytesIO(data))
        final = store.commit(temp, "datasets/x/data.npz")
    assert temp.sha256 == hashlib.sha256(data).hexdigest() and temp.size == len(data)
    assert final.read_bytes() == data
    assert list(store.tmp.iterdir()) == []


def test_an_interrupted_write_leaves_no_file(tmp_path):
    store = ArtifactStore(tmp_path)

    class Dropped(Exception):
        pass

    with pytest.raises(Dropped), store.writing() as temp:
        temp.write(b"half a file")
        raise Dropped
    with pytest.raises(TooLarge), store.writing(limit=10) as temp:
        temp.write(b"x" * 11)
    assert list(store.tmp.iterdir()) == []
    assert not (tmp_path / "datasets").exists()
