"""Datasets: upload, list, read, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile

from app.api.deps import ArtifactsDep, CurrentUser, SessionDep, SessionsDep, SettingsDep, UserAuth
from app.api.schemas import DatasetOut
from app.store import datasets
from app.uploads import delete_dataset, upload_dataset

router = APIRouter(prefix="/datasets", tags=["datasets"], dependencies=[UserAuth])


@router.post("", status_code=201, response_model=DatasetOut)
def upload(
    user: CurrentUser,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description=".npz, .npy, .csv or .parquet")],
) -> DatasetOut:
    dataset = upload_dataset(
        sessions,
        artifacts,
        user_id=user.id,
        filename=file.filename,
        source=file.file,
        max_bytes=settings.max_upload_bytes,
        max_unpacked_bytes=settings.max_unpacked_bytes,
    )
    return DatasetOut.of(dataset)


@router.get("", response_model=list[DatasetOut])
def list_datasets(user: CurrentUser, session: SessionDep) -> list[DatasetOut]:
    return [DatasetOut.of(d) for d in datasets.list_for_user(session, user.id)]


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, user: CurrentUser, session: SessionDep) -> DatasetOut:
    return DatasetOut.of(datasets.get(session, user.id, dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete(
    dataset_id: str, user: CurrentUser, sessions: SessionsDep, artifacts: ArtifactsDep
) -> Response:
    delete_dataset(sessions, artifacts, user.id, dataset_id)
    return Response(status_code=204)
