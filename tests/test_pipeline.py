"""Appends and completes through the real pipeline: shim, Redis, Celery worker processes, PostgreSQL."""

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from conftest import Project, count_results, new_project
from sqlalchemy import Engine
from support import Service, make_tests, service_env, start_api, start_worker, unique, wait_for

from ingest.admin import Admin
from schema.messages import accounted, batch_key
from schema.protocol import celery_message
from schema.status import STATS_KEY


def test_parallel_flow_counts_every_result(project: Project, engine: Engine) -> None:
    api = project.api
    run_id = api.create_run(project.id, name="parallel")
    statuses = ["passed", "failed", "skipped", "blocked", "retest", "untested"]
    threads = [api.create_thread(run_id) for _ in range(3)]
    for i, thread_id in enumerate(threads):
        for j in range(4):
            api.append(thread_id, make_tests(24, statuses, prefix=f"t{i}-{j}-"))
        api.complete_thread(thread_id)
    api.complete_run(run_id)

    run = api.wait_completed(run_id)
    assert run["total_count"] == 288
    assert run["status1_count"] == run["success_count"] == 48
    assert run["status2_count"] == run["failure_count"] == 48
    assert run["status5_count"] == 48  # skipped
    assert run["status4_count"] == 48  # blocked
    assert run["status3_count"] == 48  # retest
    assert run["untested_count"] == 48
    assert run["completed_count"] == 192  # passed, failed, blocked, skipped are final
    assert run["status"] == 3
    assert run["thread_count"] == 3 and run["thread_completed_count"] == 3
    assert all(t["is_completed"] and t["total_count"] == 96 for t in run["threads"])
    assert count_results(engine, run_id) == {1: 48, 2: 48, 3: 48, 4: 48, 5: 48, 6: 48}


@pytest.fixture
def paused(admin: Admin, redis_client: "redis.Redis[bytes]", logs: Path) -> Iterator["Paused"]:
    """A shim whose queue no worker consumes until the test starts one."""
    env = service_env(queue=unique("paused"))
    api, url = start_api(env, logs / "api.log")
    paused = Paused(env, url, redis_client, logs, new_project(admin, url))
    yield paused
    paused.project.api.close()
    api.stop()
    if paused.worker is not None:
        paused.worker.stop()


class Paused:
    def __init__(self, env: dict[str, str], url: str, redis_client: "redis.Redis[bytes]", logs: Path,
                 project: Project) -> None:
        self.env = env
        self.url = url
        self.queue = env["INGEST_QUEUE"]
        self.redis = redis_client
        self.logs = logs
        self.project = project
        self.worker: Service | None = None

    def messages(self) -> list[bytes]:
        """Waiting messages, oldest first (the shim pushes on the left, workers pop on the right)."""
        return list(reversed(self.redis.lrange(self.queue, 0, -1)))

    def requeue(self, messages: list[bytes]) -> None:
        """Replace the queue's contents so that workers take `messages` in this order."""
        pipe = self.redis.pipeline()
        pipe.delete(self.queue)
        for message in messages:
            pipe.lpush(self.queue, message)
        pipe.execute()

    def start_worker(self) -> None:
        self.worker = start_worker(self.env, self.logs / "worker.log")


def test_completes_that_overtake_their_appends_wait_for_them(paused: Paused, engine: Engine) -> None:
    api = paused.project.api
    run_id = api.create_run(paused.project.id)
    threads = [api.create_thread(run_id) for _ in range(2)]
    for thread_id in threads:
        for j in range(3):
            api.append(thread_id, make_tests(10, ["passed", "failed"], prefix=f"{thread_id}-{j}-"))
    api.complete_thread(threads[0])
    api.complete_run(run_id)

    waiting = paused.messages()
    assert len(waiting) == 11  # the run's create, two threads' creates, six appends, two completes
    # Celery keeps no order: deliver the run's complete first, then the thread's, then the appends, then the
    # threads' creates and last the run's own: each waits for what it needs, and all converge.
    paused.requeue(list(reversed(waiting)))
    paused.start_worker()

    run = api.wait_completed(run_id)
    assert run["total_count"] == 60 and run["success_count"] == 30 and run["failure_count"] == 30
    assert run["thread_completed_count"] == 2
    assert all(t["total_count"] == 30 and t["is_completed"] for t in run["threads"])
    assert count_results(engine, run_id) == {2: 30, 3: 30}


def test_every_message_delivered_twice_changes_nothing(paused: Paused, engine: Engine) -> None:
    api = paused.project.api
    run_id = api.create_run(paused.project.id)
    thread_id = api.create_thread(run_id)
    for j in range(5):
        api.append(thread_id, make_tests(20, ["passed", "skipped"], prefix=f"{j}-"))
    api.complete_thread(thread_id)
    api.complete_run(run_id)

    waiting = paused.messages()
    # Each message twice as it is, and each batch once more under a new key, as if the shim had enqueued
    # the same operations twice: only the claimed operation ids can tell those apart.
    copies = []
    keys = []
    for message in waiting:
        key = orjson.loads(orjson.loads(message)["body"])[0][0]
        copy_key = batch_key(unique("copy"))
        payload = paused.redis.get(key) or b""
        paused.redis.set(copy_key, payload)
        paused.redis.hincrby(STATS_KEY, "queued_bytes", accounted(len(payload)))  # as the shim counts it
        copies.append(celery_message(paused.queue, copy_key))
        keys += [key, copy_key]
    paused.requeue(waiting + copies + waiting)
    paused.start_worker()

    api.wait_completed(run_id)
    wait_for(lambda: paused.redis.llen(paused.queue) == 0, what="the duplicates to drain")
    wait_for(lambda: not paused.redis.exists(*keys), what="the batches to be deleted")
    run = api.run(run_id)
    assert run["total_count"] == 100 and run["status1_count"] == 50 and run["status5_count"] == 50
    assert count_results(engine, run_id) == {2: 50, 6: 50}


def test_submit_flow_without_thread_complete_completes_the_thread(project: Project) -> None:
    # `testmo automation:run:submit` never completes its thread: completing the run must.
    api = project.api
    run_id = api.create_run(project.id)
    thread_id = api.create_thread(run_id, elapsed_computed=5_000)
    api.append(thread_id, make_tests(3))
    api.complete_run(run_id, measure_elapsed=False)
    run = api.wait_completed(run_id)
    assert run["threads"][0]["is_completed"] and run["threads"][0]["status"] == 2
    assert run["status"] == 2 and run["elapsed"] == 5_000 and run["total_count"] == 3
