"""The direct path for thread appends, past Starlette's middleware, router, request and response objects.

Nearly every request a CI fleet sends is a thread append, and the framework's share of each was larger than
validating its tests (issue 12's profile). So `HotPath` sits between `observe.Observe` (request ids, metrics,
logs, as for every request) and the Starlette app, and hands these straight to `writes.accept_thread_append`,
the same function the route calls; everything else goes on to the routes of `app.py`. Refusals are answered
exactly as the app answers them (`app.error_for`).
"""

import re
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from api_shim import writes
from api_shim.http import receive_body

THREAD_APPEND = re.compile(r"/api/v1/automation/runs/threads/([0-9]{1,19})/append")

ErrorFor = Callable[[Scope, Exception], Callable[[Scope, Receive, Send], Awaitable[None]]]


class HotPath:
    def __init__(self, app: Starlette, error_for: ErrorFor) -> None:
        self.app = app
        self.error_for = error_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = THREAD_APPEND.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" \
            else None
        if match is None:
            await self.app(scope, receive, send)
            return
        scope["endpoint"] = writes.thread_append  # the route, as the request log and metrics name it
        scope["app"] = self.app  # as Starlette sets it: the error handlers find the services there
        authorization = encoding = declared = idempotency_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"idempotency-key":
                idempotency_key = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
            elif name == b"content-encoding":
                encoding = value.decode("latin-1")
        try:
            await writes.accept_thread_append(
                self.app.state.services, authorization, int(match.group(1)), scope["state"]["request_id"],
                lambda limit: receive_body(encoding, declared, receive, limit), idempotency_key)
        except Exception as exc:
            await self.error_for(scope, exc)(scope, receive, send)
            return
        # New messages each time: the middlewares outside add their headers to them.
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
