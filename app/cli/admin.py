"""Admin commands that work on the service's database directly: `token create`,
`admin gc-datasets`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

token_app = typer.Typer(help="Manage API tokens (admin).", no_args_is_help=True)
admin_app = typer.Typer(help="Maintain the service's storage (admin).", no_args_is_help=True)


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


@admin_app.command("gc-datasets")
def gc_datasets(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be removed; remove nothing.")
    ] = False,
    older_than_hours: Annotated[
        float,
        typer.Option(
            min=0,
            help="Only datasets uploaded at least this long ago: a fresh upload may be "
            "about to be named by a submit.",
        ),
    ] = 24.0,
) -> None:
    """Remove datasets (rows and files) that no job names; prints what it freed."""
    from app.artifacts import ArtifactStore
    from app.config import get_settings
    from app.dataset_gc import collect
    from app.db import make_engine, make_sessions
    from app.migrate import upgrade_engine

    settings = get_settings()
    engine = make_engine(settings.database_url)
    upgrade_engine(engine)
    try:
        found = collect(
            make_sessions(engine),
            ArtifactStore(settings.artifact_dir),
            older_than_s=older_than_hours * 3600,
            dry_run=dry_run,
        )
    finally:
        engine.dispose()
    for d in found:
        sys.stdout.write(
            f"{d.id}  user {d.user_id}  {d.size:>14,} bytes  {d.created_at}  {d.name}\n"
        )
    verb = "would free" if dry_run else "freed"
    total = sum(d.size for d in found)
    sys.stdout.write(f"{verb} {len(found)} dataset(s), {total:,} bytes\n")
