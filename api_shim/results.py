"""Stored results read back (reads.md): a run's tests, and the project's automation cases.

A run's tests are listed as soon as a worker applied them; the page's `total` comes from the counters
applied in the same transaction as the results, so it costs no count over a million rows. Cases reflect
completed runs only (worker/cases.py folds them in). Query strings are parsed into `schema.queries`, answers
built as `schema.responses`.
"""

from typing import Any, cast

import msgspec
from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from api_shim.errors import INVALID, ApiError, not_found
from api_shim.http import iso, path_id, services
from api_shim.reads import build_expands, encoded, envelope, query, require_project
from schema import queries, responses
from schema.messages import run_key
from schema.partitions import CLOCK_SKEW
from schema.statuses import COUNT_COLUMNS

TEST_COLUMNS = {"automation_run_tests:id": "id", "automation_run_tests:name": "name",
                "automation_run_tests:status": "status_id", "automation_run_tests:elapsed": "elapsed",
                "automation_run_tests:created_at": "created_at"}
CASE_COLUMNS = {"automation_sources:created_at": "created_at", "automation_cases:name": "name",
                "automation_cases:elapsed_average": "elapsed_average",
                "automation_cases:failure_count": "failure_count", "automation_cases:flaky_percent": "flaky_percent"}

# A result is stored no earlier than its run was created (less the clock skew allowed): the lookups stay off
# the older daily partitions.
_SINCE_RUN = "r.created_at >= cast(:since AS timestamptz) - cast(:skew AS interval)"
_EMPTY = msgspec.Raw(b"[]")


def _counts(alias: str) -> str:
    return ", ".join(f"{alias}.{c}" for c in COUNT_COLUMNS)


# --- GET /automation/runs/{run_id}/tests ----------------------------------------------------------------------

# Each field of a listed result (schema.responses.RunTest, in its order) as SQL over the page's rows `p`:
# PostgreSQL writes the page's JSON, so that a page of 1,000 results costs the shim's event loop next to nothing
# (it serves appends meanwhile).
_ISO = """to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
TEST_JSON = {
    "id": "p.id", "project_id": ":project", "run_id": ":run", "thread_id": "p.thread_id", "case_id": "{case}",
    "repository_case_id": "NULL", "status_id": "p.status_id", "key": "p.key", "name": "p.name",
    "folder": "p.folder", "elapsed": "p.elapsed", "file": "p.file", "line": "p.line", "assertions": "p.assertions",
    # Stored as the client sent them (none stored as NULL).
    "fields": "coalesce(p.fields, '[]'::jsonb)", "artifacts": "coalesce(p.artifacts, '[]'::jsonb)",
    "created_at": _ISO.format("p.created_at"),
}
assert tuple(TEST_JSON) == responses.RunTest.__struct_fields__, "TEST_JSON must follow schema.responses.RunTest"
# A row of these columns, written by row_to_json: compact, as every other body (json_build_object would write
# `"id" : 1`).
_TEST_ROW = "SELECT " + ", ".join(f'{sql} AS "{name}"' for name, sql in TEST_JSON.items())


def _total(counts: RowMapping, status_ids: list[int] | None) -> int:
    return sum(counts[column] for i, column in enumerate(COUNT_COLUMNS, start=1)
               if status_ids is None or i in status_ids)


async def list_tests(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    run_id = path_id(request, "run_id", "Run")
    async with s.engine.connect() as conn:
        run = (await conn.execute(text(
            f"SELECT id, project_id, source_id, is_completed, created_at, created_by, updated_by, completed_by, "
            f"{_counts('automation_runs')} FROM automation_runs WHERE id = :id"), {"id": run_id})).mappings().first()
        if run is None:
            # Created, but no worker has written it yet: nothing of it is applied.
            pending = await s.redis.hget(run_key(run_id), "pending")
            if pending is None:
                raise not_found("Run")
            principal.authorize(msgspec.json.decode(pending)["project_id"])
        else:
            principal.authorize(run["project_id"])

        q = query(queries.TestsQuery, request.query_params)
        errors: dict[str, list[str]] = {}
        known = {status.id for status in s.statuses.statuses}
        if q.status_id is not None and not set(q.status_id) <= known:
            errors["status_id"] = [f"unknown status id {i}" for i in sorted(set(q.status_id) - known)[:10]]
        counts: RowMapping | None = run
        if run is not None and q.thread_id is not None:
            counts = (await conn.execute(text(
                f"SELECT {_counts('t')} FROM automation_run_threads t WHERE t.id = :thread AND t.run_id = :run"),
                {"thread": q.thread_id, "run": run_id})).mappings().first()
            if counts is None:
                errors["thread_id"] = ["must be a thread of this run"]
        if errors:
            raise ApiError(422, INVALID, errors)

        statuses = s.statuses.statuses
        page = _EMPTY if run is None or counts is None else await _tests_page(conn, run, counts, q)
        total = 0 if counts is None else _total(counts, q.status_id)
        return encoded(responses.TestPage(
            **envelope(q.page, q.per_page, total), result=cast(list[responses.RunTest], page),
            expands=await build_expands(conn, q.expands, [run] if run is not None else [], statuses,
                                        expands=responses.ThreadExpands)))


async def _tests_page(conn: AsyncConnection, run: RowMapping, counts: RowMapping,
                      q: queries.TestsQuery) -> msgspec.Raw:
    """The page's results as the JSON list of their objects."""
    where = ["r.run_id = :run", _SINCE_RUN]
    binds: dict[str, Any] = {"run": run["id"], "since": run["created_at"], "skew": CLOCK_SKEW, "limit": q.per_page,
                             "offset": (q.page - 1) * q.per_page, "reach": q.page * q.per_page,
                             "project": run["project_id"], "source": run["source_id"]}
    if q.thread_id is not None:
        where.append("r.thread_id = :thread")
        binds["thread"] = q.thread_id
    column, order = TEST_COLUMNS[q.sort], q.order
    # elapsed is the one column that can be NULL: those results go last whichever the order.
    nulls = " NULLS LAST" if column == "elapsed" else ""
    condition = " AND ".join(where)
    if column == "id":
        # The index holds a run's results in id order within each status: the page is the merge of each
        # status's first results, for the statuses asked for that the run (or thread) has.
        present = [i for i, c in enumerate(COUNT_COLUMNS, start=1) if counts[c] and (q.status_id is None
                                                                                    or i in q.status_id)]
        if not present:
            return _EMPTY
        rows = " UNION ALL ".join(
            f"(SELECT r.* FROM automation_results r WHERE {condition} AND r.status_id = {status} "
            f"ORDER BY r.id {order} LIMIT :reach)" for status in present)
        rows = f"SELECT * FROM ({rows}) r ORDER BY r.id {order} LIMIT :limit OFFSET :offset"
    else:
        if q.status_id is not None:
            condition += " AND r.status_id = ANY(:statuses)"
            binds["statuses"] = q.status_id
        rows = (f"SELECT r.* FROM automation_results r WHERE {condition} "
                f"ORDER BY r.{column} {order}{nulls}, r.id {order} LIMIT :limit OFFSET :offset")
    # The page first, its cases after: a join before the LIMIT could be planned over the whole run.
    case = ("(SELECT c.id FROM automation_cases c WHERE c.project_id = :project AND c.source_id = :source "
            "AND c.key = p.key)" if run["is_completed"] else "NULL::bigint")
    page = (await conn.execute(text(
        f"SELECT coalesce(json_agg(row_to_json(t) ORDER BY p.{column} {order}{nulls}, p.id {order}), '[]')::text "
        f"FROM ({rows}) p CROSS JOIN LATERAL ({_TEST_ROW.format(case=case)}) t"), binds)).scalar_one()
    return msgspec.Raw(page.encode())


