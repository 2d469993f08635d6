"""Small request and response helpers shared by the endpoints."""

from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from api_shim.errors import INVALID, ApiError, from_validation, not_found
from api_shim.repair import has_unstorable_escape, saturated, storable_escapes, too_large
from api_shim.services import Services
from schema.requests import BodyError, finish_thread_append, validate

BIGINT_MAX = 2**63 - 1


def services(request: Request) -> Services:
    s: Services = request.app.state.services
    return s


def path_id(request: Request, name: str, what: str) -> int:
    value: int = request.path_params[name]
    if value < 1 or value > BIGINT_MAX:
        raise not_found(what)
    return value


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` (before it is all read)."""
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise ApiError(415, "Compressed request bodies are not supported.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body is larger than {limit} bytes.")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def parse(body_type: type, body: bytes, statuses: dict[str, int] | None = None) -> dict[str, Any]:
    """The body validated against one of the TypedDicts of `schema.requests`; with `statuses`, the tests'
    status strings mapped to status ids. What the official CLI sends that cannot be stored as it stands is
    repaired (api_shim/repair.py), never refused."""
    if not body.strip():
        body = b"{}"  # a complete without a body means "no options"
    # Each repair removes what it repairs, so the body is validated at most three times (surrogates, then
    # numbers, then clean); nearly every body passes the first time.
    for _ in range(4):
        try:
            parsed = validate(body_type, body)
            if statuses is not None:
                finish_thread_append(parsed, statuses)
        except ValidationError as exc:
            repaired = _repaired(body, exc)
            if repaired is None:
                raise _refusal(exc, body) from None
            body = repaired
            continue
        except BodyError as exc:
            raise ApiError(422, INVALID, exc.errors) from None
        if b"\\u0000" in body and (repaired := storable_escapes(body)) is not None:
            body = repaired  # a NUL, escaped: validate the body again with U+FFFD in its place
            continue
        return parsed
    raise AssertionError("a repaired body was refused again for what was repaired")


def _repaired(body: bytes, exc: ValidationError) -> bytes | None:
    """The body repaired for what the validator refused, if that is repairable (api_shim/repair.py)."""
    problems = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in problems):
        return storable_escapes(body) if has_unstorable_escape(body) else None
    too_large_at = [e["loc"] for e in problems if too_large(e["loc"], e.get("input"))]
    return saturated(body, too_large_at) if too_large_at else None


def _refusal(exc: ValidationError, body: bytes) -> ApiError:
    if (b"NaN" in body or b"Infinity" in body) and not _strict_json(body):
        # pydantic's parser takes these JavaScript literals (then refuses them as numbers); they are not JSON.
        return ApiError(400, "The request body is not valid JSON.")
    return from_validation(exc, body)


def _strict_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def no_content() -> Response:
    return Response(status_code=204)


def iso(moment: datetime | None) -> str | None:
    """UTC ISO 8601 with microseconds and Z, as compat.md section 2 asks."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
