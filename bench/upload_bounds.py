"""Uploads against a real uvicorn process: hostile files and one big honest file.

For each upload: the answer, the time it took, and the API process's memory growth
(peak RSS from /proc/<pid>/status VmHWM, reset with clear_refs before each upload,
minus the RSS before it). The big file goes up both ways the API takes: the raw
bytes (application/octet-stream, ?name=; what torchyard's Client and CLI send, here
through Client.datasets.upload) and a multipart form (browsers, curl -F). While it
uploads, a thread polls GET /healthz and GET /api/v1/datasets every 20 ms: their
p50/p99 against the same polls idle.

Baselines for the big file: copying the same file on the same disk (read, write,
fsync), and the same copy hashing it with sha256 as it goes: what an upload has to
do at the least (the store keeps every file's sha256). Copies and uploads alternate,
`--rounds` times, and medians are compared: on a VM a copy takes several times longer
when the page cache it writes is fresh memory (2 to 13 s for 2 GB on the 2-core dev
machine), so a baseline measured apart from the uploads would mislead.

    .venv/bin/python bench/upload_bounds.py [--gb 2] [--rounds 2] [--skip-hostile]

Goals: API memory growth under 256 MB for every upload; the big file at disk speed
(upload/copy near 1; the bytes also cross loopback HTTP and are hashed); polls during
the upload answered (p99 within a few times idle). Exits non-zero only on an error.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.app.hostile_files import (  # noqa: E402  (after the path is set)
    deflated_zeros,
    many_members,
    npy_header,
    stored,
    wide_csv,
    zip_archive,
)
from torchyard import Client  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Api:
    def __init__(self, home: Path, max_upload: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = "ty_" + secrets.token_urlsafe(24)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TORCHYARD_HOME": str(home),
            "TORCHYARD_TOKEN": self.token,
            "TORCHYARD_MAX_UPLOAD_BYTES": str(max_upload),
        }
        argv = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
        argv += ["--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the API did not start")
            time.sleep(0.2)

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=600)

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def measure(self, upload):
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        before = self.status("VmRSS")
        started = time.perf_counter()
        response = upload()
        took = time.perf_counter() - started
        return response, took, self.status("VmHWM") - before

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def honest_npz(path: Path, size: int) -> tuple[int, int]:
    """An NPZ of float32 features (N, 128) and int64 labels, written in 64 MiB pieces."""
    rows = size // (128 * 4 + 8)
    rows -= rows % 4096
    block = np.random.default_rng(0).standard_normal((4096, 128), dtype=np.float32).tobytes()
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("x.npy", "w", force_zip64=True) as fp:
            fp.write(npy_header("<f4", (rows, 128)))
            for _ in range(rows // 4096):
                fp.write(block)
        labels = (np.arange(rows) % 10).astype("<i8")
        with archive.open("y.npy", "w", force_zip64=True) as fp:
            fp.write(npy_header("<i8", (rows,)))
            fp.write(labels.tobytes())
    return rows, path.stat().st_size


def disk_copy(source: Path, folder: Path, *, hashed: bool = False) -> float:
    """Copy `source` on the same disk in 1 MiB pieces and fsync; with its sha256 if `hashed`."""
    target = folder / "copy.bin"
    digest = hashlib.sha256()
    started = time.perf_counter()
    with source.open("rb") as src, target.open("wb") as dst:
        while piece := src.read(MIB):
            if hashed:
                digest.update(piece)
            dst.write(piece)
        dst.flush()
        os.fsync(dst.fileno())
    took = time.perf_counter() - started
    target.unlink()
    return took


def poll(api: Api, job_path: str, stop: threading.Event, out: list[float]) -> None:
    with api.client() as client:
        while not stop.is_set():
            for path in ("/healthz", job_path):
                started = time.perf_counter()
                response = client.get(api.url + path)
                out.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
            time.sleep(0.02)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0, help="size of the honest file")
    parser.add_argument("--rounds", type=int, default=2, help="copies and uploads, alternated")
    parser.add_argument("--skip-hostile", action="store_true")
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory(prefix="upload-bounds-") as scratch:
        folder = Path(scratch)
        api = Api(folder / "home", max_upload=size + GIB)
        try:
            run(api, folder, size, args.skip_hostile, args.rounds)
        finally:
            api.stop()


def run(api: Api, folder: Path, size: int, skip_hostile: bool, rounds: int) -> None:
    rows_out: list[tuple[str, str, str, str]] = []

    def upload_bytes(name: str, data: bytes):
        with api.client() as client:
            return client.post("/datasets", files={"file": (name, data)})

    if not skip_hostile:
        hostile = {
            "npz, 400,000 members (90 MB)": ("many.npz", many_members(400_000)),
            "csv, 238,000 columns": ("wide.csv", wide_csv(238_000)),
            "npz, 7 members x 1 GiB zeros (int64)": (
                "zeros.npz",
                zip_archive(
                    [
                        stored("y.npy", npy_header("<i8", (4,)) + np.arange(4).tobytes()),
                        *(deflated_zeros(f"m{i}.npy", "<i8", GIB // 8) for i in range(7)),
                    ]
                ),
            ),
        }
        for what, (name, data) in hostile.items():
            response, took, grew = api.measure(lambda n=name, d=data: upload_bytes(n, d))
            detail = response.json().get("detail") if response.status_code != 201 else "described"
            rows_out.append(
                (what, f"{response.status_code} {detail}"[:70], f"{took:.2f}", f"{grew / MIB:.0f}")
            )

    path = folder / "honest.npz"
    _, nbytes = honest_npz(path, size)
    job_path = "/api/v1/datasets"  # a read of the database, authenticated
    idle: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=poll, args=(api, job_path, stop, idle))
    thread.start()
    time.sleep(5)
    stop.set()
    thread.join()

    def upload_raw() -> dict:
        with Client(api.url, api.token) as client:
            return client.datasets.upload(path)

    def upload_form() -> dict:
        with api.client() as client, path.open("rb") as fp:
            response = client.post("/datasets", files={"file": ("honest.npz", fp)})
        assert response.status_code == 201, response.text
        return response.json()

    times: dict[str, list[float]] = {}
    grown: dict[str, list[int]] = {}
    cpu: dict[str, list[float]] = {}
    busy: list[float] = []
    for _ in range(rounds):
        times.setdefault("copy", []).append(disk_copy(path, folder))
        times.setdefault("copy with sha256", []).append(disk_copy(path, folder, hashed=True))
        for way, upload in (("raw", upload_raw), ("form", upload_form)):
            stop = threading.Event()
            thread = threading.Thread(target=poll, args=(api, job_path, stop, busy))
            thread.start()
            cpu_before = api.cpu_s()
            dataset, took, grew = api.measure(upload)
            cpu.setdefault(way, []).append(api.cpu_s() - cpu_before)
            stop.set()
            thread.join()
            assert dataset["size"] == nbytes and dataset["rows"], dataset
            times.setdefault(way, []).append(took)
            grown.setdefault(way, []).append(grew)
            with api.client() as client:  # the next round writes as much again
                client.delete(f"/datasets/{dataset['id']}").raise_for_status()
    for way in ("raw", "form"):
        rows_out.append(
            (
                f"npz, honest, {nbytes / 1e9:.2f} GB, {way}",
                "201 described",
                f"{statistics.median(times[way]):.2f}",
                f"{max(grown[way]) / MIB:.0f}",
            )
        )

    print("\n| upload | answer | s (median) | API RSS growth MB (max) |\n|---|---|---|---|")
    for row in rows_out:
        print("| " + " | ".join(row) + " |")
    median = {what: statistics.median(values) for what, values in times.items()}
    each = "; ".join(
        f"{what} " + ", ".join(f"{t:.2f}" for t in values) for what, values in times.items()
    )
    print(f"\nhonest file, {rounds} round(s), seconds each: {each}")
    for way in ("raw", "form"):
        took = median[way]
        cpu_gb = statistics.median(cpu[way]) / (nbytes / 1e9)
        print(
            f"{way}: upload {took:.2f} s, upload/copy {took / median['copy']:.2f} "
            f"(copy {median['copy']:.2f} s), upload/(copy with sha256) "
            f"{took / median['copy with sha256']:.2f} ({median['copy with sha256']:.2f} s); "
            f"{nbytes / took / 1e6:.0f} MB/s; API process CPU {cpu_gb:.2f} s a GB"
        )
    print(
        f"polls (GET /healthz and a list read, {len(busy)} during the uploads, {len(idle)} idle): "
        f"p50 {pct(busy, 0.5):.1f} ms vs {pct(idle, 0.5):.1f} ms idle, "
        f"p99 {pct(busy, 0.99):.1f} ms vs {pct(idle, 0.99):.1f} ms idle, "
        f"max {pct(busy, 1.0):.1f} ms"
    )


if __name__ == "__main__":
    main()
