"""Coalesced lookups (app.async_reads.Coalesced): concurrent polls share batch queries,
and never get an answer read before they asked."""

from __future__ import annotations

import asyncio

import pytest

from app.async_reads import Coalesced


class Table:
    """A stand-in for the database: a dict whose reads take a moment, and a log of them."""

    def __init__(self) -> None:
        self.rows = {"a": 1, "b": 2}
        self.batches: list[list[str]] = []
        self.running = 0
        self.most_running = 0
        self.fail_next = False

    async def fetch(self, keys: list[str]) -> dict[str, int]:
        self.batches.append(sorted(keys))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            snapshot = dict(self.rows)  # what a query sees: the state when it starts
            await asyncio.sleep(0.02)
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("database down")
            return {k: snapshot[k] for k in keys if k in snapshot}
        finally:
            self.running -= 1


def test_concurrent_lookups_share_batches_and_each_gets_its_own_answer():
    table = Table()
    reads = Coalesced(table.fetch, in_flight=1)

    async def main() -> list[int | None]:
        return await asyncio.gather(*(reads.get(k) for k in ["a", "b", "a", "zzz"] * 25))

    assert asyncio.run(main()) == [1, 2, 1, None] * 25
    # the first lookup starts a batch alone; the 99 made while it ran go in one more
    assert table.batches == [["a"], ["a", "b", "zzz"]]


def test_a_lookup_never_gets_an_answer_read_before_it_asked():
    table = Table()
    reads = Coalesced(table.fetch, in_flight=1)

    async def main() -> tuple[int | None, int | None]:
        early = asyncio.ensure_future(reads.get("a"))
        await asyncio.sleep(0.005)  # its batch is running now, on the old row
        table.rows["a"] = 10  # a write commits
        late = await reads.get("a")  # asked after the write: must see it
        return await early, late

    assert asyncio.run(main()) == (1, 10)
    assert table.batches == [["a"], ["a"]]


def test_at_most_in_flight_batches_run_at_once():
    table = Table()
    reads = Coalesced(table.fetch, in_flight=2)

    async def main() -> None:
        for _ in range(5):
            await asyncio.gather(*(reads.get("a") for _ in range(3)), asyncio.sleep(0.001))

    asyncio.run(main())
    assert table.most_running <= 2


def test_an_error_reaches_every_waiter_of_its_batch_and_the_next_batch_works():
    table = Table()
    reads = Coalesced(table.fetch, in_flight=1)
    table.fail_next = True

    async def main() -> list[object]:
        return await asyncio.gather(*(reads.get("a") for _ in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[0], RuntimeError)
    # the lookups made while the failing batch ran went in the next one, which worked
    assert results[1:] == [1, 1]
    assert asyncio.run(Coalesced(table.fetch).get("b")) == 2


def test_a_waiter_that_goes_away_does_not_disturb_the_others():
    table = Table()
    reads = Coalesced(table.fetch, in_flight=1)

    async def main() -> int | None:
        first = asyncio.ensure_future(reads.get("a"))
        gone = asyncio.ensure_future(reads.get("b"))
        kept = asyncio.ensure_future(reads.get("b"))
        await asyncio.sleep(0.001)
        gone.cancel()
        await first
        return await kept

    assert asyncio.run(main()) == 2


@pytest.mark.parametrize("in_flight", [1, 4])
def test_lookups_keep_working_after_many_rounds(in_flight: int):
    table = Table()
    reads = Coalesced(table.fetch, in_flight=in_flight)

    async def main() -> None:
        for n in range(20):
            keys = ["a", "b", "c"] * (n % 4 + 1)
            assert await asyncio.gather(*(reads.get(k) for k in keys)) == [1, 2, None] * (n % 4 + 1)

    asyncio.run(main())
    assert table.running == 0


def test_with_gather_the_lookups_of_tasks_woken_together_go_in_one_batch():
    table = Table()
    reads = Coalesced(table.fetch, in_flight=1, gather=True)

    async def watcher(key: str) -> int | None:
        await asyncio.sleep(0.01)  # all wake at the same tick
        return await reads.get(key)

    async def main() -> list[int | None]:
        return await asyncio.gather(*(watcher(k) for k in ["a", "b"] * 10))

    assert asyncio.run(main()) == [1, 2] * 10
    assert table.batches == [["a", "b"]]


def test_with_gather_and_room_for_more_batches_lookups_still_join_the_waiting_one():
    table = Table()
    reads = Coalesced(table.fetch, in_flight=4, gather=True)

    async def main() -> list[int | None]:
        return await asyncio.gather(*(reads.get(k) for k in ["a", "b", "a"] * 5))

    assert asyncio.run(main()) == [1, 2, 1] * 5
    assert table.batches == [["a", "b"]]
