"""What operators see of the shim: /metrics, /healthz, /readyz, request ids and one log line per request.

/metrics carries two kinds of figures. The installation's (queue depth, ages, totals, dead letters, runs,
workers) are read from Redis at scrape time and from PostgreSQL at most a second before, so every shim reports
the same values: aggregate them with max(), not sum(). This process's own HTTP figures are per process, to be
summed.
"""

import asyncio
import functools
import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_shim.auth import client_address
from api_shim.http import json_response, services
from schema import status

log = logging.getLogger("ingest.access")

REQUESTS = Counter("ingest_http_requests", "HTTP requests answered", ["route", "method", "code"])
DURATION = Histogram("ingest_http_request_duration_seconds", "Time to answer a request", ["route"],
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class Observe:
    """ASGI middleware: a request id for every request (the client's X-Request-ID, else a new one), echoed in
    the response and carried into the queued operations; request counts and durations; a log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.observe(scope, receive, send, time.perf_counter(), request_id_of(scope["headers"]))

    async def observe(self, scope: Scope, receive: Receive, send: Send, start: float, request_id: str) -> None:
        """The app's answer to a request that began at `start` (api_shim/hot.py's refusals come here late)."""
        scope.setdefault("state", {})["request_id"] = request_id
        client_address.set(scope["client"][0] if scope.get("client") else None)
        code = 500

        async def send_with_id(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            endpoint = scope.get("endpoint")
            finish(getattr(endpoint, "__name__", "unmatched"), scope["method"], code, start, request_id)


def finish(route: str, method: str, code: int, start: float, request_id: str) -> None:
    """Count, time and log one request, answered with `code`."""
    seconds = time.perf_counter() - start
    _requests(route, method, code).inc()
    _duration(route).observe(seconds)
    # Refusals and failures are worth a line at INFO; successes only at DEBUG (thousands a second).
    level = logging.WARNING if code >= 500 else logging.INFO if code >= 400 else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(level, "%s %s %d", method, route, code, extra={
            "request_id": request_id, "route": route, "method": method, "status": code,
            "duration_ms": round(seconds * 1000, 2)})


# A client's request id is kept only if it is plainly an id: it is echoed, logged and carried in operations,
# and must never be anything a reader could take for structure.
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


@functools.cache
def _requests(route: str, method: str, code: int) -> Counter:
    # A labelled child looked up once, not on every request (labels() builds its key under a lock).
    return REQUESTS.labels(route, method, str(code))


@functools.cache
def _duration(route: str) -> Histogram:
    return DURATION.labels(route)


# A new request id is this process's random prefix and a count: as unique as 16 random hex digits would be
# for joining log lines, without reading the system's random source on every request.
_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count()


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id" and _SAFE_REQUEST_ID.fullmatch(value):
            return str(value.decode())
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def request_id(request: Request) -> str:
    value: str = request.state.request_id
    return value


class _Cluster:
    """A one-scrape collector for the installation's figures."""

    def __init__(self, snapshot: status.Snapshot) -> None:
        self.s = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.s
        messages = GaugeMetricFamily("ingest_queue_messages", "Messages in the queue, by state", labels=["state"])
        messages.add_metric(["waiting"], s.waiting)
        messages.add_metric(["reserved"], s.reserved)
        yield messages
        yield GaugeMetricFamily("ingest_queue_depth", "Messages waiting plus those reserved by workers: the "
                                "work outstanding (scale workers on this)", value=s.depth)
        yield GaugeMetricFamily("ingest_queue_oldest_waiting_seconds", "Age of the oldest waiting message",
                                value=s.oldest_waiting_seconds)
        yield GaugeMetricFamily("ingest_queue_oldest_reserved_seconds",
                                "Time the longest-held reserved message has been held", value=s.oldest_reserved_seconds)
        for name, value, doc in (
                ("ingest_appends_accepted", s.appends_accepted, "Thread appends accepted"),
                ("ingest_results_accepted", s.results_accepted, "Test results accepted"),
                ("ingest_operations_applied", s.operations_applied, "Operations applied by workers"),
                ("ingest_results_applied", s.results_applied, "Test results stored by workers")):
            yield CounterMetricFamily(name, doc + " (whole installation)", value=value)
        yield GaugeMetricFamily("ingest_workers_alive", "Workers whose heartbeat is fresh", value=s.workers_alive)
        for name, maybe, doc in (
                ("ingest_dead_letters", s.dead_letters, "Dead-lettered operations not yet applied"),
                ("ingest_runs_open", s.runs_open, "Runs not completed"),
                ("ingest_runs_stuck", s.runs_stuck, "Open runs idle, or waiting on their complete, too long")):
            if maybe is not None:  # the database could not be read
                yield GaugeMetricFamily(name, doc, value=maybe)


def _process_registry() -> CollectorRegistry:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # `ingest api --workers N`: sum over the server processes
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


async def metrics(request: Request) -> Response:
    cluster = CollectorRegistry()
    cluster.register(_Cluster(await services(request).snapshot()))
    body = generate_latest(cluster) + generate_latest(_process_registry())
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def healthz(_: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    s = services(request)
    checks: dict[str, Any] = {}
    try:
        async with s.engine.connect() as conn:
            await asyncio.wait_for(conn.execute(text("SELECT 1")), 3)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = type(exc).__name__
    try:
        await asyncio.wait_for(s.redis.ping(), 3)
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = type(exc).__name__
    ready = all(v == "ok" for v in checks.values())
    response = json_response({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)
    if not ready:
        response.headers["Retry-After"] = str(s.settings.retry_after_seconds)
    return response
