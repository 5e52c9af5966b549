"""Projects: the names jobs are grouped under, with their jobs counted by status."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CurrentUser, ReadSessionDep, UserAuth
from app.api.schemas import ProjectOut
from app.store import jobs

router = APIRouter(prefix="/projects", tags=["projects"], dependencies=[UserAuth])


@router.get("", response_model=list[ProjectOut])
def list_projects(user: CurrentUser, session: ReadSessionDep) -> list[ProjectOut]:
    """Your projects by name (a project exists while a job of yours is in it)."""
    return [
        ProjectOut(name=p.name, jobs=p.jobs, by_status=p.by_status)
        for p in jobs.projects(session, user.id)
    ]
