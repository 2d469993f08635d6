"""The Celery application. Task options live here, in one place, not on the task decorators."""

import logging
import os
from typing import Any

import orjson
from celery import Celery
from celery.signals import after_setup_logger, worker_process_init, worker_ready
from kombu.serialization import register

from schema.messages import APPLY_TASK, DELIVER_TASK
from schema.process import quiet_gc
from schema.settings import get_settings
from worker import db

settings = get_settings()

# Kombu's own JSON decoder calls a Python hook for every object; a message of a thousand results has
# thousands. Our messages are plain JSON, so orjson decodes them several times faster.
register("json", lambda obj: orjson.dumps(obj).decode(), orjson.loads, "application/json", "utf-8")

app = Celery("ingest", broker=settings.redis_url, include=["worker.tasks", "worker.webhooks"])
app.conf.update(
    task_default_queue=settings.queue,
    # Deliveries have a queue of their own, so that operators may serve it apart (`ingest worker --queues`).
    task_routes={DELIVER_TASK: {"queue": settings.webhook_queue}},
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    # A message is acknowledged only after its transaction committed; a worker that dies mid-batch leaves
    # it to be delivered again, and the claimed ids make the second delivery harmless.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=settings.worker_prefetch,
    worker_concurrency=settings.worker_concurrency,
    broker_connection_retry_on_startup=True,
    # How long a reserved, unacknowledged message waits before Redis hands it to another worker
    # (a worker killed outright never acknowledges).
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout,
        # Look for such messages every 5 s (kombu's default looks every 100 s).
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
    },
    worker_hijack_root_logger=False,
    # No broadcast control channel (a Redis pub/sub connection whose loss kombu 5.7 cannot survive: the
    # worker stops with "Unrecoverable error"). Workers report their liveness through Redis instead.
    worker_enable_remote_control=False,
    # Retry for as long as it takes: an accepted batch is never given up on (tasks.py decides when to
    # dead-letter instead).
    task_annotations={APPLY_TASK: {"max_retries": None}},
)


@after_setup_logger.connect
def _quiet_task_lines(**_: Any) -> None:
    # A line per message received and per message applied is noise at thousands of messages a minute;
    # failures and retries are still logged.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)


@worker_process_init.connect
def _fresh_pool(**_: Any) -> None:
    # On a machine shared with the shim, accepting requests must not wait behind applying them.
    os.nice(settings.worker_nice)
    quiet_gc()
    # A forked child must not share the parent's database sockets.
    db.reset()


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    from worker import sweeper

    sweeper.start()
