"""torchyard's Python client: submit job specs to a torchyard service and follow them.

    from torchyard import Client

    client = Client()                       # TORCHYARD_URL, TORCHYARD_TOKEN
    job = client.submit("examples/digits_cnn.json", project="digits", tags=["cnn"])
    for event in job.follow():              # server-sent events, resumed if dropped
        print(event.event, event.data)
    job.wait()
    history = job.metrics(["val_accuracy"], max_points=500)
    job.download("best.safetensors")

`AsyncClient` (also `torchyard.aio`) has the same methods for asyncio code. Errors
are `TorchyardError`s: `ApiError` carries the service's status, detail and JSON path.
This package needs only httpx and httpx-sse: it imports nothing of the service or
the training engine.
"""

from __future__ import annotations

from torchyard.aio import AsyncClient, AsyncDatasets
from torchyard.client import Client, Datasets
from torchyard.errors import ApiError, Issue, LocalSpecError, TorchyardError, Unreachable
from torchyard.events import Event
from torchyard.jobs import AsyncJob, Job
from torchyard.metrics import Metrics, Point

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncDatasets",
    "AsyncJob",
    "Client",
    "Datasets",
    "Event",
    "Issue",
    "Job",
    "LocalSpecError",
    "Metrics",
    "Point",
    "TorchyardError",
    "Unreachable",
]
