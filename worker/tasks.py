"""Thin Celery tasks: fetch the batches, apply them in one transaction, retry or dead-letter."""

import contextlib
import logging
import random
from typing import cast

import psycopg
import redis
from celery import Task
from sqlalchemy.exc import OperationalError

from schema.messages import ACCOUNTED_LUA, APPLY_TASK, Op, leased_key, pending_key
from schema.settings import get_settings
from schema.status import STATS_KEY
from worker import metrics
from worker.app import app
from worker.apply import Outcome, apply_ops, dead_letter, decode_batch
from worker.db import batches, unit_of_work

log = logging.getLogger(__name__)

BACKOFF_CAP_SECONDS = 10.0
# A batch that keeps failing on a reachable database (statement timeouts, say) is split and its operations
# dead-lettered after this many retries; while the database or Redis is unreachable, retries never stop.
MAX_RETRIES = 10
# At most this many other batches, and this many bytes of them, join a message's batch in one transaction.
SIBLINGS = 50
MAX_BYTES = 8 * 1024 * 1024


def backoff(retries: int) -> float:
    return min(BACKOFF_CAP_SECONDS, 0.5 * 2.0**retries) * random.uniform(0.5, 1.0)


def unreachable(exc: BaseException) -> bool:
    if isinstance(exc, redis.RedisError):
        return True
    return isinstance(exc, OperationalError) and (
        exc.connection_invalidated or type(exc.orig) is psycopg.OperationalError)


@app.task(name=APPLY_TASK, bind=True)
def apply(self: Task, key: str) -> None:  # type: ignore[type-arg]
    try:
        keys, ops = take_batches(key)
        if not keys:
            # A batch is deleted only after its operations committed: this message's work is done.
            return
        with metrics.DURATION.time():
            outcome = apply_batch(ops)
        # Only now: a worker that dies before this line leaves the batches to their own messages.
        delete_batches(keys)
        record(outcome)
        log.info("applied %d operations, %d results", outcome.applied, outcome.results, extra={
            "batches": [name for name, _ in keys], "request_ids": [op.get("request_id") for op in ops[:200]]})
    except Exception as exc:
        # Nothing here may end the task with an error: Celery would acknowledge the message and its batch
        # would never be applied. Database or Redis down, a deadlock, a statement timeout: retry later;
        # the batch stays stored meanwhile. (max_retries is None for this task: see worker/app.py.)
        if self.request.retries >= MAX_RETRIES and not unreachable(exc) and dead_letter_batch(key):
            return
        log.warning("batch %s failed, will retry: %s", key, type(exc).__name__)
        metrics.RETRIES.inc()
        raise self.retry(exc=exc, countdown=backoff(self.request.retries)) from exc


# KEYS: stats, leases, then batches. ARGV: their payloads' sizes. Only the worker that deletes a batch discounts
# it, by what the shim counted for it; deleting it also ends its lease.
_DELETE = ACCOUNTED_LUA + """
for i = 3, #KEYS do
  if redis.call('DEL', KEYS[i]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'queued_bytes', -accounted(tonumber(ARGV[i - 2])))
  end
  redis.call('ZREM', KEYS[2], KEYS[i])
end
"""

# KEYS: pending list, leases. ARGV: how many, lease seconds. Takes batches from the pending list and leases them
# in the same step: if the transaction that took them never commits (its worker killed, Redis gone before the
# reply), the sweeper puts them back when the lease ends. Their own messages cannot be relied on: Redis loses a
# message it handed out just before crashing, and Celery drops a message whose retry it could not enqueue.
# Batches already applied and deleted are dropped from the list here. (The batch keys are not declared: the
# Celery Redis transport needs a single Redis, not a cluster, anyway.)
_TAKE = """
local taken = redis.call('LPOP', KEYS[1], ARGV[1])
if not taken then return {} end
local until_ = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[2])
local out = {}
for _, key in ipairs(taken) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', KEYS[2], until_, key)
    out[#out + 1] = key
  end
end
return out
"""


