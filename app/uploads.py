"""Dataset uploads: stream the file into the artifact store, describe it, record it."""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import BinaryIO

from app.artifacts import ArtifactStore
from app.db import Sessions, session_scope
from app.errors import Unprocessable
from app.field_infos import to_json
from app.ids import new_id
from app.models import Dataset
from app.store import datasets

SUFFIXES = (".npz", ".npy", ".csv", ".parquet")


def display_name(filename: str | None) -> str:
    """The last part of a client's file name, for display only: it never becomes a path."""
    name = PureWindowsPath(PurePosixPath(filename or "").name).name.strip()
    return "".join(c for c in name if c.isprintable())[:255] or "dataset"


def upload_dataset(
    sessions: Sessions,
    artifacts: ArtifactStore,
    *,
    user_id: int,
    filename: str | None,
    source: BinaryIO,
    max_bytes: int,
    max_unpacked_bytes: int,
) -> Dataset:
    """Store, describe and record one dataset file; nothing is kept when any step fails."""
    from worker.engine.data import describe
    from worker.engine.errors import DataError

    name = display_name(filename)
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise Unprocessable(
            f"{name!r} is not a dataset file: expected one of {', '.join(SUFFIXES)}"
        )
    dataset_id = new_id()
    # The stored name comes from the id, never from the client.
    relative = f"datasets/{dataset_id}/data{suffix}"
    with artifacts.writing(limit=max_bytes) as temp:
        temp.copy_from(source)
        path = artifacts.commit(temp, relative)
    try:
        try:
            info = describe(path, max_bytes=max_unpacked_bytes)
        except DataError as exc:
            # The reader names the stored file (data.npz); the client knows its own name.
            raise Unprocessable(_one_line(exc).replace(path.name, name, 1)) from None
        except Exception as exc:  # a reader library choking on a malformed file
            raise Unprocessable(f"cannot read {name!r} as {suffix[1:]}: {_one_line(exc)}") from None
        with session_scope(sessions) as session:
            return datasets.create(
                session,
                dataset_id=dataset_id,
                user_id=user_id,
                name=name,
                format=info.format,
                size=temp.size,
                sha256=temp.sha256,
                rows=info.rows,
                fields=to_json(info.fields),
                path=relative,
            )
    except BaseException:
        artifacts.delete_tree(f"datasets/{dataset_id}")
        raise


def delete_dataset(
    sessions: Sessions, artifacts: ArtifactStore, user_id: int, dataset_id: str
) -> None:
    with session_scope(sessions) as session:
        datasets.delete_unused(session, user_id, dataset_id)
    # after commit: a rolled-back delete must still find its file
    artifacts.delete_tree(f"datasets/{dataset_id}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
