"""Users and their bearer tokens (only sha256 hashes are stored)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.ids import hash_token, new_token
from app.models import Token, User

TOKEN_PREFIX = "ty"


@dataclass(frozen=True)
class UserRef:
    """Who is calling, as a user token says: plain values, safe outside a session."""

    id: int
    name: str
    admin: bool


def get_by_name(session: Session, name: str) -> User | None:
    return session.execute(select(User).where(User.name == name)).scalar_one_or_none()


def create_user(session: Session, name: str, admin: bool = False) -> User:
    if get_by_name(session, name) is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(name=name, admin=admin)
    session.add(user)
    session.flush()
    return user


def create_token(session: Session, user: User, name: str = "default") -> str:
    """Add a token for `user`; the raw token is returned once and never stored."""
    raw = new_token(TOKEN_PREFIX)
    session.add(Token(user_id=user.id, name=name, token_hash=hash_token(raw)))
    session.flush()
    return raw


def create_user_with_token(session: Session, name: str, admin: bool = False) -> tuple[User, str]:
    """A new user and their first token (raw, to print once)."""
    user = create_user(session, name, admin=admin)
    return user, create_token(session, user)


def ensure_token(session: Session, name: str, raw_token: str, admin: bool = True) -> User:
    """Make `raw_token` a valid token of user `name`, creating the user if needed.

    `serve` calls this with TORCHYARD_TOKEN so a token chosen in the environment
    works from the first start; calling it again changes nothing.
    """
    user = get_by_name(session, name)
    if user is None:
        user = User(name=name, admin=admin)
        session.add(user)
        session.flush()
    digest = hash_token(raw_token)
    existing = session.execute(select(Token).where(Token.token_hash == digest)).scalar_one_or_none()
    if existing is None:
        session.add(Token(user_id=user.id, name="env", token_hash=digest))
        session.flush()
    elif existing.user_id != user.id:
        raise Conflict(f"that token already belongs to another user, not {name!r}")
    return user


def user_for_token(session: Session, token_hash: str) -> UserRef | None:
    """The user a token (given by its sha256, `app.ids.hash_token`) belongs to; None if unknown."""
    row = session.execute(
        select(User.id, User.name, User.admin)
        .join(Token, Token.user_id == User.id)
        .where(Token.token_hash == token_hash)
    ).one_or_none()
    return None if row is None else UserRef(id=row.id, name=row.name, admin=row.admin)
