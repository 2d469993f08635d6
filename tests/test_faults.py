"""Faults injected into real processes: nothing accepted is lost or counted twice.

Each test runs its own shim and workers (and, where it breaks one, its own PostgreSQL or Redis), so that
killing or stopping them never disturbs the rest of the suite.
"""

import asyncio
import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import uvloop
from sqlalchemy import Engine, create_engine, text
from support import (
    ROOT,
    TEST_REDIS_URL,
    Api,
    PrivatePostgres,
    PrivateRedis,
    Service,
    service_env,
    start_api,
    start_worker,
    tree,
    unique,
    wait_for,
)

from api_shim.services import RedisConnection
from ingest.admin import Admin
from schema.db import upgrade
from schema.messages import leased_key, pending_key
from schema.settings import Settings
from schema.status import UNACKED_KEY

STATUSES = ["passed", "failed", "skipped"]


@dataclass
class Fleet:
    """CI jobs appending to one run from several threads; remembers which appends were accepted."""

    url: str
    token: str
    project_id: int
    threads: int = 6
    run_id: int = 0
    thread_ids: list[int] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # keys of the tests whose append got 204
    refused: dict[int, int] = field(default_factory=dict)  # status code -> appends refused
    refused_keys: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        api = Api(self.url, self.token)
        try:
            self.run_id = api.create_run(self.project_id, name="fleet")
            self.thread_ids = [api.create_thread(self.run_id) for _ in range(self.threads)]
        finally:
            api.close()

    def push(self, appends: int, tests: int, pause: float = 0.0) -> None:
        """Every thread sends `appends` appends of `tests` tests, all threads at once."""

        def job(thread_id: int) -> None:
            with httpx.Client(base_url=f"{self.url}/api/v1", timeout=30,
                              headers={"Authorization": f"Bearer {self.token}"}) as http:
                for _ in range(appends):
                    keys = [uuid.uuid4().hex for _ in range(tests)]
                    body = {"tests": [{"key": k, "name": k, "status": random.choice(STATUSES)} for k in keys]}
                    try:
                        code = http.post(f"/automation/runs/threads/{thread_id}/append", json=body).status_code
                    except httpx.TransportError:
                        code = 0
                    with self.lock:
                        if code == 204:
                            self.accepted += keys
                        else:
                            self.refused[code] = self.refused.get(code, 0) + 1
                            self.refused_keys += keys
                    time.sleep(pause)

        workers = [threading.Thread(target=job, args=(t,)) for t in self.thread_ids]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def complete(self, explain: Callable[[], str] = str) -> dict[str, Any]:
        """Complete every thread and the run, and wait for the run; `explain` says why it did not complete."""
        api = Api(self.url, self.token)
        try:
            for thread_id in self.thread_ids:
                api.complete_thread(thread_id)
            api.complete_run(self.run_id)
            try:
                return api.wait_completed(self.run_id, timeout=120)
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {explain()}") from None
        finally:
            api.close()


def stalled(engine: Engine, redis_url: str, queue: str, run_id: int) -> str:
    """Where a run that does not complete stands: its completion barrier, its open threads', what Redis holds."""
    with engine.connect() as conn:
        run = conn.execute(text("SELECT ops_applied, ops_expected FROM automation_runs WHERE id = :r"),
                           {"r": run_id}).one()
        threads = conn.execute(text(
            "SELECT id, appends_applied, appends_expected FROM automation_run_threads "
            "WHERE run_id = :r AND NOT is_completed ORDER BY id"), {"r": run_id}).all()
    with redis.Redis.from_url(redis_url) as store:
        held = {"waiting": store.llen(queue), "reserved": store.hlen(UNACKED_KEY),
                "pending": store.llen(pending_key(queue)), "leased": store.zcard(leased_key(queue)),
                "batches": sum(1 for _ in store.scan_iter("ingest:batch:*"))}
    return (f"operations applied/expected {run.ops_applied}/{run.ops_expected}; open threads "
            f"{[f'{t.id}: {t.appends_applied}/{t.appends_expected}' for t in threads]}; in Redis {held}")


