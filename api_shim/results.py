"""Stored results read back (reads.md): a run's tests, and the project's automation cases.

A run's tests are listed as soon as a worker applied them; the page's `total` comes from the counters
applied in the same transaction as the results, so it costs no count over a million rows. Cases reflect
completed runs only (worker/cases.py folds them in).
"""

from typing import Any

import orjson
from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from api_shim.errors import INVALID, ApiError, not_found
from api_shim.http import iso, json_response, path_id, services
from api_shim.reads import _ids, _positive, build_expands, page_of, parse_expands
from schema.messages import run_key
from schema.statuses import COUNT_COLUMNS

TESTS_PER_PAGE = (100, 1000)  # any whole number in the range
TEST_SORTS = {f"automation_run_tests:{name}": name for name in ("id", "name", "status", "elapsed", "created_at")}
TEST_COLUMNS = {"id": "id", "name": "name", "status": "status_id", "elapsed": "elapsed", "created_at": "created_at"}
TEST_EXPANDS = ("statuses", "users")

CASES_PER_PAGE = (15, 25, 50, 100)
CASE_SORTS = {"automation_sources:created_at": "created_at", "automation_cases:name": "name",
              "automation_cases:elapsed_average": "elapsed_average", "automation_cases:failure_count": "failure_count",
              "automation_cases:flaky_percent": "flaky_percent"}
CASE_STATUSES = (1, 2, 3)  # neutral, success, failure
CASE_EXPANDS = ("automation_sources", "statuses")

# A result is stored no earlier than its run was created; the day of margin covers shims whose clocks
# disagree. It keeps the lookups off the older daily partitions.
_SINCE_RUN = "r.created_at >= cast(:since AS timestamptz) - interval '1 day'"
_EMPTY = orjson.Fragment(b"[]")


def _order(params: QueryParams, default: str, errors: dict[str, list[str]]) -> str:
    order = params.get("order", default).lower()
    if order not in ("asc", "desc"):
        errors["order"] = ["must be asc or desc"]
    return order


def _sort(params: QueryParams, sorts: dict[str, str], default: str, errors: dict[str, list[str]]) -> str:
    sort = params.get("sort", default)
    if sort not in sorts:
        errors["sort"] = [f"must be one of {', '.join(sorts)}"]
        return sorts[default]
    return sorts[sort]


def _expands(params: QueryParams, accepted: tuple[str, ...], errors: dict[str, list[str]]) -> list[str]:
    try:
        return parse_expands(params, accepted)
    except ApiError as exc:
        errors.update((name, list(problems)) for name, problems in (exc.errors or {}).items())
        return []


# --- GET /automation/runs/{run_id}/tests ----------------------------------------------------------------------

def test_json(r: RowMapping, project_id: int, run_id: int) -> dict[str, Any]:
    return {
        "id": r["id"], "project_id": project_id, "run_id": run_id, "thread_id": r["thread_id"],
        "case_id": r["case_id"], "repository_case_id": None, "status_id": r["status_id"], "key": r["key"],
        "name": r["name"], "folder": r["folder"], "elapsed": r["elapsed"], "file": r["file"], "line": r["line"],
        "assertions": r["assertions"],
        # Stored as the client sent them; passed through without being decoded and encoded again.
        "fields": orjson.Fragment(r["fields"]) if r["fields"] is not None else _EMPTY,
        "artifacts": orjson.Fragment(r["artifacts"]) if r["artifacts"] is not None else _EMPTY,
        "created_at": iso(r["created_at"]),
    }


def _total(counts: RowMapping, status_ids: list[int] | None) -> int:
    return sum(counts[column] for i, column in enumerate(COUNT_COLUMNS, start=1)
               if status_ids is None or i in status_ids)


def _count_columns(alias: str) -> str:
    return ", ".join(f"{alias}.{c}" for c in COUNT_COLUMNS)


