"""The OpenAPI 3.1 document of the whole API, served at `GET /openapi.json`.

Built from the code where it can be: request bodies are the JSON schemas of `schema.requests.BODIES` (the
very Structs that validate them), counters come from `schema.statuses.COUNT_COLUMNS`, the list endpoint's
choices from `api_shim.reads`, and the limits from `schema.requests`. The response objects are described here,
after `api_shim.reads` (compat.md section 2); `tests/test_fuzz.py` checks real responses against them.
"""

import typing
from functools import cache
from typing import Any

import msgspec
import orjson
from starlette.requests import Request
from starlette.responses import Response

from api_shim.reads import EXPANDS, PER_PAGE, SORTS, THREAD_EXPANDS
from schema.requests import BIGINT_MAX, BODIES, CustomField
from schema.statuses import COUNT_COLUMNS, RUN_STATUS_FAILED, RUN_STATUS_PASSED, RUN_STATUS_RUNNING

API = "/api/v1"
REF = "#/components/schemas/{model}"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _object(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    """A closed object: every property required unless `required` says otherwise, nothing else allowed."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _list(items: Schema) -> Schema:
    return {"type": "array", "items": items}


ID: Schema = {"type": "integer", "format": "int64", "minimum": 1, "maximum": BIGINT_MAX}
COUNT: Schema = {"type": "integer", "minimum": 0}
MICROS: Schema = {"type": "integer", "format": "int64", "minimum": 0, "description": "Microseconds."}
# compat.md section 2: UTC ISO 8601 with microseconds and Z (`api_shim.http.iso`).
TIMESTAMP: Schema = {"type": "string", "format": "date-time",
                     "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$"}
RUN_STATUS: Schema = {"type": "integer", "enum": [RUN_STATUS_PASSED, RUN_STATUS_FAILED, RUN_STATUS_RUNNING],
                      "description": "4 running; once completed 3 if any result failed, else 2."}

# `api_shim.reads.counters`: one counter per status id, then the four derived from the status flags.
COUNTERS: dict[str, Schema] = {name: COUNT for name in (*COUNT_COLUMNS, "success_count", "failure_count",
                                                         "completed_count", "total_count")}


def _request_bodies() -> tuple[dict[str, Schema], dict[str, str]]:
    """The request Structs' JSON schemas, with the Structs they use, as components: (schemas, body names)."""
    _, schemas = msgspec.json.schema_components(BODIES, ref_template=REF.replace("{model}", "{name}"))
    return {name: without_discriminators(schema) for name, schema in schemas.items()}, \
        {body.__name__: body.__name__ for body in BODIES}


def without_discriminators(schema: Any) -> Any:
    # msgspec describes a tagged union with a discriminator keyed by integers (the field types 1 to 5), which
    # OpenAPI does not allow; its anyOf says the same.
    if isinstance(schema, dict):
        return {k: without_discriminators(v) for k, v in schema.items() if k != "discriminator"}
    if isinstance(schema, list):
        return [without_discriminators(v) for v in schema]
    return schema


def _response_schemas() -> dict[str, Schema]:
    """What `api_shim.reads` and `api_shim.errors` return."""
    # Stored artifacts, fields and links are the validated request objects, as the client sent them.
    stored = {"artifacts": _list(_ref("Artifact")), "fields": _list(_ref("CustomField"))}
    custom_field = {"anyOf": [_ref(kind.__name__) for kind in typing.get_args(CustomField)]}
    run: dict[str, Schema] = {
        "id": ID, "project_id": ID, "source_id": ID, "name": {"type": "string"}, "status": RUN_STATUS,
        "config_id": _nullable(ID), "milestone_id": _nullable(ID), "elapsed": _nullable(MICROS),
        "is_completed": {"type": "boolean"}, "tags": _list({"type": "string"}),
        **stored, "links": _list(_ref("Link")),
        **COUNTERS,
        "thread_count": COUNT, "thread_active_count": COUNT, "thread_completed_count": COUNT,
        "created_at": TIMESTAMP, "created_by": ID,
        "updated_at": _nullable(TIMESTAMP), "updated_by": _nullable(ID),
        "completed_at": _nullable(TIMESTAMP), "completed_by": _nullable(ID),
    }
    thread: dict[str, Schema] = {
        "id": ID, "index": {"type": "integer", "minimum": 1, "description": "1, 2, ... in creation order."},
        "name": _nullable({"type": "string"}), "status": RUN_STATUS, "elapsed": _nullable(MICROS),
        "is_completed": {"type": "boolean"}, **stored,
        **COUNTERS,
        "created_at": TIMESTAMP, "created_by": ID,
        "completed_at": _nullable(TIMESTAMP), "completed_by": _nullable(ID),
    }
    named = _object({"id": ID, "name": {"type": "string"}})
    status = _object({
        "id": {"type": "integer", "minimum": 1, "maximum": len(COUNT_COLUMNS)}, "name": {"type": "string"},
        "system_name": {"type": "string"}, "color": {"type": "string"}, "is_final": {"type": "boolean"},
        "is_untested": {"type": "boolean"}, "is_passed": {"type": "boolean"}, "is_failed": {"type": "boolean"},
        "aliases": _list({"type": "string"}),
    })
    expands = _object({name: _list(_ref("Status" if name == "statuses" else "NamedObject")) for name in EXPANDS},
                      required=[])
    expands["description"] = "Only the expands the request asked for."
    page = _nullable({"type": "integer", "minimum": 1})
    return {
        "Id": _object({"id": ID}),
        "Error": _object({
            "message": {"type": "string", "minLength": 1},
            "errors": {"type": "object", "description": "Field path (e.g. `tests.0.status`) to its problems.",
                       "additionalProperties": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
        }, required=["message"]),
        "User": _object({"id": ID, "name": {"type": "string"}, "email": _nullable({"type": "string"}),
                         "created_at": TIMESTAMP}),
        "NamedObject": named,
        "CustomField": custom_field,
        "Status": status,
        "Expands": expands,
        "Run": _object(run),
        "Thread": _object(thread),
        "RunWithThreads": _object(run | {"threads": _list(_ref("Thread"))}),
        "RunResponse": _object({"result": _ref("RunWithThreads"), "expands": _ref("Expands")}),
        "ThreadPage": _object({
            "page": page, "prev_page": page, "next_page": page, "last_page": page,
            "per_page": {"type": "integer", "enum": list(PER_PAGE)}, "total": COUNT,
            "result": _list(_ref("Thread")), "expands": _ref("Expands"),
        }),
        "RunPage": _object({
            "page": page, "prev_page": page, "next_page": page, "last_page": page,
            "per_page": {"type": "integer", "enum": list(PER_PAGE)}, "total": COUNT,
            "result": _list(_ref("Run")), "expands": _ref("Expands"),
        }),
    }


ERRORS = {
    400: "The body is not valid JSON, or not a JSON object.",
    401: "Missing, malformed or unknown bearer token.",
    403: "The token's user has no access to the project.",
    404: "Unknown project, run or thread (or id out of range).",
    405: "Wrong method on a known path (with an `Allow` header).",
    413: "The body is larger than the configured limit.",
    415: "The body has a `Content-Encoding` other than `identity`.",
    422: "Valid JSON that breaks the schema or a rule; each problem under `errors` by field path.",
    429: "The server sheds load: appends are refused while the queue is over its high-water mark.",
    503: "A dependency (database, queue) is unavailable.",
}
RETRY_AFTER: Schema = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 0}}


