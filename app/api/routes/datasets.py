"""Datasets: upload, list, read, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import ArtifactsDep, CurrentUser, SessionDep, SessionsDep, SettingsDep, UserAuth
from app.api.schemas import DatasetOut
from app.store import datasets
from app.uploads import NAME_PARAM, delete_dataset, upload_dataset

# The body is streamed by the route itself (app/upload_stream.py), so it is described here.
UPLOAD_BODY: dict[str, Any] = {
    "parameters": [
        {
            "name": NAME_PARAM,
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "The file's name, for a raw (application/octet-stream) body: "
            "its suffix says the format (a form's file part carries its own name)",
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "The file's bytes (.npz, .npy, .csv or .parquet; name in "
                    "`?name=`): the fastest way, nothing to parse",
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".npz, .npy, .csv or .parquet",
                        }
                    },
                }
            },
        },
    },
}

router = APIRouter(prefix="/datasets", tags=["datasets"], dependencies=[UserAuth])


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=UPLOAD_BODY)
async def upload(
    request: Request,
    user: CurrentUser,
    sessions: SessionsDep,
    artifacts: ArtifactsDep,
    settings: SettingsDep,
) -> DatasetOut:
    """Upload a dataset file, described on arrival: the raw bytes
    (`Content-Type: application/octet-stream`, `?name=train.npz`), or the `file` part of
    a multipart form."""
    dataset = await upload_dataset(sessions, artifacts, settings, user_id=user.id, request=request)
    return DatasetOut.of(dataset)


@router.get("", response_model=list[DatasetOut])
def list_datasets(
    user: CurrentUser,
    session: SessionDep,
    sha256: Annotated[
        str | None,
        Query(
            pattern="^[0-9a-fA-F]{64}$",
            description="Only your datasets with these bytes (sha256 hex): a client asks "
            "before uploading a file the service may already hold",
        ),
    ] = None,
) -> list[DatasetOut]:
    """Your datasets, newest first."""
    found = datasets.list_for_user(session, user.id, sha256=sha256.lower() if sha256 else None)
    return [DatasetOut.of(d) for d in found]


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, user: CurrentUser, session: SessionDep) -> DatasetOut:
    return DatasetOut.of(datasets.get(session, user.id, dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete(
    dataset_id: str, user: CurrentUser, sessions: SessionsDep, artifacts: ArtifactsDep
) -> Response:
    delete_dataset(sessions, artifacts, user.id, dataset_id)
    return Response(status_code=204)
