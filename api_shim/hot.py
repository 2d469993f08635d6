"""The direct path for thread appends: answered by the HTTP protocol itself, past uvicorn's request cycle, ASGI,
the middlewares and Starlette.

Nearly every request a CI fleet sends is a thread append, and the framework's share of each was larger than
validating its tests (issue 12's profile). So the server's protocol (`api_shim/server.py`) asks `HotPath.take`,
once a request's headers are in, whether it is a plain thread append; if so, it starts `HotPath.accept` at once
(as uvicorn starts the app: what needs no body, a 401 or a 404, is answered before the body is in), gathers the
body itself, and `HotPath.accept` hands it to `writes.accept_thread_append`, the same function the route calls;
then the protocol writes the 204. Anything unusual (another method or path, a query string, no Content-Length,
a compressed body, `Expect: 100-continue`, a request pipelined behind another) goes the general way, through
the routes of `app.py`. A refusal is answered by the app's own exception handlers (`app.error_for`), so it
reads exactly as on the general path; requests are counted, timed and logged by `observe.finish` on both.
"""

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api_shim import observe, writes
from api_shim.auth import client_address

# The key of the lifespan state (uvicorn's `app_state`) under which the app leaves its HotPath for the protocol.
HOT_PATH = "ingest.hot_path"

THREAD_APPEND = re.compile(rb"/api/v1/automation/runs/threads/([0-9]{1,19})/append")
# Headers that send a request the general way: a body the routes refuse (415) or read as it comes.
_GENERAL = frozenset((b"content-encoding", b"transfer-encoding", b"expect"))

ErrorFor = Callable[[Scope, Exception], Callable[[Scope, Receive, Send], Awaitable[None]]]


@dataclass(slots=True, eq=False)
class Append:
    """One thread append on its way; the protocol's `cycle` meanwhile, with the attributes of uvicorn's request
    cycle that the protocol reads and sets (whether the response is under way or done, whether the client left,
    keep-alive, the scope's state)."""

    url: bytes
    thread_id: int
    authorization: str | None
    idempotency_key: str | None
    request_id: str
    forwarded_for: bytes | None
    keep_alive: bool
    started: float
    scope: Any  # uvicorn's scope of the request (headers, client, state): for a refusal, built out in full
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False  # the body is all in
    waiter: "asyncio.Future[None] | None" = None  # the answer, waiting for the rest of the body
    response_started: bool = False
    response_complete: bool = False
    disconnected: bool = False

    @property
    def message_event(self) -> "Append":
        return self  # what uvicorn's protocol sets when the body is in or the client has gone: `set`

    def set(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def body(self) -> bytes:
        """The body, once it is all in; ClientDisconnect if the client left first (or was cut off)."""
        while not self.complete:
            if self.disconnected:
                raise ClientDisconnect()
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


class HotPath:
    def __init__(self, app: Starlette, error_for: ErrorFor) -> None:
        self.app = app
        self.error_for = error_for

    def take(self, url: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool, scope: Any,
             started: float) -> Append | None:
        """The request as an Append if it is a plain thread append (its headers are in), else None."""
        match = THREAD_APPEND.fullmatch(url)
        if match is None:
            return None
        authorization = idempotency_key = forwarded_for = length = None
        for name, value in headers:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                length = value
            elif name == b"idempotency-key":
                idempotency_key = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded_for = value
            elif name in _GENERAL:
                return None
        limit = self.app.state.services.settings.max_body_bytes
        if length is None or not length.isdigit() or int(length) > limit:
            return None  # the routes refuse it, or read a body of unknown length
        return Append(url, int(match.group(1)), authorization, idempotency_key, observe.request_id_of(headers),
                      forwarded_for, keep_alive, started, scope)

    async def accept(self, append: Append, proxy: ProxyHeadersMiddleware | None) -> Exception | None:
        """Accept the append as the route would; the refusal, if it is one. `proxy` is the server's
        middleware for X-Forwarded-For (None if it trusts no proxy), which decides the client as for every
        other request."""
        if append.forwarded_for is not None and proxy is not None:
            await proxy(append.scope, _nothing, _nothing)
        client = append.scope["client"]
        client_address.set(client[0] if client else None)

        async def read(_: int) -> bytes:
            return await append.body()  # no larger than the limit: its Content-Length was not (`take`)

        try:
            await writes.accept_thread_append(self.app.state.services, append.authorization, append.thread_id,
                                              append.request_id, read, append.idempotency_key)
        except Exception as exc:
            return exc
        return None

    def refusal(self, append: Append, exc: Exception) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        """The ASGI app that answers the refusal as the app would, observed as every request is; the protocol
        runs it on a request cycle of uvicorn's, as it would have run the app."""
        scope = append.scope
        scope.update(method="POST", path=append.url.decode("ascii"), raw_path=append.url, query_string=b"",
                     endpoint=writes.thread_append, app=self.app)
        answer = self.error_for(scope, exc)

        async def observed(scope: Scope, receive: Receive, send: Send) -> None:
            await observe.Observe(answer).observe(scope, receive, send, append.started, append.request_id)
        return observed


def proxy_for(forwarded_allow_ips: Any) -> ProxyHeadersMiddleware:
    """uvicorn's middleware for proxy headers, with nothing behind it: it only sets the scope's client."""
    return ProxyHeadersMiddleware(_nothing, trusted_hosts=forwarded_allow_ips)


async def _nothing(*_: Any) -> Any:
    return None
