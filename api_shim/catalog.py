"""What a run create checks its references against, without asking PostgreSQL each time: a project's
configs, milestones and sources, by id and by name.

Each shim process keeps a project's catalog for CATALOG_SECONDS, read from PostgreSQL and copied to Redis,
where other shims (and this one, restarted during a database outage) find it while PostgreSQL cannot answer.
A name the catalog does not know is looked up again before it is refused, once a second at most, so that a
config or milestone created a moment ago is found. When neither PostgreSQL nor Redis knows the project,
the create gets 503, as it did when it waited on the database.

A source is created on first use: the shim draws its id (api_shim/ids.py) and claims the name for it in a
Redis hash, so that every shim gives the same new source the same id; a worker inserts the row with the run.
"""

import logging
import time
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api_shim.errors import unavailable
from api_shim.ids import IdBlocks
from api_shim.lru import Lru

log = logging.getLogger(__name__)

CATALOG_SECONDS = 60.0
RELOOK_SECONDS = 1.0
REDIS_TTL_SECONDS = 7 * 24 * 3600
CACHED_PROJECTS = 10_000


def catalog_key(project_id: int) -> str:
    return f"ingest:catalog:{project_id}"


def sources_key(project_id: int) -> str:
    """Source name -> id, for every source of the project, new ones included before a worker inserts them."""
    return f"ingest:sources:{project_id}"


@dataclass
class ProjectCatalog:
    configs: dict[str, int] = field(default_factory=dict)  # name -> id
    milestones: dict[str, int] = field(default_factory=dict)
    read_at: float = 0.0

    def ids(self, kind: str) -> set[int]:
        return set(self.names(kind).values())

    def names(self, kind: str) -> dict[str, int]:
        return self.configs if kind == "configs" else self.milestones


class Catalog:
    def __init__(self, engine: AsyncEngine, redis: Redis, sources: IdBlocks, retry_after: int) -> None:
        self.engine = engine
        self.redis = redis
        self.source_ids = sources
        self.retry_after = retry_after
        self._projects: Lru[int, ProjectCatalog] = Lru(CACHED_PROJECTS)
        self._misses: Lru[tuple[int, str, int | None, str | None], float] = Lru(CACHED_PROJECTS)

    async def resolve(self, project_id: int, kind: str, given_id: int | None, given_name: str | None) -> int | None:
        """A config or milestone (`kind`: "configs" or "milestones") by id, which wins, or by name; None when
        neither is given, -1 when the one given does not exist in the project."""
        if given_id is None and given_name is None:
            return None
        catalog = await self._catalog(project_id)
        if not self._knows(catalog, kind, given_id, given_name):
            # Created a moment ago, maybe: look again, once a second at most for the same name.
            miss = (project_id, kind, given_id, given_name)
            missed_at = self._misses.get(miss)
            if missed_at is None or time.monotonic() - missed_at > RELOOK_SECONDS:
                self._misses.put(miss, time.monotonic())
                catalog = await self._catalog(project_id, fresh=True)
        if given_id is not None:
            return given_id if given_id in catalog.ids(kind) else -1
        assert given_name is not None
        return catalog.names(kind).get(given_name, -1)

    async def source(self, project_id: int, name: str) -> int:
        """The id of the project's source of this name, a new one if there is none yet."""
        known = await self.redis.hget(sources_key(project_id), name)
        if known is None:
            await self._catalog(project_id, fresh=True)  # the database may know it (Redis lost it, say)
            known = await self.redis.hget(sources_key(project_id), name)
        if known is not None:
            return int(known)
        new_id = await self.source_ids.take()
        # HSETNX: if another shim claimed the name meanwhile, its id is the source's.
        if not await self.redis.hsetnx(sources_key(project_id), name, new_id):
            return int(await self.redis.hget(sources_key(project_id), name) or new_id)
        await self.redis.expire(sources_key(project_id), REDIS_TTL_SECONDS)
        return new_id

    async def exists(self, project_id: int) -> bool:
        """Whether there is such a project (asked only for one the token may not use: 404 or 403)."""
        try:
            async with self.engine.connect() as conn:
                found = (await conn.execute(text("SELECT 1 FROM projects WHERE id = :p"), {"p": project_id})).first()
        except Exception as exc:
            raise unavailable(self.retry_after, "The database") from exc
        return found is not None

    def forget(self, project_id: int) -> None:
        self._projects.pop(project_id)

    @staticmethod
    def _knows(catalog: ProjectCatalog, kind: str, given_id: int | None, given_name: str | None) -> bool:
        if given_id is not None:
            return given_id in catalog.ids(kind)
        return given_name in catalog.names(kind)

    async def _catalog(self, project_id: int, fresh: bool = False) -> ProjectCatalog:
        cached = self._projects.get(project_id)
        if cached is not None and not fresh and time.monotonic() - cached.read_at < CATALOG_SECONDS:
            return cached
        try:
            catalog = await self._read_database(project_id)
        except Exception as exc:
            if cached is not None:
                return cached  # stale, but better than refusing while the database is away
            stored = await self.redis.get(catalog_key(project_id))
            if stored is None:
                log.warning("no catalog for project %d: %s", project_id, type(exc).__name__)
                raise unavailable(self.retry_after, "The database") from exc
            data = orjson.loads(stored)
            catalog = ProjectCatalog(data["configs"], data["milestones"], time.monotonic())
        self._projects.put(project_id, catalog)
        return catalog

    async def _read_database(self, project_id: int) -> ProjectCatalog:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT 'configs', id, name FROM configs WHERE project_id = :p UNION ALL "
                "SELECT 'milestones', id, name FROM milestones WHERE project_id = :p UNION ALL "
                "SELECT 'sources', id, name FROM automation_sources WHERE project_id = :p"),
                {"p": project_id})).all()
        catalog = ProjectCatalog(read_at=time.monotonic())
        sources: dict[str, int] = {}
        for kind, row_id, name in rows:
            if kind == "sources":
                sources[name] = row_id
            else:
                catalog.names(kind)[name] = row_id
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(catalog_key(project_id), orjson.dumps({"configs": catalog.configs,
                                                            "milestones": catalog.milestones}),
                     ex=REDIS_TTL_SECONDS)
            for name, source_id in sources.items():
                pipe.hsetnx(sources_key(project_id), name, source_id)
            pipe.expire(sources_key(project_id), REDIS_TTL_SECONDS)
            await pipe.execute()
        return catalog
