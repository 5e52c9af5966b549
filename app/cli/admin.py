"""Admin commands that work on the service's database directly: `token create`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

token_app = typer.Typer(help="Manage API tokens (admin).", no_args_is_help=True)


@token_app.command("create")
def token_create(name: Annotated[str, typer.Argument(help="The user the token is for.")]) -> None:
    """Create a user (if new) and a token for them; prints the token once."""
    from app.config import get_settings
    from app.db import make_engine, make_sessions, session_scope
    from app.migrate import upgrade_engine
    from app.store import users

    settings = get_settings()
    engine = make_engine(settings.database_url)
    upgrade_engine(engine)
    with session_scope(make_sessions(engine)) as session:
        user = users.get_by_name(session, name) or users.create_user(session, name)
        raw = users.create_token(session, user, name="cli")
    engine.dispose()
    sys.stdout.write(raw + "\n")
