"""Webhook deliveries (reads.md "Webhooks"): one POST per webhook per completed run, at least once.

What is owed is the row in `webhook_deliveries`, written with the run's completion (worker/outbox.py), never a
message: a message only says "look at it now". Each attempt leases its row first, so two attempts never POST
at once, builds the body on the first attempt and stores it (every retry sends the same bytes), POSTs with no
transaction open, then records the answer in a transaction of its own.

Why a thread pool: the task only hands its deliveries to threads of the worker process and returns. By default
one worker serves the ops queue and this one with the same prefork children; a POST made in the task would hold
a child (and the messages it has prefetched) for as long as its receiver hangs, up to 10 s, and appends would
wait behind it. A process that dies with deliveries in its pool loses nothing: their rows are still pending,
and the sweeper sends them again once their lease has run out (`send_due`).

Retries: a short backoff is scheduled as a countdown on the task; a long one is left to the sweeper, which
sends every pending delivery that is due (holding hour-long countdowns in a worker's memory would outlive the
broker's visibility timeout, and a restart would lose them anyway).
"""

import hashlib
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import msgspec
import orjson
from sqlalchemy import Connection, Engine, create_engine

from schema.messages import DELIVER_TASK
from schema.settings import get_settings
from worker.app import app

log = logging.getLogger(__name__)

EVENT = "automation_run.completed"
# The receiver has this long to answer once the request is sent; connecting and sending get less, so that a
# whole attempt stays well inside its lease.
ANSWER_SECONDS = 10.0
SEND_SECONDS = 3.0
# Longer than an attempt can take (SEND_SECONDS to connect, as many to send, ANSWER_SECONDS for the answer) with
# its bookkeeping: past it, the attempt's worker is taken for dead and another attempt may start.
LEASE_SECONDS = 20
BACKOFF_CAP_SECONDS = 3600.0
# A retry's countdown is measured on the worker's clock, its due time on the database's. On one machine the
# countdown, started after the failure committed, always ends after the due time; where the clocks disagree,
# one that ends too early is refused, and the sweeper sends the delivery once it is due.
COUNTDOWN_MARGIN_SECONDS = 0.05


@dataclass(frozen=True)
class Leased:
    id: str
    run_id: int
    url: str
    secret: str
    body: str | None
    attempts: int
    occurred_at: datetime


# --- the queries ----------------------------------------------------------------------------------------------

def pending_of_run(conn: Connection, run_id: int) -> list[str]:
    return [str(row[0]) for row in conn.exec_driver_sql(
        "SELECT id FROM webhook_deliveries WHERE run_id = %(run)s AND state = 'pending' ORDER BY id",
        {"run": run_id})]


def due(conn: Connection, limit: int = 1000) -> list[tuple[int, str]]:
    """Pending deliveries whose next attempt is due and that nobody holds: (run, delivery)."""
    return [(row[0], str(row[1])) for row in conn.exec_driver_sql(
        "SELECT run_id, id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= now() "
        "AND (leased_until IS NULL OR leased_until < now()) ORDER BY next_attempt_at LIMIT %(limit)s",
        {"limit": limit})]


def lease(conn: Connection, delivery_id: str) -> Leased | None:
    """Take the delivery for one attempt, if it is pending, due and not held by another. Due: a message sent
    twice (after the commit and by the sweeper, say) must not make a retry come before its backoff."""
    row = conn.exec_driver_sql(
        "UPDATE webhook_deliveries d SET leased_until = now() + make_interval(secs => %(lease)s) "
        "FROM webhooks w WHERE d.id = %(id)s AND w.id = d.webhook_id AND d.state = 'pending' "
        "AND d.next_attempt_at <= now() "
        "AND (d.leased_until IS NULL OR d.leased_until < now()) "
        "RETURNING d.id, d.run_id, w.url, w.secret, d.body, d.attempts, d.occurred_at",
        {"id": delivery_id, "lease": LEASE_SECONDS}).first()
    return None if row is None else Leased(str(row[0]), *row[1:])


def store_body(conn: Connection, delivery_id: str, body: str) -> str:
    """Keep the first attempt's body; the body kept (another attempt's, had one got there first)."""
    return str(conn.exec_driver_sql(
        "UPDATE webhook_deliveries SET body = coalesce(body, %(body)s) WHERE id = %(id)s RETURNING body",
        {"id": delivery_id, "body": body}).scalar_one())


