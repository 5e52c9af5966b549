"""`Client`: the REST API of a torchyard service, for scripts, notebooks and the CLI.

    from torchyard import Client

    client = Client()  # TORCHYARD_URL, TORCHYARD_TOKEN
    job = client.submit("examples/digits_cnn.json")  # local datasets are uploaded if new
    job.wait()
    job.download("best.safetensors")

`AsyncClient` (torchyard.aio) is the same for asyncio code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from httpx_sse import SSEError, connect_sse

from torchyard import specs
from torchyard.downloads import atomic_target
from torchyard.errors import Unreachable, raise_for_answer
from torchyard.events import READ_TIMEOUT_S, Event, Followed
from torchyard.jobs import Job
from torchyard.specs import LocalDataset, SpecSource

DEFAULT_URL = "http://127.0.0.1:8000"
# A dataset goes up as its raw bytes (nothing for the service to parse), read in pieces
# of a MiB: httpx reads a file 64 KiB at a time, which costs the client twice the CPU.
UPLOAD_PIECE = 1 << 20
SOURCES_HEADER = "X-Dataset-Sources"  # app/submission.py
PAGE_SIZE = 50


def connection(url: str | None, token: str | None) -> tuple[str, dict[str, str]]:
    """(the service's URL, the auth headers), from the arguments or the environment."""
    url = (url or os.environ.get("TORCHYARD_URL") or DEFAULT_URL).rstrip("/")
    token = token or os.environ.get("TORCHYARD_TOKEN") or ""
    return url, ({"Authorization": f"Bearer {token}"} if token else {})


def list_params(**filters: Any) -> dict[str, Any]:
    return {key: value for key, value in filters.items() if value is not None}


def raw_upload(path: Path, name: str | None) -> dict[str, Any]:
    """The request arguments, but the body, of a dataset upload: `?name=` and its length."""
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(path.stat().st_size),
    }
    return {"params": {"name": name or path.name}, "headers": headers, "timeout": None}


def file_pieces(handle: BinaryIO) -> Iterator[bytes]:
    while piece := handle.read(UPLOAD_PIECE):
        yield piece


def matching(found: list[dict[str, Any]], local: LocalDataset) -> dict[str, Any] | None:
    """The newest of the user's datasets with the file's bytes, read as the same format."""
    return next((d for d in found if d.get("format") == local.format), None)


class Datasets:
    """The user's datasets on the service (`client.datasets`)."""

    def __init__(self, client: Client):
        self._client = client

    def upload(self, path: str | Path, *, name: str | None = None) -> dict[str, Any]:
        """Upload a .npz .npy .csv or .parquet file; returns the dataset: id, fields, sha256..."""
        path = Path(path)
        with path.open("rb") as handle:
            request = raw_upload(path, name)
            return self._client._call("POST", "/datasets", content=file_pieces(handle), **request)

    def find(self, sha256: str) -> list[dict[str, Any]]:
        """The user's datasets with these bytes, newest first (never another user's)."""
        return self._client._call("GET", "/datasets", params={"sha256": sha256})

    def ensure(self, local: LocalDataset) -> dict[str, Any]:
        """The service's dataset of this file: one it holds already, else uploaded now."""
        return matching(self.find(local.sha256), local) or self.upload(
            local.file, name=local.upload_name
        )

    def list(self) -> list[dict[str, Any]]:
        return self._client._call("GET", "/datasets")

    def get(self, dataset_id: str) -> dict[str, Any]:
        return self._client._call("GET", f"/datasets/{dataset_id}")

    def delete(self, dataset_id: str) -> None:
        """Delete a dataset (409 while a queued or running job uses it)."""
        self._client._call("DELETE", f"/datasets/{dataset_id}")


