"""The shim's enqueue scripts on a real Redis: barrier counts, verdicts, and batches that mix operations."""

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import redis
from redis.asyncio import Redis as AsyncRedis
from support import TEST_REDIS_URL, unique

from api_shim.queue import Queue
from schema.messages import run_key, thread_key
from schema.protocol import ThreadOp
from schema.status import STATS_KEY

T = TypeVar("T")


def ids(n: int) -> list[int]:
    """Ids no run or thread of the database shares: the tests' Redis also serves a live shim."""
    return [random.randrange(10**12, 10**13) for _ in range(n)]


def run(step: Callable[[Queue], Awaitable[T]], high_water: int = 0, queue_name: str | None = None,
        high_water_bytes: int = 0) -> T:
    async def main() -> T:
        client = AsyncRedis.from_url(TEST_REDIS_URL)
        try:
            return await step(Queue(client, queue_name or unique("q"), high_water, high_water_bytes))
        finally:
            await client.aclose()

    return asyncio.run(main())


async def open_thread(queue: Queue, run_id: int, thread_id: int) -> None:
    await queue.fill(run_key(run_id), closed=False, project=1, ops=0, threads=0)
    await queue.fill(thread_key(thread_id), closed=False, run=run_id, project=1, appends=0)


def append(run_id: int, thread_id: int, name: str = "t") -> ThreadOp:
    op = {"kind": "thread.append", "run_id": run_id, "thread_id": thread_id,
          "results": [[2, "k", name, None, None, None, None, None, None, None]]}
    return ThreadOp("a", run_id, thread_id, orjson.dumps(op))


def complete(run_id: int, thread_id: int) -> ThreadOp:
    op = {"kind": "thread.complete", "run_id": run_id, "thread_id": thread_id, "request_id": "-7777777777"}
    return ThreadOp("c", run_id, thread_id, orjson.dumps(op))


def newest_batch(client: "redis.Redis[bytes]", queue: str) -> list[dict[str, Any]]:
    """The batch the newest message names, as the worker will read it."""
    message = client.lindex(queue, 0)
    assert message is not None
    key = orjson.loads(orjson.loads(message)["body"])[0][0]
    batch: list[dict[str, Any]] = orjson.loads(client.get(key) or b"null")
    return batch


def test_a_mixed_batch_records_each_completes_own_count(redis_client: "redis.Redis[bytes]") -> None:
    name = unique("q")
    # Client values that look like structure (the sentinel an earlier version split on) stay data.
    tricky = 'x -7777777777 ,"expected": 5} y'

    r, a, b = ids(3)

    async def step(queue: Queue) -> Any:
        await open_thread(queue, r, a)
        await open_thread(queue, r, b)
        return await queue.thread_ops([
            append(r, a, tricky), append(r, b), append(r, a), complete(r, a), append(r, b), complete(r, b),
        ])

    assert run(step, queue_name=name) == "ok"
    assert redis_client.llen(name) == 1
    batch = newest_batch(redis_client, name)
    assert [op["kind"] for op in batch] == ["thread.append"] * 3 + ["thread.complete", "thread.append",
                                                                     "thread.complete"]
    assert batch[0]["results"][0][2] == tricky
    assert (batch[3]["expected"], batch[5]["expected"]) == (2, 2)
    assert redis_client.hget(run_key(r), "ops") == b"6"
    assert redis_client.hmget(thread_key(a), ["closed", "appends"]) == [b"1", b"2"]


def test_an_append_behind_a_complete_of_its_thread_is_refused_and_nothing_is_enqueued(
        redis_client: "redis.Redis[bytes]") -> None:
    name = unique("q")

    r, t = ids(2)

    async def step(queue: Queue) -> Any:
        await open_thread(queue, r, t)
        return await queue.thread_ops([append(r, t), complete(r, t), append(r, t)])

    assert run(step, queue_name=name) == ["ok", "ok", "closed"]
    assert redis_client.llen(name) == 0
    assert redis_client.hmget(thread_key(t), ["closed", "appends"]) == [b"0", b"0"]


def test_completing_a_completed_thread_is_done_and_unknown_state_is_missing(
        redis_client: "redis.Redis[bytes]") -> None:
    r, t, unknown = ids(3)

    async def step(queue: Queue) -> Any:
        await open_thread(queue, r, t)
        first = await queue.thread_ops([complete(r, t)])
        again = await queue.thread_ops([complete(r, t), append(r, t)])
        lost = await queue.thread_ops([append(r, unknown)])
        return first, again, lost

    assert run(step) == ("ok", ["done", "closed"], ["missing"])


def test_over_the_high_water_mark_appends_are_busy_but_completes_still_go(
        redis_client: "redis.Redis[bytes]") -> None:
    name = unique("q")
    redis_client.lpush(name, b"a", b"b")

    r, t = ids(2)

    async def step(queue: Queue) -> Any:
        await open_thread(queue, r, t)
        mixed = await queue.thread_ops([append(r, t), complete(r, t)])
        alone = await queue.thread_ops([complete(r, t)])
        return mixed, alone

    assert run(step, high_water=2, queue_name=name) == (["busy", "ok"], "ok")
    assert redis_client.llen(name) == 3
    assert newest_batch(redis_client, name)[0]["expected"] == 0


def test_appends_are_busy_while_waiting_batches_hold_the_high_water_bytes(
        redis_client: "redis.Redis[bytes]") -> None:
    r, t = ids(2)
    held = int(redis_client.hget(STATS_KEY, "queued_bytes") or 0)

    async def step(queue: Queue) -> Any:
        await open_thread(queue, r, t)
        first = await queue.thread_ops([append(r, t)])
        second = await queue.thread_ops([append(r, t)])
        return first, second

    # The mark sits one byte above what is held now: the first batch fits under it, and then it is reached.
    assert run(step, high_water_bytes=held + 1) == ("ok", ["busy"])
    assert int(redis_client.hget(STATS_KEY, "queued_bytes") or 0) > held
