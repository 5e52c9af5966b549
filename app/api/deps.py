"""Dependencies as Annotated aliases, declared once and used by every route."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.token_cache import TokenCache
from app.artifacts import ArtifactStore
from app.config import Settings
from app.db import Sessions, session_scope
from app.dispatch import Dispatcher
from app.errors import Forbidden, NotFound, Unauthorized
from app.ids import hash_token
from app.job_reads import ReadModels
from app.models import Job
from app.store import attempts, jobs, users, web_sessions
from app.store.attempts import AttemptRef
from app.store.users import UserRef
from app.store.web_sessions import SessionRef

# The dashboard's sign-in (app/api/routes/session.py): the cookie holds a random
# session id; requests that change state must also send the session's CSRF token.
SESSION_COOKIE = "torchyard_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MISSING_CREDENTIALS = "missing bearer token (Authorization: Bearer <token>)"

# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` in the
# thread pool, and a thread hop costs more than reading an attribute.


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _sessions(request: Request) -> Sessions:
    return request.app.state.sessions


async def _read_sessions(request: Request) -> Sessions:
    return request.app.state.read_sessions


async def _artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


async def _dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def read_models(request: Request) -> ReadModels:
    """The process's read models (app.job_reads), typed. A plain call, not a dependency:
    the routes that use them (the polls) skip FastAPI's dependency solving."""
    return request.app.state.read_models


SettingsDep = Annotated[Settings, Depends(_settings)]
# The session factory, for routes that do slow work (file I/O, exports) and must
# not hold a transaction (on SQLite, the write lock) while they do it.
SessionsDep = Annotated[Sessions, Depends(_sessions)]
# Sessions for a single-statement read (app.db.make_read_sessions): auth and ownership checks.
ReadSessionsDep = Annotated[Sessions, Depends(_read_sessions)]
ArtifactsDep = Annotated[ArtifactStore, Depends(_artifacts)]
DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]


def _session(sessions: SessionsDep) -> Iterator[Session]:
    with session_scope(sessions) as session:
        yield session


# scope="function": commit (or roll back) when the route returns, before the
# response is sent, so a failed commit is an error answer, not a lost write.
SessionDep = Annotated[Session, Depends(_session, scope="function")]


def _read_session(sessions: ReadSessionsDep) -> Iterator[Session]:
    with session_scope(sessions) as session:
        yield session


# For a route that reads with one statement (a search): no write lock on SQLite, no
# BEGIN/COMMIT round trips on Postgres.
ReadSessionDep = Annotated[Session, Depends(_read_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False, description="A user token, a worker token, or an attempt token"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized(MISSING_CREDENTIALS)
    return credentials.credentials


# The two dependencies of every user request read app.state themselves rather than
# through SessionsDep-like parameters: each dependency FastAPI solves costs time.


async def _current_user(request: Request, credentials: Credentials) -> UserRef:
    """The token's user (from this process's token cache, else from the database), or
    without a bearer token, the signed-in user of the dashboard's session cookie."""
    if credentials is None and "authorization" not in request.headers:
        return await cookie_user(request)
    return await _user_of(request, _token(credentials))


async def authenticate(request: Request) -> UserRef:
    """`CurrentUser` without FastAPI's dependency solving, for the hottest route.

    Reads `Authorization: Bearer <token>` as HTTPBearer does (scheme case-insensitive);
    without that header, the session cookie (EventSource cannot set headers).
    """
    if "authorization" not in request.headers:
        return await cookie_user(request)
    return await _user_of(request, bearer_token(request))


def bearer_token(request: Request) -> str:
    """The token of `Authorization: Bearer <token>`, read as HTTPBearer does (scheme
    case-insensitive), for routes that authenticate themselves."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(MISSING_CREDENTIALS)
    return token.strip()


async def cookie_user(request: Request) -> UserRef:
    """The session cookie's user; a request that changes state must carry the session's
    CSRF token too (a cookie is sent by whatever page made the request; the header only
    by our own page, which alone can read the token)."""
    ref = await web_session(request)
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), ref.csrf_token.encode()):
            raise Forbidden(f"a request signed in by cookie needs header {CSRF_HEADER}")
    return ref.user


async def web_session(request: Request) -> SessionRef:
    """The live session of the request's cookie (401 without one). Not cached, unlike
    tokens: signing out ends a session at once on every API process."""
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        raise Unauthorized(MISSING_CREDENTIALS)
    sessions = request.app.state.read_sessions
    ref = await run_in_threadpool(_session_for_id, sessions, hash_token(raw))
    if ref is None:
        raise Unauthorized("session ended or expired: sign in again")
    return ref


def _session_for_id(sessions: Sessions, id_hash: str) -> SessionRef | None:
    with session_scope(sessions) as session:
        return web_sessions.resolve(session, id_hash)


async def _user_of(request: Request, token: str) -> UserRef:
    digest = hash_token(token)
    cache: TokenCache = request.app.state.token_cache
    sessions = request.app.state.read_sessions
    user = await cache.load(digest, lambda: run_in_threadpool(_user_for_token, sessions, digest))
    if user is None:
        raise Unauthorized("invalid token")
    return user


def _user_for_token(sessions: Sessions, token_hash: str) -> UserRef | None:
    # Its own short transaction: a streaming route must not keep one open.
    with session_scope(sessions) as session:
        return users.user_for_token(session, token_hash)


CurrentUser = Annotated[UserRef, Depends(_current_user)]
# For `APIRouter(dependencies=[UserAuth])`: the same callable as CurrentUser, so a
# route that also asks for the user gets the cached one.
UserAuth = Depends(_current_user)


def _owned_job(request: Request, job_id: str, user: CurrentUser) -> Job:
    """The job in the path if it is the caller's (404 otherwise), read on its own (one statement)."""
    with session_scope(request.app.state.read_sessions) as session:
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
    request: Request, sessions: ReadSessionsDep, credentials: Credentials
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


def _releasing_attempt(
    request: Request, sessions: ReadSessionsDep, credentials: Credentials
) -> AttemptRef:
    """As `WorkerAttempt`, but an attempt already released resolves too: a release is retried."""
    with session_scope(sessions) as session:
        ref = attempts.resolve(session, _token(credentials), released_ok=True)
    if ref is None:
        raise Unauthorized("invalid attempt token")
    if request.path_params.get("job_id") != ref.job_id:
        raise NotFound(f"no job {request.path_params.get('job_id')!r} for this attempt")
    return ref


ReleasingAttempt = Annotated[AttemptRef, Depends(_releasing_attempt)]
