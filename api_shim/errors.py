"""The error body and status codes of compat.md section 6."""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.responses import Response

INVALID = "The given data was invalid."


class ApiError(Exception):
    def __init__(self, status: int, message: str, errors: Mapping[str, Sequence[str]] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = headers


def error_response(error: ApiError) -> Response:
    body: dict[str, Any] = {"message": error.message}
    if error.errors is not None:
        body["errors"] = error.errors
    return Response(orjson.dumps(body), status_code=error.status, headers=error.headers,
                    media_type="application/json")


def unauthorized(message: str = "Unauthenticated: a valid bearer token is required.") -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})


def forbidden() -> ApiError:
    return ApiError(403, "This token's user has no access to this project.")


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found.")


def invalid(field: str, problem: str) -> ApiError:
    return ApiError(422, INVALID, {field: [problem]})


def already_completed(what: str) -> ApiError:
    return invalid(what, f"The {what} is already completed.")


def unavailable(retry_after: int, what: str = "A dependency") -> ApiError:
    return ApiError(503, f"{what} is unavailable; try again shortly.", headers={"Retry-After": str(retry_after)})


def from_validation(exc: ValidationError, body: bytes) -> ApiError:
    """400 for a body that is not a JSON object, else 422 with each problem under its field path."""
    problems = exc.errors(include_url=False, include_input=False)
    for e in problems:
        if e["type"] == "json_invalid":
            return ApiError(400, "The request body is not valid JSON.")
        if not e["loc"] and e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            return ApiError(400, "The request body must be a JSON object.")
    try:
        document = orjson.loads(body)
    except ValueError:
        try:  # numbers orjson refuses (1e400, say) but pydantic's parser took
            document = json.loads(body)
        except ValueError:
            document = None
    errors: dict[str, list[str]] = {}
    for e in problems:
        path = _field_path(e["loc"], document, e["type"] == "missing") or "body"
        errors.setdefault(path, []).append(e["msg"].removeprefix("Value error, "))
    return ApiError(422, INVALID, errors)


def _field_path(loc: tuple[int | str, ...], document: Any, missing: bool) -> str:
    # pydantic's loc also names the union member that failed ('int', 'constrained-str') and marks a bad dict
    # key ('[key]'); those are not in the body, so walking the body along loc leaves only the field path.
    if document is None:
        return ".".join(map(str, loc))
    parts: list[str] = []
    value = document
    for i, part in enumerate(loc):
        if _holds(value, part):
            value = value[part]
        elif not (missing and i == len(loc) - 1):
            continue
        parts.append(str(part))
    return ".".join(parts)


def _holds(value: Any, part: int | str) -> bool:
    if isinstance(value, dict):
        return part in value
    return isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
