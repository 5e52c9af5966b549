"""Re-submitting a spec whose local datasets the service already holds.

`torchyard.Client.submit(spec.json)` on a spec naming ~200 MB of local NPZ files
(relative paths, as `torchyard train` reads them): the first submit uploads them;
every later one hashes the files, asks the service for each sha256, finds them,
and sends only the spec. Measured: the time of each re-submit and the dataset
bytes it sent (counted on the client's own requests).

Baseline: a bare POST /api/v1/jobs of the same spec with the dataset ids in it
(what a user who uploaded by hand and edited the spec would send). Rounds alternate
the two. Also shown, for the record: the first submit (the uploads) and the
`torchyard submit` command (a new Python process each time).

    .venv/bin/python bench/resubmit.py [--mb 200] [--rounds 10] [--db sqlite|postgres]

Goal: a re-submit sends no dataset bytes and returns in <= 1 s. Exits non-zero only
on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_harness import (
    ROOT,
    Served,
    Settings,
    client,
    database,
    expect,
    migrate,
    print_table,
    python_path,
    scratch,
)

FEATURES = 64  # float32 columns: 256 bytes a row


def write_datasets(folder: Path, total_mb: int) -> dict[str, Path]:
    """train.npz (3/4 of the bytes) and val.npz (1/4), uncompressed, in folder/data."""
    rng = np.random.default_rng(0)
    out = {}
    for name, share in (("train", 0.75), ("val", 0.25)):
        rows = int(total_mb * 1e6 * share / (FEATURES * 4 + 8))
        path = folder / "data" / f"{name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
        np.savez(path, x=x, y=rng.integers(0, 10, size=rows).astype("int64"))
        out[name] = path
    return out


def spec_document(train: str, validation: str) -> dict[str, Any]:
    return {
        "name": "bench-resubmit",
        "data": {"train": train, "validation": validation, "inputs": "x", "targets": "y"},
        "model": {"layers": [{"type": "linear", "out_features": 10}]},
        "training": {"epochs": 1, "loss": "cross_entropy", "device": "cpu"},
    }


class SentBytes:
    """Counts what a client's requests to POST /datasets carried (an httpx event hook)."""

    def __init__(self) -> None:
        self.uploads = 0
        self.bytes = 0

    def __call__(self, request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path.endswith("/datasets"):
            self.uploads += 1
            self.bytes += int(request.headers.get("content-length", 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="dataset megabytes in all")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cli-runs", type=int, default=3)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()

    from torchyard import Client

    with scratch() as tmp, database(args.db, Path(tmp)) as db_url:
        folder = Path(tmp)
        files = write_datasets(folder, args.mb)
        size = sum(p.stat().st_size for p in files.values())
        spec_path = folder / "spec.json"
        spec_path.write_text(json.dumps(spec_document("data/train.npz", "data/val.npz")))
        settings = Settings(folder / "home", db_url, "filesystem://")
        migrate(db_url)
        with Served("torchyard", env=settings.env()) as api:
            sent = SentBytes()
            with (
                Client(api.url, settings.token) as torchyard,
                client(api.url, settings.token) as bare,
            ):
                torchyard.http.event_hooks["request"].append(sent)
                started = time.perf_counter()
                first = torchyard.submit(spec_path)
                first_s = time.perf_counter() - started
                first_uploads, first_bytes = sent.uploads, sent.bytes
                ids_spec = first.info["spec"]
                ours: list[float] = []
                baseline: list[float] = []
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    torchyard.submit(spec_path)
                    ours.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    expect(bare.post("/jobs", json=ids_spec), 201)
                    baseline.append(time.perf_counter() - started)
                resent_uploads = sent.uploads - first_uploads
                resent_bytes = sent.bytes - first_bytes
                held = len(expect(bare.get("/datasets"), 200))
            env = {
                **os.environ,
                "PYTHONPATH": python_path(),
                "TORCHYARD_URL": api.url,
                "TORCHYARD_TOKEN": settings.token,
            }
            cli: list[float] = []
            for _ in range(args.cli_runs):
                started = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "app.cli", "submit", str(spec_path)],
                    env=env,
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                )
                cli.append(time.perf_counter() - started)

    base = statistics.median(baseline)
    print(f"datasets: {size / 1e6:.0f} MB in 2 files; {args.rounds} rounds; {args.db}")
    print_table(
        ["case", "median s", "max s", "uploads", "dataset bytes sent", "/ baseline"],
        [
            [
                "first submit (uploads)",
                first_s,
                first_s,
                first_uploads,
                first_bytes,
                first_s / base,
            ],
            [
                "re-submit, Client.submit(spec.json)",
                statistics.median(ours),
                max(ours),
                resent_uploads,
                resent_bytes,
                statistics.median(ours) / base,
            ],
            ["baseline: bare POST /jobs of ids", base, max(baseline), 0, 0, 1.0],
            [
                "`torchyard submit spec.json` (process)",
                statistics.median(cli),
                max(cli),
                "-",
                "-",
                statistics.median(cli) / base,
            ],
        ],
    )
    met = resent_bytes == 0 and held == 2 and max(ours) <= 1.0
    print(f"goal (no dataset bytes, <= 1 s): {'met' if met else 'NOT met'}; datasets held: {held}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
