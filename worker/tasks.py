"""Thin Celery tasks: fetch the batch, apply it in one transaction, retry or dead-letter."""

import logging
import random

import orjson
import redis
from celery import Task
from sqlalchemy.exc import OperationalError

from schema.messages import APPLY_TASK, Op
from worker.app import app
from worker.apply import apply_ops, dead_letter
from worker.db import batches, unit_of_work

log = logging.getLogger(__name__)

BACKOFF_CAP_SECONDS = 30.0


def backoff(retries: int) -> float:
    return min(BACKOFF_CAP_SECONDS, 0.5 * 2.0**retries) * random.uniform(0.5, 1.0)


@app.task(name=APPLY_TASK, bind=True)
def apply(self: Task, key: str) -> None:  # type: ignore[type-arg]
    try:
        payload = batches().get(key)
        if payload is None:
            # The batch is deleted only after its transaction committed: this is a redelivery.
            log.info("batch %s already applied", key)
            return
        apply_batch(orjson.loads(payload))
        batches().delete(key)
    except (OperationalError, redis.ConnectionError, redis.TimeoutError) as exc:
        # The database or Redis is unreachable, or a deadlock or serialisation failure: all pass with
        # time, so keep the message and try again later rather than give up on accepted results.
        log.warning("batch %s failed, will retry: %s", key, type(exc).__name__)
        raise self.retry(exc=exc, countdown=backoff(self.request.retries), max_retries=None) from exc


def apply_batch(ops: list[Op]) -> None:
    try:
        with unit_of_work() as conn:
            apply_ops(conn, ops)
    except OperationalError:
        raise
    except Exception as exc:
        # The data itself is refused. Apply the operations one by one so that only the one at fault is
        # set aside, with its payload and the error, for an operator to replay.
        if len(ops) > 1:
            for op in ops:
                apply_batch([op])
            return
        log.error("operation %s dead-lettered: %s", ops[0].get("id"), type(exc).__name__)
        with unit_of_work() as conn:
            dead_letter(conn, [(ops[0], f"{type(exc).__name__}: {exc}"[:4000])])
