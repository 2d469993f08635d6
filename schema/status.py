"""What the whole installation is doing, read from Redis and PostgreSQL.

The shim exports it at /metrics and `ingest status` prints it; both read the same snapshot, so the numbers an
operator sees in a terminal are the ones Prometheus alerts on.
"""

import contextlib
import os
import socket
import time
from dataclasses import asdict, dataclass, field

import orjson
from redis import Redis
from sqlalchemy import Engine, text

# Installation-wide counts kept by the shims' scripts and the workers: appends and results accepted, operations
# and results applied, and the bytes held by batches waiting (which the high-water mark bounds).
STATS_KEY = "ingest:stats"
# The live workers, read in O(workers) without scanning the keyspace: a sorted set of worker ids scored by
# their last heartbeat (Redis's clock, so that the hosts' clocks need not agree), and a hash of what each is.
WORKERS_KEY = "ingest:workers"
WORKER_INFO_KEY = "ingest:workers:info"
# kombu's Redis transport keeps each message a worker has reserved, not yet acknowledged, in this hash, and
# the time it was reserved in this sorted set.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
HEARTBEAT_TTL_SECONDS = 30


@dataclass
class Snapshot:
    waiting: int = 0
    reserved: int = 0
    oldest_waiting_seconds: float = 0.0
    oldest_reserved_seconds: float = 0.0
    appends_accepted: int = 0
    results_accepted: int = 0
    operations_applied: int = 0
    results_applied: int = 0
    queued_bytes: int = 0  # held by batches not yet applied
    workers_alive: int = 0
    # From PostgreSQL; None when it cannot be read.
    dead_letters: int | None = None
    runs_open: int | None = None
    runs_stuck: int | None = None
    workers: list[dict[str, object]] = field(default_factory=list)
    taken_at: float = field(default_factory=time.time)

    @property
    def depth(self) -> int:
        return self.waiting + self.reserved

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"depth": self.depth}


def read_redis(redis: Redis, queue: str, snapshot: Snapshot) -> None:
    now = time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.llen(queue)
    pipe.hlen(UNACKED_KEY)
    pipe.lindex(queue, -1)
    pipe.zrange(UNACKED_INDEX_KEY, 0, 0, withscores=True)
    pipe.hgetall(STATS_KEY)
    pipe.time()
    pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
    pipe.hgetall(WORKER_INFO_KEY)
    snapshot.waiting, snapshot.reserved, oldest, reserved, stats, clock, seen, info = pipe.execute()
    if oldest is not None:
        enqueued = orjson.loads(oldest).get("headers", {}).get("ingest_enqueued_at")
        snapshot.oldest_waiting_seconds = max(0.0, now - enqueued) if enqueued else 0.0
    if reserved:
        snapshot.oldest_reserved_seconds = max(0.0, now - reserved[0][1])
    for name, value in stats.items():
        if hasattr(snapshot, name.decode()):
            setattr(snapshot, name.decode(), int(value))
    fresh_since = clock[0] + clock[1] / 1e6 - HEARTBEAT_TTL_SECONDS
    snapshot.workers = [orjson.loads(info[worker]) for worker, beat in seen if beat > fresh_since and worker in info]
    snapshot.workers_alive = len(snapshot.workers)


def read_database(engine: Engine, stuck_after_seconds: int, snapshot: Snapshot) -> None:
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT (SELECT count(*) FROM dead_letters d WHERE NOT EXISTS "
            "          (SELECT 1 FROM applied_ops a WHERE a.id = d.op_id)), "
            "       (SELECT count(*) FROM automation_runs WHERE NOT is_completed), "
            # Stuck: nothing applied for a long time, or a complete accepted long ago still waiting for
            # operations that never arrive (dead-lettered, most likely).
            "       (SELECT count(*) FROM automation_runs WHERE NOT is_completed AND "
            "          (activity_at < now() - make_interval(secs => :stuck) OR "
            "           complete_requested_at < now() - make_interval(secs => :stuck)))"),
            {"stuck": stuck_after_seconds}).one()
    snapshot.dead_letters, snapshot.runs_open, snapshot.runs_stuck = row


def take(redis: Redis, engine: Engine | None, queue: str, stuck_after_seconds: int) -> Snapshot:
    snapshot = Snapshot()
    read_redis(redis, queue, snapshot)
    if engine is not None:
        # The queue figures are worth showing while the database is down.
        with contextlib.suppress(Exception):
            read_database(engine, stuck_after_seconds, snapshot)
    return snapshot


def heartbeat(redis: Redis, queue: str, concurrency: int, started_at: float) -> None:
    """A worker says it is alive; it counts as alive for HEARTBEAT_TTL_SECONDS after."""
    info = orjson.dumps({"host": socket.gethostname(), "pid": _pid(), "queue": queue, "concurrency": concurrency,
                         "started_at": started_at, "seen_at": time.time()})
    from schema.protocol import WorkerScripts  # here: schema.protocol imports this module

    WorkerScripts(redis).heartbeat(WORKERS_KEY, WORKER_INFO_KEY, f"{socket.gethostname()}:{_pid()}", info,
                                   HEARTBEAT_TTL_SECONDS)


def _pid() -> int:
    return os.getpid()

