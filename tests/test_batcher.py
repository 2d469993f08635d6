"""Group commit: one member's fault fails that member only; a dependency down fails them all."""

import asyncio

import pytest

from api_shim.batcher import GroupCommit


class DependencyDown(Exception):
    pass


def test_a_faulty_member_fails_alone_and_the_others_are_flushed() -> None:
    flushed: list[list[str]] = []

    async def flush(items: list[str]) -> list[str]:
        flushed.append(items)
        await asyncio.sleep(0.01)
        if "bad" in items:
            raise ValueError("one item is at fault")
        return [item.upper() for item in items]

    async def main() -> list[object]:
        batcher = GroupCommit(flush, max_items=100, shared=(DependencyDown,))
        return await asyncio.gather(*(batcher.submit(x) for x in ["a", "b", "bad", "c", "d"]),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert results[:2] == ["A", "B"] and results[3:] == ["C", "D"]
    assert isinstance(results[2], ValueError)
    # All five went in one flush; it failed, so each went again alone.
    assert flushed == [["a", "b", "bad", "c", "d"], ["a"], ["b"], ["bad"], ["c"], ["d"]]


def test_a_dependency_down_fails_the_whole_batch_at_once() -> None:
    calls = 0

    async def flush(items: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise DependencyDown()

    async def main() -> list[object]:
        batcher = GroupCommit(flush, max_items=100, shared=(DependencyDown,))
        return await asyncio.gather(*(batcher.submit(x) for x in "abcde"), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, DependencyDown) for r in results)
    assert calls == 1  # not once per item


@pytest.mark.parametrize("n", [1, 250])
def test_every_member_gets_its_own_result(n: int) -> None:
    async def flush(items: list[int]) -> list[int]:
        await asyncio.sleep(0)
        return [i * 2 for i in items]

    async def main() -> list[int]:
        batcher = GroupCommit(flush, max_items=50)
        return list(await asyncio.gather(*(batcher.submit(i) for i in range(n))))

    assert asyncio.run(main()) == [i * 2 for i in range(n)]
