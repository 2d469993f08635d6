"""Putting operations on the Celery queue, atomically with the completion-barrier bookkeeping.

The keys, the scripts and the message format are the Redis protocol of `schema/protocol.py`; this is the
shim's side of it: batches built with the queue's high-water marks, and verdicts read back.
"""

from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from schema.messages import run_key, thread_key
from schema.protocol import Batch, ShimScripts, ThreadOp
from schema.status import STATS_KEY


class Queue:
    def __init__(self, redis: Redis, queue: str, high_water: int, high_water_bytes: int = 0) -> None:
        self.redis = redis
        self.queue = queue
        self.high_water = high_water
        self.high_water_bytes = high_water_bytes
        self.scripts = ShimScripts(redis)

    def high_water_reading(self, pipe: Pipeline) -> None:
        """Queue on `pipe` what `over_high_water` needs: the waiting messages and the bytes counted."""
        pipe.llen(self.queue)
        pipe.hget(STATS_KEY, "queued_bytes")

    def over_high_water(self, waiting: int, queued_bytes: bytes | None) -> bool:
        """The scripts' full(), for what the shim refuses outside them."""
        return ((self.high_water > 0 and waiting >= self.high_water)
                or (self.high_water_bytes > 0 and int(queued_bytes or 0) >= self.high_water_bytes))

    def _batch(self) -> Batch:
        return Batch.new(self.queue, self.high_water, self.high_water_bytes)

    async def thread_ops(self, ops: list[ThreadOp]) -> list[str] | str:
        """Enqueue new threads, thread appends and completes as one batch: 'ok', or (nothing enqueued) a
        verdict per op."""
        return await self.scripts.thread_ops(self._batch(), ops, [run_key(op.run_id) for op in ops],
                                             [thread_key(op.thread_id) for op in ops])

    async def run_create(self, run_id: int, project_id: int, op: Any, resources: str, view: Any,
                         idem: str = "") -> str:
        return await self.scripts.run_create(self._batch(), run_key(run_id), project_id, orjson.dumps(op),
                                             resources, orjson.dumps(view), idem)

    async def run_append(self, op: Any, resources: str, idem: str = "") -> str:
        return await self.scripts.run_append(self._batch(), run_key(op["run_id"]), orjson.dumps(op), resources,
                                             idem)

    async def run_complete(self, op: Any, idem: str = "") -> str:
        return await self.scripts.run_complete(self._batch(), run_key(op["run_id"]), orjson.dumps(op), idem)

    async def fill(self, key: str, closed: bool, client: Pipeline | None = None, **fields: int) -> None:
        """Create a run's or thread's state hash, unless it exists (then its counts are the truth)."""
        await self.scripts.fill(key, closed, fields, client)

    async def thread_ops_with_retry(self, ops: list[ThreadOp]) -> list[str]:
        """A verdict per op. Ops of a refused batch that may go are pushed again at once, on their own: a
        complete is never held back by appends that arrived behind it while the queue was full. An op that
        waited for another of the same idempotency key goes after it, once that one is settled."""
        verdicts = [""] * len(ops)
        todo: list[int] = list(range(len(ops)))
        deferred: list[int] = []
        while todo:
            verdict = await self.thread_ops([ops[i] for i in todo])
            if isinstance(verdict, str):
                for i in todo:
                    verdicts[i] = verdict
                todo, deferred = deferred, []
                continue
            retry = []
            for i, one in zip(todo, verdict, strict=True):
                if one == "ok":
                    retry.append(i)
                elif one == "wait":
                    deferred.append(i)
                else:
                    verdicts[i] = one
            todo = retry
            if not todo:
                todo, deferred = deferred, []
        return verdicts
