"""The shim's app served inside the test process: `create_app` on an event loop of its own thread, reached
through httpx's ASGI transport (no socket, no uvicorn, no worker).

For tests about what the shim accepts and refuses: an accepted request is answered only once its operation is
in Redis, so what a request did can be read from Redis as soon as its answer is back, without waiting for a
worker to apply anything. The tests about what is stored stay on the real pipeline (conftest.py).
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import httpx

from api_shim.app import create_app
from schema.settings import Settings

T = TypeVar("T")


class _Chunks(httpx.AsyncByteStream):
    """A sync request body, already read, replayed chunk by chunk (so a chunked upload stays chunked)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


class InProcess(httpx.BaseTransport):
    """A sync httpx transport onto the app, with the app's lifespan (its Redis, database and group commits)
    started on creation and ended by `shutdown`."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="in-process-app", daemon=True)
        self.thread.start()
        self.app = create_app(settings)
        self.asgi = httpx.ASGITransport(app=self.app)
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._run(self._lifespan("startup"))

    def _run(self, work: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    async def _lifespan(self, phase: str) -> None:
        if phase == "startup":
            scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
            self.lifespan = asyncio.create_task(self.app(scope, self.to_app.get, self.from_app.put))
        await self.to_app.put({"type": f"lifespan.{phase}"})
        answer = await self.from_app.get()
        assert answer["type"] == f"lifespan.{phase}.complete", answer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.stream = _Chunks(list(request.stream))  # type: ignore[arg-type]
        return self._run(self._send(request))

    async def _send(self, request: httpx.Request) -> httpx.Response:
        response = await self.asgi.handle_async_request(request)
        content = await response.aread()
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    def close(self) -> None:
        """Called by each client closing: the app outlives its clients."""

    def shutdown(self) -> None:
        self._run(self._lifespan("shutdown"))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
