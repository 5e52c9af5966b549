"""The opaque `cursor` of GET /jobs: where the last page ended, in the order it was read.

A cursor is base64url of the JSON `[sort, order, id]` (`created`) or
`[sort, order, id, best value or null]` (`best`). One made for another sort or order
is refused rather than read as a position in this one. A bare base64url job id (the
cursor of earlier versions, newest first) still reads as `created`, `desc`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

from fastapi.exceptions import RequestValidationError

from app.ids import is_id
from app.store.jobs import Position, Sort


def encode(position: Position | None, sort: Sort, descending: bool) -> str | None:
    if position is None:
        return None
    order = "desc" if descending else "asc"
    key: list[Any] = [sort, order, position.id]
    if sort == "best":
        key.append(position.best_value)
    raw = json.dumps(key, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str | None, sort: Sort, descending: bool) -> Position | None:
    """The position a cursor names; a 422 on `query.cursor` for anything else."""
    if not cursor:
        return None
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        text = raw.decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _invalid("not a cursor this API returned") from None
    if is_id(text):
        key: Any = ["created", "desc", text]
    else:
        try:
            key = json.loads(text)
        except ValueError:
            raise _invalid("not a cursor this API returned") from None
    position = _position(key)
    if position is None:
        raise _invalid("not a cursor this API returned")
    order = "desc" if descending else "asc"
    if key[:2] != [sort, order]:
        raise _invalid(
            f"made for sort={key[0]}&order={key[1]}; pass the same sort and order, "
            "or leave the cursor out to start again"
        )
    return position


def _position(key: Any) -> Position | None:
    if not isinstance(key, list) or len(key) < 3 or key[:1] not in (["created"], ["best"]):
        return None
    if key[1] not in ("desc", "asc") or not isinstance(key[2], str) or not is_id(key[2]):
        return None
    if key[0] == "created":
        return Position(key[2]) if len(key) == 3 else None
    value = key[3] if len(key) == 4 else "missing"
    if value is None:
        return Position(key[2])
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return Position(key[2], float(value))


def _invalid(message: str) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("query", "cursor"), "msg": message, "type": "value_error"}]
    )
