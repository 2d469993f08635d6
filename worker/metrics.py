"""The worker's own metrics, and its liveness: served by the parent process on
`--metrics-host` and `--metrics-port`.

Counters are incremented in the prefork children; prometheus_client's multiprocess mode (a directory of
per-process files, set up by `ingest worker` before anything imports this module) lets the parent serve
their sum. The parent also writes a heartbeat to Redis every few seconds: `/healthz` answers 200 while
those writes succeed, and the shim counts the live workers from them.
"""

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from schema.settings import get_settings
from schema.status import HEARTBEAT_TTL_SECONDS, heartbeat
from worker.db import batches

log = logging.getLogger(__name__)

BATCHES = Counter("ingest_worker_batches_applied", "Transactions that applied batches of operations")
OPERATIONS = Counter("ingest_worker_operations_applied", "Operations applied", ["kind"])
RESULTS = Counter("ingest_worker_results_applied", "Test results stored")
DURATION = Histogram("ingest_worker_apply_duration_seconds", "Time to apply one transaction's batches",
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RETRIES = Counter("ingest_worker_retries", "Batches put back to be tried again later")
DEAD_LETTERS = Counter("ingest_worker_dead_letters", "Operations set aside as dead letters")

HEARTBEAT_SECONDS = 5.0


class Liveness:
    def __init__(self) -> None:
        self.last_beat = 0.0

    def alive(self) -> bool:
        return time.monotonic() - self.last_beat < HEARTBEAT_TTL_SECONDS


def serve(host: str, port: int, concurrency: int, queues: str | None = None) -> Liveness:
    """Start the heartbeat and the metrics server in the calling (parent) process."""
    settings = get_settings()
    liveness = Liveness()
    started = time.time()

    def beat() -> None:
        while True:
            try:
                heartbeat(batches(), queues or settings.queue, concurrency, started)
                liveness.last_beat = time.monotonic()
            except Exception as exc:
                log.warning("heartbeat failed: %s", type(exc).__name__)
            time.sleep(HEARTBEAT_SECONDS)

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = liveness.alive()
                self._send(200 if ok else 503, b'{"status":"ok"}' if ok else b'{"status":"no heartbeat"}',
                           "application/json")
            else:
                self._send(404, b'{"message":"Not found."}', "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # scrapes are not worth a log line each
            pass

    threading.Thread(target=beat, name="ingest-heartbeat", daemon=True).start()
    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="ingest-metrics", daemon=True).start()
    log.info("metrics and /healthz on %s port %d", host, port)
    return liveness
