"""The database tables (SQLAlchemy 2 typed ORM). The Alembic migrations create them."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

UTC = timezone.utc

# Named constraints so later migrations (and SQLite batch mode) can address them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATUSES = frozenset({"queued", "running"})


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend (SQLite keeps naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        float: Double(),
    }


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the raw token
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebSession(Base):
    """A dashboard sign-in: the browser holds the raw session id in an HttpOnly cookie;
    only its sha256 is stored (app/store/web_sessions.py)."""

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # sent back by the page in X-CSRF-Token on every state-changing request
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))  # display only; never a path
    format: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(BigInteger)
    fields: Mapped[dict[str, Any]]  # {name: {dtype, shape, num_classes}}
    path: Mapped[str] = mapped_column(String(1024))  # relative to the artifact root
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_user_id_id", "user_id", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        # a project's jobs newest first (GET /jobs?project=)
        Index("ix_jobs_user_id_project_id", "user_id", "project", "id"),
        # GET /projects counts from the index alone
        Index("ix_jobs_user_id_project_status", "user_id", "project", "status"),
        # GET /jobs?sort=best
        Index("ix_jobs_user_id_best_value_id", "user_id", "best_value", "id"),
    )

    # ids sort by creation time (millisecond prefix), so "newest first" is ORDER BY id DESC
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    spec: Mapped[dict[str, Any]]
    fields: Mapped[dict[str, Any]]  # {"inputs": {...}, "targets": {...}} FieldInfos at submission
    queue: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=1)  # the current or next attempt
    max_restarts: Mapped[int] = mapped_column(Integer, default=3)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    dispatched_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[dict[str, Any] | None]
    latest_metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {name: {step, value}}
    best_epoch: Mapped[int | None] = mapped_column(Integer)
    best_monitor: Mapped[str | None] = mapped_column(String(128))
    best_value: Mapped[float | None]
    stopped_early: Mapped[bool] = mapped_column(Boolean, default=False)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]
    # Metadata (spec keys project, tags, note; editable with PATCH /jobs/{id}). `tags`
    # is the list as shown, in its order; `job_tags` holds the same tags, indexed for search.
    project: Mapped[str] = mapped_column(String(64), server_default="default")
    tags: Mapped[list[str]] = mapped_column(JSONType, server_default=text("'[]'"))
    note: Mapped[str] = mapped_column(Text, server_default="")
    # Bytes the job holds in the artifact store: its kept checkpoint files (each once)
    # and the exports cached beside them (app/retention.py)
    disk_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class JobTag(Base):
    """A tag of a job, with the job's owner copied in (a job never changes owner), so
    `GET /jobs?tag=` walks one index of the user's tagged jobs in id order."""

    __tablename__ = "job_tags"
    __table_args__ = (Index("ix_job_tags_user_id_tag_job_id", "user_id", "tag", "job_id"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer)


class JobDataset(Base):
    __tablename__ = "job_datasets"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("job_id", "n"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    n: Mapped[int] = mapped_column(Integer)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    worker: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(32))
    # where this attempt's first heartbeat found the run: the ETA of a resumed run
    # must not count steps an earlier attempt did
    first_step: Mapped[int | None] = mapped_column(BigInteger)
    first_step_at: Mapped[datetime | None]


class MetricChunk(Base):
    """A run of one series' points, as the worker reported them in one batch.

    Steps, epochs, values and times are packed little-endian arrays (int64, int32,
    float64, float64; NaN stands for a null value): a batch of thousands of points is
    one row, written in one statement and read back with one `numpy.frombuffer`
    each (app/store/metrics.py). Within a series the chunks' step ranges do not
    overlap, and each chunk's steps are increasing.
    """

    __tablename__ = "metric_chunks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    first_step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    last_step: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(Integer)
    steps: Mapped[bytes] = mapped_column(LargeBinary)
    epochs: Mapped[bytes] = mapped_column(LargeBinary)
    values: Mapped[bytes] = mapped_column(LargeBinary)
    times: Mapped[bytes] = mapped_column(LargeBinary)


class MetricRollup(Base):
    """One bucket of 2**level steps of a series: its first, last, lowest and highest point
    (app/store/metric_rollups.py keeps them, for downsampled reads)."""

    __tablename__ = "metric_rollups"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # step >> level
    first_step: Mapped[int] = mapped_column(BigInteger)
    first_epoch: Mapped[int] = mapped_column(Integer)
    first_value: Mapped[float | None]
    first_time: Mapped[float]
    last_step: Mapped[int] = mapped_column(BigInteger)
    last_epoch: Mapped[int] = mapped_column(Integer)
    last_value: Mapped[float | None]
    last_time: Mapped[float]
    low_step: Mapped[int] = mapped_column(BigInteger)
    low_epoch: Mapped[int] = mapped_column(Integer)
    low_value: Mapped[float | None]
    low_time: Mapped[float]
    high_step: Mapped[int] = mapped_column(BigInteger)
    high_epoch: Mapped[int] = mapped_column(Integer)
    high_value: Mapped[float | None]
    high_time: Mapped[float]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "epoch", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    step: Mapped[int] = mapped_column(BigInteger)
    monitor: Mapped[str | None] = mapped_column(String(128))
    value: Mapped[float | None]
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ArtifactStoreMark(Base):
    """The one row naming the artifact root this database goes with (the root holds the
    same mark in a file): the start-up sweep removes files only where the two agree,
    so a service pointed at the wrong database never deletes a store's files."""

    __tablename__ = "artifact_store_mark"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    mark: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GangMember(Base):
    """A worker's held claim on a job of several nodes (app/store/gangs.py).

    Members gather while the job is `queued`; the one that makes the gang whole
    starts attempt `n`, whose token is member 0's. A gang not whole within
    gang_wait_s of a member's join drops that member (its claim is released)."""

    __tablename__ = "gang_members"
    __table_args__ = (UniqueConstraint("job_id", "n", "member"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    n: Mapped[int] = mapped_column(Integer)
    member: Mapped[int] = mapped_column(Integer)  # the node rank
    worker: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)  # member 0's: the ranks' rendezvous
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    joined_at: Mapped[datetime] = mapped_column(default=utcnow)
