"""Dependencies as Annotated aliases, declared once and used by every route."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.artifacts import ArtifactStore
from app.config import Settings
from app.db import Sessions, session_scope
from app.dispatch import Dispatcher
from app.errors import NotFound, Unauthorized
from app.models import Job, User
from app.store import attempts, jobs, users
from app.store.attempts import AttemptRef


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _sessions(request: Request) -> Sessions:
    return request.app.state.sessions


def _artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


def _dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(_settings)]
# The session factory, for routes that do slow work (file I/O, exports) and must
# not hold a transaction (on SQLite, the write lock) while they do it.
SessionsDep = Annotated[Sessions, Depends(_sessions)]
ArtifactsDep = Annotated[ArtifactStore, Depends(_artifacts)]
DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]


def _session(sessions: SessionsDep) -> Iterator[Session]:
    with session_scope(sessions) as session:
        yield session


# scope="function": commit (or roll back) when the route returns, before the
# response is sent, so a failed commit is an error answer, not a lost write.
SessionDep = Annotated[Session, Depends(_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False, description="A user token, a worker token, or an attempt token"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return credentials.credentials


def _current_user(sessions: SessionsDep, credentials: Credentials) -> User:
    # Its own short transaction: a streaming route must not keep one open.
    raw = _token(credentials)
    with session_scope(sessions) as session:
        user = users.user_for_token(session, raw)
    if user is None:
        raise Unauthorized("invalid token")
    return user


CurrentUser = Annotated[User, Depends(_current_user)]
# For `APIRouter(dependencies=[UserAuth])`: the same callable as CurrentUser, so a
# route that also asks for the user gets the cached one.
UserAuth = Depends(_current_user)


def _owned_job(job_id: str, user: CurrentUser, sessions: SessionsDep) -> Job:
    """The job in the path if it is the caller's (404 otherwise), read in its own transaction."""
    with session_scope(sessions) as session:
        return jobs.get(session, user.id, job_id)


OwnedJob = Annotated[Job, Depends(_owned_job)]


def _worker_secret(settings: SettingsDep, credentials: Credentials) -> None:
    raw = _token(credentials)
    if not settings.worker_token or not hmac.compare_digest(
        raw.encode(), settings.worker_token.encode()
    ):
        raise Unauthorized("invalid worker token")


WorkerAuth = Depends(_worker_secret)


def _worker_attempt(
    request: Request, sessions: SessionsDep, credentials: Credentials
) -> AttemptRef:
    """The caller's attempt: 401 for an unknown token, 409 'stale attempt' for an old one."""
    raw = _token(credentials)
    with session_scope(sessions) as session:
        ref = attempts.resolve(session, raw)
    if ref is None:
        raise Unauthorized("invalid attempt token")
    job_id = request.path_params.get("job_id")
    if job_id is not None and job_id != ref.job_id:
        raise NotFound(f"no job {job_id!r} for this attempt")
    return ref


WorkerAttempt = Annotated[AttemptRef, Depends(_worker_attempt)]
AttemptAuth = Depends(_worker_attempt)
