"""The POST endpoints: each is validated, authorised and put on the queue (`queue.py`), then answered; a worker
applies it. None waits on PostgreSQL: a create answers with an id drawn ahead of time (`ids.py`) and checks its
references against caches (`catalog.py`, `state.py`); a worker writes its row.
"""

import itertools
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import msgspec
import orjson
from starlette.requests import Request
from starlette.responses import Response

from api_shim.errors import ApiError, already_completed, invalid, not_found
from api_shim.http import json_response, no_content, now_iso, parse, path_id, read_body, services
from api_shim.idempotency import HEADER, conflict, idempotency
from api_shim.observe import request_id
from api_shim.reads import run_json
from api_shim.services import Services
from api_shim.state import ThreadRef
from schema.protocol import ThreadOp, resources_of
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
from schema.statuses import COUNT_COLUMNS, RUN_STATUS_RUNNING


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
    """Raise the refusal a verdict of the queue scripts means, if it is one."""
    if verdict == "ok" or verdict.startswith("again:"):
        return
    if verdict == "busy":
        raise ApiError(429, "The server is shedding load: the queue is over its high-water mark.",
                       headers={"Retry-After": str(s.settings.retry_after_seconds)})
    if verdict.startswith("full:"):
        raise over_cap(what, verdict.removeprefix("full:"))
    if verdict == "conflict":
        raise conflict()
    if verdict in ("exists", "missing"):
        raise RuntimeError(f"the queue answered {verdict!r}")  # an id handed out twice; a state that vanished
    raise already_completed(what)


def _created(verdict: str, new_id: int) -> Response:
    """201 with the new id, or with the one a retry of the same idempotency key was given before."""
    return json_response({"id": int(verdict.removeprefix("again:")) if verdict.startswith("again:") else new_id},
                         201)


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


async def _request(request: Request) -> tuple[bytes, str]:
    """The body as sent, and what the queue scripts take for its idempotency key."""
    raw = await read_body(request, services(request).settings.max_body_bytes)
    return raw, idempotency(request.headers.get("authorization"), request.headers.get(HEADER), request.method,
                            request.url.path, raw)


async def _thread_ref(request: Request) -> tuple[Services, ThreadRef, int]:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    thread_id = path_id(request, "thread_id", "Thread")
    ref = await s.state.thread(thread_id)
    if ref is None:
        raise not_found("Thread")
    principal.authorize(ref.project_id)
    return s, ref, principal.user_id


async def _run_ref(request: Request) -> tuple[Services, int, int, int]:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    run_id = path_id(request, "run_id", "Run")
    project_id = await s.state.run_project(run_id)
    if project_id is None:
        raise not_found("Run")
    principal.authorize(project_id)
    return s, run_id, project_id, principal.user_id


# --- the hot path ------------------------------------------------------------------------------------------

async def thread_append(request: Request) -> Response:
    """The route's own endpoint; requests take the direct path in api_shim/hot.py, to the same function."""
    await accept_thread_append(services(request), request.headers.get("authorization"),
                               request.path_params["thread_id"], request_id(request),
                               lambda limit: read_body(request, limit), request.headers.get(HEADER))
    return no_content()


async def accept_thread_append(s: Services, authorization: str | None, thread_id: int, request_id: str,
                               read: Callable[[int], Awaitable[bytes]], idempotency_key: str | None = None) -> None:
    """Authorise, validate and enqueue a thread append (raises ApiError when it is refused)."""
    principal = await s.auth.authenticate(authorization)
    ref = await s.state.thread(thread_id) if 1 <= thread_id <= BIGINT_MAX else None
    if ref is None:
        raise not_found("Thread")
    principal.authorize(ref.project_id)
    sent = await read(s.settings.max_body_bytes)
    idem = idempotency(authorization, idempotency_key, "POST", f"/api/v1/automation/runs/threads/{thread_id}/append",
                       sent) if idempotency_key is not None else ""
    body, raw = await parse(ThreadAppend, sent, s.statuses.aliases, nul=False)
    # The body goes on as the client sent it (repaired if it had to be), never encoded again, in the pair
    # [head, body]: the worker decodes both in one pass, the body with the same declaration, and turns its
    # tests into rows (worker/apply.py `decode_batch`).
    head = orjson.dumps(_op_head("thread.append", ref.run_id, principal.user_id, request_id)
                        | {"thread_id": ref.thread_id})
    resources = resources_of(given(body))[0] if body.fields or body.artifacts else ""
    append = ThreadOp("a", ref.run_id, ref.thread_id, b"".join((b"[", head, b",", raw, b"]")),
                      len(body.tests) if body.tests else 0, resources, idem)
    verdict = await _enqueue(s, ref.run_id, ref.thread_id, lambda: s.thread_ops.submit(append))
    _check_accepted(s, verdict, "thread")


async def thread_complete(request: Request) -> Response:
    s, ref, user_id = await _thread_ref(request)
    sent, idem = await _request(request)
    body = given((await parse(ThreadComplete, sent))[0])
    op = _new_op("thread.complete", ref.run_id, user_id, request) | {"thread_id": ref.thread_id}
    op |= _given(body)
    complete = ThreadOp("c", ref.run_id, ref.thread_id, orjson.dumps(op), idem=idem)
    # "done" (completed already, or its run is) is fine too: completing twice is safe for retries.
    verdict = await _enqueue(s, ref.run_id, ref.thread_id, lambda: s.thread_ops.submit(complete))
    if verdict == "conflict":
        raise conflict()
    return no_content()


