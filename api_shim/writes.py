"""The POST endpoints.

Creating a run or a thread writes to PostgreSQL at once: the client needs the id. Appends and completes are
validated, authorised and put on the queue (see `queue.py`), then answered 204; a worker applies them.
"""

import itertools
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from api_shim.errors import ApiError, already_completed, invalid, not_found
from api_shim.http import json_response, no_content, now_iso, parse, path_id, read_body, services
from api_shim.observe import request_id
from api_shim.queue import ThreadOp, held, resources_of
from api_shim.services import Services
from api_shim.state import ThreadRef
from api_shim.threads import BUSY, NewThread
from schema.messages import run_key
from schema.requests import (
    BIGINT_MAX,
    OBJECT_BYTES_MAX,
    OBJECT_ITEMS_MAX,
    RunAppend,
    RunComplete,
    RunCreate,
    ThreadAppend,
    ThreadComplete,
    ThreadCreate,
    given,
)


def _new_op(kind: str, run_id: int, user_id: int, request: Request) -> dict[str, Any]:
    return _op_head(kind, run_id, user_id, request_id(request))


def _op_head(kind: str, run_id: int, user_id: int, request_id: str) -> dict[str, Any]:
    # The request id goes with the operation, so that the worker's log lines can be joined to the shim's.
    return {"kind": kind, "id": new_op_id(), "run_id": run_id, "user_id": user_id, "at": now_iso(),
            "request_id": request_id}


_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count()


def new_op_id() -> str:
    """A UUID-shaped id unique to this process and call: a random prefix per process, then a counter.

    uuid4() costs more than the rest of an append's bookkeeping; this is as unique and far cheaper.
    """
    n = f"{next(_id_counter):016x}"
    p = _ID_PREFIX
    return f"{p[:8]}-{p[8:12]}-{p[12:16]}-{n[:4]}-{n[4:]}"


async def _enqueue(s: Services, run_id: int, thread_id: int | None,
                   push: Callable[[], Awaitable[str]]) -> str:
    """Run a queue script; if Redis had lost the run's or thread's state, rebuild it once and retry."""
    verdict = await push()
    if verdict == "missing":
        await s.state.rebuild_run(run_id)
        if thread_id is not None:
            await s.state.rebuild_thread(thread_id)
        verdict = await push()
    return verdict


def _check_accepted(s: Services, verdict: str, what: str) -> None:
    if verdict == "busy":
        raise ApiError(429, "The server is shedding load: the queue is over its high-water mark.",
                       headers={"Retry-After": str(s.settings.retry_after_seconds)})
    if verdict.startswith("full:"):
        raise over_cap(what, verdict.removeprefix("full:"))
    if verdict != "ok":
        raise already_completed(what)


def over_cap(what: str, cap: str) -> ApiError:
    """422 for resources past what one run or thread may hold (schema.requests.OBJECT_*_MAX)."""
    if cap == "bytes":
        return invalid("body", f"The {what} would hold more than {OBJECT_BYTES_MAX} bytes of fields, links and "
                               f"artifacts: at most {OBJECT_BYTES_MAX} over all its appends.")
    return invalid(cap, f"The {what} would hold more than {OBJECT_ITEMS_MAX} {cap}: at most {OBJECT_ITEMS_MAX} "
                        "over all its appends.")


def _check_create_resources(body: dict[str, Any], what: str) -> str:
    """A create's resources, in the queue scripts' form, refused if they alone pass the caps."""
    resources, size = resources_of(body)
    if size > OBJECT_BYTES_MAX:
        raise over_cap(what, "bytes")
    return resources


async def _thread_ref(request: Request) -> tuple[Services, ThreadRef, int]:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    thread_id = path_id(request, "thread_id", "Thread")
    ref = await s.state.thread(thread_id)
    if ref is None:
        raise not_found("Thread")
    principal.authorize(ref.project_id)
    return s, ref, principal.user_id


async def _run_ref(request: Request) -> tuple[Services, int, int]:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    run_id = path_id(request, "run_id", "Run")
    project_id = await s.state.run_project(run_id)
    if project_id is None:
        raise not_found("Run")
    principal.authorize(project_id)
    return s, run_id, principal.user_id


# --- the hot path ------------------------------------------------------------------------------------------

async def thread_append(request: Request) -> Response:
    """The route's own endpoint; requests take the direct path in api_shim/hot.py, to the same function."""
    await accept_thread_append(services(request), request.headers.get("authorization"),
                               request.path_params["thread_id"], request_id(request),
                               lambda limit: read_body(request, limit))
    return no_content()


async def accept_thread_append(s: Services, authorization: str | None, thread_id: int, request_id: str,
                               read: Callable[[int], Awaitable[bytes]]) -> None:
    """Authorise, validate and enqueue a thread append (raises ApiError when it is refused)."""
    principal = await s.auth.authenticate(authorization)
    ref = await s.state.thread(thread_id) if 1 <= thread_id <= BIGINT_MAX else None
    if ref is None:
        raise not_found("Thread")
    principal.authorize(ref.project_id)
    body, raw = await parse(ThreadAppend, await read(s.settings.max_body_bytes), s.statuses.aliases, nul=False)
    # The body goes on as the client sent it (repaired if it had to be), never encoded again: the worker
    # decodes it with the same declaration, and turns its tests into rows.
    head = orjson.dumps(_op_head("thread.append", ref.run_id, principal.user_id, request_id)
                        | {"thread_id": ref.thread_id})
    resources = resources_of(given(body))[0] if body.fields or body.artifacts else ""
    append = ThreadOp("a", ref.run_id, ref.thread_id, head[:-1] + b',"body":' + raw + b"}",
                      len(body.tests) if body.tests else 0, resources)
    verdict = await _enqueue(s, ref.run_id, ref.thread_id, lambda: s.thread_ops.submit(append))
    _check_accepted(s, verdict, "thread")


