"""Completing runs and threads nobody completes, and applying batches no message will bring.

A run (or a thread of an open run) with nothing applied for `INGEST_COMPLETE_IDLE_AFTER_SECONDS` is completed
as it stands and marked `completed_reason = 'timeout'`; `ingest admin run complete ID` does the same at once
('forced'). Either way the run or thread is first closed in Redis, so that the shim refuses what comes after;
anything accepted before and still queued is dead-lettered when it arrives, never counted late.

A batch's message can be lost while its batch is safe in Redis (see `worker/tasks.py`): the sweeper returns
batches whose lease ran out to the pending list, and when no message is left to take pending batches along,
enqueues one that will.

Webhook deliveries that are due and that no attempt holds are sent again (worker/webhooks.py): retries left to
the sweeper, and deliveries whose task was lost or whose worker was killed mid-POST.
"""

import logging
import threading

from redis import Redis
from sqlalchemy import Connection

from schema.messages import CLOSED_TTL_SECONDS, leased_key, pending_key, run_key, thread_key
from schema.protocol import WorkerScripts, celery_message
from schema.settings import get_settings
from worker import lifecycle
from worker.apply import force_complete_run
from worker.cases import overdue
from worker.db import batches, engine, unit_of_work
from worker.store import failed_status_ids, thread_status_sql
from worker.tasks import SIBLINGS, after_completion, fold_all_owed
from worker.webhooks import send_due

log = logging.getLogger(__name__)

# One sweeper at a time per installation: the lock is named after its queue, so that installations sharing a
# Redis (each on its own queue) never stop each other's sweeps.
SWEEP_LOCK = "ingest:sweeper:{queue}"
# Longer than a fold task takes, queue included, on a busy installation.
FOLD_OVERDUE_SECONDS = 60


# --- the queries ----------------------------------------------------------------------------------------------

def idle_runs(conn: Connection, idle_seconds: int) -> list[int]:
    return [row[0] for row in conn.exec_driver_sql(
        "SELECT id FROM automation_runs WHERE NOT is_completed "
        "AND activity_at < now() - make_interval(secs => %(idle)s) ORDER BY id LIMIT 1000",
        {"idle": idle_seconds})]


def idle_threads(conn: Connection, idle_seconds: int) -> list[int]:
    """Open threads of open runs with nothing applied for `idle_seconds` (a CI job that died, say)."""
    return [row[0] for row in conn.exec_driver_sql(
        "SELECT t.id FROM automation_run_threads t JOIN automation_runs r ON r.id = t.run_id "
        "WHERE NOT t.is_completed AND NOT r.is_completed "
        "AND t.activity_at < now() - make_interval(secs => %(idle)s) ORDER BY t.id LIMIT 1000",
        {"idle": idle_seconds})]


def complete_threads(conn: Connection, thread_ids: list[int], reason: str) -> list[int]:
    """Complete these threads as they stand; the ones that were still open."""
    if not thread_ids:
        return []
    # Lock in id order, as batches do.
    locked = [row[0] for row in conn.exec_driver_sql(
        "SELECT id FROM automation_run_threads WHERE id = ANY(%(ids)s) AND NOT is_completed "
        "ORDER BY id FOR NO KEY UPDATE", {"ids": thread_ids})]
    if locked:
        conn.exec_driver_sql(
            f"UPDATE automation_run_threads SET is_completed = true, status = "
            f"{thread_status_sql(failed_status_ids(conn))}, completed_at = now(), completed_reason = %(reason)s "
            f"WHERE id = ANY(%(ids)s)", {"ids": locked, "reason": reason})
    return locked


# --- the sweep ------------------------------------------------------------------------------------------------

def rescue(queue: str) -> list[str]:
    """Make sure stored batches are applied whatever became of their messages; the batches new messages were
    enqueued for."""
    store = batches()
    reclaimed = WorkerScripts(store).reclaim_leases(leased_key(queue), pending_key(queue))
    if reclaimed:
        log.warning("%s leased batches were not deleted in time: pending again", reclaimed)
    # Each waiting message takes pending batches with it; with none waiting, nothing else would.
    if store.llen(queue):
        return []
    pending = pending_key(queue)
    pipe = store.pipeline(transaction=False)
    for i in range(0, store.llen(pending), SIBLINGS):
        pipe.lindex(pending, i)
    keys = [key.decode() for key in pipe.execute() if key is not None]
    for key in keys:
        store.lpush(queue, celery_message(queue, key))  # as the shim enqueues them
    return keys


def close(store: Redis, keys: list[str]) -> None:
    """Refuse further requests for these runs or threads."""
    if keys:
        pipe = store.pipeline()
        for key in keys:
            pipe.hset(key, "closed", "1")
            pipe.expire(key, CLOSED_TTL_SECONDS)
        pipe.execute()


def complete_run(run_id: int, reason: str = "forced") -> bool:
    close(batches(), [run_key(run_id)])
    with unit_of_work() as conn:
        deliveries = force_complete_run(conn, run_id, reason)
    if deliveries is None:
        return False
    after_completion([run_id], [run_id] if deliveries else [])
    return True


def fold_overdue() -> list[int]:
    """Once a fold has waited FOLD_OVERDUE_SECONDS (its task lost), fold all that are owed; the runs folded."""
    with unit_of_work() as conn:
        if not overdue(conn, FOLD_OVERDUE_SECONDS):
            return []
    folded = fold_all_owed()
    log.warning("folded runs %s whose fold task was lost", folded)
    return folded


def sweep(idle_seconds: int) -> tuple[list[int], list[int]]:
    """Complete idle runs and idle threads; the ids completed."""
    with unit_of_work() as conn:
        runs = idle_runs(conn, idle_seconds)
        threads = idle_threads(conn, idle_seconds)
    completed_runs = [run_id for run_id in runs if complete_run(run_id, "timeout")]
    close(batches(), [thread_key(t) for t in threads])
    with unit_of_work() as conn:
        completed_threads = complete_threads(conn, threads, "timeout")
    if completed_runs or completed_threads:
        log.warning("completed idle runs %s and threads %s", completed_runs, completed_threads)
    return completed_runs, completed_threads


def start() -> threading.Thread:
    """Sweep every `INGEST_SWEEP_INTERVAL_SECONDS` in the background; one worker at a time sweeps. Beside it,
    the store's lifecycle (worker/lifecycle.py): partitions made ahead, and a daily retention pass."""
    settings = get_settings()
    lifecycle.start(engine(), batches(), settings)

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(settings.sweep_interval_seconds):
            try:
                if batches().set(SWEEP_LOCK.format(queue=settings.queue), "1", nx=True,
                                  ex=settings.sweep_interval_seconds):
                    rescue(settings.queue)
                    sweep(settings.complete_idle_after_seconds)
                    fold_overdue()
                    send_due()
            except Exception as exc:  # a sweep that fails is tried again at the next interval
                log.warning("sweep failed: %s", type(exc).__name__)

    thread = threading.Thread(target=loop, name="ingest-sweeper", daemon=True)
    thread.start()
    return thread
