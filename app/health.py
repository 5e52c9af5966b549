"""Readiness: can this API process reach its database and its broker right now?"""

from __future__ import annotations

from sqlalchemy import Engine

from app.db import ping
from app.dispatch import Dispatcher


def readiness(engine: Engine, dispatcher: Dispatcher) -> dict[str, str]:
    """Each dependency's state: "ok" or a one-line reason."""
    checks: dict[str, str] = {}
    try:
        ping(engine)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {_first_line(exc)}"
    try:
        dispatcher.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {_first_line(exc)}"
    return checks


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__
