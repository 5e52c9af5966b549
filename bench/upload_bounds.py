"""Uploads against a real uvicorn process: hostile files and one big honest file.

For each upload: the answer, the time it took, and the API process's memory growth
(peak RSS from /proc/<pid>/status VmHWM, reset with clear_refs before each upload,
minus the RSS before it). While the big file uploads, a thread polls GET /healthz
and GET /api/v1/datasets every 20 ms: their p50/p99 against the same polls idle.

Baselines for the big file: copying the same file on the same disk (read, write,
fsync), and the same copy hashing it with sha256 as it goes: what an upload has to
do at the least (the store keeps every file's sha256).

    .venv/bin/python bench/upload_bounds.py [--gb 2] [--skip-hostile]

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
    parser.add_argument("--skip-hostile", action="store_true")
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory(prefix="upload-bounds-") as scratch:
        folder = Path(scratch)
        api = Api(folder / "home", max_upload=size + GIB)
        try:
            run(api, folder, size, args.skip_hostile)
        finally:
            api.stop()


def run(api: Api, folder: Path, size: int, skip_hostile: bool) -> None:
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
    copy_s = statistics.median(disk_copy(path, folder) for _ in range(2))
    hashed_s = statistics.median(disk_copy(path, folder, hashed=True) for _ in range(2))

    job_path = "/api/v1/datasets"  # a read of the database, authenticated
    idle: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=poll, args=(api, job_path, stop, idle))
    thread.start()
    time.sleep(5)
    stop.set()
    thread.join()

    busy: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=poll, args=(api, job_path, stop, busy))
    thread.start()

    def upload_file():
        with api.client() as client, path.open("rb") as fp:
            return client.post("/datasets", files={"file": ("honest.npz", fp)})

    cpu_before = api.cpu_s()
    response, took, grew = api.measure(upload_file)
    api_cpu = api.cpu_s() - cpu_before
    stop.set()
    thread.join()
    assert response.status_code == 201, response.text
    rows_out.append(
        (f"npz, honest, {nbytes / 1e9:.2f} GB", "201 described", f"{took:.2f}", f"{grew / MIB:.0f}")
    )

    print("\n| upload | answer | s | API RSS growth MB |\n|---|---|---|---|")
    for row in rows_out:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nhonest file: upload {took:.2f} s, disk copy {copy_s:.2f} s, "
        f"upload/copy {took / copy_s:.2f}; copy with sha256 {hashed_s:.2f} s, "
        f"upload/(copy with sha256) {took / hashed_s:.2f}; {nbytes / took / 1e6:.0f} MB/s; "
        f"API process CPU {api_cpu:.2f} s ({api_cpu / (nbytes / 1e9):.2f} s a GB)"
    )
    print(
        f"polls (GET /healthz and a list read, {len(busy)} during the upload, {len(idle)} idle): "
        f"p50 {pct(busy, 0.5):.1f} ms vs {pct(idle, 0.5):.1f} ms idle, "
        f"p99 {pct(busy, 0.99):.1f} ms vs {pct(idle, 0.99):.1f} ms idle"
    )


if __name__ == "__main__":
    main()
