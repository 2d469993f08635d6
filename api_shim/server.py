"""The HTTP server's guard against slow and excess clients: one client must never hold what others need.

uvicorn bounds only the idle time of a keep-alive connection. This protocol adds, per connection:
- a header deadline: complete request headers within INGEST_HEADER_TIMEOUT_SECONDS of connecting, or of the
  previous response on a keep-alive connection; else 408 (or, if nothing of a request came, a silent close);
- a body deadline: the whole body within INGEST_BODY_TIMEOUT_SECONDS of the headers; else 408 and close;
- a cap: beyond INGEST_MAX_CONNECTIONS open connections in this process, a new connection is answered 503 and
  closed at once, while the connections already admitted keep working.

No connection has a timer of its own: arming a deadline is one assignment, and one sweep per server process,
four times a second, closes the connections whose deadline has passed. A request costs no timer call at all
(a uvloop timer armed and cancelled would cost more than the rest of the guard), and 10,000 open connections
cost the sweep a third of a millisecond.
"""

import asyncio
import logging
import resource
import time
from collections import Counter
from typing import Any, cast

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from api_shim import observe
from api_shim.hot import HOT_PATH, Append, HotPath, proxy_for
from schema.settings import Settings, get_settings

log = logging.getLogger("ingest.server")

# Set in a request's scope["state"] when the body deadline cut it off, so that the request log says 408 (what
# the client was sent) rather than the 499 of a client that left by itself (api_shim/app.py).
BODY_TIMED_OUT = "ingest.body_timed_out"

# How often the sweep looks for connections past their deadline: so much late a connection may be closed.
SWEEP_SECONDS = 0.25
_CLOSE_SLICE = 50
_NO_CONTENT = STATUS_LINE[204]
# File descriptors besides the clients' that a server process needs: its listening socket, the PostgreSQL and
# Redis pools, log files, the interpreter's own.
_SPARE_FILES = 1024


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._settings = get_settings()
        self._deadline: float | None = None
        self._awaiting_body = False
        self._in_message = False  # some of a request has arrived, not yet all of it
        self._proxy = proxy_for(config.forwarded_allow_ips) if config.proxy_headers else None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self._settings.max_connections:
            self.transport = transport
            transport.pause_reading()
            transport.write(self._response(503, "The server has too many connections open; try again shortly.",
                                           (b"retry-after", str(self._settings.retry_after_seconds).encode())))
            transport.close()
            _tally.add(self.loop, "refused over the connection limit")
            return
        super().connection_made(transport)
        _sweep.start(self.loop, self.connections)
        self._arm(self._settings.header_timeout_seconds, body=False)

    def on_message_begin(self) -> None:
        self._in_message = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._arm(self._settings.body_timeout_seconds, body=True)
        hot: HotPath | None = self.app_state.get(HOT_PATH)
        # The direct path, for a plain thread append that no other request on this connection is ahead of.
        if (hot is not None and (self.cycle is None or self.cycle.response_complete) and not self.pipeline
                and self.parser.get_method() == b"POST" and self.parser.get_http_version() == "1.1"
                and not self.parser.should_upgrade()):
            append = hot.take(self.url, self.headers, self.parser.should_keep_alive(), self.scope,
                              time.perf_counter())
            if append is not None:
                self.cycle = append  # type: ignore[assignment]  # uvicorn reads the same attributes of it
                # Started now, as uvicorn starts the app: what needs no body (a 401, a 404) is answered at once.
                task = self.loop.create_task(self._answer(append, hot))
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)  # the server waits for these at shutdown
                return
        super().on_headers_complete()

    def _append(self) -> Append | None:
        """The request under way, if it takes the direct path."""
        cycle: object = self.cycle
        return cycle if type(cycle) is Append else None

    def on_body(self, body: bytes) -> None:
        if (append := self._append()) is not None:
            append.chunks.append(body)  # no more than its Content-Length, which is within the limit
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if (append := self._append()) is not None:
            self._deadline = None  # the request is ours now, as below
            append.complete = True
            append.set()
            return
        if self.cycle is not None and self.cycle.response_complete:
            # Answered before its body was all in (see on_response_complete): the next request is due now.
            self._arm(self._settings.header_timeout_seconds, body=False)
        else:
            # The request is the application's now: how long it takes to answer is not the client's doing.
            self._deadline = None
        super().on_message_complete()

    async def _answer(self, append: Append, hot: HotPath) -> None:
        refused = await hot.accept(append, self._proxy)
        if refused is not None:
            # Answered by the app's handlers, on a request cycle of uvicorn's as the general path's would be.
            cycle = RequestResponseCycle(
                scope=append.scope, transport=self.transport, flow=self.flow, logger=self.logger,
                access_logger=self.access_logger, access_log=self.access_log,
                default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
                expect_100_continue=False, keep_alive=append.keep_alive, on_response=self.on_response_complete)
            cycle.more_body = False
            cycle.disconnected = append.disconnected
            self.cycle = cycle
            await cycle.run_asgi(cast(Any, hot.refusal(append, refused)))
            return
        if not append.disconnected:
            self.transport.write(b"".join([
                _NO_CONTENT, *[b"%s: %s\r\n" % header for header in self.server_state.default_headers],
                b"x-request-id: ", append.request_id.encode(), b"\r\n",
                b"\r\n" if append.keep_alive else b"connection: close\r\n\r\n"]))
        append.response_started = append.response_complete = True
        observe.finish("thread_append", "POST", 204, append.started, append.request_id)
        if not append.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's headers are now due, unless a pipelined request is already being answered, or the
        # application answered before the body was all in (a 401, a 413): the body deadline still holds then.
        if not self.transport.is_closing() and self.cycle.response_complete and not self._in_message:
            self._arm(self._settings.header_timeout_seconds, body=False)

    def _arm(self, seconds: float, body: bool) -> None:
        self._deadline = self.loop.time() + seconds
        self._awaiting_body = body

    def expire_if_late(self, now: float) -> None:
        if self._deadline is None or self._deadline > now or self.transport.is_closing():
            return  # its request completed, or it closed, since the sweep found it late
        self._deadline = None
        if self._awaiting_body:
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                self.transport.write(self._response(
                    408, f"The request body did not arrive within {self._settings.body_timeout_seconds:g} "
                         "seconds of its headers."))
                cycle.scope["state"][BODY_TIMED_OUT] = True
                # The application is waiting for the body: it now reads a disconnect (starlette's
                # ClientDisconnect), and whatever it answers is not written after this 408.
                cycle.disconnected = True
                cycle.message_event.set()
            _tally.add(self.loop, "body timeout")
        elif self._in_message:
            self.transport.write(self._response(
                408, f"The request headers did not arrive within {self._settings.header_timeout_seconds:g} "
                     "seconds."))
            _tally.add(self.loop, "header timeout")
        else:
            _tally.add(self.loop, "header timeout, nothing sent")  # no request begun: nobody to answer
        self.transport.close()

    def _response(self, status: int, message: str, *headers: tuple[bytes, bytes]) -> bytes:
        """A whole response with the compat.md error body, written by the server itself (the application is not
        involved, or has not answered)."""
        body = orjson.dumps({"message": message})
        lines = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers,
                            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]:
            lines += [name, b": ", value, b"\r\n"]
        return b"".join([*lines, b"\r\n", body])


