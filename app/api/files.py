"""File answers: ETag = sha256 (If-None-Match -> 304), Range (via Starlette), a download name."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import Request, Response
from fastapi.responses import FileResponse

from app.artifacts import ArtifactStore
from app.errors import NotFound
from app.exports import ExportFormat, export_checkpoint
from app.models import Checkpoint, Job

MEDIA_TYPES = {
    "safetensors": "application/octet-stream",
    "pt": "application/octet-stream",
    "pt2": "application/zip",
    "onnx": "application/octet-stream",
    "npz": "application/octet-stream",
    "npy": "application/octet-stream",
    "csv": "text/csv",
    "parquet": "application/vnd.apache.parquet",
}


def file_response(request: Request, path: Path, *, etag: str, filename: str) -> Response:
    if not path.is_file():
        raise NotFound("the file is missing from the artifact store")
    tag = f'"{etag}"'
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": tag})
    suffix = filename.rsplit(".", 1)[-1]
    return FileResponse(
        path,
        filename=filename,
        media_type=MEDIA_TYPES.get(suffix, "application/octet-stream"),
        headers={"ETag": tag, "Cache-Control": "private, no-cache"},
    )


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/").strip('"') for t in header.split(",")]
    return "*" in tags or etag in tags


def checkpoint_response(
    request: Request,
    artifacts: ArtifactStore,
    job: Job,
    checkpoint: Checkpoint,
    fmt: ExportFormat | None,
) -> Response:
    """The checkpoint's file, or its export in `fmt` (made once, then cached beside it)."""
    weights = artifacts.path(checkpoint.path)
    stem = f"{_safe(job.name)}-{checkpoint.kind}-epoch{checkpoint.epoch}"
    if fmt is None:
        suffix = weights.suffix.lstrip(".")
        return file_response(request, weights, etag=checkpoint.sha256, filename=f"{stem}.{suffix}")
    if not weights.is_file():
        raise NotFound("the checkpoint file is missing from the artifact store")
    exported = export_checkpoint(job.spec, job.fields, checkpoint.kind, weights, fmt)
    return file_response(
        request, exported, etag=f"{checkpoint.sha256}-{fmt}", filename=f"{stem}.{fmt}"
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "job"