def delivered(conn: Connection, delivery_id: str, status: int) -> None:
    conn.exec_driver_sql(
        "UPDATE webhook_deliveries SET state = 'delivered', delivered_at = now(), attempts = attempts + 1, "
        "last_status = %(status)s, last_error = NULL, leased_until = NULL WHERE id = %(id)s",
        {"id": delivery_id, "status": status})


def attempt_failed(conn: Connection, delivery_id: str, status: int | None, error: str, retry_in: float,
                   window_hours: float) -> str:
    """Count a failed attempt and schedule the next; the delivery's state ('failed' once its window is over).
    The window counts from `created_at`: when the run completed, or when an operator asked for a redelivery."""
    return str(conn.exec_driver_sql(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = %(status)s, last_error = %(error)s, "
        "leased_until = NULL, next_attempt_at = now() + make_interval(secs => %(retry)s), "
        "state = CASE WHEN created_at < now() - make_interval(secs => %(window)s) THEN 'failed' ELSE 'pending' END "
        "WHERE id = %(id)s RETURNING state",
        {"id": delivery_id, "status": status, "error": error[:2000], "retry": retry_in,
         "window": window_hours * 3600}).scalar_one())


def run_gone(conn: Connection, delivery_id: str) -> None:
    conn.exec_driver_sql(
        "UPDATE webhook_deliveries SET state = 'failed', attempts = attempts + 1, leased_until = NULL, "
        "last_error = 'the run no longer exists (deleted, or removed by retention) before its first attempt' "
        "WHERE id = %(id)s", {"id": delivery_id})


def run_object(conn: Connection, run_id: int) -> dict[str, Any] | None:
    """The run as GET /api/v1/automation/runs/{id} returns it in `result`, from the same columns and the same
    Struct."""
    from api_shim.reads import EMBEDDED_THREADS, RUN_COLUMNS, THREAD_COLUMNS, run_with_threads
    from schema.statuses import STATUS_TABLE_SQL, status_of

    run = conn.exec_driver_sql(f"SELECT {RUN_COLUMNS} FROM automation_runs WHERE id = %(id)s",
                               {"id": run_id}).mappings().first()
    if run is None:
        return None
    threads = conn.exec_driver_sql(
        f"SELECT {THREAD_COLUMNS} FROM automation_run_threads WHERE run_id = %(id)s ORDER BY id LIMIT %(n)s",
        {"id": run_id, "n": EMBEDDED_THREADS}).mappings().all()
    statuses = [status_of(row) for row in conn.exec_driver_sql(STATUS_TABLE_SQL).mappings()]
    built: dict[str, Any] = msgspec.to_builtins(run_with_threads(run, threads, statuses))
    return built


# --- one attempt ----------------------------------------------------------------------------------------------

def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff(attempts: int, base: float) -> float:
    """Seconds before the next try, after `attempts` failed ones."""
    return float(min(BACKOFF_CAP_SECONDS, base * 2.0 ** (attempts - 1)))


def body_of(delivery: Leased, run: dict[str, Any]) -> str:
    from api_shim.http import iso

    return orjson.dumps({"event": EVENT, "delivery_id": delivery.id, "occurred_at": iso(delivery.occurred_at),
                         "run": run}).decode()


def post(delivery: Leased, body: str) -> tuple[int | None, str | None]:
    """POST the body; (HTTP status or None, error or None if delivered)."""
    raw = body.encode()
    headers = {"Content-Type": "application/json", "X-Ingest-Event": EVENT, "X-Ingest-Delivery": delivery.id,
               "X-Ingest-Signature-256": signature(delivery.secret, raw)}
    timeout = httpx.Timeout(ANSWER_SECONDS, connect=SEND_SECONDS, write=SEND_SECONDS, pool=SEND_SECONDS)
    try:
        with httpx.stream("POST", delivery.url, content=raw, headers=headers, timeout=timeout) as response:
            if 200 <= response.status_code < 300:
                return response.status_code, None  # its body is of no interest
            return response.status_code, f"HTTP {response.status_code}: {_start_of(response)}"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _start_of(response: httpx.Response, limit: int = 500) -> str:
    """The start of an error answer's body, for the operator, read for no longer than a second."""
    deadline = time.monotonic() + 1.0
    data = b""
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) >= limit or time.monotonic() > deadline:
            break
    return data[:limit].decode(errors="replace")