async def list_tests(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    run_id = path_id(request, "run_id", "Run")
    async with s.engine.connect() as conn:
        run = (await conn.execute(text(
            f"SELECT id, project_id, source_id, is_completed, created_at, created_by, updated_by, completed_by, "
            f"{_count_columns('automation_runs')} FROM automation_runs WHERE id = :id"),
            {"id": run_id})).mappings().first()
        if run is None:
            # Created, but no worker has written it yet: nothing of it is applied.
            pending = await s.redis.hget(run_key(run_id), "pending")
            if pending is None:
                raise not_found("Run")
            principal.authorize(orjson.loads(pending)["project_id"])
        else:
            principal.authorize(run["project_id"])

        params = request.query_params
        errors: dict[str, list[str]] = {}
        page = _positive(params, "page", 1, errors)
        low, high = TESTS_PER_PAGE
        per_page = _positive(params, "per_page", low, errors)
        if "per_page" not in errors and not low <= per_page <= high:
            errors["per_page"] = [f"must be a whole number from {low} to {high}"]
        column = TEST_COLUMNS[_sort(params, TEST_SORTS, "automation_run_tests:id", errors)]
        order = _order(params, "desc", errors)
        thread_ids = _ids(params, "thread_id", errors)
        if thread_ids is not None and len(thread_ids) != 1:
            errors["thread_id"] = ["must be one thread id"]
        status_ids = _ids(params, "status_id", errors)
        known = {status.id for status in s.statuses.statuses}
        if status_ids is not None and not set(status_ids) <= known:
            errors["status_id"] = [f"unknown status id {i}" for i in sorted(set(status_ids) - known)[:10]]
        expands = _expands(params, TEST_EXPANDS, errors)
        counts: RowMapping | None = run
        if run is not None and thread_ids and "thread_id" not in errors:
            counts = (await conn.execute(text(
                f"SELECT {_count_columns('t')} FROM automation_run_threads t WHERE t.id = :thread "
                "AND t.run_id = :run"), {"thread": thread_ids[0], "run": run_id})).mappings().first()
            if counts is None:
                errors["thread_id"] = ["must be a thread of this run"]
        if errors:
            raise ApiError(422, INVALID, errors)

        statuses = s.statuses.statuses
        if run is None or counts is None:
            return json_response(page_of(page, per_page, 0, [], await build_expands(conn, expands, [], statuses)))
        rows = await _tests_page(conn, run, thread_ids[0] if thread_ids else None, status_ids, column, order,
                                 per_page, (page - 1) * per_page)
        result = [test_json(r, run["project_id"], run_id) for r in rows]
        return json_response(page_of(page, per_page, _total(counts, status_ids), result,
                                     await build_expands(conn, expands, [run], statuses)))


async def _tests_page(conn: AsyncConnection, run: RowMapping, thread_id: int | None, status_ids: list[int] | None,
                      column: str, order: str, limit: int, offset: int) -> list[RowMapping]:
    where = ["r.run_id = :run", _SINCE_RUN]
    binds: dict[str, Any] = {"run": run["id"], "since": run["created_at"], "limit": limit, "offset": offset,
                             "project": run["project_id"], "source": run["source_id"]}
    if thread_id is not None:
        where.append("r.thread_id = :thread")
        binds["thread"] = thread_id
    if status_ids is not None:
        where.append("r.status_id = ANY(:statuses)")
        binds["statuses"] = status_ids
    # The page first, its cases after: a join before the LIMIT could be planned over the whole run.
    # elapsed is the one column that can be NULL: those results go last whichever the order.
    nulls = " NULLS LAST" if column == "elapsed" else ""
    case = ("(SELECT c.id FROM automation_cases c WHERE c.project_id = :project AND c.source_id = :source "
            "AND c.key = p.key)" if run["is_completed"] else "NULL::bigint")
    return list((await conn.execute(text(
        f"SELECT p.*, {case} AS case_id FROM ("
        f"  SELECT r.id, r.thread_id, r.status_id, r.key, r.name, r.folder, r.elapsed, r.file, r.line, "
        f"  r.assertions, r.fields::text AS fields, r.artifacts::text AS artifacts, r.created_at "
        f"  FROM automation_results r WHERE {' AND '.join(where)} "
        f"  ORDER BY r.{column} {order}{nulls}, r.id {order} LIMIT :limit OFFSET :offset) p "
        f"ORDER BY p.{column} {order}{nulls}, p.id {order}"), binds)).mappings().all())


# --- GET /projects/{project_id}/automation/cases --------------------------------------------------------------

def case_json(c: RowMapping) -> dict[str, Any]:
    return {
        "id": c["id"], "project_id": c["project_id"], "source_id": c["source_id"], "key": c["key"],
        "name": c["name"], "folder": c["folder"], "status": c["status"], "run_count": c["run_count"],
        "result_count": c["result_count"], "success_count": c["success_count"],
        "failure_count": c["failure_count"], "elapsed_average": c["elapsed_average"],
        "flaky_percent": float(c["flaky_percent"]), "last_run_id": c["last_run_id"],
        "created_at": iso(c["created_at"]), "updated_at": iso(c["updated_at"]),
    }


CASE_COLUMNS = ("id, project_id, source_id, key, name, folder, status, run_count, result_count, success_count, "
                "failure_count, elapsed_average, flaky_percent, last_run_id, created_at, updated_at")


def _like(fragment: str) -> str:
    escaped = fragment.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def list_cases(request: Request) -> Response:
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
        if "per_page" not in errors and per_page not in CASES_PER_PAGE:
            errors["per_page"] = [f"must be one of {', '.join(map(str, CASES_PER_PAGE))}"]
        column = _sort(params, CASE_SORTS, "automation_sources:created_at", errors)
        order = _order(params, "asc", errors)
        where = ["project_id = :project"]
        binds: dict[str, Any] = {"project": project_id}
        source_ids = _ids(params, "source_id", errors)
        if source_ids is not None:
            where.append("source_id = ANY(:sources)")
            binds["sources"] = source_ids
        outcomes = _ids(params, "status", errors)
        if outcomes is not None and not set(outcomes) <= set(CASE_STATUSES):
            errors["status"] = ["must be a comma-separated list of 1 (neutral), 2 (success) and 3 (failure)"]
        elif outcomes is not None:
            where.append("status = ANY(:outcomes)")
            binds["outcomes"] = outcomes
        if params.get("name"):
            where.append("name ILIKE :name")
            binds["name"] = _like(params["name"])
        if params.get("folder"):
            where.append("folder = :folder")
            binds["folder"] = params["folder"]
        expands = _expands(params, CASE_EXPANDS, errors)
        if errors:
            raise ApiError(422, INVALID, errors)

        condition = " AND ".join(where)
        total = (await conn.execute(text(f"SELECT count(*) FROM automation_cases WHERE {condition}"),
                                    binds)).scalar_one()
        # NULLs (no elapsed reported) sort last whichever the order: they are not "fastest".
        rows = (await conn.execute(text(
            f"SELECT {CASE_COLUMNS} FROM automation_cases WHERE {condition} "
            f"ORDER BY {column} {order} NULLS LAST, id {order} LIMIT :limit OFFSET :offset"),
            binds | {"limit": per_page, "offset": (page - 1) * per_page})).mappings().all()
        return json_response(page_of(page, per_page, total, [case_json(c) for c in rows],
                                     await build_expands(conn, expands, rows, s.statuses.statuses)))
