"""The GET endpoints: runs with their counters, threads, filters, pagination and expands (compat.md 2 and 4).

Query strings are parsed into the models of `schema.queries` and answers built as the Structs of
`schema.responses`, the declarations `api_shim/openapi.py` describes them with.
"""

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import orjson
from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from api_shim.auth import Principal
from api_shim.errors import INVALID, ApiError, not_found
from api_shim.http import iso, path_id, services
from api_shim.services import Services
from schema import queries, responses
from schema.messages import run_key, unwritten_runs_key
from schema.queries import Q, Sort
from schema.statuses import COUNT_COLUMNS, Status

X = TypeVar("X", bound=msgspec.Struct)  # an expands object of schema.responses

READ_YOUR_WRITES_SECONDS = 1.0
# A run's GET carries its first threads only, so that it stays small for a run of 10,000 threads; all of them
# are listed, a page at a time, by GET /automation/runs/{id}/threads.
EMBEDDED_THREADS = 100
SORTS: dict[Sort, str] = {"automation_runs:created_at": "created_at"}
ID_FILTERS = ("config_id", "created_by", "milestone_id", "source_id")

_COUNTS = ", ".join(COUNT_COLUMNS)
RUN_COLUMNS = (
    "id, project_id, source_id, name, status, config_id, milestone_id, elapsed, is_completed, tags, "
    f"artifacts, fields, links, {_COUNTS}, created_at, created_by, "
    "updated_at, updated_by, completed_at, completed_by, "
    # Counted on read rather than kept on the run row, so that creating threads never queues on that row.
    "(SELECT count(*) FROM automation_run_threads t WHERE t.run_id = automation_runs.id) AS thread_count, "
    "(SELECT count(*) FROM automation_run_threads t WHERE t.run_id = automation_runs.id AND t.is_completed) "
    "  AS thread_completed_count"
)
THREAD_COLUMNS = (
    # Threads are numbered in the order they were created, which is the order of their ids.
    "id, row_number() OVER (ORDER BY id) AS index, name, status, elapsed_observed, elapsed_computed, "
    f"results_elapsed, is_completed, artifacts, fields, {_COUNTS}, created_at, created_by, completed_at, completed_by"
)
_encode = msgspec.json.Encoder().encode
# The Structs are built positionally (the fastest way), in the order of their fields; the type checker does not
# know the counter fields, which are generated.
_new_run: Callable[..., responses.Run] = responses.Run
_new_thread: Callable[..., responses.Thread] = responses.Thread
_new_run_with_threads: Callable[..., responses.RunWithThreads] = responses.RunWithThreads


def encoded(body: msgspec.Struct) -> Response:
    return Response(_encode(body), media_type="application/json")


class Tally:
    """The counters of `schema.responses.COUNTERS` from a row's status counts, for one set of statuses."""

    def __init__(self, statuses: Sequence[Status]) -> None:
        self.passed = [s.id - 1 for s in statuses if s.is_passed]
        self.failed = [s.id - 1 for s in statuses if s.is_failed]
        self.final = [s.id - 1 for s in statuses if s.is_final]

    def __call__(self, row: Mapping[Any, Any]) -> list[int]:
        counts = [row[c] for c in COUNT_COLUMNS]
        return [*counts, sum(counts[i] for i in self.passed), sum(counts[i] for i in self.failed),
                sum(counts[i] for i in self.final), sum(counts)]


def _run_values(r: Mapping[Any, Any], tally: Tally) -> list[Any]:
    return [
        r["id"], r["project_id"], r["source_id"], r["name"], r["status"], r["config_id"], r["milestone_id"],
        r["elapsed"], r["is_completed"], r["tags"], r["artifacts"], r["fields"], r["links"],
        *tally(r),
        r["thread_count"], r["thread_count"] - r["thread_completed_count"], r["thread_completed_count"],
        iso(r["created_at"]), r["created_by"], iso(r["updated_at"]), r["updated_by"],
        iso(r["completed_at"]), r["completed_by"],
    ]


def run_json(r: Mapping[Any, Any], statuses: Sequence[Status] | Tally) -> responses.Run:
    return _new_run(*_run_values(r, statuses if isinstance(statuses, Tally) else Tally(statuses)))


def thread_json(t: Mapping[Any, Any], tally: Tally) -> responses.Thread:
    elapsed = t["elapsed_observed"]
    if elapsed is None:
        elapsed = t["elapsed_computed"] if t["elapsed_computed"] is not None else t["results_elapsed"]
    return _new_thread(
        t["id"], t["index"], t["name"], t["status"], elapsed, t["is_completed"], t["artifacts"], t["fields"],
        *tally(t),
        iso(t["created_at"]), t["created_by"], iso(t["completed_at"]), t["completed_by"])


