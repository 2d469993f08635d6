"""The GET endpoints: runs with their counters, threads, filters, pagination and expands (compat.md 2 and 4)."""

import asyncio
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec
import orjson
from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from api_shim.errors import INVALID, ApiError, not_found
from api_shim.http import iso, json_response, path_id, services
from api_shim.services import Services
from schema.messages import run_key, unwritten_runs_key
from schema.requests import Tag
from schema.statuses import COUNT_COLUMNS, Status

PER_PAGE = (15, 25, 50, 100)
READ_YOUR_WRITES_SECONDS = 1.0
# A run's GET carries its first threads only, so that it stays small for a run of 10,000 threads; all of them
# are listed, a page at a time, by GET /automation/runs/{id}/threads.
EMBEDDED_THREADS = 100
THREAD_EXPANDS = ("statuses", "users")
EXPANDS = ("automation_sources", "configs", "milestones", "statuses", "users")
SORTS = {"automation_runs:created_at": "created_at"}
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


def counters(row: Mapping[Any, Any], statuses: Sequence[Status]) -> dict[str, int]:
    counts = [row[c] for c in COUNT_COLUMNS]
    out = dict(zip(COUNT_COLUMNS, counts, strict=True))
    out["success_count"] = sum(counts[s.id - 1] for s in statuses if s.is_passed)
    out["failure_count"] = sum(counts[s.id - 1] for s in statuses if s.is_failed)
    out["completed_count"] = sum(counts[s.id - 1] for s in statuses if s.is_final)
    out["total_count"] = sum(counts)
    return out


def run_json(r: Mapping[Any, Any], statuses: Sequence[Status]) -> dict[str, Any]:
    return {
        "id": r["id"], "project_id": r["project_id"], "source_id": r["source_id"], "name": r["name"],
        "status": r["status"], "config_id": r["config_id"], "milestone_id": r["milestone_id"],
        "elapsed": r["elapsed"], "is_completed": r["is_completed"], "tags": r["tags"],
        "artifacts": r["artifacts"], "fields": r["fields"], "links": r["links"],
        **counters(r, statuses),
        "thread_count": r["thread_count"],
        "thread_active_count": r["thread_count"] - r["thread_completed_count"],
        "thread_completed_count": r["thread_completed_count"],
        "created_at": iso(r["created_at"]), "created_by": r["created_by"],
        "updated_at": iso(r["updated_at"]), "updated_by": r["updated_by"],
        "completed_at": iso(r["completed_at"]), "completed_by": r["completed_by"],
    }


def thread_json(t: RowMapping, statuses: Sequence[Status]) -> dict[str, Any]:
    elapsed = t["elapsed_observed"]
    if elapsed is None:
        elapsed = t["elapsed_computed"] if t["elapsed_computed"] is not None else t["results_elapsed"]
    return {
        "id": t["id"], "index": t["index"], "name": t["name"], "status": t["status"], "elapsed": elapsed,
        "is_completed": t["is_completed"], "artifacts": t["artifacts"], "fields": t["fields"],
        **counters(t, statuses),
        "created_at": iso(t["created_at"]), "created_by": t["created_by"],
        "completed_at": iso(t["completed_at"]), "completed_by": t["completed_by"],
    }


def status_json(s: Status) -> dict[str, Any]:
    return {"id": s.id, "name": s.name, "system_name": s.system_name, "color": s.color,
            "is_final": s.is_final, "is_untested": s.is_untested, "is_passed": s.is_passed,
            "is_failed": s.is_failed, "aliases": list(s.aliases)}


def parse_expands(params: QueryParams, accepted: Sequence[str] = EXPANDS) -> list[str]:
    raw = params.get("expands", "")
    # Each name once, in the order first given: a name repeated ten thousand times is one query, not 10,000.
    names = list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in accepted]
    if unknown:
        raise ApiError(422, INVALID, {"expands": [
            f"Unknown expand '{n[:100]}'; accepted: {', '.join(accepted)}." for n in unknown[:10]]})
    return names


async def build_expands(conn: AsyncConnection, names: Iterable[str], runs: Sequence[RowMapping],
                        statuses: Sequence[Status],
                        threads: Sequence[RowMapping] = ()) -> dict[str, Any]:
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
        out[name] = [{"id": row[0], "name": row[1]} for row in rows]
    return out


