"""The per-process token cache: entries expire, and concurrent misses share one lookup."""

from __future__ import annotations

import asyncio

import pytest

from app.api.token_cache import TokenCache
from app.store.users import UserRef


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def a_user(user_id: int = 1) -> UserRef:
    return UserRef(id=user_id, name=f"user-{user_id}", admin=False)


def test_an_entry_is_trusted_for_ttl_seconds_then_asked_again():
    clock = Clock()
    cache = TokenCache(5.0, clock=clock)
    cache.put("h", a_user())
    clock.now += 4.9
    assert cache.get("h") == a_user()
    clock.now += 0.2
    assert cache.get("h") is None


def test_a_zero_ttl_caches_nothing():
    cache = TokenCache(0)
    cache.put("h", a_user())
    assert cache.get("h") is None


def test_a_full_cache_drops_expired_entries_first():
    clock = Clock()
    cache = TokenCache(5.0, max_entries=2, clock=clock)
    cache.put("old", a_user(1))
    clock.now += 10
    cache.put("a", a_user(2))
    cache.put("b", a_user(3))
    assert cache.get("a") == a_user(2) and cache.get("b") == a_user(3)
    assert cache.get("old") is None


def test_concurrent_misses_of_one_token_share_a_single_lookup():
    cache = TokenCache(5.0)
    calls: list[str] = []

    async def lookup() -> UserRef:
        calls.append("db")
        await asyncio.sleep(0.05)
        return a_user()

    async def main() -> list[UserRef | None]:
        return await asyncio.gather(*(cache.load("h", lookup) for _ in range(64)))

    assert asyncio.run(main()) == [a_user()] * 64
    assert calls == ["db"]
    assert cache.get("h") == a_user()  # and the answer is cached


def test_an_unknown_token_and_a_failed_lookup_are_not_cached():
    cache = TokenCache(5.0)
    answers: list[object] = [None, RuntimeError("database down"), a_user()]

    async def lookup() -> UserRef | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    async def main() -> None:
        assert await cache.load("h", lookup) is None
        with pytest.raises(RuntimeError, match="database down"):
            await cache.load("h", lookup)
        assert await cache.load("h", lookup) == a_user()  # asked again each time

    asyncio.run(main())
    assert answers == []


def test_a_caller_that_goes_away_does_not_cancel_the_others_lookup():
    cache = TokenCache(5.0)

    async def lookup() -> UserRef:
        await asyncio.sleep(0.05)
        return a_user()

    async def main() -> UserRef | None:
        first = asyncio.ensure_future(cache.load("h", lookup))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(cache.load("h", lookup))
        await asyncio.sleep(0.01)
        first.cancel()
        return await second

    assert asyncio.run(main()) == a_user()