# --- GET /projects/{project_id}/automation/cases --------------------------------------------------------------

def case_json(c: RowMapping) -> responses.Case:
    return responses.Case(
        c["id"], c["project_id"], c["source_id"], c["key"], c["name"], c["folder"], c["status"], c["run_count"],
        c["result_count"], c["success_count"], c["failure_count"], c["elapsed_average"], float(c["flaky_percent"]),
        c["last_run_id"], cast(str, iso(c["created_at"])), cast(str, iso(c["updated_at"])))


CASE_FIELDS = ("id, project_id, source_id, key, name, folder, status, run_count, result_count, success_count, "
               "failure_count, elapsed_average, flaky_percent, last_run_id, created_at, updated_at")


def _like(fragment: str) -> str:
    escaped = fragment.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def list_cases(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    project_id = path_id(request, "project_id", "Project")
    async with s.engine.connect() as conn:
        await require_project(conn, principal, project_id)

        q = query(queries.CasesQuery, request.query_params)
        where = ["project_id = :project"]
        binds: dict[str, Any] = {"project": project_id}
        if q.source_id is not None:
            where.append("source_id = ANY(:sources)")
            binds["sources"] = q.source_id
        if q.status is not None:
            where.append("status = ANY(:outcomes)")
            binds["outcomes"] = q.status
        if q.name is not None:
            where.append("name ILIKE :name")
            binds["name"] = _like(q.name)
        if q.folder is not None:
            where.append("folder = :folder")
            binds["folder"] = q.folder
        condition = " AND ".join(where)
        if q.name is None and q.folder is None:
            # Kept by the folds per source and status: a project's 100,000 cases are not counted for each page.
            total = (await conn.execute(text(
                f"SELECT coalesce(sum(cases), 0) FROM automation_case_totals WHERE {condition}"), binds)).scalar_one()
        else:
            total = (await conn.execute(text(f"SELECT count(*) FROM automation_cases WHERE {condition}"),
                                        binds)).scalar_one()
        # NULLs (no elapsed reported) sort last whichever the order: they are not the fastest.
        column, order = CASE_COLUMNS[q.sort], q.order
        nulls = " NULLS LAST" if column == "elapsed_average" else ""
        rows = (await conn.execute(text(
            f"SELECT {CASE_FIELDS} FROM automation_cases WHERE {condition} "
            f"ORDER BY {column} {order}{nulls}, id {order} LIMIT :limit OFFSET :offset"),
            binds | {"limit": q.per_page, "offset": (q.page - 1) * q.per_page})).mappings().all()
        return encoded(responses.CasePage(
            **envelope(q.page, q.per_page, total), result=[case_json(c) for c in rows],
            expands=await build_expands(conn, q.expands, rows, s.statuses.statuses,
                                        expands=responses.CaseExpands)))