def take(engine: Engine, delivery_id: str) -> tuple[Leased, str | None] | None:
    """Lease the delivery and give it its body (built on its first attempt); None if it is not due or held by
    another attempt, a None body if its run is gone (the delivery is failed then)."""
    with engine.begin() as conn:
        delivery = lease(conn, delivery_id)
        if delivery is None or delivery.body is not None:
            return None if delivery is None else (delivery, delivery.body)
        run = run_object(conn, delivery.run_id)
        if run is None:
            run_gone(conn, delivery_id)
            log.error("webhook delivery %s failed: run %s no longer exists", delivery_id, delivery.run_id)
            return delivery, None
        return delivery, store_body(conn, delivery_id, body_of(delivery, run))


def attempt(engine: Engine, delivery_id: str) -> str | None:
    """One attempt at a delivery, if it is due and free; its state after, or None if it was not taken."""
    taken = take(engine, delivery_id)
    if taken is None:
        return None
    delivery, body = taken
    if body is None:
        return "failed"
    # No transaction is open from here to the answer: a receiver that hangs holds no lock and no connection.
    status, error = post(delivery, body)
    settings = get_settings()
    with engine.begin() as conn:
        if error is None:
            assert status is not None
            delivered(conn, delivery_id, status)
            return "delivered"
        retry_in = backoff(delivery.attempts + 1, settings.webhook_retry_base_seconds)
        state = attempt_failed(conn, delivery_id, status, error, retry_in, settings.webhook_retry_hours)
    if state == "failed":
        log.error("webhook delivery %s failed for good after %d attempts: %s", delivery_id,
                  delivery.attempts + 1, error)
    else:
        log.warning("webhook delivery %s failed (attempt %d), again in %.1f s: %s", delivery_id,
                    delivery.attempts + 1, retry_in, error)
        if retry_in <= settings.sweep_interval_seconds:
            send(delivery.run_id, delivery_id, countdown=retry_in + COUNTDOWN_MARGIN_SECONDS)
    return state


# --- the task -------------------------------------------------------------------------------------------------

class _Pool:
    """The POSTs in flight in this process, and their own connections (apart from those that apply batches,
    so that a burst of deliveries never makes a batch wait for a connection)."""

    def __init__(self) -> None:
        settings = get_settings()
        self.pid = os.getpid()
        self.engine = create_engine(settings.database_url, pool_size=2, max_overflow=2, pool_pre_ping=True)
        self.threads = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="ingest-webhook")

    def submit(self, delivery_id: str) -> None:
        self.threads.submit(self._attempt, delivery_id)

    def _attempt(self, delivery_id: str) -> None:
        try:
            attempt(self.engine, delivery_id)
        except Exception:  # its lease runs out, and the sweeper sends it again
            log.exception("webhook delivery %s: attempt failed", delivery_id)


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def pool() -> _Pool:
    global _pool
    with _pool_lock:
        # Made in the process that runs the tasks: threads and connections do not survive a fork.
        if _pool is None or _pool.pid != os.getpid():
            _pool = _Pool()
        return _pool


@app.task(name=DELIVER_TASK)
def deliver(run_id: int, delivery_id: str | None = None) -> None:
    """Attempt the run's pending deliveries (or one of them), in the background of this process."""
    p = pool()
    if delivery_id is None:
        with p.engine.connect() as conn:
            ids = pending_of_run(conn, run_id)
    else:
        ids = [delivery_id]
    for one in ids:
        p.submit(one)


def send(run_id: int, delivery_id: str | None = None, countdown: float = 0.0) -> None:
    """Queue a delivery task (worker/app.py routes it to INGEST_WEBHOOK_QUEUE)."""
    if countdown:
        deliver.apply_async((run_id, delivery_id), countdown=countdown)
    else:  # no ETA: a message any worker takes at once, rather than one held in a worker's memory
        deliver.apply_async((run_id, delivery_id))


def send_due() -> int:
    """The sweeper's part: a task for every pending delivery that is due and that no attempt holds (its task
    lost, its worker killed, or a retry left to the sweeper); how many."""
    from worker.db import unit_of_work

    with unit_of_work() as conn:
        deliveries = due(conn)
    for run_id, delivery_id in deliveries:
        send(run_id, delivery_id)
    return len(deliveries)
