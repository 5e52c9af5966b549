"""The training workers `serve` starts beside its API: started, watched, stopped.

Each worker is `python -m app.cli worker --ready-fd N`: it writes its name to that
pipe when Celery is ready to take jobs, so serve can say "worker ready" without
reading the worker's log. A worker that exits while serve still runs is reported
on the terminal with where its log is.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

# How long a worker's exit may precede serve's own stop and still count as part of
# it: Ctrl+C reaches the workers (same process group) as it reaches serve.
STOP_GRACE_S = 2.0
# A stopping worker hands its job back within worker.task.STOP_GRACE_S (3 s), then
# Celery shuts down; serve must be gone within 5 s of Ctrl-C.
WORKERS_STOP_S = 3.5


class EmbeddedWorkers:
    def __init__(
        self,
        gpus: list[list[int]],
        env: dict[str, str],
        *,
        output: IO[str] | None,
        log_path: Path | None,
        say: Callable[[str], None],
        warn: Callable[[str], None],
    ):
        """Start a worker per entry of `gpus` (its GPU set, []: the CPU); their output
        goes to `output` (None: this terminal)."""
        self.log_path = log_path
        self.stopping = threading.Event()
        self._say, self._warn = say, warn
        self._ready = 0
        read_end, write_end = os.pipe()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for i, gpu in enumerate(gpus):
                name = f"embedded{i}"
                argv = [sys.executable, "-m", "app.cli", "worker", "--name", name]
                argv += ["--gpu", ",".join(map(str, gpu))] if gpu else []
                self.procs[name] = subprocess.Popen(
                    [*argv, "--ready-fd", str(write_end)],
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT if output else None,
                    pass_fds=(write_end,),
                    preexec_fn=_die_with_parent,
                )
        finally:
            os.close(write_end)  # the workers hold it now: EOF once they are all gone
        threading.Thread(target=self._read_ready, args=(read_end,), daemon=True).start()
        for name, proc in self.procs.items():
            threading.Thread(target=self._watch, args=(name, proc), daemon=True).start()

    def _read_ready(self, read_end: int) -> None:
        with os.fdopen(read_end, "r") as pipe:
            for line in pipe:
                self._ready += 1
                if len(self.procs) == 1:
                    self._say("worker ready")
                else:
                    self._say(f"worker {line.strip()} ready ({self._ready} of {len(self.procs)})")

    def _watch(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if self.stopping.wait(STOP_GRACE_S):
            return
        where = f"; its log: {self.log_path}" if self.log_path else ""
        self._warn(f"worker {name} exited with code {code}{where}")

    def stop(self) -> None:
        """SIGTERM each worker (Celery's warm shutdown: the running job is handed back),
        then wait; kill any still there after WORKERS_STOP_S. A killed worker's training
        child dies with it (worker.task.die_with_parent)."""
        self.stopping.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + WORKERS_STOP_S
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _die_with_parent() -> None:
    """Linux: a worker started by `serve` gets SIGTERM when serve dies, even by SIGKILL."""
    import ctypes
    import signal

    # Not Linux: no libc.so.6, and serve's own shutdown still stops its workers.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
