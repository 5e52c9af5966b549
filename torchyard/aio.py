"""`AsyncClient`: `Client` for asyncio code, the same methods awaited.

from torchyard.aio import AsyncClient

async with AsyncClient() as client:
    job = await client.submit("examples/digits_cnn.json")
    async for event in job.follow():
        print(event.event, event.data)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from httpx_sse import SSEError, aconnect_sse

from torchyard import specs
from torchyard.client import (
    PAGE_SIZE,
    SOURCES_HEADER,
    connection,
    file_pieces,
    list_params,
    matching,
    raw_upload,
)
from torchyard.downloads import atomic_target
from torchyard.errors import Unreachable, raise_for_answer
from torchyard.events import READ_TIMEOUT_S, Event, Followed
from torchyard.jobs import AsyncJob
from torchyard.specs import LocalDataset, SpecSource


async def pieces(handle: BinaryIO) -> AsyncIterator[bytes]:
    """`file_pieces` for httpx's AsyncClient (a MiB from the page cache: no await needed)."""
    for piece in file_pieces(handle):
        yield piece


class AsyncDatasets:
    """The user's datasets on the service (`client.datasets`); see `torchyard.client.Datasets`."""

    def __init__(self, client: AsyncClient):
        self._client = client

    async def upload(self, path: str | Path, *, name: str | None = None) -> dict[str, Any]:
        path = Path(path)
        with path.open("rb") as handle:
            request = raw_upload(path, name)
            return await self._client._call("POST", "/datasets", content=pieces(handle), **request)

    async def find(self, sha256: str) -> list[dict[str, Any]]:
        return await self._client._call("GET", "/datasets", params={"sha256": sha256})

    async def ensure(self, local: LocalDataset) -> dict[str, Any]:
        found = matching(await self.find(local.sha256), local)
        return found or await self.upload(local.file, name=local.upload_name)

    async def list(self) -> list[dict[str, Any]]:
        return await self._client._call("GET", "/datasets")

    async def get(self, dataset_id: str) -> dict[str, Any]:
        return await self._client._call("GET", f"/datasets/{dataset_id}")

    async def delete(self, dataset_id: str) -> None:
        await self._client._call("DELETE", f"/datasets/{dataset_id}")


class AsyncClient:
    """A torchyard service's REST API over httpx's AsyncClient; see `torchyard.Client`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.url, headers = connection(url, token)
        self.http = httpx.AsyncClient(
            base_url=self.url + "/api/v1", headers=headers, timeout=timeout, transport=transport
        )
        self.datasets = AsyncDatasets(self)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def submit(
        self,
        spec: SpecSource,
        *,
        project: str | None = None,
        tags: Iterable[str] | None = None,
        note: str | None = None,
    ) -> AsyncJob:
        document, headers = await self._prepare(spec)
        document = specs.with_labels(document, project=project, tags=tags, note=note)
        return AsyncJob(self, await self._call("POST", "/jobs", json=document, headers=headers))

    async def validate(self, spec: SpecSource) -> dict[str, Any]:
        document, _ = await self._prepare(spec)
        return (await self._call("POST", "/jobs/validate", json=document))["summary"]

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._call("GET", f"/jobs/{job_id}"))

    async def jobs(
        self,
        *,
        project: str | None = None,
        tag: str | None = None,
        status: str | None = None,
        name: str | None = None,
        sort: str | None = None,
        order: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> AsyncIterator[AsyncJob]:
        params = list_params(
            project=project, tag=tag, status=status, name=name, sort=sort, order=order
        )
        params["limit"] = page_size
        while True:
            page = await self._call("GET", "/jobs", params=params)
            for info in page["jobs"]:
                yield AsyncJob(self, info)
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    async def projects(self) -> list[dict[str, Any]]:
        return await self._call("GET", "/projects")

    # --------------------------------------------------------------- plumbing

    async def _prepare(self, spec: SpecSource) -> tuple[dict[str, Any], dict[str, str]]:
        document, base = specs.load(spec)
        # hashing reads every byte of the files: off the event loop
        local = await asyncio.to_thread(specs.local_datasets, document, base)
        ids: dict[str, str] = {}
        by_bytes: dict[tuple[str, str], str] = {}
        for dataset in local:
            key = (dataset.sha256, dataset.format)
            if key not in by_bytes:
                by_bytes[key] = (await self.datasets.ensure(dataset))["id"]
            ids[dataset.json_path] = by_bytes[key]
        header = specs.sources_header(local)
        return specs.with_ids(document, ids), ({SOURCES_HEADER: header} if header else {})

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach {self.url}: {exc}") from None
        return raise_for_answer(response).json() if response.content else None

    async def _download(self, job_id: str, checkpoint: str, out: Path, fmt: str | None) -> Path:
        params = {"format": fmt} if fmt else {}
        path = f"/jobs/{job_id}/checkpoints/{checkpoint}"
        with atomic_target(out) as tmp:
            try:
                async with self.http.stream("GET", path, params=params, timeout=600) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise_for_answer(response)
                    with tmp.open("wb") as handle:
                        async for chunk in response.aiter_bytes(1 << 20):
                            handle.write(chunk)
            except httpx.HTTPError as exc:
                raise Unreachable(f"cannot reach {self.url}: {exc}") from None
        return out

    async def _follow(self, job_id: str, last_event_id: str | None) -> AsyncIterator[Event]:
        stream = Followed(job_id, last_event_id)
        while True:
            try:
                async with aconnect_sse(
                    self.http,
                    "GET",
                    f"/jobs/{job_id}/events",
                    headers=stream.headers(),
                    timeout=httpx.Timeout(self.http.timeout.connect, read=READ_TIMEOUT_S),
                ) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        raise_for_answer(source.response)
                    async for sse in source.aiter_sse():
                        event = stream.seen(sse)
                        if event is None:
                            continue
                        yield event
                        if event.event == "end":
                            return
                problem = "the stream closed before the job's end"
            except SSEError as exc:
                raise Unreachable(f"{self.url}: {exc}") from None
            except httpx.TransportError as exc:
                problem = str(exc) or type(exc).__name__
            await asyncio.sleep(stream.dropped(problem))
