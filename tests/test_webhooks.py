"""Completion webhooks (reads.md "Webhooks") through real processes: the shim, a Celery worker serving both
queues, PostgreSQL, Redis, and receivers listening on loopback."""

import hashlib
import hmac
import itertools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import Project, new_project
from sqlalchemy import Engine, create_engine, text
from support import (
    ROOT,
    TEST_DATABASE_URL,
    PrivateRedis,
    Service,
    make_tests,
    service_env,
    start_api,
    start_worker,
    unique,
    wait_for,
)

from ingest.admin import Admin
from schema.db import drop_database, upgrade
from schema.settings import Settings

# What a receiver answers to its n-th request (from 1): a status, after waiting on `hold` if one is given.
Behaviour = Callable[[int], int]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """An HTTP server recording every POST; each path is one webhook, with its own behaviour."""

    server: ThreadingHTTPServer
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    holds: dict[str, threading.Event] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path}"

    def got(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == f"/{path}"]

    def wait(self, path: str, n: int, timeout: float = 20.0) -> list[Received]:
        return wait_for(lambda: len(got := self.got(path)) >= n and got, timeout=timeout,
                        what=f"{n} request(s) to /{path}")


def receiver() -> Receiver:
    state: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            name = self.path.lstrip("/")
            with state.lock:
                state.requests.append(Received(self.path, dict(self.headers), body, time.monotonic()))
                n = len([r for r in state.requests if r.path == self.path])
            if (hold := state.holds.get(name)) is not None and n == 1:
                hold.wait(30)
            status = state.behaviours.get(name, lambda n: 200)(n)
            try:
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:  # the worker is gone
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state = Receiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return state


@dataclass
class Stack:
    env: dict[str, str]
    url: str
    api: Service
    worker: Service
    logs: Path

    def restart_worker(self) -> None:
        self.worker = start_worker(self.env, self.logs / f"worker-{time.monotonic()}.log")


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A database and a Redis of this module's own: (database URL, Redis URL). The suite's other workers sweep
    the suite's database for deliveries due, and would deliver these with their own retry settings."""
    database_url = f"{TEST_DATABASE_URL}_hooks"
    drop_database(database_url)
    upgrade(database_url)
    store = PrivateRedis(tmp_path_factory.mktemp("hooks-redis"))
    yield database_url, store.url
    store.stop()


@pytest.fixture(scope="module")
def engine(private: tuple[str, str]) -> Iterator[Engine]:
    engine = create_engine(private[0])
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def admin(private: tuple[str, str]) -> Iterator[Admin]:
    admin = Admin(Settings(database_url=private[0], redis_url=private[1]))
    yield admin
    admin.close()


