"""Small request and response helpers shared by the endpoints."""

import time
from datetime import UTC, datetime
from typing import Any, overload

import msgspec
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from api_shim import problems
from api_shim.errors import NOT_JSON, ApiError, invalid_body, not_found
from api_shim.problems import NotAnObject, field_path
from api_shim.repair import has_unstorable_escape, saturated, storable_escapes
from api_shim.services import Services
from schema.requests import BIGINT_MAX, B, BodyError, validate


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
    encoding, declared = request.headers.get("content-encoding"), request.headers.get("content-length")
    if encoding is not None and encoding.lower() != "identity":
        raise ApiError(415, "Compressed request bodies are not supported.")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body is larger than {limit} bytes.")
    chunks = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def parse(body_type: type[B], body: bytes, statuses: dict[str, int] | None = None,
                nul: bool = True) -> tuple[B, bytes]:
    """The body validated against one of the Structs of `schema.requests` (`schema.requests.validate`), and
    the JSON it was decoded from, repaired: what the official CLI sends that cannot be stored as it stands is
    repaired (api_shim/repair.py), never refused; anything else wrong is a 400 or a 422 listing the problems.

    With `nul` false, an escaped NUL is left for the worker to replace (it does so for thread appends, whose
    body it stores as the shim passes it on): the hot path does not scan the body for one."""
    if not body.strip():
        body = b"{}"  # a complete without a body means "no options"
    # Each repair removes what it repairs, so the body is validated at most three times (surrogates, then
    # numbers, then clean); nearly every body passes the first time.
    for _ in range(4):
        try:
            parsed = validate(body_type, body, statuses)
        except msgspec.ValidationError as exc:  # (a DecodeError too: it comes first)
            body = await _saturated_or_refused(body_type, body, exc)
            continue
        except (msgspec.DecodeError, RecursionError):
            repaired = storable_escapes(body) if has_unstorable_escape(body) else None
            if repaired is None:
                raise ApiError(400, NOT_JSON) from None
            body = repaired
            continue
        except BodyError as exc:
            raise invalid_body(exc.errors) from None
        if nul and b"\\u0000" in body and (repaired := storable_escapes(body)) is not None:
            body = repaired  # a NUL, escaped: validate the body again with U+FFFD in its place
            continue
        return parsed, body
    raise AssertionError("a repaired body was refused again for what was repaired")


async def _saturated_or_refused(body_type: type[B], body: bytes, exc: msgspec.ValidationError) -> bytes:
    """The body with its too large integers saturated, or (there are none) the 422 that lists its problems."""
    try:
        found = await problems.find(body_type, body)
    except NotAnObject:
        raise ApiError(400, "The request body must be a JSON object.") from None
    except (msgspec.DecodeError, RecursionError):
        raise ApiError(400, NOT_JSON) from None
    if found.too_large and (repaired := saturated(body, found.too_large)) is not None:
        return repaired
    if not found.errors:  # the walk and the decoder disagree: the decoder's own word, at its path
        found.add((field_path(str(exc)),), str(exc).split(" - at ")[0])
    raise invalid_body(found.errors, found.more)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def no_content() -> Response:
    return Response(status_code=204)


@overload
def iso(moment: datetime) -> str: ...
@overload
def iso(moment: None) -> None: ...
def iso(moment: datetime | None) -> str | None:
    """UTC ISO 8601 with microseconds and Z, as compat.md section 2 asks."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_second: tuple[int, str] = (0, "")


def now_iso() -> str:
    """The time now as `iso` writes it. Every operation carries one: the formatted second is kept, and only
    the microseconds are written anew."""
    global _second
    second, nanos = divmod(time.time_ns(), 1_000_000_000)
    if second != _second[0]:
        _second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{_second[1]}{nanos // 1000:06d}Z"
