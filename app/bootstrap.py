"""First start of a service: the schema, and a token for its first user."""

from __future__ import annotations

from sqlalchemy import func, select

from app.config import Settings
from app.db import make_engine, make_sessions, session_scope
from app.migrate import upgrade_engine
from app.models import User
from app.store import users

FIRST_USER = "admin"


def bootstrap(settings: Settings, name: str = FIRST_USER) -> str | None:
    """Migrate, then make sure someone can log in; returns a new raw token to show once, or None.

    With TORCHYARD_TOKEN set, that token becomes (or stays) a token of user `name`.
    Without it, the first start creates user `name` and returns their new token;
    later starts return None (the token was shown when it was made).
    """
    engine = make_engine(settings.database_url)
    try:
        upgrade_engine(engine)
        with session_scope(make_sessions(engine)) as session:
            if settings.token:
                users.ensure_token(session, name, settings.token)
                return None
            if session.execute(select(func.count()).select_from(User)).scalar_one():
                return None
            _, token = users.create_user_with_token(session, name, admin=True)
            return token
    finally:
        engine.dispose()