def status_json(s: Status) -> responses.Status:
    return responses.Status(s.id, s.name, s.system_name, s.color, s.is_final, s.is_untested, s.is_passed,
                            s.is_failed, list(s.aliases))


def query(model: type[Q], params: QueryParams) -> Q:
    try:
        return queries.parse(model, params)
    except queries.QueryError as exc:
        raise ApiError(422, INVALID, exc.errors) from None


async def build_expands(conn: AsyncConnection, names: Iterable[str], runs: Sequence[Any],
                        statuses: Sequence[Status], threads: Sequence[Any] = (),
                        expands: type[X] = responses.RunExpands) -> X:  # type: ignore[assignment]
    out: dict[str, Any] = {}
    for name in names:
        if name == "statuses":
            out[name] = [status_json(s) for s in statuses]
            continue
        if name == "users":
            ids = {r[c] for r in (*runs, *threads) for c in ("created_by", "updated_by", "completed_by")
                   if c in r}
            table = "users"
        else:
            column = {"automation_sources": "source_id", "configs": "config_id",
                      "milestones": "milestone_id"}[name]
            ids = {r[column] for r in runs}
            table = name
        ids.discard(None)
        rows = (await conn.execute(text(f"SELECT id, name FROM {table} WHERE id = ANY(:ids) ORDER BY id"),
                                   {"ids": sorted(ids)})).all() if ids else []
        out[name] = [responses.NamedObject(row[0], row[1]) for row in rows]
    return expands(**out)


