"""Gangs: the workers that run a job of several nodes, gathered before any of them trains.

A worker's claim on a job of `nodes` M joins the gang of the job's current attempt
number: it gets a node rank (the lowest free) and a member token, and the job stays
`queued`. The member that makes the gang whole starts the attempt (`queued ->
running`, as a one-worker claim does) with member 0's token as the attempt's, so
node 0 reports and finishes; the other members' tokens resolve to the same attempt
(`attempts.resolve`) for downloads, heartbeats and a release. A member not in a
whole gang within `gang_wait_s` of joining is dropped: its worker stops waiting
then too, so a partial gang never holds workers for longer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.ids import hash_token, new_token
from app.models import Attempt, GangMember, Job, utcnow
from app.store import events, jobs

TOKEN_PREFIX = "tyg"


@dataclass(frozen=True)
class Joined:
    member: GangMember
    token: str
    whole: bool


def nodes_of(job: Job) -> int:
    """The workers the job runs on: one wake-up each when it is (re)queued."""
    return int(job.spec.get("resources", {}).get("nodes", 1))


def join(
    session: Session, job: Job, worker: str, host: str, port: int, *, wait_s: float, lease_s: float
) -> Joined:
    """Add a member to the job's gang (the caller holds the job's row lock, job queued)."""
    nodes = nodes_of(job)
    now = utcnow()
    # Members that waited too long have left (their workers gave up): free their ranks.
    session.execute(
        delete(GangMember).where(
            GangMember.job_id == job.id,
            GangMember.n == job.attempt,
            GangMember.joined_at < now - timedelta(seconds=wait_s),
        )
    )
    members = members_of(session, job.id, job.attempt)
    taken = {m.member for m in members}
    rank = next(r for r in range(nodes + 1) if r not in taken)
    if rank >= nodes:
        raise Conflict(f"job {job.id!r} already has its {nodes} workers")
    token = new_token(TOKEN_PREFIX)
    member = GangMember(
        job_id=job.id,
        n=job.attempt,
        member=rank,
        worker=worker[:255],
        host=host[:255],
        port=port,
        token_hash=hash_token(token),
        joined_at=now,
    )
    session.add(member)
    session.flush()
    whole = len(members) + 1 == nodes
    if whole:
        _start(session, job, [*members, member], lease_s)
    return Joined(member, token, whole)


def _start(session: Session, job: Job, members: list[GangMember], lease_s: float) -> None:
    now = utcnow()
    if not jobs.transition(
        session,
        job.id,
        "queued",
        status="running",
        started_at=job.started_at or now,
        lease_expires_at=now + timedelta(seconds=lease_s),
    ):
        raise Conflict(f"job {job.id!r} was claimed by another worker")
    zero = next(m for m in members if m.member == 0)
    names = ",".join(m.worker for m in sorted(members, key=lambda m: m.member))
    session.add(
        Attempt(job_id=job.id, n=job.attempt, token_hash=zero.token_hash, worker=names[:255])
    )
    session.flush()
    events.append(
        session,
        job.id,
        "status",
        {"status": "running", "attempt": job.attempt, "worker": names, "nodes": len(members)},
    )


def members_of(session: Session, job_id: str, n: int) -> list[GangMember]:
    stmt = select(GangMember).where(GangMember.job_id == job_id, GangMember.n == n)
    return list(session.execute(stmt).scalars())


def by_token(session: Session, raw_token: str) -> GangMember | None:
    stmt = select(GangMember).where(GangMember.token_hash == hash_token(raw_token))
    return session.execute(stmt).scalar_one_or_none()


def state(session: Session, job_id: str, raw_token: str, *, wait_s: float) -> dict[str, object]:
    """What a member learns when it asks: `gathering`, `whole` (its rank and node 0's
    endpoint) or `gone` (dropped, or its attempt is over).

    The API alone decides when a member's wait is over, under the job's row lock as
    `join` does: a member is either in the gang that forms or told `gone`, never both."""
    member = by_token(session, raw_token)
    if member is None or member.job_id != job_id:
        return {"state": "gone"}
    job = jobs.lock(session, job_id)
    if job.attempt != member.n:
        return {"state": "gone"}
    if job.status == "queued":
        if member.joined_at < utcnow() - timedelta(seconds=wait_s):
            session.delete(member)
            return {"state": "gone"}
        joined = len(members_of(session, job.id, member.n))
        return {"state": "gathering", "member": member.member, "joined": joined}
    members = members_of(session, job.id, member.n)
    if job.status != "running":
        return {"state": "gone"}
    zero = next(m for m in members if m.member == 0)
    return {
        "state": "whole",
        "member": member.member,
        "nodes": len(members),
        "endpoint": f"{zero.host}:{zero.port}",
        "run_id": f"{job.id}-{job.attempt}",
    }