def stored_keys(engine: Engine, run_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT key, count(*) FROM automation_results WHERE run_id = :r GROUP BY key"),
                            {"r": run_id}).all()
    return {key: n for key, n in rows}


def assert_exactly_once(engine: Engine, fleet: Fleet, run: dict[str, Any], maybe: list[str] = ()) -> None:
    """Every accepted test is stored once, nothing else is (but `maybe`), and the counters say the same."""
    stored = stored_keys(engine, fleet.run_id)
    assert [k for k, n in stored.items() if n > 1] == []
    missing = set(fleet.accepted) - stored.keys()
    assert not missing, f"{len(missing)} accepted results were lost"
    assert stored.keys() - set(fleet.accepted) <= set(maybe)
    assert run["total_count"] == len(stored) == sum(run[f"status{i}_count"] for i in (1, 2, 5))
    with engine.connect() as conn:
        letters = conn.execute(text("SELECT count(*) FROM dead_letters WHERE run_id = :r"), {"r": fleet.run_id})
        assert letters.scalar_one() == 0


@dataclass
class Stack:
    env: dict[str, str]
    url: str
    api: Service
    workers: list[Service]
    logs: Path

    def start_worker(self, **overrides: Any) -> Service:
        env = self.env | {f"INGEST_{k.upper()}": str(v) for k, v in overrides.items()}
        worker = start_worker(env, self.logs / f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        self.api.stop()
        for worker in self.workers:
            worker.stop(signal.SIGKILL)


@pytest.fixture
def stack_factory(logs: Path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(workers: int = 1, **overrides: Any) -> Stack:
        env = service_env(queue=unique("faults"), visibility_timeout=5, **overrides)
        api, url = start_api(env, logs / f"api{len(stacks)}.log")
        stack = Stack(env, url, api, [], logs)
        stacks.append(stack)
        for _ in range(workers):
            stack.start_worker()
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture
def private(tmp_path: Path) -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    """A migrated PostgreSQL and a Redis of the test's own, to stop at will. Its own Redis too: ids in a new
    database start again, and must not meet the state of the suite's runs."""
    pg, redis_server = PrivatePostgres(), PrivateRedis(tmp_path)
    upgrade(pg.url)
    yield pg, redis_server
    pg.close()
    redis_server.stop()


def project_on(database_url: str, redis_url: str) -> tuple[int, str]:
    admin = Admin(Settings(database_url=database_url, redis_url=redis_url))
    try:
        project_id = admin.create_project(unique("faults"))
        return project_id, admin.create_token(unique("ci"), [project_id])
    finally:
        admin.close()


def test_workers_killed_mid_batch_lose_nothing_and_count_nothing_twice(
        stack_factory: Callable[..., Stack], engine: Engine, database_url: str) -> None:
    stack = stack_factory()
    project_id, token = project_on(database_url, TEST_REDIS_URL)
    fleet = Fleet(stack.url, token, project_id)
    fleet.start()

    stop = threading.Event()
    kills: set[int] = set()

    def killer() -> None:
        # SIGKILL the processes applying batches, over and over, while the fleet appends; after a few, the
        # whole worker, parent and children, with batches reserved: Redis hands them to the next worker once
        # the visibility timeout passes.
        while not stop.wait(random.uniform(0.2, 0.4)):
            if len(kills) == 4:
                os.killpg(stack.workers[-1].proc.pid, signal.SIGKILL)
                kills.add(stack.workers[-1].proc.pid)
                stack.start_worker()
                continue
            children = [p for p in tree(stack.workers[-1].proc.pid)[1:] if p not in kills]
            if children:
                victim = random.choice(children)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
                    kills.add(victim)

    thread = threading.Thread(target=killer)
    thread.start()
    rounds = 0
    try:
        # Keep appending until the killer has struck often enough, however fast the machine is.
        while len(kills) < 10 and rounds < 40:
            fleet.push(appends=10, tests=50, pause=0.05)
            rounds += 1
    finally:
        stop.set()
        thread.join()

    run = fleet.complete(lambda: stalled(engine, TEST_REDIS_URL, stack.env["INGEST_QUEUE"], fleet.run_id))
    assert len(kills) >= 10
    assert fleet.refused == {}
    assert_exactly_once(engine, fleet, run)
    assert run["total_count"] == rounds * 6 * 10 * 50


def test_postgres_down_for_20_seconds(private: tuple[PrivatePostgres, PrivateRedis],
                                      stack_factory: Callable[..., Stack]) -> None:
    pg, redis_server = private
    stack = stack_factory(database_url=pg.url, redis_url=redis_server.url)
    project_id, token = project_on(pg.url, redis_server.url)
    fleet = Fleet(stack.url, token, project_id)
    fleet.start()
    api = Api(stack.url, token)
    engine = create_engine(pg.url)
    try:
        fleet.push(appends=3, tests=20)
        pg.stop()
        down_since = time.monotonic()
        # The queue absorbs every write while the database is down, creates included; reads say when to come
        # back.
        late_run = api.create_run(project_id, name="created while the database was down")
        late_thread = api.create_thread(late_run)
        api.append(late_thread, [{"key": "late", "name": "late", "status": "passed"}])
        extra_thread = api.create_thread(fleet.run_id)
        for response in (api.get(f"/automation/runs/{fleet.run_id}"),
                         api.get(f"/projects/{project_id}/automation/runs")):
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) > 0
            assert "unavailable" in response.json()["message"]
        while time.monotonic() - down_since < 20:
            fleet.push(appends=1, tests=20, pause=0.2)
        assert fleet.refused == {}
        pg.start()

        api.complete_thread(extra_thread)
        run = fleet.complete(lambda: stalled(engine, redis_server.url, stack.env["INGEST_QUEUE"], fleet.run_id))
        assert_exactly_once(engine, fleet, run)
        assert run["total_count"] == len(fleet.accepted) >= 6 * 20 * 10
        assert run["thread_count"] == fleet.threads + 1
        api.complete_run(late_run)
        late = api.wait_completed(late_run)
        assert (late["name"], late["total_count"], late["thread_count"]) == (
            "created while the database was down", 1, 1)
    finally:
        api.close()
        engine.dispose()
        stack.stop()


def test_redis_restarted_with_aof_keeps_every_accepted_append(
        stack_factory: Callable[..., Stack], tmp_path: Path, engine: Engine, database_url: str) -> None:
    """With the append-only file on, an append answered 204 survives the Redis process crashing (SIGKILL) and
    restarting. During the outage appends are refused (503), never silently dropped; an append in flight at
    the crash may be applied though its client saw an error (it cannot tell which).

    What `appendfsync always` adds, the append on disk before the answer so that it survives the machine losing
    power, is not tested: the kernel keeps what a killed process wrote, so this passes with any `appendfsync`."""
    redis_server = PrivateRedis(tmp_path)
    try:
        # What the crash leaves without a message, the sweeper brings within seconds rather than a minute.
        stack = stack_factory(redis_url=redis_server.url, sweep_interval_seconds=1)
        project_id, token = project_on(database_url, redis_server.url)
        fleet = Fleet(stack.url, token, project_id)
        fleet.start()

        def crash_and_restart() -> None:
            time.sleep(1.0)
            redis_server.kill()
            time.sleep(2.0)
            redis_server.start()

        crasher = threading.Thread(target=crash_and_restart)
        crasher.start()
        fleet.push(appends=40, tests=20, pause=0.05)
        crasher.join()
        fleet.push(appends=2, tests=20)
        # Ids come from PostgreSQL's sequences, not from Redis: none is handed out again after the restart.
        api = Api(stack.url, token)
        later = [api.create_thread(fleet.run_id) for _ in range(3)]
        later_run = api.create_run(project_id)
        for thread_id in later:
            api.complete_thread(thread_id)
        assert not set(later) & set(fleet.thread_ids) and later_run != fleet.run_id

        assert set(fleet.refused) <= {503, 0}, fleet.refused
        assert fleet.refused, "the outage should have refused some appends"
        run = fleet.complete(lambda: stalled(engine, redis_server.url, stack.env["INGEST_QUEUE"], fleet.run_id))
        assert_exactly_once(engine, fleet, run, maybe=fleet.refused_keys)
        assert run["thread_count"] == fleet.threads + len(later)
        api.complete_run(later_run)
        api.wait_completed(later_run)
        api.close()
    finally:
        redis_server.stop()


def test_batches_whose_messages_redis_lost_are_applied_all_the_same(
        stack_factory: Callable[..., Stack], tmp_path: Path, engine: Engine, database_url: str) -> None:
    """What a Redis crash can leave behind, made on purpose: batches stored, their messages gone (Redis handed a
    message to a worker just before dying, or Celery dropped one whose retry it could not enqueue while Redis was
    down), and one batch taken from the pending list by a transaction that never committed. No message will
    ever come for them: the sweeper must see to it."""
    redis_server = PrivateRedis(tmp_path)
    store = redis.Redis.from_url(redis_server.url)
    try:
        stack = stack_factory(workers=0, redis_url=redis_server.url, sweep_interval_seconds=1)
        queue = stack.env["INGEST_QUEUE"]
        project_id, token = project_on(database_url, redis_server.url)
        api = Api(stack.url, token)
        run_id = api.create_run(project_id)
        thread_id = api.create_thread(run_id)
        api.append(thread_id, [{"key": "taken", "name": "taken", "status": "passed"}])
        api.append(thread_id, [{"key": "pending", "name": "pending", "status": "failed"}])
        api.complete_thread(thread_id)
        api.complete_run(run_id)
        # The crash took every message (the creates', the appends', the completes'), and the first batch was
        # leased by a worker that died with it.
        assert store.llen(queue) == 6
        store.delete(queue)
        taken = store.lpop(pending_key(queue))
        store.zadd(leased_key(queue), {taken: time.time() + 2})

        stack.start_worker()
        run = api.wait_completed(run_id, timeout=30)
        api.close()
        assert run["total_count"] == 2 and run["failure_count"] == 1
        assert stored_keys(engine, run_id) == {"taken": 1, "pending": 1}
        wait_for(lambda: not store.exists(leased_key(queue), pending_key(queue), queue),
                 what="the leases, the pending list and the queue to be empty")
        assert list(store.scan_iter("ingest:batch:*")) == []
    finally:
        store.close()
        redis_server.stop()


def test_a_connection_redis_reset_is_unavailable_not_an_internal_error() -> None:
    """Redis dying resets the connections it had just accepted. Writing to one under uvloop, as the shim runs,
    raised RuntimeError, which made an append during the outage a 500 where it should be a 503."""

    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []
        server = await asyncio.start_server(lambda _, writer: accepted.append(writer), "127.0.0.1", 0)
        conn = RedisConnection(host="127.0.0.1", port=server.sockets[0].getsockname()[1], socket_timeout=5)
        try:
            await conn._connect()  # the socket alone: this server cannot answer the handshake a real Redis would
            while not accepted:
                await asyncio.sleep(0.01)
            reset = struct.pack("ii", 1, 0)  # close without lingering: a reset
            accepted[0].get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
            accepted[0].close()
            while conn._writer is not None and not conn._writer.transport.is_closing():
                await asyncio.sleep(0.01)
            with pytest.raises(redis.exceptions.ConnectionError):
                await conn.send_command("PING", check_health=False)
        finally:
            await conn.disconnect()
            server.close()
            await server.wait_closed()

    uvloop.run(main())


def ingest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingest.cli", *args], env=env or service_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_an_operation_the_database_refuses_is_dead_lettered_then_replayed(
        stack_factory: Callable[..., Stack], engine: Engine, database_url: str,
        redis_client: "redis.Redis[bytes]") -> None:
    stack = stack_factory()
    project_id, token = project_on(database_url, TEST_REDIS_URL)
    poison = f"poison-{uuid.uuid4().hex}"
    function = f"refuse_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        # A database rule that refuses one result: the kind of cause an operator fixes, then replays.
        conn.execute(text(f"""CREATE FUNCTION {function}() RETURNS trigger AS $$ BEGIN
            IF NEW.key = '{poison}' THEN RAISE EXCEPTION 'refused by a rule'; END IF; RETURN NEW; END $$
            LANGUAGE plpgsql"""))
        conn.execute(text(f"CREATE TRIGGER {function} BEFORE INSERT ON automation_results FOR EACH ROW "
                          f"EXECUTE FUNCTION {function}()"))
    api = Api(stack.url, token)
    try:
        run_id = api.create_run(project_id)
        thread_id = api.create_thread(run_id)
        api.append(thread_id, [{"key": "good-1", "name": "good", "status": "passed"}])
        api.append(thread_id, [{"key": poison, "name": "bad", "status": "failed"},
                               {"key": "good-2", "name": "good", "status": "passed"}])
        api.append(thread_id, [{"key": "good-3", "name": "good", "status": "passed"}])
        api.complete_thread(thread_id)
        api.complete_run(run_id)

        def letter() -> int | None:
            with engine.connect() as conn:
                return conn.execute(text("SELECT id FROM dead_letters WHERE run_id = :r"), {"r": run_id}).scalar()

        letter_id = wait_for(letter, what="the refused operation to be dead-lettered")
        listing = ingest("dlq", "list", env=stack.env)
        assert listing.returncode == 0 and f"{letter_id:>6} dead" in listing.stdout
        assert "refused by a rule" in listing.stdout
        time.sleep(1)
        # The barrier holds: the run waits for the operation that was accepted but not applied.
        run = api.run(run_id)
        assert not run["is_completed"] and run["total_count"] == 2

        with engine.begin() as conn:
            conn.execute(text(f"DROP TRIGGER {function} ON automation_results"))
        # Replayed twice before a worker gets to it (twice by mistake, or two operators at once): both copies
        # reach the queue, and the operation's id makes the second change nothing.
        stack.workers[0].stop()
        queue = stack.env["INGEST_QUEUE"]
        for _ in range(2):
            replay = ingest("dlq", "replay", str(letter_id), env=stack.env)
            assert replay.returncode == 0, replay.stderr
            assert "1 operation(s) queued again" in replay.stdout
        replayed = [orjson.loads(orjson.loads(message)["body"])[0][0] for message in redis_client.lrange(queue, 0, -1)]
        assert len(replayed) == 2 and redis_client.exists(*replayed) == 2
        stack.start_worker()

        run = api.wait_completed(run_id)
        assert run["total_count"] == 4 and run["failure_count"] == 1 and run["status"] == 3
        assert stored_keys(engine, run_id) == {"good-1": 1, "good-2": 1, "good-3": 1, poison: 1}
        assert f"{letter_id:>6} applied" in ingest("dlq", "list", "--all", env=stack.env).stdout
        # A worker took both copies (a batch is deleted only once its transaction has committed) and the
        # second changed nothing.
        wait_for(lambda: redis_client.llen(queue) == 0 and redis_client.exists(*replayed) == 0,
                 what="both replays to be consumed")
        assert api.run(run_id)["total_count"] == 4
        assert stored_keys(engine, run_id)[poison] == 1
        # Once applied, a letter is not queued again at all.
        again = ingest("dlq", "replay", str(letter_id), env=stack.env)
        assert again.returncode == 0 and "0 operation(s) queued again" in again.stdout
        assert redis_client.llen(queue) == 0
    finally:
        api.close()
        with engine.begin() as conn:
            conn.execute(text(f"DROP TRIGGER IF EXISTS {function} ON automation_results"))
            conn.execute(text(f"DROP FUNCTION IF EXISTS {function}()"))


