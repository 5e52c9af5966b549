"""The dashboard's sign-in: a token in, an HttpOnly session cookie and a CSRF token out.

The page keeps the CSRF token in memory only (a reload asks GET /session again) and
never stores the API token: the cookie is what keeps it signed in.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.api.deps import SESSION_COOKIE, SessionDep, SettingsDep, cookie_user, web_session
from app.db import Sessions, session_scope
from app.errors import Unauthorized
from app.ids import hash_token
from app.store import users, web_sessions

router = APIRouter(prefix="/session", tags=["session"])


class SessionIn(BaseModel):
    token: str = Field(min_length=1, max_length=512, description="An API token of yours")


class SessionOut(BaseModel):
    user: str
    csrf_token: str = Field(description="Send as X-CSRF-Token with every non-GET request")


@router.post("", response_model=SessionOut)
def sign_in(
    body: SessionIn,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
) -> SessionOut:
    """Sign in with an API token: sets the session cookie (HttpOnly, SameSite=Strict,
    Secure when the request came over https)."""
    user = users.user_for_token(session, hash_token(body.token))
    if user is None:
        raise Unauthorized("invalid token")
    raw, csrf = web_sessions.create(session, user.id, settings.web_session_s)
    response.set_cookie(
        SESSION_COOKIE,
        raw,
        max_age=int(settings.web_session_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return SessionOut(user=user.name, csrf_token=csrf)


@router.get("", response_model=SessionOut)
async def current(request: Request) -> SessionOut:
    """The signed-in session of the cookie, with its CSRF token (for a reloaded page)."""
    ref = await web_session(request)
    return SessionOut(user=ref.user.name, csrf_token=ref.csrf_token)


@router.delete("", status_code=204)
async def sign_out(request: Request) -> Response:
    """End the session server-side (its cookie is worthless from now on) and clear it."""
    await cookie_user(request)  # the cookie's session, and its CSRF token
    id_hash = hash_token(request.cookies[SESSION_COOKIE])
    await run_in_threadpool(_end, request.app.state.sessions, id_hash)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def _end(sessions: Sessions, id_hash: str) -> None:
    with session_scope(sessions) as session:
        web_sessions.end(session, id_hash)
