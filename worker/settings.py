"""Worker settings: what a GPU worker needs to know, and nothing about the API's state.

`CommonSettings` declares the `TORCHYARD_*` names the API and its workers share
(docs/service.md), once: the API's `app.config.Settings` extends it (app may import
worker.settings, not the reverse), so one environment serves both in embedded mode
and in docker compose, with the same defaults.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path(".torchyard")
DEFAULT_BROKER_URL = "filesystem://"  # kombu's filesystem transport: the embedded broker


class CommonSettings(BaseSettings):
    """What the API and its workers both read from the environment."""

    model_config = SettingsConfigDict(env_prefix="TORCHYARD_", extra="ignore")

    home: Path = Field(default=DEFAULT_HOME, description="Embedded mode's state folder")
    broker_url: str = Field(
        default=DEFAULT_BROKER_URL, description="Celery broker; redis://... deployed"
    )
    api_url: str = Field(
        default="http://127.0.0.1:8000", description="Where workers and the CLI reach the API"
    )
    # "" is unset: the API then makes one in local mode (app.config.with_worker_token)
    # and refuses to start without one outside it.
    worker_token: str = Field(default="", description="Shared secret workers claim jobs with")


class WorkerSettings(CommonSettings):
    work_dir: Path | None = Field(default=None, description="Run folders and dataset cache")
    worker_name: str = Field(default_factory=lambda: socket.gethostname())
    # Where the other workers of a gang reach this one when it is node 0.
    rendezvous_host: str = Field(default_factory=lambda: socket.gethostname())
    report_buffer_points: int = Field(
        default=100_000, ge=100, description="in memory before spilling"
    )
    request_timeout_s: float = 30.0

    @property
    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.home / "worker").resolve()


# `gpu`: jobs that need one GPU, consumed by GPU workers only; `gpuN`: jobs of N GPUs
# a node (resources.gpus N), consumed by workers holding a set of at least N GPUs
# (`--gpu 0,1`). `cpu`: jobs that must not take a GPU. `auto`: jobs that run on a GPU
# when one is free; GPU workers consume it, and the API's reconciler hands a job still
# waiting after auto_gpu_wait_s to the `cpu` queue (docs/service.md, "Queues").
QUEUES = ("cpu", "gpu", "auto")


def gpu_queue(gpus: int) -> str:
    """The queue of jobs that train on `gpus` GPUs a node."""
    return "gpu" if gpus == 1 else f"gpu{gpus}"


def gpus_of_queue(queue: str) -> int | None:
    """How many GPUs a job of `queue` trains on (0: none); None for no queue of ours."""
    if queue in ("cpu", "auto"):
        return 0
    if queue == "gpu":
        return 1
    digits = queue.removeprefix("gpu")
    if queue.startswith("gpu") and digits.isdigit() and str(int(digits)) == digits:
        return int(digits) if int(digits) >= 2 else None
    return None


def worker_queues(gpus: int, given: str | None) -> list[str]:
    """The queues a worker holding `gpus` GPUs consumes; ValueError, saying why, if unfit.

    Default: `cpu` without a GPU; with a set of K, the jobs of 1 to K GPUs (`gpu`,
    `gpu2` .. `gpuK`) and `auto`."""
    if not given:
        return [*(gpu_queue(n) for n in range(1, gpus + 1)), "auto"] if gpus else ["cpu"]
    queues = [q.strip() for q in given.split(",") if q.strip()]
    unknown = [q for q in queues if gpus_of_queue(q) is None]
    if unknown or not queues:
        raise ValueError(
            f"--queues {given!r}: unknown queue(s) {', '.join(unknown) or '(none given)'}; "
            f"expected some of {', '.join(QUEUES)}, or gpuN for jobs of N GPUs"
        )
    for queue in queues:
        needs = gpus_of_queue(queue) or 0
        if needs > gpus:
            held = f"this worker holds {gpus}" if gpus else "this worker holds none"
            raise ValueError(
                f"--queues {queue} needs --gpu with at least {needs} GPU(s) ({held}): jobs "
                f"in the {queue} queue train on {needs} GPU(s), and a worker without them "
                f"would fail them"
            )
    return queues


def celery_config(broker_url: str, home: Path) -> dict[str, Any]:
    """Celery settings shared by the API (sender) and workers (consumers)."""
    config: dict[str, Any] = {
        "broker_url": broker_url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": "cpu",
    }
    if broker_url.startswith("filesystem://"):
        folder = (home / "broker").resolve()
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    elif broker_url.startswith(("redis://", "rediss://")):
        # Long training runs hold an unacked task: keep Redis from handing it to
        # another worker mid-run (the claim would refuse it anyway).
        config["broker_transport_options"] = {"visibility_timeout": 7 * 24 * 3600}
    return config
