"""Request and response bodies of the REST API (they are also the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from app.models import Checkpoint, Dataset, Job
from app.store.metrics import finite, latest_values
from worker.engine.spec import LABEL_CHARACTERS, MAX_TAGS, Label, Note, Tags

# The largest values the database's integer columns hold (Integer, BigInteger): a
# larger number in a request is a 422, not an overflow inside the database driver.
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1


class IssueOut(BaseModel):
    path: str = Field(description="Where: a JSON path in the spec, or query.x / body.x / path.x")
    message: str = Field(description="What was found and what was expected")


class ErrorOut(BaseModel):
    """Every error answer: one line, or one issue per problem (a spec, a request's fields)."""

    detail: str | list[IssueOut]


# The error answers of the API's routes, documented with the body they really have
# (FastAPI's default 422 schema describes its own validation errors, not these).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in {
        400: "A malformed request",
        401: "No token, or an unknown one",
        404: "No such thing, or not yours",
        409: "Not possible in the current state",
        413: "The body is over its limit",
        422: "Well-formed but unusable: each issue says where and why",
        503: "The database is unreachable; retry later",
    }.items()
}


class FieldOut(BaseModel):
    dtype: str
    shape: list[int]
    num_classes: int | None = None


class DatasetOut(BaseModel):
    id: str
    name: str
    format: str
    size: int
    sha256: str
    rows: int | None
    fields: dict[str, FieldOut]
    created_at: datetime

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetOut:
        return cls(
            id=dataset.id,
            name=dataset.name,
            format=dataset.format,
            size=dataset.size,
            sha256=dataset.sha256,
            rows=dataset.rows,
            fields={name: FieldOut(**info) for name, info in dataset.fields.items()},
            created_at=dataset.created_at,
        )


class ProgressOut(BaseModel):
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps_per_epoch: int | None = None
    eta_s: float | None = None


class BestOut(BaseModel):
    epoch: int | None
    monitor: str | None
    value: float | None


class JobSummary(BaseModel):
    id: str
    name: str
    status: str
    queue: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int
    cancel_requested: bool
    error: str | None
    project: str
    tags: list[str]
    note: str
    progress: ProgressOut | None
    best: BestOut | None

    @classmethod
    def fields_of(cls, job: Job | Row[Any]) -> dict[str, Any]:
        best = None
        if job.best_epoch is not None or job.best_value is not None:
            best = BestOut(
                epoch=job.best_epoch, monitor=job.best_monitor, value=finite(job.best_value)
            )
        return {
            "id": job.id,
            "name": job.name,
            "status": job.status,
            "queue": job.queue,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "attempt": job.attempt,
            "cancel_requested": job.cancel_requested,
            "error": job.error,
            "project": job.project,
            "tags": job.tags,
            "note": job.note,
            "progress": ProgressOut(
                **{k: v for k, v in job.progress.items() if k in ProgressOut.model_fields}
            )
            if job.progress
            else None,
            "best": best,
        }

    @classmethod
    def of(cls, job: Job | Row[Any]) -> JobSummary:
        return cls(**cls.fields_of(job))


class JobOut(JobSummary):
    max_restarts: int
    metrics: dict[str, float | None]
    stopped_early: bool
    stop_reason: str | None
    result: dict[str, Any] | None = Field(
        default=None,
        description="The run's result once finished (epochs run, steps, final metrics)",
    )
    spec: dict[str, Any]
    dataset_sources: dict[str, str] = Field(
        description="Where each dataset came from, by its JSON path in the spec, as the "
        "submitting client said (X-Dataset-Sources); empty when it did not say"
    )
    disk_bytes: int = Field(
        description="Bytes the job holds in the artifact store: its kept checkpoint files "
        "(each once) and the exports cached beside them"
    )

    @classmethod
    def of(cls, job: Job | Row[Any]) -> JobOut:
        """From the ORM row or from `app.store.jobs.shown_by_id` (the same attribute names)."""
        return cls(
            **cls.fields_of(job),
            max_restarts=job.max_restarts,
            metrics=latest_values(job),
            stopped_early=job.stopped_early,
            stop_reason=job.stop_reason,
            result=job.result,
            spec=job.spec,
            dataset_sources=(job.fields or {}).get("sources", {}),
            disk_bytes=job.disk_bytes or 0,
        )

    @classmethod
    def render(cls, job: Job | Row[Any]) -> bytes:
        """The JSON answer of GET /jobs/{id} (kept as bytes by app.job_reads.ShownJobs)."""
        return cls.of(job).model_dump_json().encode()


class UsageOf(BaseModel):
    count: int
    bytes: int


class UsageOut(BaseModel):
    """What the caller holds in the artifact store."""

    datasets: UsageOf = Field(description="The caller's datasets: count and file bytes")
    jobs: UsageOf = Field(description="The caller's jobs: count and the sum of their disk_bytes")
    total_bytes: int


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end"
    )


