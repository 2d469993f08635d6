"""Creating threads, in batches: one INSERT and two Redis round trips for all the threads asked for meanwhile.

A CI fleet starts with a burst of thread creates, one per job; each create needs its thread's id at once, so
unlike appends they are written before they are answered. Batching keeps that burst cheap.
"""

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api_shim.queue import Queue, held
from api_shim.state import State, ThreadRef
from schema.messages import run_key, thread_key


@dataclass(frozen=True)
class NewThread:
    run_id: int
    user_id: int
    name: str | None
    elapsed_observed: int | None
    elapsed_computed: int | None
    artifacts: str  # JSON
    fields: str  # JSON
    resources: str = ""  # what it holds, in the queue scripts' form (api_shim.queue.resources_of)


# A thread is inserted only into a run that is neither completed nor waiting to be: KEY SHARE on the run lets
# workers update it meanwhile, but makes the insert wait for a worker finalising the run (which takes FOR
# UPDATE) and then re-check it. So a thread is either created before its run is finalised, and completed with
# it, or refused. Ids are drawn here, so that each created thread can be matched to its request.
INSERT = text("""
WITH new AS (
    SELECT * FROM unnest(CAST(:runs AS bigint[]), CAST(:names AS text[]), CAST(:observed AS bigint[]),
                         CAST(:computed AS bigint[]), CAST(:artifacts AS jsonb[]), CAST(:fields AS jsonb[]),
                         CAST(:users AS bigint[]))
        WITH ORDINALITY AS n(run_id, name, elapsed_observed, elapsed_computed, artifacts, fields, created_by, ord)
), open AS (
    SELECT new.*, r.project_id, nextval(pg_get_serial_sequence('automation_run_threads', 'id')) AS id
    FROM new JOIN automation_runs r ON r.id = new.run_id AND NOT r.is_completed AND r.ops_expected IS NULL
    ORDER BY new.ord
    FOR KEY SHARE OF r
), inserted AS (
    INSERT INTO automation_run_threads (id, run_id, project_id, name, elapsed_observed, elapsed_computed,
                                        artifacts, fields, created_by)
    SELECT id, run_id, project_id, name, elapsed_observed, elapsed_computed, artifacts, fields, created_by
    FROM open ORDER BY id
)
SELECT ord, id, project_id FROM open
""")


CLOSED, BUSY = "closed", "busy"


async def create_threads(engine: AsyncEngine, queue: Queue, state: State,
                         batch: list[NewThread]) -> list[int | str]:
    """The new threads' ids, in order; CLOSED where the run is completed (or its complete accepted), BUSY for
    all while the queue is over its high-water mark (a new thread would only add appends to it)."""
    closed, busy = await _closed_runs(queue, state, {t.run_id for t in batch})
    if busy:
        return [BUSY] * len(batch)
    todo = [t for t in batch if t.run_id not in closed]
    created: dict[int, tuple[int, int]] = {}
    if todo:
        async with engine.begin() as conn:
            rows = (await conn.execute(INSERT, {
                "runs": [t.run_id for t in todo], "names": [t.name for t in todo],
                "observed": [t.elapsed_observed for t in todo], "computed": [t.elapsed_computed for t in todo],
                "artifacts": [t.artifacts for t in todo], "fields": [t.fields for t in todo],
                "users": [t.user_id for t in todo],
            })).all()
        created = {ord_ - 1: (thread_id, project_id) for ord_, thread_id, project_id in rows}
        async with queue.redis.pipeline(transaction=False) as pipe:
            for i, (thread_id, project_id) in created.items():
                await queue.fill(thread_key(thread_id), closed=False, client=pipe, run=todo[i].run_id,
                                 project=project_id, appends=0, **held(todo[i].resources))
                state.remember_thread(ThreadRef(thread_id, todo[i].run_id, project_id))
            await pipe.execute()
    ids = iter(created.get(i, (CLOSED, 0))[0] for i in range(len(todo)))
    return [CLOSED if t.run_id in closed else next(ids) for t in batch]


async def _closed_runs(queue: Queue, state: State, runs: set[int]) -> tuple[set[int], bool]:
    """Runs whose complete has been accepted (the database may not know yet, Redis does), and whether the
    queue is over its high-water mark."""
    ordered = sorted(runs)
    async with queue.redis.pipeline(transaction=False) as pipe:
        queue.high_water_reading(pipe)
        for run_id in ordered:
            pipe.hget(run_key(run_id), "closed")
        waiting, queued_bytes, *values = await pipe.execute()
    closed = set()
    for run_id, value in zip(ordered, values, strict=True):
        if value is None and await state.rebuild_run(run_id) is not None:
            value = await queue.redis.hget(run_key(run_id), "closed")
        if value != b"0":
            closed.add(run_id)
    return closed, queue.over_high_water(waiting, queued_bytes)