async def get_user(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    async with s.engine.connect() as conn:
        row = (await conn.execute(text("SELECT id, name, email, created_at FROM users WHERE id = :id"),
                                  {"id": principal.user_id})).mappings().first()
    if row is None:
        raise not_found("User")
    return json_response({"id": row["id"], "name": row["name"], "email": row["email"],
                          "created_at": iso(row["created_at"])})


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
            expands = parse_expands(request.query_params)
            return json_response({"result": view | {"threads": []},
                                  "expands": await build_expands(conn, expands, [view], s.statuses.statuses)})
        principal.authorize(run["project_id"])
        expands = parse_expands(request.query_params)
        threads = (await conn.execute(text(
            f"SELECT {THREAD_COLUMNS} FROM automation_run_threads WHERE run_id = :id ORDER BY id LIMIT :n"),
            {"id": run_id, "n": EMBEDDED_THREADS})).mappings().all()
        statuses = s.statuses.statuses
        result = run_json(run, statuses) | {"threads": [thread_json(t, statuses) for t in threads]}
        return json_response({"result": result,
                              "expands": await build_expands(conn, expands, [run], statuses, threads)})


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


def _is_number(text: str) -> bool:
    # str.isdigit() also accepts digits int() refuses, such as '²'.
    return text.isascii() and text.isdecimal()


def _ids(params: QueryParams, name: str, errors: dict[str, list[str]]) -> list[int] | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts or not all(_is_number(p) and len(p) <= 18 for p in parts):
        errors[name] = ["must be a comma-separated list of ids"]
        return None
    return [int(p) for p in parts]


def _tags(params: QueryParams, errors: dict[str, list[str]]) -> list[str] | None:
    # A tag no run can carry is a mistake in the query, not a filter that matches nothing.
    tags = [t.strip() for t in params.get("tags", "").split(",") if t.strip()]
    if not tags:
        return None
    try:
        return msgspec.convert(tags, list[Tag])
    except msgspec.ValidationError:
        errors["tags"] = ["must be a comma-separated list of tags (letters, digits, underscore and dash)"]
        return None


def _moment(params: QueryParams, name: str, errors: dict[str, list[str]]) -> datetime | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        errors[name] = ["must be an ISO 8601 date and time, e.g. 2026-02-15T00:00:00.000Z"]
        return None
    if moment.tzinfo is None:
        errors[name] = ["must carry a time zone, e.g. a trailing Z for UTC"]
        return None
    return moment


def _positive(params: QueryParams, name: str, default: int, errors: dict[str, list[str]]) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not _is_number(raw) or len(raw) > 9 or int(raw) < 1:
        errors[name] = ["must be a positive whole number"]
        return default
    return int(raw)


async def list_runs(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    project_id = path_id(request, "project_id", "Project")
    async with s.engine.connect() as conn:
        if (await conn.execute(text("SELECT 1 FROM projects WHERE id = :id"), {"id": project_id})).first() is None:
            raise not_found("Project")
        principal.authorize(project_id)

        params = request.query_params
        errors: dict[str, list[str]] = {}
        page = _positive(params, "page", 1, errors)
        per_page = _positive(params, "per_page", 100, errors)
        if "per_page" not in errors and per_page not in PER_PAGE:
            errors["per_page"] = [f"must be one of {', '.join(map(str, PER_PAGE))}"]
        sort = params.get("sort", "automation_runs:created_at")
        if sort not in SORTS:
            errors["sort"] = [f"must be one of {', '.join(SORTS)}"]
        order = params.get("order", "desc").lower()
        if order not in ("asc", "desc"):
            errors["order"] = ["must be asc or desc"]
        where = ["project_id = :project"]
        binds: dict[str, Any] = {"project": project_id}
        for name in ID_FILTERS:
            ids = _ids(params, name, errors)
            if ids is not None:
                where.append(f"{name} = ANY(:{name})")
                binds[name] = ids
        status_name = "status" if "status" in params else "state"
        status_ids = _ids(params, status_name, errors)
        if status_ids is not None:
            where.append("status = ANY(:status)")
            binds["status"] = status_ids
        tags = _tags(params, errors)
        if tags is not None:
            where.append("tags && cast(:tags AS text[])")
            binds["tags"] = tags
        for name, op in (("created_after", ">"), ("created_before", "<")):
            moment = _moment(params, name, errors)
            if moment is not None:
                where.append(f"created_at {op} :{name}")
                binds[name] = moment
        try:
            expands = parse_expands(params)
        except ApiError as exc:
            errors.update((name, list(problems)) for name, problems in (exc.errors or {}).items())
            expands = []
        if errors:
            raise ApiError(422, INVALID, errors)

        await _runs_written(s, conn, project_id)
        condition = " AND ".join(where)
        total = (await conn.execute(text(f"SELECT count(*) FROM automation_runs WHERE {condition}"),
                                    binds)).scalar_one()
        rows = (await conn.execute(text(
            f"SELECT {RUN_COLUMNS} FROM automation_runs WHERE {condition} "
            f"ORDER BY {SORTS[sort]} {order}, id {order} LIMIT :limit OFFSET :offset"),
            binds | {"limit": per_page, "offset": (page - 1) * per_page})).mappings().all()
        statuses = s.statuses.statuses
        return json_response(page_of(page, per_page, total, [run_json(r, statuses) for r in rows],
                                     await build_expands(conn, expands, rows, statuses)))


def page_of(page: int, per_page: int, total: int, result: list[Any], expands: dict[str, Any]) -> dict[str, Any]:
    """The list envelope (compat.md section 4)."""
    last_page = math.ceil(total / per_page) if total else None
    return {
        "page": page if total else None,
        "prev_page": page - 1 if total and page > 1 else None,
        "next_page": page + 1 if last_page and page < last_page else None,
        "last_page": last_page,
        "per_page": per_page,
        "total": total,
        "result": result,
        "expands": expands,
    }


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
        params = request.query_params
        errors: dict[str, list[str]] = {}
        page = _positive(params, "page", 1, errors)
        per_page = _positive(params, "per_page", 100, errors)
        if "per_page" not in errors and per_page not in PER_PAGE:
            errors["per_page"] = [f"must be one of {', '.join(map(str, PER_PAGE))}"]
        try:
            expands = parse_expands(params, THREAD_EXPANDS)
        except ApiError as exc:
            errors.update((name, list(problems)) for name, problems in (exc.errors or {}).items())
            expands = []
        if errors:
            raise ApiError(422, INVALID, errors)
        total = (await conn.execute(text("SELECT count(*) FROM automation_run_threads WHERE run_id = :id"),
                                    {"id": run_id})).scalar_one()
        threads = (await conn.execute(text(
            f"SELECT {THREAD_COLUMNS} FROM automation_run_threads WHERE run_id = :id "
            "ORDER BY id LIMIT :limit OFFSET :offset"),
            {"id": run_id, "limit": per_page, "offset": (page - 1) * per_page})).mappings().all()
        statuses = s.statuses.statuses
        return json_response(page_of(page, per_page, total, [thread_json(t, statuses) for t in threads],
                                     await build_expands(conn, expands, [], statuses, threads)))
