"""Completing runs and threads nobody completes: a CI job that died never sends its complete.

A run (or a thread of an open run) with nothing applied for `INGEST_COMPLETE_IDLE_AFTER_SECONDS` is completed
as it stands and marked `completed_reason = 'timeout'`; `ingest admin run complete ID` does the same at once
('forced'). Either way the run or thread is first closed in Redis, so that the shim refuses what comes after;
anything accepted before and still queued is dead-lettered when it arrives, never counted late.
"""

import logging
import threading

from redis import Redis

from schema.messages import CLOSED_TTL_SECONDS, run_key, thread_key
from schema.settings import get_settings
from worker.apply import complete_threads, force_complete_run, idle_runs, idle_threads
from worker.db import batches, unit_of_work

log = logging.getLogger(__name__)

SWEEP_LOCK = "ingest:sweeper"


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
        return force_complete_run(conn, run_id, reason)


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
    """Sweep every `INGEST_SWEEP_INTERVAL_SECONDS` in the background; one worker at a time sweeps."""
    settings = get_settings()

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(settings.sweep_interval_seconds):
            try:
                if batches().set(SWEEP_LOCK, "1", nx=True, ex=settings.sweep_interval_seconds):
                    sweep(settings.complete_idle_after_seconds)
            except Exception as exc:  # a sweep that fails is tried again at the next interval
                log.warning("sweep failed: %s", type(exc).__name__)

    thread = threading.Thread(target=loop, name="ingest-sweeper", daemon=True)
    thread.start()
    return thread
