"""The worker's HTTP client for the API's worker protocol (docs/service.md)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from worker.engine.files import atomic_path


class StaleAttempt(Exception):
    """The API says this attempt is no longer the job's current one (409)."""


class NotClaimable(Exception):
    """The job is not queued any more (claimed elsewhere, cancelled or finished)."""


class ApiUnavailable(Exception):
    """The API could not be reached or answered 5xx: retry later."""


@dataclass
class Claim:
    job_id: str
    attempt: int
    token: str
    spec: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    resume_url: str | None
    lease_s: float
    # A job of several nodes: {"member": node rank, "wait_s": how long to wait for the
    # gang}; the place (rank, endpoint) comes from `gang()` once it is whole.
    gang: dict[str, Any] | None = None
    place: dict[str, Any] | None = None


class WorkerClient:
    def __init__(self, api_url: str, token: str, *, timeout: float = 30.0):
        self.http = httpx.Client(
            base_url=api_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"{method} {url}: {exc}") from None
        if response.status_code >= 500:
            raise ApiUnavailable(f"{method} {url}: HTTP {response.status_code}")
        if response.status_code == 409:
            detail = _detail(response)
            if "stale" in detail:
                raise StaleAttempt(detail)
            raise NotClaimable(detail)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {url}: HTTP {response.status_code}: {_detail(response)}")
        return response

    def claim(
        self, job_id: str, worker: str, host: str | None = None, port: int | None = None
    ) -> Claim:
        ask: dict[str, Any] = {"worker": worker}
        if host and port:
            ask.update(host=host, port=port)
        body = self._request("POST", f"/api/v1/worker/jobs/{job_id}/claim", json=ask).json()
        resume = body.get("resume") or None
        return Claim(
            job_id=job_id,
            attempt=int(body["attempt"]),
            token=body["token"],
            spec=body["spec"],
            datasets=body.get("datasets", {}),
            resume_url=resume["url"] if resume else None,
            lease_s=float(body.get("lease_s", 30)),
            gang=body.get("gang"),
        )

    def gang(self, job_id: str) -> dict[str, Any]:
        """This gang member's place (its member token): gathering, whole or gone."""
        return self._request("POST", f"/api/v1/worker/jobs/{job_id}/gang").json()

    def heartbeat(self, job_id: str, progress: dict[str, Any]) -> bool:
        body = self._request(
            "POST", f"/api/v1/worker/jobs/{job_id}/heartbeat", json={"progress": progress}
        )
        return bool(body.json().get("cancel", False))

    def metrics(self, job_id: str, points: list[dict[str, Any]]) -> bool:
        body = self._request(
            "POST", f"/api/v1/worker/jobs/{job_id}/metrics", json={"points": points}
        )
        return bool(body.json().get("cancel", False))

    def logs(self, job_id: str, lines: list[str]) -> None:
        self._request("POST", f"/api/v1/worker/jobs/{job_id}/logs", json={"lines": lines})

    def checkpoint(
        self, job_id: str, kind: str, epoch: int, path: Path, meta: dict[str, Any]
    ) -> None:
        digest = sha256_file(path)
        headers = {"X-Sha256": digest, "X-Step": str(meta.get("step", 0))}
        if meta.get("monitor") is not None:
            headers["X-Monitor"] = str(meta["monitor"])
        if meta.get("value") is not None:
            headers["X-Value"] = repr(float(meta["value"]))
        with path.open("rb") as handle:
            self._request(
                "PUT",
                f"/api/v1/worker/jobs/{job_id}/checkpoints/{kind}/{epoch}",
                content=handle,
                headers=headers,
            )

    def finish(self, job_id: str, status: str, result: dict[str, Any]) -> None:
        self._request(
            "POST",
            f"/api/v1/worker/jobs/{job_id}/finish",
            json={"status": status, "result": result},
        )

    def release(
        self, job_id: str, reason: str, *, lost: bool = False, timeout: float | None = None
    ) -> None:
        """Hand the job back (this worker is stopping): queued now, resumed by the next one.

        `lost`: the attempt was lost (a rank or node died): a restart, as for a lost worker."""
        self._request(
            "POST",
            f"/api/v1/worker/jobs/{job_id}/release",
            json={"reason": reason, "lost": lost},
            **({"timeout": timeout} if timeout is not None else {}),
        )

    def download(self, url: str, dest: Path, sha256: str | None = None) -> Path:
        """Stream a file to `dest` through a temp name; check its sha256 when given."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with atomic_path(dest) as tmp:
            try:
                with self.http.stream("GET", url) as response:
                    if response.status_code == 404:
                        raise FileNotFoundError(url)
                    if response.status_code == 409:
                        raise StaleAttempt(url)
                    if response.status_code >= 400:
                        raise ApiUnavailable(f"GET {url}: HTTP {response.status_code}")
                    with tmp.open("wb") as out:
                        for chunk in response.iter_bytes(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
            except httpx.HTTPError as exc:
                raise ApiUnavailable(f"GET {url}: {exc}") from None
            if sha256 and digest.hexdigest() != sha256:
                raise RuntimeError(f"download of {url} does not match its sha256")
        return dest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", "")
    except ValueError:
        return response.text[:200]
    return detail if isinstance(detail, str) else str(detail)
