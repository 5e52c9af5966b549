"""The artifact store mark: one row naming the artifact root this database goes with."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import Sessions, session_scope
from app.models import ArtifactStoreMark


def get(session: Session) -> str | None:
    return session.execute(
        select(ArtifactStoreMark.mark).where(ArtifactStoreMark.id == 1)
    ).scalar_one_or_none()


def get_or_create(sessions: Sessions) -> tuple[str, bool]:
    """(the database's mark, whether this call made it). Two processes starting at once
    agree: the row's key is fixed, so the second insert fails and reads the first."""
    with session_scope(sessions) as session:
        found = get(session)
    if found is not None:
        return found, False
    mark = secrets.token_hex(16)
    try:
        with session_scope(sessions) as session:
            session.add(ArtifactStoreMark(id=1, mark=mark))
    except IntegrityError:
        with session_scope(sessions) as session:
            found = get(session)
        assert found is not None
        return found, False
    return mark, True
