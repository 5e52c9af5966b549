"""A job taken to its end through the worker protocol, as a worker would."""

from __future__ import annotations

import hashlib

from tests.app.conftest import Server, claim, points

WEIGHTS = b"w" * 100


def finish(server: Server, job_id: str) -> None:
    """Claim, report three loss points, a log line and the best weights, succeed."""
    attempt = claim(server, job_id)
    attempt.post("metrics", {"points": points(1.0, 0.5, 0.25)})
    attempt.post("logs", {"lines": ["epoch 0 done"]})
    headers = {"X-Sha256": hashlib.sha256(WEIGHTS).hexdigest(), "X-Step": "3"}
    attempt.client.put(
        f"/worker/jobs/{job_id}/checkpoints/best/0", content=WEIGHTS, headers=headers
    )
    attempt.post("finish", {"status": "succeeded", "result": {"best_epoch": 0}})
