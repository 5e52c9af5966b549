"""atomic_path: a reader sees the old file or the whole new one, and no temp file stays."""

from __future__ import annotations

import pytest

from worker.engine.files import atomic_path, atomic_write_text


def test_atomic_path_replaces_the_target_only_when_the_write_finishes(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not yet: the write is still going on
        assert tmp.parent == tmp_path and tmp.suffix == ".pt" and tmp.name.startswith(".")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_path_leaves_the_target_and_no_temp_when_the_write_fails(tmp_path):
    target = tmp_path / "best.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_atomic_path_with_fsync_and_a_new_target(tmp_path):
    target = tmp_path / "result.json"
    with atomic_path(target, fsync=True) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}"


def test_two_writers_of_one_target_get_their_own_temp_files(tmp_path):
    target = tmp_path / "metrics.jsonl"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("a")
        second.write_text("b")
    assert target.read_text() == "a"  # the outer write finished last, so it wins


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello\n")
    assert (tmp_path / "a.txt").read_text() == "hello\n"
