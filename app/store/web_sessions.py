"""Dashboard sign-ins: a random session id in an HttpOnly cookie, stored as its sha256
with the user, the CSRF token the page sends back, and an expiry."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.ids import hash_token
from app.models import User, WebSession, utcnow
from app.store.users import UserRef


@dataclass(frozen=True)
class SessionRef:
    """A live session as auth needs it: plain values, safe outside a database session."""

    user: UserRef
    csrf_token: str


def create(session: Session, user_id: int, ttl_s: float) -> tuple[str, str]:
    """A new session of `user_id`: (raw session id for the cookie, CSRF token).

    Expired sessions are swept here, so the table holds only the live ones and
    the ones that ran out since the last sign-in.
    """
    now = utcnow()
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    raw = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    session.add(
        WebSession(
            id_hash=hash_token(raw),
            user_id=user_id,
            csrf_token=csrf,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
    )
    session.flush()
    return raw, csrf


def resolve(session: Session, id_hash: str) -> SessionRef | None:
    """The unexpired session with this hashed id; None if unknown, ended or expired."""
    row = session.execute(
        select(User.id, User.name, User.admin, WebSession.csrf_token)
        .join(WebSession, WebSession.user_id == User.id)
        .where(WebSession.id_hash == id_hash, WebSession.expires_at > utcnow())
    ).one_or_none()
    if row is None:
        return None
    return SessionRef(UserRef(id=row.id, name=row.name, admin=row.admin), row.csrf_token)


def end(session: Session, id_hash: str) -> None:
    session.execute(delete(WebSession).where(WebSession.id_hash == id_hash))
