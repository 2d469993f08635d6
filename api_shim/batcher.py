"""Group commit.

While one flush (a push to Redis, an insert into PostgreSQL) is in flight, the requests that arrive meanwhile
wait together and go in the next flush. Under load a flush carries many items, so the downstream work is
done once for all of them; with a single client a flush carries one, and nothing waits on a timer. Every
request is answered only once its own item has been flushed.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], max_items: int,
                 max_bytes: int = 0, size: Callable[[T], int] = lambda _: 0,
                 shared: tuple[type[BaseException], ...] = ()) -> None:
        """`flush` takes a batch and returns one result per item, in order. An exception of a `shared` type
        (a dependency down) fails the whole batch; any other one may be one item's fault, so the items are
        flushed again one by one and only the failing ones fail."""
        self.flush = flush
        self.shared = shared
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.size = size
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None:
            # Keep a reference: the event loop holds tasks only weakly.
            self._task = asyncio.create_task(self._flush_all())
        return await future

    async def _flush_all(self) -> None:
        try:
            while self._pending:
                batch = self._take()
                try:
                    results = await self.flush([item for item, _ in batch])
                except Exception as exc:
                    if len(batch) == 1 or isinstance(exc, self.shared):
                        for _, future in batch:
                            future.set_exception(exc)
                    else:
                        for one in batch:
                            await self._flush_alone(one)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    future.set_result(result)
        finally:
            self._task = None

    async def _flush_alone(self, entry: tuple[T, "asyncio.Future[R]"]) -> None:
        item, future = entry
        try:
            [result] = await self.flush([item])
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        total = 0
        count = 0
        for item, _ in self._pending:
            size = self.size(item)
            if count and (count >= self.max_items or (self.max_bytes and total + size > self.max_bytes)):
                break
            total += size
            count += 1
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch
