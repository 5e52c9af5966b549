"""User tokens an API process verified a moment ago, trusted for a few seconds.

A user's every request names its token, and looking it up is a transaction and
a round trip to the database: for a small read (a watcher polling GET
/jobs/{id}) that is half the work. A token found valid within the last `ttl_s`
seconds is taken on trust instead. Only valid tokens are kept (an unknown one
always asks the database), keyed by the token's sha256 (never the raw token), so
a deleted token or user stays usable on one API process for at most `ttl_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.store.users import UserRef

MAX_ENTRIES = 10_000


class TokenCache:
    """Token hash -> the user it belongs to, each entry for `ttl_s` seconds (0: off).

    Used from the event loop only (the auth dependency is async), so no lock.
    """

    def __init__(
        self,
        ttl_s: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, tuple[float, UserRef]] = {}

    def get(self, token_hash: str) -> UserRef | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        expires, user = entry
        if self.clock() >= expires:
            del self._entries[token_hash]
            return None
        return user

    def put(self, token_hash: str, user: UserRef) -> None:
        if self.ttl_s <= 0:
            return
        now = self.clock()
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[token_hash] = (now + self.ttl_s, user)
