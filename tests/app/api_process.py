"""The API as its own uvicorn process, for tests that watch what the process does: its
log (every line it writes, with the app's INFO lines) and its memory (peak RSS from
/proc, reset before each measured step)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]

# uvicorn's own loggers at their defaults; the root logger shows the app's INFO lines too
LAUNCH = """
import logging, sys, uvicorn
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
uvicorn.run("app.main:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]),
            log_level="info", access_log=False, timeout_graceful_shutdown=1)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiProcess:
    def __init__(self, home: Path, **settings: str):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = "ty_" + secrets.token_urlsafe(24)
        self.log_path = home / "api.log"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TORCHYARD_HOME": str(home),
            "TORCHYARD_TOKEN": self.token,
            "OMP_NUM_THREADS": "1",
            **{f"TORCHYARD_{k.upper()}": v for k, v in settings.items()},
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{self.log()}")
            time.sleep(0.2)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=120,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _status(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def reset_peak(self) -> int:
        """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5); the RSS."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self._status()["VmRSS"]

    def peak(self) -> int:
        return self._status()["VmHWM"]

    def temp_files(self) -> list[Path]:
        return list((self.home / "artifacts" / "tmp").glob("*"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