def test_idle_runs_complete_by_timeout_and_an_operator_can_force_one(
        private: tuple[PrivatePostgres, PrivateRedis], stack_factory: Callable[..., Stack]) -> None:
    pg, redis_server = private
    engine = create_engine(pg.url)
    stack = stack_factory(workers=0, database_url=pg.url, redis_url=redis_server.url)
    project_id, token = project_on(pg.url, redis_server.url)
    api = Api(stack.url, token)
    try:
        stack.start_worker(complete_idle_after_seconds=3, sweep_interval_seconds=1)
        idle = api.create_run(project_id)
        thread_id = api.create_thread(idle)
        api.append(thread_id, [{"key": "a", "name": "a", "status": "passed"}])

        run = api.wait_completed(idle, timeout=30)
        assert run["total_count"] == 1 and run["threads"][0]["is_completed"]
        with engine.connect() as conn:
            assert conn.execute(text("SELECT completed_reason FROM automation_runs WHERE id = :r"),
                                {"r": idle}).scalar_one() == "timeout"
        late = api.post(f"/automation/runs/threads/{thread_id}/append",
                        {"tests": [{"key": "b", "name": "b", "status": "passed"}]})
        assert late.status_code == 422

        forced = api.create_run(project_id)
        forced_thread = api.create_thread(forced)
        api.append(forced_thread, [{"key": "c", "name": "c", "status": "failed"}])
        wait_for(lambda: api.run(forced)["total_count"] == 1, what="the append to be applied")
        done = ingest("admin", "run", "complete", str(forced), env=stack.env)
        assert done.returncode == 0 and "completed" in done.stdout
        run = api.run(forced)
        assert run["is_completed"] and run["status"] == 3 and run["total_count"] == 1
        with engine.connect() as conn:
            assert conn.execute(text("SELECT completed_reason FROM automation_runs WHERE id = :r"),
                                {"r": forced}).scalar_one() == "forced"
        assert api.post(f"/automation/runs/threads/{forced_thread}/append",
                        {"tests": [{"key": "d", "name": "d", "status": "passed"}]}).status_code == 422
        assert ingest("admin", "run", "complete", str(forced), env=stack.env).returncode == 1
    finally:
        api.close()
        engine.dispose()
        stack.stop()


def test_logs_carry_no_token_and_no_payload(stack_factory: Callable[..., Stack], database_url: str) -> None:
    stack = stack_factory(log_level="DEBUG")
    project_id, token = project_on(database_url, TEST_REDIS_URL)
    marker = f"secret-payload-{uuid.uuid4().hex}"
    api = Api(stack.url, token)
    try:
        run_id = api.create_run(project_id, name=marker)
        thread_id = api.create_thread(run_id)
        api.append(thread_id, [{"key": marker, "name": marker, "status": "passed",
                                "fields": [{"type": 4, "name": "Output", "value": marker}]}])
        api.complete_run(run_id)
        api.wait_completed(run_id)
        assert api.post(f"/automation/runs/threads/{thread_id}/append", {"tests": [{"key": marker}]}).status_code \
            == 422
    finally:
        api.close()
    stack.stop()
    logs = "".join(p.read_text(errors="replace") for p in stack.logs.glob("*.log"))
    assert "ops.apply" in logs  # the worker did log at DEBUG
    assert token not in logs
    assert marker not in logs
