"""What every command family shares: the two consoles, `fail()`, the spec argument."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="The job spec (JSON).", show_default=False)]


def fail(lines: list[str] | str, code: int = 1) -> typer.Exit:
    """Print each line as `error: ...` on stderr; raise the returned Exit to stop with `code`."""
    for line in [lines] if isinstance(lines, str) else lines:
        err.print(f"[red]error:[/red] {line}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)