class Client:
    """A torchyard service's REST API over httpx.

    `url` and `token` default to TORCHYARD_URL (else http://127.0.0.1:8000) and
    TORCHYARD_TOKEN. Errors are `torchyard.errors.TorchyardError`s: `ApiError`
    (the service's status, detail and JSON path), `Unreachable`, `LocalSpecError`.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url, headers = connection(url, token)
        self.http = httpx.Client(
            base_url=self.url + "/api/v1", headers=headers, timeout=timeout, transport=transport
        )
        self.datasets = Datasets(self)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ jobs

    def submit(
        self,
        spec: SpecSource,
        *,
        project: str | None = None,
        tags: Iterable[str] | None = None,
        note: str | None = None,
    ) -> Job:
        """Submit a spec: a dict, or a JSON file. Dataset files it names (relative to the
        spec's folder, or to the working directory for a dict) are uploaded unless the
        service holds the same bytes already; the job records where each came from.
        `project`, `tags`, `note` set those keys of the submitted copy (the file is never
        written)."""
        document, headers = self._prepare(spec)
        document = specs.with_labels(document, project=project, tags=tags, note=note)
        return Job(self, self._call("POST", "/jobs", json=document, headers=headers))

    def validate(self, spec: SpecSource) -> dict[str, Any]:
        """The model summary of a spec the service would run (its local datasets uploaded as
        for `submit`); an ApiError naming each problem's JSON path otherwise."""
        document, _ = self._prepare(spec)
        return self._call("POST", "/jobs/validate", json=document)["summary"]

    def job(self, job_id: str) -> Job:
        return Job(self, self._call("GET", f"/jobs/{job_id}"))

    def jobs(
        self,
        *,
        project: str | None = None,
        tag: str | None = None,
        status: str | None = None,
        name: str | None = None,
        sort: str | None = None,
        order: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> Iterator[Job]:
        """The user's jobs, newest first (or by `sort`: created, best), read a page at a time."""
        params = list_params(
            project=project, tag=tag, status=status, name=name, sort=sort, order=order
        )
        params["limit"] = page_size
        while True:
            page = self._call("GET", "/jobs", params=params)
            for info in page["jobs"]:
                yield Job(self, info)
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def projects(self) -> list[dict[str, Any]]:
        """The user's projects: [{"name", "jobs"}]."""
        return self._call("GET", "/projects")

    # --------------------------------------------------------------- plumbing

    def _prepare(self, spec: SpecSource) -> tuple[dict[str, Any], dict[str, str]]:
        """The document to send (dataset ids in place of local files) and its headers."""
        document, base = specs.load(spec)
        local = specs.local_datasets(document, base)
        ids: dict[str, str] = {}
        by_bytes: dict[tuple[str, str], str] = {}  # one file named twice is sent once
        for dataset in local:
            key = (dataset.sha256, dataset.format)
            if key not in by_bytes:
                by_bytes[key] = self.datasets.ensure(dataset)["id"]
            ids[dataset.json_path] = by_bytes[key]
        header = specs.sources_header(local)
        return specs.with_ids(document, ids), ({SOURCES_HEADER: header} if header else {})

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; the answer's JSON (None for an empty one), or a TorchyardError."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach {self.url}: {exc}") from None
        return raise_for_answer(response).json() if response.content else None

    def _download(self, job_id: str, checkpoint: str, out: Path, fmt: str | None) -> Path:
        params = {"format": fmt} if fmt else {}
        path = f"/jobs/{job_id}/checkpoints/{checkpoint}"
        with atomic_target(out) as tmp:
            try:
                with self.http.stream("GET", path, params=params, timeout=600) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise_for_answer(response)
                    with tmp.open("wb") as handle:
                        for chunk in response.iter_bytes(1 << 20):
                            handle.write(chunk)
            except httpx.HTTPError as exc:
                raise Unreachable(f"cannot reach {self.url}: {exc}") from None
        return out

    def _follow(self, job_id: str, last_event_id: str | None) -> Iterator[Event]:
        stream = Followed(job_id, last_event_id)
        while True:
            try:
                with connect_sse(
                    self.http,
                    "GET",
                    f"/jobs/{job_id}/events",
                    headers=stream.headers(),
                    timeout=httpx.Timeout(self.http.timeout.connect, read=READ_TIMEOUT_S),
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise_for_answer(source.response)
                    for sse in source.iter_sse():
                        event = stream.seen(sse)
                        if event is None:
                            continue
                        yield event
                        if event.event == "end":
                            return
                problem = "the stream closed before the job's end"
            except SSEError as exc:  # not an event stream at all: retrying will not help
                raise Unreachable(f"{self.url}: {exc}") from None
            except httpx.TransportError as exc:
                problem = str(exc) or type(exc).__name__
            time.sleep(stream.dropped(problem))
