"""Thin Celery tasks: fetch the batches, apply them in one transaction, retry or dead-letter."""

import contextlib
import functools
import logging
import random
import time
from typing import cast

import psycopg
import redis
from celery import Task
from sqlalchemy.exc import OperationalError

from schema.messages import APPLY_TASK, FOLD_TASK, Op, leased_key, pending_key, run_key, unwritten_runs_key
from schema.protocol import WorkerScripts
from schema.settings import get_settings
from schema.status import STATS_KEY
from worker import metrics
from worker.app import app
from worker.apply import Outcome, Raced, apply_ops, decode_batch, waiting, with_storable_escapes
from worker.cases import fold_owed
from worker.db import batches, unit_of_work
from worker.store import dead_letter
from worker.webhooks import send as send_deliveries

log = logging.getLogger(__name__)

BACKOFF_CAP_SECONDS = 10.0
# A batch that keeps failing on a reachable database (statement timeouts, say) is split and its operations
# dead-lettered after this many retries; while the database or Redis is unreachable, retries never stop.
MAX_RETRIES = 10
# At most this many other batches, and this many bytes of them, join a message's batch in one transaction.
SIBLINGS = 50
MAX_BYTES = 8 * 1024 * 1024
# A batch waiting for runs or threads not written yet looks again for WAIT_HERE_SECONDS, then goes back to the
# queue for WAIT_SECONDS; after MAX_WAITS of those (some ten minutes) its operations are dead-lettered as they
# stand (their run or thread unknown).
WAIT_HERE_SECONDS = 0.5
WAIT_SECONDS = 0.5
MAX_WAITS = 1200


def backoff(retries: int) -> float:
    return min(BACKOFF_CAP_SECONDS, 0.5 * 2.0**retries) * random.uniform(0.5, 1.0)


def unreachable(exc: BaseException) -> bool:
    if isinstance(exc, redis.RedisError):
        return True
    return isinstance(exc, OperationalError) and (
        exc.connection_invalidated or type(exc.orig) is psycopg.OperationalError)


CREATES_FIRST = {"run.create": 0, "thread.create": 1}


class Waiting(Exception):
    """This message's batch holds operations whose run or thread a worker has not written yet."""


class NotReady(Exception):
    """Some of the operations about to be applied wait for a run or thread not written yet (`ready` then
    settles which batches can go)."""


@app.task(name=APPLY_TASK, bind=True)
def apply(self: Task, key: str) -> None:  # type: ignore[type-arg]
    try:
        keys, batched = take_batches(key)
        if not keys:
            # A batch is deleted only after its operations committed: this message's work is done.
            return
        ops = [op for batch in batched for op in batch]
        started = time.perf_counter()
        try:
            # Most often nothing in them waits: that is checked in the transaction that applies them, instead
            # of one of its own (with few operations a batch, in an open loop, a good share of the SQL).
            outcome = apply_batch(ops, check_ready=True)
        except NotReady:
            keys, ops = ready(key, keys, batched)
            if not keys:
                return
            started = time.perf_counter()
            outcome = apply_batch(ops)
        metrics.DURATION.observe(time.perf_counter() - started)
        # Only now: a worker that dies before this line leaves the batches to their own messages.
        delete_batches(keys)
        record(outcome)
        forget_pending_views(outcome.runs_created)
        after_completion(outcome.runs_completed, outcome.runs_with_deliveries)
        log.info("applied %d operations, %d results", outcome.applied, outcome.results, extra={
            "batches": [name for name, _ in keys], "request_ids": [op.get("request_id") for op in ops[:200]]})
    except Waiting as exc:
        # The creates these operations wait for were accepted before them and are on their way; once a worker
        # has written them, this goes. Only if they never come (dead-lettered) does it end as dead letters too.
        if self.request.retries >= MAX_WAITS and dead_letter_batch(key):
            return
        raise self.retry(exc=exc, countdown=WAIT_SECONDS) from exc
    except Exception as exc:
        # Nothing here may end the task with an error: Celery would acknowledge the message and its batch
        # would never be applied. Database or Redis down, a deadlock, a statement timeout: retry later;
        # the batch stays stored meanwhile. (max_retries is None for this task: see worker/app.py.)
        if self.request.retries >= MAX_RETRIES and not unreachable(exc) and dead_letter_batch(key):
            return
        log.warning("batch %s failed, will retry: %s", key, type(exc).__name__)
        metrics.RETRIES.inc()
        raise self.retry(exc=exc, countdown=backoff(self.request.retries)) from exc



@app.task(name=FOLD_TASK, bind=True)
def fold(self: Task, run_id: int) -> None:  # type: ignore[type-arg]
    """Fold completed runs into their cases (worker/cases.py): `run_id`'s, and whichever others are owed then
    (another task may have taken `run_id`'s already). Exactly once whatever happens to this task: a run's
    record of owing its fold goes in the fold's own transaction."""
    try:
        fold_all_owed()
    except Exception as exc:  # the record stays, so a later try (or the sweeper) folds it
        log.warning("fold of run %s failed, will retry: %s", run_id, type(exc).__name__)
        raise self.retry(exc=exc, countdown=backoff(self.request.retries)) from exc


def fold_all_owed() -> list[int]:
    """Fold until nothing is owed that no other transaction holds (a pass takes at most FOLD_RESULTS results,
    each in a transaction of its own); the runs folded."""
    folded: list[int] = []
    while True:
        with unit_of_work() as conn:
            runs = fold_owed(conn)
        if not runs:
            return folded
        folded.extend(runs)


