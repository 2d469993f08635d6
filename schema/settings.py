from functools import lru_cache
from typing import Annotated

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob comes from an `INGEST_*` environment variable; the defaults work on a developer machine."""

    model_config = SettingsConfigDict(env_prefix="INGEST_", extra="ignore")

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/ingest"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Celery queue (a Redis list of this name) that carries every append and complete.
    queue: str = "ingest"
    # Appends are answered 429 while this many messages wait in the queue, or while the batches waiting hold
    # this many bytes in Redis (0: no limit).
    queue_high_water: int = 50_000
    queue_high_water_bytes: int = 2 * 1024**3
    max_body_bytes: int = 10 * 1024 * 1024
    # Slow clients (api_shim/server.py): request headers must be complete this long after connecting (or after
    # the previous response on a keep-alive connection), and a body this long after its headers, else 408 and
    # the connection is closed. The official CLI sends each request at once and gives up on it after 60 s, so at
    # 60 it can never be the one cut off.
    header_timeout_seconds: float = 60.0
    body_timeout_seconds: float = 60.0
    # A keep-alive connection with no new request for this long is closed.
    keep_alive_timeout_seconds: int = 30
    # Connections one server process holds at once; a new one beyond them is answered 503 and closed. Far above
    # what a CI fleet opens (a connection per job at a time), so that even a thousand slow clients, each held
    # up to the timeouts above, leave room for everyone else.
    max_connections: int = 10_000
    # How long what a shim read about a token from PostgreSQL is trusted, counted from that read, in Redis and
    # in every process: it bounds how long a revoke or a grant takes to reach every shim.
    auth_cache_seconds: float = 10.0
    # How long an unknown (or revoked) token is remembered as such, in Redis and in each shim process.
    auth_negative_cache_seconds: float = 30.0
    # Tokens a shim process remembers, valid and unknown ones each; the least recently used go first.
    auth_cache_entries: int = 100_000
    # Failed authentications a client address may make at once, and how many more a second after that. Beyond,
    # its requests get 429, without a database lookup, unless their token is cached (0: no limit).
    auth_failure_burst: int = 20
    auth_failures_per_second: Annotated[float, Field(gt=0)] = 1.0
    # Seconds a client is told to wait when a dependency is down.
    retry_after_seconds: int = 5
    worker_concurrency: int = 2
    # Messages a worker child reserves ahead of the one it applies.
    worker_prefetch: int = 4
    # Seconds a message reserved by a worker may stay unacknowledged before Redis hands it to another worker
    # (a worker killed outright never acknowledges), and how long a batch taken from the pending list is leased.
    # Longer than the slowest batch.
    visibility_timeout: int = 300
    # Runs (and threads of open runs) with nothing applied for this long are completed as they stand.
    complete_idle_after_seconds: int = 24 * 3600
    # An open run counts as stuck (in metrics and `ingest status`) after this long without activity, or this long
    # after its complete was accepted.
    stuck_after_seconds: int = 3600
    # How often a worker looks for such runs and threads, and for batches no message will bring.
    sweep_interval_seconds: int = 60
    # Completed runs are removed, with their threads and results, this many days after their completion
    # (0: kept forever); `ingest admin project retention` overrides it for one project. Open runs are never
    # removed. The workers' sweeper applies it once a day.
    retention_days: Annotated[int, Field(ge=0)] = 90
    # How long an operation's id is remembered once claimed, so that a redelivery is recognised: an operation
    # arriving later than this after it was accepted is dead-lettered ("outside the dedupe window"), never
    # applied twice. Workers refuse to start when it is not longer than the visibility timeout plus the longest
    # retry (worker/lifecycle.py).
    dedupe_days: Annotated[int, Field(ge=1)] = 7
    # The Celery queue of webhook deliveries (worker/webhooks.py), apart from `queue`, so that operators can
    # serve it with workers of its own (`ingest worker --queues webhooks`).
    webhook_queue: str = "ingest-webhooks"
    # POSTs one worker process has in flight at once (each waits up to 10 s for its receiver).
    webhook_concurrency: Annotated[int, Field(ge=1)] = 8
    # A failed delivery is tried again after base x 2^(attempts-1) seconds, at most an hour apart, until its
    # first attempt is this many hours old; then it is marked failed (`ingest admin webhook redeliver`).
    webhook_retry_base_seconds: Annotated[float, Field(gt=0)] = 10.0
    webhook_retry_hours: Annotated[float, Field(gt=0)] = 24.0
    # Scheduling niceness added to worker processes: where the shim shares the machine, accepting requests
    # takes precedence over applying them (the queue absorbs the difference).
    worker_nice: int = 10
    log_level: str = "INFO"
    # "json" (one object a line, for log pipelines) or "text".
    log_format: str = "json"


@lru_cache
def get_settings() -> Settings:
    return Settings()
