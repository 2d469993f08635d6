"""The shim's enqueue scripts on a real Redis: barrier counts, verdicts, and batches that mix operations."""

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError
from support import TEST_REDIS_URL, unique

from api_shim.queue import Queue
from schema.messages import pending_key, run_key, thread_key
from schema.protocol import SCRIPT_HEAD_BYTES, THREAD_CAPS, Batch, ThreadOp
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
            append(r, a, tricky), append(r, b), append(r, a), complete(r, a), append(r, b), append(r, b),
            complete(r, b),
        ])

    assert run(step, queue_name=name) == "ok"
    assert redis_client.llen(name) == 1
    batch = newest_batch(redis_client, name)
    # The completes go last (only they pass through the script), each with the count of its own thread.
    assert [op["kind"] for op in batch] == ["thread.append"] * 5 + ["thread.complete"] * 2
    assert [op["thread_id"] for op in batch] == [a, b, a, b, b, a, b]
    assert batch[0]["results"][0][2] == tricky
    assert (batch[5]["expected"], batch[6]["expected"]) == (2, 3)
    assert redis_client.hget(run_key(r), "ops") == b"7"
    assert redis_client.hmget(thread_key(a), ["closed", "appends"]) == [b"1", b"2"]
    assert redis_client.hmget(thread_key(b), ["closed", "appends"]) == [b"1", b"3"]


# A name this long makes an append's op bigger than what goes to Redis through the script itself.
BIG = "n" * SCRIPT_HEAD_BYTES


@pytest.mark.parametrize("name_of_a", ["t", BIG], ids=["small", "big"])
@pytest.mark.parametrize("ops", ["a", "c", "ac", "cc", "aca"])
def test_a_batch_is_stored_whole_whatever_mix_of_appends_and_completes_it_holds(
        redis_client: "redis.Redis[bytes]", ops: str, name_of_a: str) -> None:
    name = unique("q")
    r, *threads = ids(1 + len(ops))

    async def step(queue: Queue) -> Any:
        for t in threads:
            await open_thread(queue, r, t)
        return await queue.thread_ops([append(r, t, name_of_a) if kind == "a" else complete(r, t)
                                       for kind, t in zip(ops, threads, strict=True)])

    assert run(step, queue_name=name) == "ok"
    batch = newest_batch(redis_client, name)
    kinds = sorted(ops, key=lambda kind: kind == "c")
    assert [op["kind"][len("thread."):][0] for op in batch] == kinds
    assert [op.get("expected") for op in batch] == [0 if kind == "c" else None for kind in kinds]
    assert [op["results"][0][2] for op in batch if "results" in op] == [name_of_a] * ops.count("a")


@pytest.mark.parametrize("name_of_a", ["t", BIG], ids=["small", "big"])
def test_a_refused_batch_leaves_no_payload_and_an_enqueued_one_is_kept(
        redis_client: "redis.Redis[bytes]", name_of_a: str) -> None:
    name = unique("q")
    r, t = ids(2)
    refused, enqueued = Batch.new(name), Batch.new(name)

    async def step(queue: Queue) -> Any:
        await open_thread(queue, r, t)
        first = await queue.scripts.thread_ops(
            refused, [append(r, t, name_of_a), complete(r, t), append(r, t, name_of_a)], [run_key(r)] * 3,
            [thread_key(t)] * 3)
        second = await queue.scripts.thread_ops(enqueued, [append(r, t, name_of_a)], [run_key(r)], [thread_key(t)])
        return first, second

    assert run(step, queue_name=name) == (["ok", "ok", "closed"], "ok")
    assert redis_client.exists(refused.key) == 0
    assert redis_client.ttl(enqueued.key) == -1  # stored for good: a big head no longer has its TTL
    assert redis_client.lrange(pending_key(name), 0, -1) == [enqueued.key.encode()]


def test_a_script_whose_payload_head_is_gone_writes_nothing(redis_client: "redis.Redis[bytes]") -> None:
    name = unique("q")
    r, t = ids(2)
    batch = Batch.new(name)

    async def step(queue: Queue) -> Any:
        await open_thread(queue, r, t)
        ops = [append(r, t)]
        # The script alone, as if its head's SET had expired before it ran.
        with pytest.raises(ResponseError, match="head is not stored"):
            await queue.scripts._thread_ops(keys=[*batch.keys(), run_key(r), thread_key(t)], args=[
                *batch.args(), 60, 60, 60, "a", 1, THREAD_CAPS, ",", ",", "", "]"])
        return await queue.thread_ops(ops)

    assert run(step, queue_name=name) == "ok"
    assert redis_client.exists(batch.key) == 0
    assert redis_client.llen(name) == 1  # only the second try's
    assert redis_client.hget(thread_key(t), "appends") == b"1"


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


@pytest.mark.parametrize("name_of_a", ["t", BIG], ids=["small", "big"])
def test_a_call_retried_after_its_reply_was_lost_enqueues_nothing_twice(
        redis_client: "redis.Redis[bytes]", name_of_a: str) -> None:
    """redis-py sends a command again when its connection fails, though Redis may have run it: the same batch
    sent twice is counted once, and its stored payload is neither cut nor deleted by the second call."""
    name = unique("q")
    r, t = ids(2)
    batch = Batch.new(name)
    ops = [append(r, t, name_of_a), complete(r, t)]

    async def step(queue: Queue) -> Any:
        await open_thread(queue, r, t)
        first = await queue.scripts.thread_ops(batch, ops, [run_key(r)] * 2, [thread_key(t)] * 2)
        stored = redis_client.get(batch.key)
        again = await queue.scripts.thread_ops(batch, ops, [run_key(r)] * 2, [thread_key(t)] * 2)
        return first, again, stored

    first, again, stored = run(step, queue_name=name)
    assert (first, again) == ("ok", "ok")
    assert redis_client.get(batch.key) == stored and redis_client.ttl(batch.key) == -1
    assert [op["kind"] for op in orjson.loads(stored or b"null")] == ["thread.append", "thread.complete"]
    assert redis_client.llen(name) == 1 and redis_client.llen(pending_key(name)) == 1
    assert redis_client.hmget(thread_key(t), ["closed", "appends"]) == [b"1", b"1"]
    assert redis_client.hget(run_key(r), "ops") == b"2"
