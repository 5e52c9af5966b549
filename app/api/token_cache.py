"""User tokens an API process verified a moment ago, trusted for a few seconds.

A user's every request names its token, and looking it up is a transaction and
a round trip to the database: for a small read (a watcher polling GET
/jobs/{id}) that is half the work. A token found valid within the last `ttl_s`
seconds is taken on trust instead. Only valid tokens are kept (an unknown one
always asks the database), keyed by the token's sha256 (never the raw token), so
a deleted token or user stays usable on one API process for at most `ttl_s`.

When an entry runs out, every request of that token in flight misses at once (64
pollers sharing a token: 64 lookups, each a thread and a transaction, all in the
same millisecond). `load` makes them share one lookup instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

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
        self._lookups: dict[str, asyncio.Future[UserRef | None]] = {}

    async def load(
        self, token_hash: str, lookup: Callable[[], Awaitable[UserRef | None]]
    ) -> UserRef | None:
        """The cached user, else the result of `lookup()`, run once for all callers
        waiting on the same token (a valid answer is cached; None and errors are not)."""
        user = self.get(token_hash)
        if user is not None:
            return user
        pending = self._lookups.get(token_hash)
        if pending is None:
            pending = asyncio.ensure_future(lookup())
            self._lookups[token_hash] = pending
            pending.add_done_callback(lambda done: self._settle(token_hash, done))
        # shielded: a caller that goes away does not cancel the others' lookup
        return await asyncio.shield(pending)

    def _settle(self, token_hash: str, done: asyncio.Future[UserRef | None]) -> None:
        self._lookups.pop(token_hash, None)
        if done.cancelled() or done.exception() is not None:
            return  # the waiters see the error; retrieving it here keeps asyncio quiet
        user = done.result()
        if user is not None:
            self.put(token_hash, user)

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