@pytest.fixture(scope="module")
def stack(private: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A shim and one worker (concurrency 2, both queues, as `ingest worker` runs by default), with a sweep every
    second and retries after 0.1, 0.2, 0.4 s ... given up after 3.6 s, so that the tests need not wait."""
    logs = tmp_path_factory.mktemp("webhooks")
    env = service_env(database_url=private[0], redis_url=private[1], queue=unique("hooks"),
                      webhook_queue=unique("hooks-deliveries"), visibility_timeout=5, sweep_interval_seconds=1,
                      webhook_retry_base_seconds=0.1, webhook_retry_hours=0.001)
    api, url = start_api(env, logs / "api.log")
    s = Stack(env, url, api, start_worker(env, logs / "worker.log"), logs)
    yield s
    api.stop()
    s.worker.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def hooks() -> Iterator[Receiver]:
    r = receiver()
    yield r
    for hold in r.holds.values():
        hold.set()
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def proj(admin: Admin, stack: Stack) -> Iterator[Project]:
    p = new_project(admin, stack.url)
    yield p
    p.api.close()


def ingest(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingest.cli", *args], env=stack.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def completed_run(p: Project, tests: int = 6) -> int:
    run_id = p.api.create_run(p.id)
    thread_id = p.api.create_thread(run_id)
    p.api.append(thread_id, make_tests(tests, ["passed", "failed", "skipped"]))
    p.api.complete_run(run_id)
    p.api.wait_completed(run_id)
    return run_id


def deliveries(engine: Engine, run_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) | {"id": str(r["id"])} for r in conn.execute(text(
            "SELECT * FROM webhook_deliveries WHERE run_id = :r ORDER BY webhook_id"), {"r": run_id}).mappings()]


def state_of(engine: Engine, delivery_id: str) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT state FROM webhook_deliveries WHERE id = :id"),
                                {"id": delivery_id}).scalar_one())


def test_each_webhook_gets_one_signed_post_carrying_the_run(stack: Stack, hooks: Receiver, proj: Project,
                                                            admin: Admin, engine: Engine) -> None:
    made = ingest(stack, "admin", "webhook", "create", "--project", str(proj.id), hooks.url("signed-a"))
    assert made.returncode == 0, made.stderr
    first_id, secret_line = made.stdout.split("\n")[:2]
    generated = secret_line.removeprefix("secret: ")
    assert len(generated) == 64
    second_id, given = admin.create_webhook(proj.id, hooks.url("signed-b"), secret="s3cret")
    assert given == "s3cret"

    run_id = completed_run(proj)
    got = {name: hooks.wait(name, 1) for name in ("signed-a", "signed-b")}
    run = proj.api.run(run_id)
    assert run["is_completed"] and run["total_count"] == 6
    ids = set()
    for name, secret in (("signed-a", generated), ("signed-b", "s3cret")):
        (request,) = got[name]
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["X-Ingest-Event"] == "automation_run.completed"
        expected = "sha256=" + hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers["X-Ingest-Signature-256"], expected)
        body = orjson.loads(request.body)
        assert body["event"] == "automation_run.completed"
        assert body["delivery_id"] == request.headers["X-Ingest-Delivery"]
        assert body["run"] == run
        assert body["occurred_at"].endswith("Z") and len(body["occurred_at"]) == 27
        ids.add(body["delivery_id"])
    assert len(ids) == 2

    rows = deliveries(engine, run_id)
    assert [r["webhook_id"] for r in rows] == sorted([int(first_id), second_id])
    assert {r["id"] for r in rows} == ids
    wait_for(lambda: all(state_of(engine, i) == "delivered" for i in ids), timeout=5, what="delivered")
    time.sleep(2.5)  # two sweeps more: nothing is sent twice
    assert len(hooks.got("signed-a")) == len(hooks.got("signed-b")) == 1
    assert all(r["attempts"] == 1 and r["last_status"] == 200 for r in deliveries(engine, run_id))

    listed = ingest(stack, "admin", "webhook", "list")
    assert hooks.url("signed-a") in listed.stdout and "s3cret" not in listed.stdout
    gone = ingest(stack, "admin", "webhook", "delete", first_id)
    assert gone.returncode == 0, gone.stderr
    assert hooks.url("signed-a") not in ingest(stack, "admin", "webhook", "list").stdout


def test_a_failing_receiver_gets_the_same_delivery_again_until_it_answers(
        stack: Stack, hooks: Receiver, proj: Project, admin: Admin, engine: Engine) -> None:
    hooks.behaviours["flaky"] = lambda n: 500 if n <= 3 else 204
    admin.create_webhook(proj.id, hooks.url("flaky"))
    run_id = completed_run(proj)
    got = hooks.wait("flaky", 4)
    (row,) = deliveries(engine, run_id)
    wait_for(lambda: state_of(engine, row["id"]) == "delivered", timeout=5, what="delivered")
    time.sleep(1.5)
    got = hooks.got("flaky")
    assert len(got) == 4
    assert {r.headers["X-Ingest-Delivery"] for r in got} == {row["id"]}
    assert len({r.body for r in got}) == 1
    (row,) = deliveries(engine, run_id)
    assert row["attempts"] == 4 and row["last_status"] == 204 and row["last_error"] is None
    # Backoff: each try waits longer than the one before (0.1, 0.2, 0.4 s).
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4, gaps


def test_a_dead_receiver_ends_failed_and_is_redelivered_on_request(
        stack: Stack, hooks: Receiver, proj: Project, admin: Admin, engine: Engine) -> None:
    hooks.behaviours["dead"] = lambda n: 503
    admin.create_webhook(proj.id, hooks.url("dead"))
    run_id = completed_run(proj)
    (row,) = deliveries(engine, run_id)
    wait_for(lambda: state_of(engine, row["id"]) == "failed", timeout=20, what="the delivery to fail")
    (row,) = deliveries(engine, run_id)
    assert row["attempts"] >= 3 and row["last_status"] == 503 and "HTTP 503" in row["last_error"]
    tries = len(hooks.got("dead"))
    time.sleep(1.5)
    assert len(hooks.got("dead")) == tries  # failed: no more tries

    failed = ingest(stack, "admin", "webhook", "deliveries", "--failed")
    assert failed.returncode == 0, failed.stderr
    assert row["id"] in failed.stdout and "failed" in failed.stdout
    hooks.behaviours["dead"] = lambda n: 200
    again = ingest(stack, "admin", "webhook", "redeliver", row["id"])
    assert again.returncode == 0, again.stderr
    got = hooks.wait("dead", tries + 1, timeout=10)
    wait_for(lambda: state_of(engine, row["id"]) == "delivered", timeout=5, what="delivered")
    assert len({r.body for r in got}) == 1
    assert row["id"] not in ingest(stack, "admin", "webhook", "deliveries", "--failed").stdout
    refused = ingest(stack, "admin", "webhook", "redeliver", "not-a-uuid")
    assert refused.returncode == 1 and "not a delivery id" in refused.stderr


def test_hanging_receivers_never_hold_up_appends(stack: Stack, hooks: Receiver, proj: Project, admin: Admin,
                                                other: Project, engine: Engine) -> None:
    # More hung POSTs than the worker has children: were a POST made in a child, applying would stop.
    names = [f"hang{i}" for i in range(3)]
    for name in names:
        hooks.holds[name] = threading.Event()
        admin.create_webhook(proj.id, hooks.url(name))
    completed_run(proj)
    for name in names:
        hooks.wait(name, 1)
    started = time.monotonic()
    run_id = other.api.create_run(other.id)
    threads = [other.api.create_thread(run_id) for _ in range(3)]
    for i, thread_id in enumerate(threads):
        for j in range(3):
            other.api.append(thread_id, make_tests(20, prefix=f"h{i}-{j}-"))
    other.api.complete_run(run_id)
    run = other.api.wait_completed(run_id, timeout=8)
    took = time.monotonic() - started
    assert run["total_count"] == 180
    assert all(not hooks.holds[name].is_set() for name in names)  # the receivers were hanging all along
    print(f"appends applied in {took:.2f} s while three receivers hung")
    assert took < 6
    for name in names:
        hooks.holds[name].set()


@pytest.fixture
def other(admin: Admin, stack: Stack) -> Iterator[Project]:
    p = new_project(admin, stack.url)
    yield p
    p.api.close()


def test_admin_refuses_urls_that_are_not_http(stack: Stack, proj: Project, admin: Admin) -> None:
    refused = ingest(stack, "admin", "webhook", "create", "--project", str(proj.id), "ftp://example.com/hook")
    assert refused.returncode == 1
    assert "only http:// and https:// URLs" in refused.stderr and refused.stdout == ""
    unknown = ingest(stack, "admin", "webhook", "create", "--project", "999999999", "https://example.com/hook")
    assert unknown.returncode == 1 and "no project with id 999999999" in unknown.stderr
    from ingest.admin import AdminError

    for url in ("example.com/hook", "https://", "javascript:alert(1)", "http://host:99999999/"):
        with pytest.raises(AdminError, match="invalid URL"):
            admin.create_webhook(proj.id, url)
    assert admin.create_webhook(proj.id, "https://example.com:8443/hook")[0] > 0


def test_a_worker_killed_mid_delivery_loses_nothing(stack: Stack, hooks: Receiver, proj: Project, admin: Admin,
                                                    engine: Engine) -> None:
    # Last: it kills the module's worker. The first POST hangs; the worker is killed while it waits for the
    # answer, after the run's completion committed: the delivery must still arrive, once, from a new worker.
    hooks.holds["killed"] = threading.Event()
    admin.create_webhook(proj.id, hooks.url("killed"))
    run_id = completed_run(proj)
    (first,) = hooks.wait("killed", 1)
    stack.worker.stop(signal.SIGKILL)
    (row,) = deliveries(engine, run_id)
    assert row["state"] == "pending" and row["attempts"] == 0 and row["body"] is not None
    with engine.connect() as conn:
        assert conn.execute(text("SELECT is_completed FROM automation_runs WHERE id = :r"),
                            {"r": run_id}).scalar_one()
    hooks.holds["killed"].set()
    stack.restart_worker()
    # Once the dead attempt's lease (20 s) is over, the sweeper sends it again.
    got = hooks.wait("killed", 2, timeout=40)
    wait_for(lambda: state_of(engine, row["id"]) == "delivered", timeout=5, what="delivered")
    assert got[1].body == first.body and got[1].headers["X-Ingest-Delivery"] == row["id"]
    time.sleep(1.5)
    assert len(hooks.got("killed")) == 2
