"""Ids for datasets and jobs, and the bearer tokens users and attempts hold."""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time

_ID = re.compile(r"[0-9a-f]{20}")
_clock = threading.Lock()
_last_ms = 0


def new_id() -> str:
    """20 hex characters: milliseconds since the epoch, then randomness.

    Ids sort by creation time, so "newest first" needs no timestamp index and a
    page cursor is just the last id seen.
    """
    global _last_ms
    with _clock:
        # strictly increasing within a process, so two ids of one millisecond keep their order
        _last_ms = max(int(time.time() * 1000), _last_ms + 1)
        ms = _last_ms
    return f"{ms:012x}{secrets.token_hex(4)}"


def is_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))


def new_token(prefix: str) -> str:
    """A bearer token; the prefix says what it is when one turns up in a log."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_token(raw: str) -> str:
    # Tokens are long and random, so a fast unsalted hash is enough: only the
    # hash is stored, and a stolen table gives no usable token.
    return hashlib.sha256(raw.encode()).hexdigest()