class _Sweep:
    """The one periodic task of a server process that enforces every connection's deadline."""

    def __init__(self) -> None:
        self.connections: set[Any] | None = None

    def start(self, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        if self.connections is None:
            self.connections = connections
            loop.call_later(SWEEP_SECONDS, self.run, loop)

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.connections is not None
        now = loop.time()
        # Every connection is one of ours (ws="none": none is handed to a WebSocket protocol). Attributes, not
        # a method call: a third of the time, with thousands of connections.
        late = [c for c in self.connections if c._deadline is not None and c._deadline <= now]
        self.close(loop, late, now)
        loop.call_later(SWEEP_SECONDS, self.run, loop)

    def close(self, loop: asyncio.AbstractEventLoop, late: list["GuardedHttpToolsProtocol"], now: float) -> None:
        # A slice at a time, the rest after the loop has polled again: a thousand slow clients that connected
        # together expire together, and closing them (and failing their requests) in one go would hold every
        # other client's requests for a tenth of a second.
        for connection in late[:_CLOSE_SLICE]:
            connection.expire_if_late(now)
        if len(late) > _CLOSE_SLICE:
            loop.call_soon(self.close, loop, late[_CLOSE_SLICE:], now)


_sweep = _Sweep()


class _Tally:
    """Connections closed for being slow or over the limit, logged as one line a second at most: a flood of them
    (an attack, a broken fleet) must not become a flood of log lines on the event loop."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, loop: asyncio.AbstractEventLoop, reason: str) -> None:
        if not self.counts:
            loop.call_later(1.0, self.flush)
        self.counts[reason] += 1

    def flush(self) -> None:
        counts, self.counts = self.counts, Counter()
        level = logging.WARNING if any("limit" in reason for reason in counts) else logging.INFO
        log.log(level, "closed %d slow or excess connection(s): %s", counts.total(),
                ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())),
                extra={"closed": dict(counts)})


_tally = _Tally()


def raise_open_files_limit(settings: Settings) -> None:
    """Raise this process's soft limit on open files (inherited by `--workers` processes) so that the connection
    cap, not the limit, is what refuses clients: at the limit, accepting fails for everyone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.max_connections + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("the open files limit (%d) is below INGEST_MAX_CONNECTIONS + %d: past about %d connections, "
                    "accepting fails instead of answering 503", soft, _SPARE_FILES, soft - _SPARE_FILES)