async def thread_complete(request: Request) -> Response:
    s, ref, user_id = await _thread_ref(request)
    body = given((await parse(ThreadComplete, await read_body(request, s.settings.max_body_bytes)))[0])
    op = _new_op("thread.complete", ref.run_id, user_id, request) | {"thread_id": ref.thread_id}
    op |= _given(body)
    complete = ThreadOp("c", ref.run_id, ref.thread_id, orjson.dumps(op))
    # "done" (completed already, or its run is) is fine too: completing twice is safe for retries.
    await _enqueue(s, ref.run_id, ref.thread_id, lambda: s.thread_ops.submit(complete))
    return no_content()


async def run_append(request: Request) -> Response:
    s, run_id, user_id = await _run_ref(request)
    body = given((await parse(RunAppend, await read_body(request, s.settings.max_body_bytes)))[0])
    op = _new_op("run.append", run_id, user_id, request) | body
    resources = resources_of(body)[0]
    _check_accepted(s, await _enqueue(s, run_id, None, lambda: s.queue.run_append(op, resources)), "run")
    return no_content()


async def run_complete(request: Request) -> Response:
    s, run_id, user_id = await _run_ref(request)
    body = given((await parse(RunComplete, await read_body(request, s.settings.max_body_bytes)))[0])
    op = _new_op("run.complete", run_id, user_id, request)
    op |= {"measure_elapsed": body.get("measure_elapsed", True)}
    await _enqueue(s, run_id, None, lambda: s.queue.run_complete(op))
    return no_content()


# --- creates -----------------------------------------------------------------------------------------------

async def create_run(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    project_id = path_id(request, "project_id", "Project")
    async with s.engine.connect() as conn:
        exists = (await conn.execute(text("SELECT 1 FROM projects WHERE id = :id"), {"id": project_id})).first()
    if exists is None:
        raise not_found("Project")
    principal.authorize(project_id)
    body = given((await parse(RunCreate, await read_body(request, s.settings.max_body_bytes)))[0])
    resources = _check_create_resources(body, "run")

    async with s.engine.begin() as conn:
        config_id = await _resolve(conn, "configs", project_id, body.get("config_id"), body.get("config"),
                                   "config")
        milestone_id = await _resolve(conn, "milestones", project_id, body.get("milestone_id"),
                                      body.get("milestone"), "milestone")
        # An unknown source is created on first use; DO UPDATE (a no-op) makes RETURNING see an existing row.
        source_id = (await conn.execute(text(
            "INSERT INTO automation_sources (project_id, name) VALUES (:p, :n) "
            "ON CONFLICT (project_id, name) DO UPDATE SET name = excluded.name RETURNING id"),
            {"p": project_id, "n": body["source"]})).scalar_one()
        run_id = (await conn.execute(text(
            "INSERT INTO automation_runs (project_id, source_id, name, config_id, milestone_id, tags, "
            "  artifacts, fields, links, created_by) "
            "VALUES (:project, :source, :name, :config, :milestone, :tags, "
            "  cast(:artifacts AS jsonb), cast(:fields AS jsonb), cast(:links AS jsonb), :user) RETURNING id"),
            {"project": project_id, "source": source_id, "name": body["name"], "config": config_id,
             "milestone": milestone_id, "tags": body.get("tags", []), "user": principal.user_id,
             **_json_columns(body, "artifacts", "fields", "links")})).scalar_one()
    await s.queue.fill(run_key(run_id), closed=False, project=project_id, ops=0, **held(resources))
    s.state.remember_run(run_id, project_id)
    return json_response({"id": run_id}, 201)


async def create_thread(request: Request) -> Response:
    s, run_id, user_id = await _run_ref(request)
    body = given((await parse(ThreadCreate, await read_body(request, s.settings.max_body_bytes)))[0])
    resources = _check_create_resources(body, "thread")
    thread_id = await s.thread_creates.submit(NewThread(
        run_id, user_id, body.get("name"), body.get("elapsed_observed"), body.get("elapsed_computed"),
        **_json_columns(body, "artifacts", "fields"), resources=resources))
    if thread_id == BUSY:
        _check_accepted(s, "busy", "run")
    if not isinstance(thread_id, int):
        raise already_completed("run")
    return json_response({"id": thread_id}, 201)


def _json_columns(body: dict[str, Any], *names: str) -> dict[str, str]:
    return {name: orjson.dumps(body.get(name, [])).decode() for name in names}


def _given(body: dict[str, Any]) -> dict[str, Any]:
    """The keys the client gave a value (not null) to."""
    return {k: v for k, v in body.items() if v is not None}


async def _resolve(conn: AsyncConnection, table: str, project_id: int, given_id: int | None,
                   given_name: str | None, field: str) -> int | None:
    """A config or milestone by id (which wins) or by name; it must exist in the project."""
    if given_id is not None:
        found = (await conn.execute(text(f"SELECT id FROM {table} WHERE id = :v AND project_id = :p"),
                                    {"v": given_id, "p": project_id})).scalar()
        if found is None:
            raise invalid(f"{field}_id", f"No {field} with id {given_id} exists in this project.")
        return int(found)
    if given_name is not None:
        found = (await conn.execute(text(f"SELECT id FROM {table} WHERE name = :v AND project_id = :p"),
                                    {"v": given_name, "p": project_id})).scalar()
        if found is None:
            raise invalid(field, f"No {field} named '{given_name}' exists in this project.")
        return int(found)
    return None
