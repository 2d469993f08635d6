"""The OpenAPI 3.1 document of the whole API, served at `GET /openapi.json`.

Built from the declarations the server runs on: request bodies are the JSON schemas of `schema.requests.BODIES`
(the Structs that validate them), answers those of `schema.responses` (the Structs `api_shim.reads` builds them
as), and the read endpoints' query parameters the fields of `schema.queries` (the models their query strings are
parsed into). `tests/test_fuzz.py` checks real responses against the document.

A read endpoint is documented by one line in READ_ENDPOINTS.
"""

from dataclasses import dataclass
from functools import cache
from typing import Any

import msgspec
import orjson
from msgspec import Struct
from starlette.requests import Request
from starlette.responses import Response

from schema import responses
from schema.queries import CasesQuery, Query, RunQuery, RunsQuery, TestsQuery, ThreadsQuery
from schema.requests import BODIES

API = "/api/v1"
REF = "#/components/schemas/{name}"
Schema = dict[str, Any]
READ_ERRORS = (401, 403, 404, 422, 503)


@dataclass(frozen=True)
class Read:
    """A GET endpoint: its path under /api/v1 (its `{..._id}` parameters are documented from it), what its
    query string is parsed into, and the Struct it answers with."""

    path: str
    operation_id: str
    summary: str
    response: type[Struct]
    query: type[Query] | None = None
    description: str = "OK."
    errors: tuple[int, ...] = READ_ERRORS


READ_ENDPOINTS: list[Read] = [
    Read("/user", "getUser", "The token's user", responses.User, description="The user.",
         errors=(401, 404, 503)),
    Read("/projects/{project_id}/automation/runs", "listRuns", "List a project's automation runs",
         responses.RunPage, RunsQuery, "A page of runs."),
    Read("/automation/runs/{run_id}", "getRun", "One automation run, with its first 100 threads",
         responses.RunResponse, RunQuery, "The run."),
    Read("/automation/runs/{run_id}/threads", "listThreads",
         "A run's threads, a page at a time (this server's addition)", responses.ThreadPage, ThreadsQuery,
         "A page of threads, oldest first."),
    Read("/automation/runs/{run_id}/tests", "listRunTests", "A run's test results, as soon as they are applied",
         responses.TestPage, TestsQuery, "A page of results."),
    Read("/projects/{project_id}/automation/cases", "listAutomationCases",
         "A project's automation cases, from its completed runs", responses.CasePage, CasesQuery,
         "A page of cases."),
]


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(name=name)}


def _request_bodies() -> tuple[dict[str, Schema], dict[str, str]]:
    """The request Structs' JSON schemas, with the Structs they use, as components: (schemas, body names)."""
    _, schemas = msgspec.json.schema_components(BODIES, ref_template=REF)
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
    """The answers' Structs (and the Structs they use) as components."""
    models = [responses.Created, responses.Error, *(read.response for read in READ_ENDPOINTS)]
    _, schemas = msgspec.json.schema_components(models, ref_template=REF)
    return {name: without_discriminators(schema) for name, schema in schemas.items()}


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


def _path_parameters(path: str) -> list[Schema]:
    """`{project_id}` and the like: ids, as `api_shim.http.path_id` takes them."""
    parameters = []
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            parameters.append({"name": name, "in": "path", "required": True,
                               "description": f"The {name.removesuffix('_id')}'s id.",
                               "schema": msgspec.json.schema(responses.Id)})
    return parameters


def _query_parameters(model: type[Query]) -> list[Schema]:
    """The model's fields as query parameters: lists are comma-separated (`style: form, explode: false`)."""
    _, schemas = msgspec.json.schema_components([model], ref_template=REF)
    parameters = []
    for name, schema in schemas[model.__name__]["properties"].items():
        if schema.get("default", ...) in (None, []):
            del schema["default"]
        # null is how a model says "not given", which a query string says by leaving the parameter out.
        variants = [v for v in schema.get("anyOf", ()) if v != {"type": "null"}]
        if len(variants) == 1:
            del schema["anyOf"]
            schema = variants[0] | schema
        parameter: Schema = {"name": name, "in": "query", "required": False, "schema": schema}
        if schema.get("type") == "array":
            parameter |= {"style": "form", "explode": False}
        parameters.append(parameter)
    return parameters


def _get(read: Read) -> Schema:
    operation: Schema = {"summary": read.summary, "operationId": read.operation_id}
    if read.query is not None:
        operation["parameters"] = _query_parameters(read.query)
    operation["responses"] = {"200": _json(_ref(read.response.__name__), read.description),
                              **_errors(*read.errors)}
    return operation


def _post(summary: str, operation_id: str, body: str, created: bool, codes: tuple[int, ...],
          optional_body: bool = False) -> Schema:
    success = (_json(_ref(responses.Created.__name__), "Created: the new object's id.") if created
               else {"description": "Accepted; applied by a worker shortly after."})
    request_body: Schema = {"required": not optional_body,
                            "content": {"application/json": {"schema": _ref(body)}}}
    if optional_body:
        request_body["description"] = "An empty body means `{}`."
    return {"summary": summary, "operationId": operation_id, "requestBody": request_body,
            "responses": {"201" if created else "204": success, **_errors(*codes)}}


def document() -> dict[str, Any]:
    request_schemas, body = _request_bodies()
    response_schemas = _response_schemas()
    # Both sets hold the request Structs answers embed (Artifact, Link, the fields): a name must mean one shape.
    clashes = [n for n in request_schemas.keys() & response_schemas.keys() if request_schemas[n] != response_schemas[n]]
    assert not clashes, f"a response Struct is named like a different request Struct: {clashes}"
    write = (400, 401, 403, 404, 413, 415, 422, 503)
    shed = (400, 401, 403, 404, 413, 415, 422, 429, 503)
    posts = {
        "/projects/{project_id}/automation/runs": _post("Create an automation run", "createRun",
                                                         body["RunCreate"], True, write),
        "/automation/runs/{run_id}/append": _post("Append artifacts, fields and links to a run", "appendRun",
                                                   body["RunAppend"], False, shed),
        "/automation/runs/{run_id}/complete": _post("Complete a run and its threads", "completeRun",
                                                     body["RunComplete"], False, write, optional_body=True),
        "/automation/runs/{run_id}/threads": _post("Create a thread in a run", "createThread",
                                                    body["ThreadCreate"], True, shed),
        "/automation/runs/threads/{thread_id}/append": _post(
            "Append test results, artifacts and fields to a thread", "appendThread", body["ThreadAppend"], False,
            shed),
        "/automation/runs/threads/{thread_id}/complete": _post("Complete a thread", "completeThread",
                                                                body["ThreadComplete"], False, write,
                                                                optional_body=True),
    }
    paths: dict[str, Schema] = {}
    for path, operation in [*((read.path, ("get", _get(read))) for read in READ_ENDPOINTS),
                            *((path, ("post", post)) for path, post in posts.items())]:
        item = paths.setdefault(f"{API}{path}", {})
        if "{" in path:
            item["parameters"] = _path_parameters(path)
        item[operation[0]] = operation[1]
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
        "paths": paths,
        "components": {
            "schemas": request_schemas | response_schemas,
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