def _error_responses() -> dict[str, Schema]:
    responses: dict[str, Schema] = {}
    for code, description in ERRORS.items():
        response: Schema = {"description": description,
                            "content": {"application/json": {"schema": _ref("Error")}}}
        if code == 401:
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}
        elif code == 405:
            response["headers"] = {"Allow": {"schema": {"type": "string"}}}
        elif code in (429, 503):
            response["headers"] = {"Retry-After": RETRY_AFTER}
        responses[f"Error{code}"] = response
    return responses


def _errors(*codes: int) -> dict[str, Schema]:
    return {str(code): {"$ref": f"#/components/responses/Error{code}"} for code in codes}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _path_id(name: str, what: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": f"The {what}'s id.", "schema": ID}


def _list_query(values: str, description: str) -> Schema:
    """A comma-separated list in the query string."""
    return {"type": "string", "pattern": rf"^{values}(,{values})*$", "description": description}


def _query_parameters() -> list[Schema]:
    """The list endpoint's query string (compat.md section 4; parsed in `api_shim.reads.list_runs`)."""
    ids = _list_query("[0-9]{1,18}", "Comma-separated ids.")
    expands = {"name": "expands", "in": "query", "required": False,
               "schema": _list_query(f"({'|'.join(EXPANDS)})", "Comma-separated expands.")}
    moment = {"type": "string", "format": "date-time", "description": "ISO 8601 with a time zone."}
    parameters: list[Schema] = [
        {"name": "page", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 999_999_999, "default": 1}},
        {"name": "per_page", "in": "query", "required": False,
         "schema": {"type": "integer", "enum": list(PER_PAGE), "default": PER_PAGE[-1]}},
        {"name": "sort", "in": "query", "required": False, "schema": {"type": "string", "enum": list(SORTS)}},
        {"name": "order", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"}},
    ]
    for name in ("config_id", "created_by", "milestone_id", "source_id"):
        parameters.append({"name": name, "in": "query", "required": False, "schema": ids})
    parameters += [
        {"name": "status", "in": "query", "required": False, "schema": ids,
         "description": "Run status ids (2 passed, 3 failed, 4 running)."},
        {"name": "state", "in": "query", "required": False, "schema": ids,
         "description": "Alias of `status`, used when `status` is absent."},
        {"name": "tags", "in": "query", "required": False,
         "schema": _list_query("[A-Za-z0-9_-]{1,750}", "Comma-separated tags; runs with any of them.")},
        {"name": "created_after", "in": "query", "required": False, "schema": moment},
        {"name": "created_before", "in": "query", "required": False, "schema": moment},
        expands,
    ]
    return parameters


def _post(summary: str, operation_id: str, body: str, created: bool, codes: tuple[int, ...],
          optional_body: bool = False) -> Schema:
    success = (_json(_ref("Id"), "Created: the new object's id.") if created
               else {"description": "Accepted; applied by a worker shortly after."})
    request_body: Schema = {"required": not optional_body,
                            "content": {"application/json": {"schema": _ref(body)}}}
    if optional_body:
        request_body["description"] = "An empty body means `{}`."
    return {"summary": summary, "operationId": operation_id, "requestBody": request_body,
            "responses": {"201" if created else "204": success, **_errors(*codes)}}


def document() -> dict[str, Any]:
    request_schemas, body = _request_bodies()
    write = (400, 401, 403, 404, 413, 415, 422, 503)
    shed = (400, 401, 403, 404, 413, 415, 422, 429, 503)
    expands_only = [p for p in _query_parameters() if p["name"] == "expands"]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ingest: Testmo automation-runs API",
            "version": "1.0.0",
            "description": (
                "The Testmo automation-runs REST API as this server implements it (compat.md). Every error is "
                "`{\"message\": ..., \"errors\"?: {\"<field path>\": [...]}}`; a wrong method on a known path "
                "gets 405 with an `Allow` header. Request bodies are strict: unknown keys and wrong JSON types are "
                "422, and an integer must be written as one (`2`, not `2.0` or `2e0`)."),
        },
        "paths": {
            f"{API}/user": {"get": {
                "summary": "The token's user", "operationId": "getUser",
                "responses": {"200": _json(_ref("User"), "The user."), **_errors(401, 404, 503)},
            }},
            f"{API}/projects/{{project_id}}/automation/runs": {
                "parameters": [_path_id("project_id", "project")],
                "get": {
                    "summary": "List a project's automation runs", "operationId": "listRuns",
                    "parameters": _query_parameters(),
                    "responses": {"200": _json(_ref("RunPage"), "A page of runs."),
                                  **_errors(401, 403, 404, 422, 503)},
                },
                "post": _post("Create an automation run", "createRun", body["RunCreate"], True, write),
            },
            f"{API}/automation/runs/{{run_id}}": {
                "parameters": [_path_id("run_id", "run")],
                "get": {
                    "summary": "One automation run, with its first 100 threads", "operationId": "getRun",
                    "parameters": expands_only,
                    "responses": {"200": _json(_ref("RunResponse"), "The run."),
                                  **_errors(401, 403, 404, 422, 503)},
                },
            },
            f"{API}/automation/runs/{{run_id}}/append": {
                "parameters": [_path_id("run_id", "run")],
                "post": _post("Append artifacts, fields and links to a run", "appendRun", body["RunAppend"],
                              False, shed),
            },
            f"{API}/automation/runs/{{run_id}}/complete": {
                "parameters": [_path_id("run_id", "run")],
                "post": _post("Complete a run and its threads", "completeRun", body["RunComplete"], False,
                              write, optional_body=True),
            },
            f"{API}/automation/runs/{{run_id}}/threads": {
                "parameters": [_path_id("run_id", "run")],
                "get": {
                    "summary": "A run's threads, a page at a time (this server's addition)",
                    "operationId": "listThreads",
                    "parameters": [p for p in _query_parameters() if p["name"] in ("page", "per_page")] + [
                        {"name": "expands", "in": "query", "required": False,
                         "schema": _list_query(f"({'|'.join(THREAD_EXPANDS)})", "Comma-separated expands.")}],
                    "responses": {"200": _json(_ref("ThreadPage"), "A page of threads, oldest first."),
                                  **_errors(401, 403, 404, 422, 503)},
                },
                "post": _post("Create a thread in a run", "createThread", body["ThreadCreate"], True, shed),
            },
            f"{API}/automation/runs/threads/{{thread_id}}/append": {
                "parameters": [_path_id("thread_id", "thread")],
                "post": _post("Append test results, artifacts and fields to a thread", "appendThread",
                              body["ThreadAppend"], False, shed),
            },
            f"{API}/automation/runs/threads/{{thread_id}}/complete": {
                "parameters": [_path_id("thread_id", "thread")],
                "post": _post("Complete a thread", "completeThread", body["ThreadComplete"], False, write,
                              optional_body=True),
            },
        },
        "components": {
            "schemas": request_schemas | _response_schemas(),
            "responses": _error_responses(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An API token (`ingest admin token create`)."}},
        },
        "security": [{"bearer": []}],
    }


@cache
def _document_json() -> bytes:
    return orjson.dumps(document())


async def openapi_json(_: Request) -> Response:
    return Response(_document_json(), media_type="application/json")