def delete_batches(keys: list[tuple[str, int]]) -> None:
    """Delete applied batches (name, size), end their leases and take their bytes off the queue's count."""
    if keys:
        batches().eval(_DELETE, len(keys) + 2, STATS_KEY, leased_key(app.conf.task_default_queue),
                       *(name for name, _ in keys), *(size for _, size in keys))


def take_batches(key: str, siblings: bool = True) -> tuple[list[tuple[str, int]], list[Op]]:
    """This message's batch and, to apply in the same transaction, others waiting in the pending list.

    Under load many small batches wait; applying them together keeps the cost per result flat. A batch
    taken here stays stored, and leased, until it is applied.
    """
    store = batches()
    others: list[bytes] = []
    if siblings:
        queue = app.conf.task_default_queue
        others = cast(list[bytes], store.eval(_TAKE, 2, pending_key(queue), leased_key(queue), SIBLINGS,
                                              get_settings().visibility_timeout))
    keys = [key, *(k.decode() for k in others if k.decode() != key)]
    found: list[tuple[str, int]] = []
    ops: list[Op] = []
    size = 0
    for name, payload in zip(keys, store.mget(keys), strict=True):
        # A sibling left out for its size stays leased: its own message, or the lease's end, brings it back.
        if payload is None or (found and size + len(payload) > MAX_BYTES):
            continue
        size += len(payload)
        found.append((name, len(payload)))
        ops.extend(decode_batch(cast(bytes, payload)))
    return found, ops


def apply_batch(ops: list[Op]) -> Outcome:
    try:
        with unit_of_work() as conn:
            outcome = apply_ops(conn, ops)
        for op, error in outcome.dead:
            log.error("operation %s dead-lettered: %s", op.get("id"), error,
                      extra={"request_id": op.get("request_id"), "run_id": op.get("run_id")})
        metrics.DEAD_LETTERS.inc(len(outcome.dead))
        return outcome
    except OperationalError:
        raise
    except Exception as exc:
        # The data itself is refused. Apply the operations one by one so that only the one at fault is
        # set aside, with its payload and the error, for an operator to replay.
        total = Outcome()
        if len(ops) > 1:
            for op in ops:
                one = apply_batch([op])
                total.applied += one.applied
                total.results += one.results
                total.kinds += one.kinds
        else:
            dead_letter_one(ops[0], exc)
        return total


def record(outcome: Outcome) -> None:
    """Count what was applied: in this process for Prometheus, and in Redis for the whole installation."""
    metrics.BATCHES.inc()
    metrics.RESULTS.inc(outcome.results)
    for kind, n in outcome.kinds.items():
        metrics.OPERATIONS.labels(kind).inc(n)
    with contextlib.suppress(redis.RedisError):  # the results are stored; a lost count only skews a graph
        pipe = batches().pipeline(transaction=False)
        pipe.hincrby(STATS_KEY, "operations_applied", outcome.applied)
        pipe.hincrby(STATS_KEY, "results_applied", outcome.results)
        pipe.execute()


def dead_letter_batch(key: str) -> bool:
    """Give up on a batch that keeps failing: apply what can be, dead-letter the rest. False if that fails
    too (then the message is retried as before)."""
    log.error("batch %s keeps failing: applying its operations one by one", key)
    try:
        keys, ops = take_batches(key, siblings=False)
        for op in ops:
            try:
                apply_batch([op])
            except OperationalError as again:
                dead_letter_one(op, again)
        delete_batches(keys)
    except Exception as exc:
        log.warning("batch %s could not be dead-lettered: %s", key, type(exc).__name__)
        return False
    return True


def dead_letter_one(op: Op, exc: BaseException) -> None:
    log.error("operation %s dead-lettered: %s", op.get("id"), type(exc).__name__,
              extra={"request_id": op.get("request_id"), "run_id": op.get("run_id")})
    metrics.DEAD_LETTERS.inc()
    with unit_of_work() as conn:
        dead_letter(conn, [(op, f"{type(exc).__name__}: {exc}"[:4000])])
