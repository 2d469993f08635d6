"""The ASGI application: where each request goes (`routes`; thread appends mostly by api_shim/hot.py, which the
server's protocol calls without ASGI)."""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis.exceptions
import sqlalchemy.exc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api_shim import observe, openapi, reads, results, writes
from api_shim.errors import ApiError, error_response, unavailable
from api_shim.hot import HOT_PATH, HotPath
from api_shim.server import BODY_TIMED_OUT
from api_shim.services import Services
from schema.settings import Settings, get_settings

log = logging.getLogger(__name__)

API = "/api/v1"


async def runs_collection(request: Request) -> Response:
    # One route for both methods, so that a 405 on this path lists both in its Allow header.
    if request.method == "POST":
        return await writes.create_run(request)
    return await reads.list_runs(request)


async def threads_collection(request: Request) -> Response:
    if request.method == "POST":
        return await writes.create_thread(request)
    return await reads.list_threads(request)


routes = [
    Route("/healthz", observe.healthz, methods=["GET"]),
    Route("/readyz", observe.readyz, methods=["GET"]),
    Route("/metrics", observe.metrics, methods=["GET"]),
    Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
    Route(f"{API}/user", reads.get_user, methods=["GET"]),
    Route(f"{API}/projects/{{project_id:int}}/automation/runs", runs_collection, methods=["GET", "POST"]),
    Route(f"{API}/automation/runs/{{run_id:int}}", reads.get_run, methods=["GET"]),
    Route(f"{API}/automation/runs/{{run_id:int}}/tests", results.list_tests, methods=["GET"]),
    Route(f"{API}/projects/{{project_id:int}}/automation/cases", results.list_cases, methods=["GET"]),
    Route(f"{API}/automation/runs/{{run_id:int}}/append", writes.run_append, methods=["POST"]),
    Route(f"{API}/automation/runs/{{run_id:int}}/complete", writes.run_complete, methods=["POST"]),
    Route(f"{API}/automation/runs/{{run_id:int}}/threads", threads_collection, methods=["GET", "POST"]),
    Route(f"{API}/automation/runs/threads/{{thread_id:int}}/append", writes.thread_append, methods=["POST"]),
    Route(f"{API}/automation/runs/threads/{{thread_id:int}}/complete", writes.thread_complete,
          methods=["POST"]),
]


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "Not found.", 405: "Method not allowed."}
    return error_response(ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                                   headers=exc.headers))


async def _dependency_down(request: Request, exc: Exception) -> Response:
    what = "The database" if isinstance(exc, sqlalchemy.exc.SQLAlchemyError) else "The queue"
    log.warning("%s unavailable: %s", what, type(exc).__name__)
    return error_response(unavailable(request.app.state.services.settings.retry_after_seconds, what))


async def _client_gone(request: Request, _: Exception) -> Response:
    # The client left before its body had arrived, or the server cut it off at the body deadline and answered
    # 408 itself (api_shim/server.py). Nobody reads this response: its status is for the request log and
    # metrics, a client's doing (4xx) and not the server's (no traceback, no 500).
    if request.scope.get("state", {}).get(BODY_TIMED_OUT):
        return error_response(ApiError(408, "The request body did not arrive in time."))
    return error_response(ApiError(499, "The client closed the connection before its request was read."))


async def _internal_error(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(ApiError(500, "Internal server error."))


HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    ApiError: _api_error,
    HTTPException: _http_error,
    ClientDisconnect: _client_gone,
    sqlalchemy.exc.OperationalError: _dependency_down,
    sqlalchemy.exc.InterfaceError: _dependency_down,
    sqlalchemy.exc.TimeoutError: _dependency_down,
    redis.exceptions.ConnectionError: _dependency_down,
    redis.exceptions.TimeoutError: _dependency_down,
    Exception: _internal_error,
}


def error_for(scope: Scope, exc: Exception) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The answer the app's exception handlers give `exc`, as an ASGI app (for api_shim/hot.py's refusals)."""
    handler = next(h for kind in type(exc).__mro__ if (h := HANDLERS.get(kind)) is not None)

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)

    return answer


def create_app(settings: Settings | None = None) -> ASGIApp:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        services = Services.create(settings)
        app.state.services = services
        await services.start()
        # In the lifespan state, where the server's protocol finds it (api_shim/server.py).
        yield {HOT_PATH: HotPath(app, error_for)}
        await services.close()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=dict(HANDLERS))
    # Every request is observed (request id, metrics, log line). Thread appends mostly come by api_shim/hot.py
    # instead, straight from the protocol.
    return observe.Observe(app)