class JobEdit(BaseModel):
    """PATCH /jobs/{id}: the metadata to change; a key left out keeps its value."""

    model_config = ConfigDict(extra="forbid")

    project: Label | None = Field(default=None, description=f"1 to 64 of: {LABEL_CHARACTERS}")
    tags: Tags | None = Field(
        default=None, description=f"Replaces the tags: at most {MAX_TAGS}, each as a project"
    )
    note: Note | None = Field(default=None, description="Free text, at most 10,000 characters")


class ProjectOut(BaseModel):
    name: str
    jobs: int
    by_status: dict[str, int] = Field(description="Job counts by status (only those above 0)")


class ValidateOut(BaseModel):
    summary: dict[str, Any]


class MetricPointOut(TypedDict):
    """A point of a metric's history: a TypedDict, as an answer holds thousands (see PointIn)."""

    step: int
    epoch: int
    value: Annotated[float | None, Field(description="null for NaN or Inf")]
    time: float


class MetricColumnsOut(TypedDict):
    """A metric's history as columns (`format=columnar`): the i-th entries make a point."""

    step: list[int]
    epoch: list[int]
    value: Annotated[list[float | None], Field(description="null for NaN or Inf")]
    time: list[float]


class CheckpointOut(BaseModel):
    id: int
    epoch: int
    kind: str
    step: int
    monitor: str | None
    value: float | None
    size: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> CheckpointOut:
        return cls(
            id=checkpoint.id,
            epoch=checkpoint.epoch,
            kind=checkpoint.kind,
            step=checkpoint.step,
            monitor=checkpoint.monitor,
            value=finite(checkpoint.value),
            size=checkpoint.size,
            sha256=checkpoint.sha256,
            created_at=checkpoint.created_at,
        )


class LogsOut(BaseModel):
    lines: list[str]


# ---------------------------------------------------------------- worker protocol


class ClaimIn(BaseModel):
    worker: str = Field(min_length=1, max_length=255, description="hostname:pid")
    # Where this worker's node 0 would listen, for a job of several nodes.
    host: str | None = Field(default=None, min_length=1, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)


class DatasetRef(BaseModel):
    url: str
    sha256: str
    filename: str
    format: str


class ResumeRef(BaseModel):
    url: str


class ClaimOut(BaseModel):
    attempt: int
    token: str
    spec: dict[str, Any]
    lease_s: float
    datasets: dict[str, DatasetRef]
    resume: ResumeRef | None
    gang: dict[str, Any] | None = None  # a job of several nodes: wait for the gang


class GangOut(BaseModel):
    """A gang member's place: gathering; whole (its node rank, node 0's endpoint, the
    rendezvous run id, the state to resume); or gone (dropped, or the attempt is over)."""

    state: Literal["gathering", "whole", "gone"]
    member: int | None = None
    joined: int | None = None
    nodes: int | None = None
    endpoint: str | None = None
    run_id: str | None = None
    resume: ResumeRef | None = None


class ProgressIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    epoch: int | None = Field(default=None, ge=0, le=MAX_INT32)
    epochs: int | None = Field(default=None, ge=0, le=MAX_INT32)
    step: int | None = Field(default=None, ge=0, le=MAX_INT64)
    steps_per_epoch: int | None = Field(default=None, ge=0, le=MAX_INT64)


class HeartbeatIn(BaseModel):
    progress: ProgressIn = Field(default_factory=ProgressIn)


class CancelOut(BaseModel):
    cancel: bool


class PointIn(TypedDict):
    """A metric point: a TypedDict, not a model, as a batch holds thousands and pydantic
    checks plain dicts several times faster than it builds (and dumps) models."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    step: Annotated[int, Field(ge=0, le=MAX_INT64)]
    epoch: Annotated[int, Field(ge=0, le=MAX_INT32)]
    value: float | None
    time: float


class MetricsIn(BaseModel):
    points: list[PointIn] = Field(max_length=100_000)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting `model` as the JSON body of a route that parses it itself
    (its `$defs` inlined, as the schema sits outside components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}


class MetricsOut(BaseModel):
    inserted: int
    cancel: bool


class LogsIn(BaseModel):
    lines: list[str] = Field(max_length=10_000)


class RunResultIn(BaseModel):
    """worker.engine.train.RunResult as JSON; unknown keys are kept in the stored result."""

    model_config = ConfigDict(extra="allow")

    status: str | None = None
    epochs_run: int = 0
    steps: int = 0
    best_epoch: int | None = Field(default=None, ge=0, le=MAX_INT32)
    monitor: str | None = None
    best_value: float | None = None
    stopped_early: bool = False
    stop_reason: str | None = None
    error: str | None = None
    final_metrics: dict[str, float | None] = Field(default_factory=dict)
    duration_s: float = 0.0


class ReleaseIn(BaseModel):
    reason: str = Field(default="worker stopping", max_length=200)
    # the attempt was lost, not handed back (a rank or node of its run died): it counts
    # against max_restarts, and past them the job fails with `reason`
    lost: bool = False


class FinishIn(BaseModel):
    status: Literal["succeeded", "failed", "cancelled"]
    result: RunResultIn = Field(default_factory=RunResultIn)