def after_completion(runs: list[int], with_deliveries: list[int]) -> None:
    """Once the completions of `runs` committed: send what they owe on its way (worker/outbox.py). A message
    lost here is made up for by the sweeper."""
    for run_id in runs:
        fold.apply_async((run_id,))
    for run_id in with_deliveries:
        send_deliveries(run_id)


@functools.cache
def _scripts() -> WorkerScripts:
    return WorkerScripts(batches())


def delete_batches(keys: list[tuple[str, int]]) -> None:
    """Delete applied batches (name, size), end their leases and take their bytes off the queue's count."""
    _scripts().delete_batches(leased_key(app.conf.task_default_queue), keys)


def ready(key: str, keys: list[tuple[str, int]], ops: list[list[Op]]) -> tuple[list[tuple[str, int]], list[Op]]:
    """The batches that can be applied now, and their operations in order. A sibling whose operations wait
    for a run or thread not written yet is left out (it stays leased: its own message, or the lease's end,
    brings it back); the message's own batch waiting raises Waiting. Leaving one out can make another wait
    (its thread's create was there), so this settles in rounds."""
    deadline = time.monotonic() + WAIT_HERE_SECONDS
    while keys:
        with unit_of_work() as conn:
            blocked = waiting(conn, [op for batch in ops for op in batch])
        if not blocked:
            return keys, [op for batch in ops for op in batch]
        position, keep, mine_blocked = 0, [], False
        for i, batch in enumerate(ops):
            if any(position + j in blocked for j in range(len(batch))):
                mine_blocked = mine_blocked or keys[i][0] == key
            else:
                keep.append(i)
            position += len(batch)
        if mine_blocked:
            # Most often the create it waits for is being applied by another worker this very moment: look
            # again shortly before handing the message back to the queue.
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise Waiting(key)
        keys, ops = [keys[i] for i in keep], [ops[i] for i in keep]
    return [], []


def take_batches(key: str, siblings: bool = True) -> tuple[list[tuple[str, int]], list[list[Op]]]:
    """This message's batch and, to apply in the same transaction, others waiting in the pending list.

    Under load many small batches wait; applying them together keeps the cost per result flat. A batch
    taken here stays stored, and leased, until it is applied.
    """
    store = batches()
    others: list[str] = []
    if siblings:
        queue = app.conf.task_default_queue
        others = _scripts().take_batches(pending_key(queue), leased_key(queue), SIBLINGS,
                                         get_settings().visibility_timeout)
    keys = [key, *(k for k in others if k != key)]
    found: list[tuple[str, int]] = []
    ops: list[list[Op]] = []
    size = 0
    for name, payload in zip(keys, store.mget(keys), strict=True):
        # A sibling left out for its size stays leased: its own message, or the lease's end, brings it back.
        if payload is None or (found and size + len(payload) > MAX_BYTES):
            continue
        size += len(payload)
        found.append((name, len(payload)))
        ops.append(decode_batch(cast(bytes, payload)))
    return found, ops


def apply_batch(ops: list[Op], check_ready: bool = False) -> Outcome:
    """Apply `ops` in one transaction; with `check_ready`, first make sure none waits (`waiting`), else raise
    NotReady with nothing done."""
    try:
        with unit_of_work() as conn:
            if check_ready and waiting(conn, ops):
                raise NotReady
            outcome = apply_ops(conn, ops)
        for op, error in outcome.dead:
            log.error("operation %s dead-lettered: %s", op.get("id"), error,
                      extra={"request_id": op.get("request_id"), "run_id": op.get("run_id")})
        metrics.DEAD_LETTERS.inc(len(outcome.dead))
        return outcome
    except Raced as exc:  # rolled back: again, now that the thread's completion is seen from the start
        log.info("thread %s was completed while a batch copied its results: applying the batch again", exc)
        return apply_batch(ops)
    except (OperationalError, NotReady):
        raise
    except Exception as exc:
        if (repaired := with_storable_escapes(ops)) is not None:
            log.info("a batch failed with escaped NULs in it: applying it again with them replaced")
            return apply_batch(repaired)
        # The data itself is refused. Apply the operations one by one so that only the one at fault is
        # set aside, with its payload and the error, for an operator to replay.
        total = Outcome()
        if len(ops) > 1:
            # Creates first: the operations after them may be on the runs and threads they create.
            for op in sorted(ops, key=lambda op: CREATES_FIRST.get(op["kind"], 2)):
                one = apply_batch([op])
                total.applied += one.applied
                total.results += one.results
                total.kinds += one.kinds
                total.runs_created += one.runs_created
        else:
            dead_letter_one(ops[0], exc)
        return total


def forget_pending_views(runs: list[tuple[int, int]]) -> None:
    """The runs (run, project) are written: reads find them in PostgreSQL now, and what was kept for them
    meanwhile can go."""
    if runs:
        with contextlib.suppress(redis.RedisError):  # it would expire with the run's state anyway
            pipe = batches().pipeline(transaction=False)
            for run_id, project_id in runs:
                pipe.hdel(run_key(run_id), "pending")
                pipe.srem(unwritten_runs_key(project_id), run_id)
            pipe.execute()


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
        keys, batched = take_batches(key, siblings=False)
        ops = [op for batch in batched for op in batch]
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
