"""The long-lived objects a shim process shares between requests."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis.exceptions
import sqlalchemy.exc
from redis import Redis as SyncRedis
from redis.asyncio import Connection, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from api_shim import problems
from api_shim.auth import Authenticator
from api_shim.batcher import GroupCommit
from api_shim.catalog import Catalog
from api_shim.ids import IdBlocks
from api_shim.queue import Queue
from api_shim.state import State
from schema import status
from schema.process import quiet_gc
from schema.protocol import ThreadOp
from schema.settings import Settings
from schema.statuses import DEFAULT_STATUSES, STATUS_TABLE_SQL, Status, alias_map, status_of

log = logging.getLogger(__name__)

STATUS_REFRESH_SECONDS = 30.0
# Errors that say a dependency is down, not that one request is at fault: a group commit fails all its members.
DEPENDENCY_DOWN: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError)
# /metrics needs no token: however often it is scraped, the database is asked for its figures (counts over
# runs and dead letters) at most once in this time by a shim process.
DATABASE_FIGURES_SECONDS = 1.0
# How much one group commit carries at most: thread appends and completes in one message, threads created
# in one insert.
BATCH_OPS = 200
BATCH_BYTES = 4 * 1024 * 1024
# Ids each shim process draws ahead, a block at a time: enough for the creates of a fleet's start, and of an
# outage of the database.
RUN_IDS = 200
THREAD_IDS = 2000
SOURCE_IDS = 20


class RedisConnection(Connection):
    """A connection to Redis whose lost socket is always a ConnectionError, answered 503.

    uvloop raises RuntimeError, not OSError, on a write to a socket the peer has reset, which is what a
    connection Redis accepted just before it died gets; redis-py lets that through (redis/redis-py#4287 is the
    same with plain asyncio), so such a request got a 500.
    """

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc


@dataclass
class StatusTable:
    """The status table, refreshed in the background so that validation never waits on the database."""

    statuses: list[Status] = field(default_factory=lambda: list(DEFAULT_STATUSES))
    aliases: dict[str, int] = field(default_factory=lambda: alias_map(DEFAULT_STATUSES))

    async def refresh(self, engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(STATUS_TABLE_SQL))).mappings().all()
        self.statuses = [status_of(row) for row in rows]
        self.aliases = alias_map(self.statuses)


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    redis: Redis
    queue: Queue
    state: State
    auth: Authenticator
    statuses: StatusTable
    thread_ops: "GroupCommit[ThreadOp, str]"
    # New threads apart: a CI job waits on its thread's id before it sends anything, so its create must not
    # wait behind a flush of megabytes of other jobs' appends.
    thread_creates: "GroupCommit[ThreadOp, str]"
    run_ids: IdBlocks
    thread_ids: IdBlocks
    catalog: Catalog
    _refresher: "asyncio.Task[None] | None" = None
    # Blocking clients for the status snapshot behind /metrics (read in a thread, a few times a minute).
    _sync_redis: SyncRedis | None = None
    _sync_engine: Engine | None = None
    _snapshot: "asyncio.Future[status.Snapshot] | None" = None
    _database_figures: tuple[float, status.Snapshot] | None = None

    async def snapshot(self) -> status.Snapshot:
        """The installation's figures for /metrics. Scrapes that arrive while one is being taken share it."""
        if self._snapshot is None:
            self._snapshot = asyncio.ensure_future(asyncio.to_thread(self._take_snapshot))
            self._snapshot.add_done_callback(self._snapshot_taken)
        return await asyncio.shield(self._snapshot)

    def _snapshot_taken(self, _: "asyncio.Future[status.Snapshot]") -> None:
        self._snapshot = None

    def _take_snapshot(self) -> status.Snapshot:
        snapshot = status.Snapshot()
        status.read_redis(self.sync_redis(), self.settings.queue, snapshot)
        now = time.monotonic()
        if self._database_figures is None or now - self._database_figures[0] >= DATABASE_FIGURES_SECONDS:
            figures = status.Snapshot()
            # The queue figures are worth showing while the database is down (its figures are then left out).
            with contextlib.suppress(Exception):
                status.read_database(self.sync_engine(), self.settings.stuck_after_seconds, figures)
            self._database_figures = (now, figures)
        figures = self._database_figures[1]
        snapshot.dead_letters, snapshot.runs_open, snapshot.runs_stuck = (
            figures.dead_letters, figures.runs_open, figures.runs_stuck)
        return snapshot

    def sync_redis(self) -> SyncRedis:
        if self._sync_redis is None:
            self._sync_redis = SyncRedis.from_url(self.settings.redis_url, socket_timeout=5,
                                                  socket_connect_timeout=3)
        return self._sync_redis

    def sync_engine(self) -> Engine:
        if self._sync_engine is None:
            self._sync_engine = create_engine(self.settings.database_url, pool_size=1, max_overflow=1,
                                              pool_pre_ping=True, connect_args={"connect_timeout": 3})
        return self._sync_engine

    @classmethod
    def create(cls, settings: Settings) -> "Services":
        engine = create_async_engine(
            settings.database_url, pool_size=20, max_overflow=10, pool_pre_ping=True, pool_timeout=30,
            connect_args={"connect_timeout": 3},
        )
        # (rediss:// and unix:// URLs bring connection classes of their own, without that fix.)
        redis = Redis.from_url(settings.redis_url, max_connections=256, socket_timeout=5,
                               socket_connect_timeout=3, connection_class=RedisConnection)
        queue = Queue(redis, settings.queue, settings.queue_high_water, settings.queue_high_water_bytes)
        state = State(engine, queue)
        retry = settings.retry_after_seconds
        return cls(
            settings, engine, redis, queue, state, Authenticator(redis, engine, settings),
            StatusTable(),
            thread_ops=GroupCommit(queue.thread_ops_with_retry, max_items=BATCH_OPS, max_bytes=BATCH_BYTES,
                                   size=lambda op: len(op.op), shared=DEPENDENCY_DOWN),
            thread_creates=GroupCommit(queue.thread_ops_with_retry, max_items=BATCH_OPS, max_bytes=BATCH_BYTES,
                                       size=lambda op: len(op.op), shared=DEPENDENCY_DOWN),
            run_ids=IdBlocks(engine, "automation_runs", RUN_IDS, retry),
            thread_ids=IdBlocks(engine, "automation_run_threads", THREAD_IDS, retry),
            catalog=Catalog(engine, redis, IdBlocks(engine, "automation_sources", SOURCE_IDS, retry), retry),
        )

    async def start(self) -> None:
        quiet_gc()
        problems.start()
        await asyncio.gather(self.run_ids.start(), self.thread_ids.start())
        try:
            await self.statuses.refresh(self.engine)
        except Exception as exc:  # the database may be down at start; the defaults serve until it is back
            log.warning("could not load statuses: %s", type(exc).__name__)
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(STATUS_REFRESH_SECONDS)
            try:
                await self.statuses.refresh(self.engine)
            except Exception as exc:
                log.warning("could not refresh statuses: %s", type(exc).__name__)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        problems.close()
        await self.redis.aclose()
        await self.engine.dispose()
        if self._sync_redis is not None:
            self._sync_redis.close()
        if self._sync_engine is not None:
            self._sync_engine.dispose()
