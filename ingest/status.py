"""`ingest status`: the queue, the rates, the workers, dead letters and stuck runs, in a terminal."""

import sys
import time
from datetime import UTC, datetime

import orjson
from redis import Redis
from sqlalchemy import create_engine

from schema.settings import Settings
from schema.status import Snapshot, take

COUNTERS = ("appends_accepted", "results_accepted", "operations_applied", "results_applied")


def rates(now: Snapshot, before: Snapshot) -> dict[str, float]:
    """Each counter's increase per second between two readings."""
    seconds = max(1e-9, now.taken_at - before.taken_at)
    return {name: (getattr(now, name) - getattr(before, name)) / seconds for name in COUNTERS}


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(now: Snapshot, before: Snapshot, queue: str) -> str:
    rate = {name: f"{value:,.1f}/s" for name, value in rates(now, before).items()}

    def known(value: int | None) -> str:
        return "?" if value is None else f"{value:,}"

    workers = ", ".join(f"{w['host']}:{w['pid']} ({w['concurrency']} processes, up "
                        f"{_ago(now.taken_at - float(str(w['started_at'])))})" for w in now.workers) or "none"
    return "\n".join([
        f"ingest status  {datetime.fromtimestamp(now.taken_at, UTC):%Y-%m-%d %H:%M:%S} UTC  queue {queue!r}",
        f"queue     depth {now.depth:,} (waiting {now.waiting:,}, reserved {now.reserved:,})   "
        f"{now.queued_bytes / 1024**2:,.1f} MB   "
        f"oldest waiting {_ago(now.oldest_waiting_seconds)}   oldest reserved {_ago(now.oldest_reserved_seconds)}",
        f"accepted  appends {rate['appends_accepted']}   results {rate['results_accepted']}"
        f"   (total {now.appends_accepted:,} appends, {now.results_accepted:,} results)",
        f"applied   operations {rate['operations_applied']}   results "
        f"{rate['results_applied']}   (total {now.operations_applied:,} operations, "
        f"{now.results_applied:,} results)",
        f"workers   {now.workers_alive} alive: {workers}",
        f"runs      open {known(now.runs_open)}   stuck {known(now.runs_stuck)}",
        f"dead      {known(now.dead_letters)} operation(s) not applied"
        + ("  (ingest dlq list)" if now.dead_letters else ""),
    ])


def main(settings: Settings, watch: float | None, as_json: bool) -> None:
    redis = Redis.from_url(settings.redis_url, socket_timeout=5)
    engine = create_engine(settings.database_url, pool_size=1, connect_args={"connect_timeout": 3})

    def snapshot() -> Snapshot:
        return take(redis, engine, settings.queue, settings.stuck_after_seconds)

    try:
        # Rates need two readings: the first a second before the one shown.
        before = snapshot()
        time.sleep(1 if watch is None else min(watch, 1))
        while True:
            now = snapshot()
            if as_json:
                print(orjson.dumps(now.as_dict() | {"rates": rates(now, before)}).decode(), flush=True)
            else:
                if watch is not None and sys.stdout.isatty():
                    print("\033[2J\033[H", end="")
                print(render(now, before, settings.queue), flush=True)
            if watch is None:
                return
            before = now
            time.sleep(watch)
    except KeyboardInterrupt:
        pass
    finally:
        redis.close()
        engine.dispose()
