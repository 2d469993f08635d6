"""The error body and status codes of compat.md section 6."""

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from starlette.responses import Response

INVALID = "The given data was invalid."
NOT_JSON = "The request body is not valid JSON."
MAX_LISTED = 50  # problems listed in one 422: a body wrong everywhere must not make a huge answer


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


def invalid_body(errors: Mapping[str, Sequence[str]], more: bool = False) -> ApiError:
    """422 with each problem under its field path; past MAX_LISTED paths, the first ones and a note."""
    if len(errors) > MAX_LISTED:
        errors, more = dict(list(errors.items())[:MAX_LISTED]), True
    message = INVALID if not more else f"{INVALID} Only the first {len(errors)} problems are listed."
    return ApiError(422, message, errors)


def already_completed(what: str) -> ApiError:
    return invalid(what, f"The {what} is already completed.")


def unavailable(retry_after: int, what: str = "A dependency") -> ApiError:
    return ApiError(503, f"{what} is unavailable; try again shortly.", headers={"Retry-After": str(retry_after)})