async def get_user(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    async with s.engine.connect() as conn:
        row = (await conn.execute(text("SELECT id, name, email, created_at FROM users WHERE id = :id"),
                                  {"id": principal.user_id})).mappings().first()
    if row is None:
        raise not_found("User")
    return encoded(responses.User(row["id"], row["name"], row["email"], iso(row["created_at"])))


async def get_run(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    run_id = path_id(request, "run_id", "Run")
    async with s.engine.connect() as conn:
        run = await _run_as_accepted(s, conn, run_id)
        if run is None:
            # Created, but no worker has written it yet: as its create left it.
            pending = await s.redis.hget(run_key(run_id), "pending")
            if pending is None:
                raise not_found("Run")
            view = orjson.loads(pending)
            principal.authorize(view["project_id"])
            expands = query(queries.RunQuery, request.query_params).expands
            return encoded(responses.RunResponse(
                responses.RunWithThreads(**view, threads=[]),
                await build_expands(conn, expands, [view], s.statuses.statuses)))
        principal.authorize(run["project_id"])
        expands = query(queries.RunQuery, request.query_params).expands
        threads = (await conn.execute(text(
            f"SELECT {THREAD_COLUMNS} FROM automation_run_threads WHERE run_id = :id ORDER BY id LIMIT :n"),
            {"id": run_id, "n": EMBEDDED_THREADS})).mappings().all()
        statuses = s.statuses.statuses
        result = run_with_threads(run, threads, statuses)
        return encoded(responses.RunResponse(result, await build_expands(conn, expands, [run], statuses, threads)))


def run_with_threads(run: Mapping[Any, Any], threads: Sequence[Mapping[Any, Any]],
                     statuses: Sequence[Status]) -> responses.RunWithThreads:
    """A run as its GET answers it (and its completion webhook carries it): the row of RUN_COLUMNS with its
    first EMBEDDED_THREADS threads' rows of THREAD_COLUMNS."""
    tally = Tally(statuses)
    return _new_run_with_threads(*_run_values(run, tally), [thread_json(t, tally) for t in threads])


async def _run_as_accepted(s: Services, conn: AsyncConnection, run_id: int) -> RowMapping | None:
    """The run's row, once the workers have applied what was accepted for it when the request came (its
    create, its threads' creates and appends), waiting for them up to READ_YOUR_WRITES_SECONDS: a client that
    creates a thread and then reads its run finds the thread, as it did when creates were written at once.
    Past that (workers behind, or down), the row as it stands, or None if it is not written yet."""
    accepted = await s.redis.hget(run_key(run_id), "ops")
    deadline = time.monotonic() + READ_YOUR_WRITES_SECONDS
    while True:
        run = (await conn.execute(text(f"SELECT {RUN_COLUMNS}, ops_applied FROM automation_runs WHERE id = :id"),
                                  {"id": run_id})).mappings().first()
        settled = run is not None and (run["is_completed"] or accepted is None
                                       or run["ops_applied"] >= int(accepted))
        if settled or time.monotonic() > deadline or (run is None and accepted is None):
            return run
        await asyncio.sleep(0.02)


async def _runs_written(s: Services, conn: AsyncConnection, project_id: int) -> None:
    """Wait, up to READ_YOUR_WRITES_SECONDS, until the project's runs created before this request are written:
    a client that creates a run and then lists the project's runs finds it."""
    unwritten = [int(r) for r in await s.redis.smembers(unwritten_runs_key(project_id))]
    deadline = time.monotonic() + READ_YOUR_WRITES_SECONDS
    while unwritten and time.monotonic() < deadline:
        written = (await conn.execute(text("SELECT count(*) FROM automation_runs WHERE id = ANY(:ids)"),
                                      {"ids": unwritten})).scalar_one()
        if written == len(unwritten):
            return
        await asyncio.sleep(0.02)


async def require_project(conn: AsyncConnection, principal: Principal, project_id: int) -> None:
    """404 for a project that does not exist, 403 for one the token may not read."""
    if (await conn.execute(text("SELECT 1 FROM projects WHERE id = :id"), {"id": project_id})).first() is None:
        raise not_found("Project")
    principal.authorize(project_id)


async def list_runs(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    project_id = path_id(request, "project_id", "Project")
    async with s.engine.connect() as conn:
        await require_project(conn, principal, project_id)

        q = query(queries.RunsQuery, request.query_params)
        where = ["project_id = :project"]
        binds: dict[str, Any] = {"project": project_id}
        for name in ID_FILTERS:
            ids = getattr(q, name)
            if ids is not None:
                where.append(f"{name} = ANY(:{name})")
                binds[name] = ids
        status_ids = q.status if q.status is not None else q.state
        if status_ids is not None:
            where.append("status = ANY(:status)")
            binds["status"] = status_ids
        if q.tags is not None:
            where.append("tags && cast(:tags AS text[])")
            binds["tags"] = q.tags
        for name, op, moment in (("created_after", ">", q.created_after), ("created_before", "<", q.created_before)):
            if moment is not None:
                where.append(f"created_at {op} :{name}")
                binds[name] = moment

        await _runs_written(s, conn, project_id)
        condition = " AND ".join(where)
        total = (await conn.execute(text(f"SELECT count(*) FROM automation_runs WHERE {condition}"),
                                    binds)).scalar_one()
        rows = (await conn.execute(text(
            f"SELECT {RUN_COLUMNS} FROM automation_runs WHERE {condition} "
            f"ORDER BY {SORTS[q.sort]} {q.order}, id {q.order} LIMIT :limit OFFSET :offset"),
            binds | {"limit": q.per_page, "offset": (q.page - 1) * q.per_page})).mappings().all()
        statuses = s.statuses.statuses
        tally = Tally(statuses)
        return encoded(responses.RunPage(**envelope(q.page, q.per_page, total),
                                         result=[run_json(r, tally) for r in rows],
                                         expands=await build_expands(conn, q.expands, rows, statuses)))


def envelope(page: int, per_page: int, total: int) -> dict[str, Any]:
    """The list envelope's fields but its result and expands (compat.md section 4)."""
    last_page = math.ceil(total / per_page) if total else None
    return {"page": page if total else None, "prev_page": page - 1 if total and page > 1 else None,
            "next_page": page + 1 if last_page and page < last_page else None, "last_page": last_page,
            "per_page": per_page, "total": total}


async def list_threads(request: Request) -> Response:
    """A run's threads, a page at a time, in the order they were created (our addition to the API)."""
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    run_id = path_id(request, "run_id", "Run")
    async with s.engine.connect() as conn:
        project_id = (await conn.execute(text("SELECT project_id FROM automation_runs WHERE id = :id"),
                                         {"id": run_id})).scalar()
        if project_id is None:
            raise not_found("Run")
        principal.authorize(project_id)
        q = query(queries.ThreadsQuery, request.query_params)
        total = (await conn.execute(text("SELECT count(*) FROM automation_run_threads WHERE run_id = :id"),
                                    {"id": run_id})).scalar_one()
        threads = (await conn.execute(text(
            f"SELECT {THREAD_COLUMNS} FROM automation_run_threads WHERE run_id = :id "
            "ORDER BY id LIMIT :limit OFFSET :offset"),
            {"id": run_id, "limit": q.per_page, "offset": (q.page - 1) * q.per_page})).mappings().all()
        statuses = s.statuses.statuses
        tally = Tally(statuses)
        return encoded(responses.ThreadPage(
            **envelope(q.page, q.per_page, total), result=[thread_json(t, tally) for t in threads],
            expands=await build_expands(conn, q.expands, [], statuses, threads, responses.ThreadExpands)))
