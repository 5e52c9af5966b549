"""Dataset uploads: stream the file into the artifact store, describe it, record it.

The body (the raw file, or a multipart form) goes straight to a temp file in the
store (`upload_stream`), hashed as it is written, and is renamed into place;
describing reads the stored file with bounded memory and work
(`worker.engine.data.describe`) on a worker thread, so a big upload blocks neither
the event loop nor other requests.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app.artifacts import ArtifactStore, TempFile
from app.config import Settings
from app.db import Sessions, session_scope
from app.errors import Unprocessable
from app.field_infos import to_json
from app.ids import new_id
from app.models import Dataset
from app.store import datasets
from app.upload_stream import receive_file

if TYPE_CHECKING:
    from worker.engine.data import DatasetInfo

SUFFIXES = (".npz", ".npy", ".csv", ".parquet")
FILE_FIELD = "file"  # the form's part
NAME_PARAM = "name"  # a raw body's file name, in the query


def display_name(filename: str | None) -> str:
    """The last part of a client's file name, for display only: it never becomes a path."""
    name = PureWindowsPath(PurePosixPath(filename or "").name).name.strip()
    return "".join(c for c in name if c.isprintable())[:255] or "dataset"


def dataset_suffix(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise Unprocessable(
            f"{name!r} is not a dataset file: expected one of {', '.join(SUFFIXES)}"
        )
    return suffix


async def upload_dataset(
    sessions: Sessions,
    artifacts: ArtifactStore,
    settings: Settings,
    *,
    user_id: int,
    request: Request,
) -> Dataset:
    """Receive, store, describe and record one dataset file; nothing is kept when any step fails."""
    names: list[str] = []

    def check_name(filename: str | None) -> None:
        # before a byte of the file is read: a wrong type is refused at once
        names.append(display_name(filename))
        dataset_suffix(names[-1])

    with artifacts.writing(limit=settings.max_upload_bytes) as temp:
        await receive_file(request, FILE_FIELD, NAME_PARAM, on_name=check_name, write=temp.write)
        return await run_in_threadpool(
            _store, sessions, artifacts, settings, temp, user_id=user_id, name=names[-1]
        )


def _store(
    sessions: Sessions,
    artifacts: ArtifactStore,
    settings: Settings,
    temp: TempFile,
    *,
    user_id: int,
    name: str,
) -> Dataset:
    dataset_id = new_id()
    # The stored name comes from the id, never from the client.
    relative = f"datasets/{dataset_id}/data{dataset_suffix(name)}"
    path = artifacts.commit(temp, relative)
    try:
        info = _describe(path, name, settings)
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


def _describe(path: Path, name: str, settings: Settings) -> DatasetInfo:
    from worker.engine.data import ScanBounds, describe
    from worker.engine.errors import DataError

    bounds = ScanBounds(
        max_columns=settings.max_dataset_columns,
        max_members=settings.max_dataset_members,
        max_scan_bytes=settings.max_class_scan_bytes,
    )
    try:
        return describe(path, max_bytes=settings.max_unpacked_bytes, bounds=bounds)
    except DataError as exc:
        # The reader names the stored file (data.npz); the client knows its own name.
        raise Unprocessable(_one_line(exc).replace(path.name, name, 1)) from None
    except Exception as exc:  # a reader library choking on a malformed file
        raise Unprocessable(
            f"cannot read {name!r} as {path.suffix[1:]}: {_one_line(exc)}"
        ) from None


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
