"""What the hot path needs to know about a run or thread, without asking PostgreSQL each time.

Which run and project a thread belongs to never changes, so each process keeps it in memory. Whether a run
or thread is still open, and how many operations it has accepted, lives in Redis (see `queue.py`) and is
rebuilt from PostgreSQL when Redis has lost it.
"""

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api_shim.queue import Queue
from schema.messages import run_key, thread_key

MAX_CACHED = 200_000
# What a run or thread holds, for the caps the queue scripts keep (api_shim.queue.resources_of): jsonb prints
# a little wider than the compact JSON counted on the way in, so a rebuilt count errs on the safe side.
_HELD = ("jsonb_array_length(fields), {links}, jsonb_array_length(artifacts), "
         "octet_length(({all})::text) - 2")


@dataclass(frozen=True)
class ThreadRef:
    thread_id: int
    run_id: int
    project_id: int


class State:
    def __init__(self, engine: AsyncEngine, queue: Queue) -> None:
        self.engine = engine
        self.queue = queue
        self._threads: dict[int, ThreadRef] = {}
        self._runs: dict[int, int] = {}

    def remember_run(self, run_id: int, project_id: int) -> None:
        if len(self._runs) >= MAX_CACHED:
            self._runs.clear()
        self._runs[run_id] = project_id

    def remember_thread(self, ref: ThreadRef) -> None:
        if len(self._threads) >= MAX_CACHED:
            self._threads.clear()
        self._threads[ref.thread_id] = ref

    async def run_project(self, run_id: int) -> int | None:
        """The run's project, or None if there is no such run."""
        project_id = self._runs.get(run_id)
        if project_id is None:
            raw = await self.queue.redis.hget(run_key(run_id), "project")
            if raw is not None:
                project_id = int(raw)
            else:
                project_id = await self.rebuild_run(run_id)
                if project_id is None:
                    return None
            self.remember_run(run_id, project_id)
        return project_id

    async def thread(self, thread_id: int) -> ThreadRef | None:
        ref = self._threads.get(thread_id)
        if ref is None:
            run, project = await self.queue.redis.hmget(thread_key(thread_id), ["run", "project"])
            if run is None or project is None:
                ref = await self.rebuild_thread(thread_id)
                if ref is None:
                    return None
            else:
                ref = ThreadRef(thread_id, int(run), int(project))
            self.remember_thread(ref)
        return ref

    async def rebuild_run(self, run_id: int) -> int | None:
        """Refill the run's Redis state from the database; its project, or None if there is no such run."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(text(
                "SELECT project_id, is_completed OR ops_expected IS NOT NULL, ops_applied, "
                f"  {_HELD.format(links='jsonb_array_length(links)', all='fields || links || artifacts')} "
                "FROM automation_runs WHERE id = :id"), {"id": run_id})).first()
        if row is None:
            return None
        await self.queue.fill(run_key(run_id), closed=row[1], project=row[0], ops=row[2],
                              fields=row[3], links=row[4], artifacts=row[5], bytes=row[6])
        return int(row[0])

    async def rebuild_thread(self, thread_id: int) -> ThreadRef | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(text(
                "SELECT run_id, project_id, is_completed OR appends_expected IS NOT NULL, appends_applied, "
                f"  {_HELD.format(links='0', all='fields || artifacts')} "
                "FROM automation_run_threads WHERE id = :id"), {"id": thread_id})).first()
        if row is None:
            return None
        await self.queue.fill(thread_key(thread_id), closed=row[2], run=row[0], project=row[1], appends=row[3],
                              fields=row[4], artifacts=row[6], bytes=row[7])
        return ThreadRef(thread_id, row[0], row[1])