async def run_append(request: Request) -> Response:
    s, run_id, _, user_id = await _run_ref(request)
    sent, idem = await _request(request)
    body = given((await parse(RunAppend, sent))[0])
    op = _new_op("run.append", run_id, user_id, request) | body
    resources = resources_of(body)[0]
    _check_accepted(s, await _enqueue(s, run_id, None, lambda: s.queue.run_append(op, resources, idem)), "run")
    return no_content()


async def run_complete(request: Request) -> Response:
    s, run_id, _, user_id = await _run_ref(request)
    sent, idem = await _request(request)
    body = given((await parse(RunComplete, sent))[0])
    op = _new_op("run.complete", run_id, user_id, request)
    op |= {"measure_elapsed": body.get("measure_elapsed", True)}
    if await _enqueue(s, run_id, None, lambda: s.queue.run_complete(op, idem)) == "conflict":
        raise conflict()
    return no_content()


# --- creates -----------------------------------------------------------------------------------------------

async def create_run(request: Request) -> Response:
    s = services(request)
    principal = await s.auth.authenticate(request.headers.get("authorization"))
    project_id = path_id(request, "project_id", "Project")
    # A project the token may use exists (its grant refers to it); for another, say which it is.
    if project_id not in principal.projects:
        if not await s.catalog.exists(project_id):
            raise not_found("Project")
        principal.authorize(project_id)
    sent, idem = await _request(request)
    body = given((await parse(RunCreate, sent))[0])
    resources = _check_create_resources(body, "run")
    config_id = await _reference(s, project_id, "config", body)
    milestone_id = await _reference(s, project_id, "milestone", body)
    source_id = await s.catalog.source(project_id, body["source"])
    run_id = await s.run_ids.take()
    op = _new_op("run.create", run_id, principal.user_id, request) | {
        "project_id": project_id, "source_id": source_id, "source": body["source"], "name": body["name"],
        "config_id": config_id, "milestone_id": milestone_id, "tags": body.get("tags", []),
        "fields": body.get("fields", []), "links": body.get("links", []), "artifacts": body.get("artifacts", [])}
    verdict = await s.queue.run_create(run_id, project_id, op, resources,
                                       _pending_view(op, s.statuses.statuses), idem)
    _check_accepted(s, verdict, "run")
    if verdict == "ok":
        s.state.remember_run(run_id, project_id)
    return _created(verdict, run_id)


async def create_thread(request: Request) -> Response:
    s, run_id, project_id, user_id = await _run_ref(request)
    sent, idem = await _request(request)
    body = given((await parse(ThreadCreate, sent))[0])
    resources = _check_create_resources(body, "thread")
    thread_id = await s.thread_ids.take()
    op = _new_op("thread.create", run_id, user_id, request) | {
        "thread_id": thread_id, "name": body.get("name"), "elapsed_observed": body.get("elapsed_observed"),
        "elapsed_computed": body.get("elapsed_computed"), "fields": body.get("fields", []),
        "artifacts": body.get("artifacts", [])}
    create = ThreadOp("n", run_id, thread_id, orjson.dumps(op), resources=resources, idem=idem)
    verdict = await _enqueue(s, run_id, None, lambda: s.thread_creates.submit(create))
    _check_accepted(s, verdict, "run")
    if verdict == "ok":
        s.state.remember_thread(ThreadRef(thread_id, run_id, project_id))
    return _created(verdict, thread_id)


async def _reference(s: Services, project_id: int, field: str, body: dict[str, Any]) -> int | None:
    """A config or milestone by id (which wins) or by name; it must exist in the project."""
    given_id, given_name = body.get(f"{field}_id"), body.get(field)
    found = await s.catalog.resolve(project_id, f"{field}s", given_id, given_name)
    if found == -1:
        if given_id is not None:
            raise invalid(f"{field}_id", f"No {field} with id {given_id} exists in this project.")
        raise invalid(field, f"No {field} named '{given_name}' exists in this project.")
    return found


def _pending_view(op: dict[str, Any], statuses: Any) -> dict[str, Any]:
    """The run as GET shows it until a worker has written its row: as created, nothing applied yet."""
    row = {"id": op["run_id"], "project_id": op["project_id"], "source_id": op["source_id"], "name": op["name"],
           "status": RUN_STATUS_RUNNING, "config_id": op["config_id"], "milestone_id": op["milestone_id"],
           "elapsed": None, "is_completed": False, "tags": op["tags"], "artifacts": op["artifacts"],
           "fields": op["fields"], "links": op["links"], **dict.fromkeys(COUNT_COLUMNS, 0), "thread_count": 0,
           "thread_completed_count": 0, "created_at": datetime.fromisoformat(op["at"]), "created_by": op["user_id"],
           "updated_at": None, "updated_by": None, "completed_at": None, "completed_by": None}
    view: dict[str, Any] = msgspec.to_builtins(run_json(row, statuses))
    return view


def _given(body: dict[str, Any]) -> dict[str, Any]:
    """The keys the client gave a value (not null) to."""
    return {k: v for k, v in body.items() if v is not None}
