"""Group commit for thread appends and completes.

While one push to Redis is in flight, the operations that arrive meanwhile wait together and go in the next
message. Under load a message carries many appends, so the workers apply them in one transaction; with a
single client a message carries one, and nothing waits on a timer. Every request is still answered only once
its append is in Redis.
"""

import asyncio

from api_shim.queue import Queue, ThreadOp

MAX_OPS = 200
MAX_BYTES = 4 * 1024 * 1024


class AppendBatcher:
    def __init__(self, queue: Queue, max_ops: int = MAX_OPS, max_bytes: int = MAX_BYTES) -> None:
        self.queue = queue
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self._pending: list[tuple[ThreadOp, asyncio.Future[str]]] = []
        # Operations of a refused batch that may go: pushed next, on their own, so that a complete is never
        # held back by appends arriving behind it while the queue is full.
        self._retry: list[tuple[ThreadOp, asyncio.Future[str]]] = []
        self._pushing = False
        self._task: asyncio.Task[None] | None = None

    async def submit(self, op: ThreadOp) -> str:
        """Enqueue one operation; its verdict: 'ok', 'busy', 'closed', 'done' or 'missing' (see `queue.py`)."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if not self._pushing:
            self._pushing = True
            # Keep a reference: the event loop holds tasks only weakly.
            self._task = asyncio.create_task(self._push_all())
        return await future

    async def _push_all(self) -> None:
        try:
            while self._pending or self._retry:
                batch, self._retry = (self._retry, []) if self._retry else (self._take(), [])
                try:
                    verdict = await self.queue.thread_ops([op for op, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        future.set_exception(exc)
                    continue
                if isinstance(verdict, str):
                    for _, future in batch:
                        future.set_result(verdict)
                    continue
                # Nothing was enqueued: answer the operations that cannot go, and retry the rest first.
                for (op, future), one in zip(batch, verdict, strict=True):
                    if one == "ok":
                        self._retry.append((op, future))
                    else:
                        future.set_result(one)
        finally:
            self._pushing = False

    def _take(self) -> list[tuple[ThreadOp, asyncio.Future[str]]]:
        total = 0
        count = 0
        for op, _ in self._pending:
            size = len(op.op)
            if count and (count >= self.max_ops or total + size > self.max_bytes):
                break
            total += size
            count += 1
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch
