"""What operators watch: /metrics, /healthz, /readyz, `ingest status`, and request ids in the logs."""

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from conftest import Pipeline, Project, new_project
from sqlalchemy import create_engine, text
from support import (
    ROOT,
    PrivatePostgres,
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
from schema.db import upgrade
from schema.status import WORKER_INFO_KEY, WORKERS_KEY

SHIM_METRICS = {
    "ingest_queue_messages", "ingest_queue_depth", "ingest_queue_oldest_waiting_seconds",
    "ingest_queue_oldest_reserved_seconds", "ingest_appends_accepted_total", "ingest_results_accepted_total",
    "ingest_operations_applied_total", "ingest_results_applied_total", "ingest_dead_letters", "ingest_runs_open",
    "ingest_runs_stuck", "ingest_workers_alive", "ingest_http_requests_total",
    "ingest_http_request_duration_seconds",
}
WORKER_METRICS = {
    "ingest_worker_batches_applied_total", "ingest_worker_operations_applied_total",
    "ingest_worker_results_applied_total", "ingest_worker_apply_duration_seconds", "ingest_worker_retries_total",
    "ingest_worker_dead_letters_total",
}


def scrape(url: str) -> dict[str, float]:
    """Samples by name and labels, e.g. {'ingest_queue_messages{state="waiting"}': 3.0}."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def families(samples: dict[str, float]) -> set[str]:
    names = {re.sub(r"\{.*", "", name) for name in samples}
    return {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in names} | names


def status(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "ingest.cli", "status", "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    reading: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])
    return reading


@pytest.fixture
def idle_queue(admin: Admin, logs: Path) -> Iterator[tuple[dict[str, str], str, Project]]:
    """A shim whose queue has no worker yet."""
    env = service_env(queue=unique("metrics"), log_level="INFO")
    api, url = start_api(env, logs / "api.log")
    project = new_project(admin, url)
    yield env, url, project
    project.api.close()
    api.stop()


def test_depth_and_age_grow_while_no_worker_runs_then_drain(
        idle_queue: tuple[dict[str, str], str, Project], logs: Path) -> None:
    env, url, project = idle_queue
    api = project.api
    held = status(env)["queued_bytes"]
    run_id = api.create_run(project.id)
    thread_id = api.create_thread(run_id)
    before = scrape(url)
    for i in range(5):
        api.append(thread_id, make_tests(10, prefix=f"{i}-"))  # one at a time: five messages

    first = scrape(url)
    assert first['ingest_queue_messages{state="waiting"}'] == 7  # and the run's and thread's creates
    assert first["ingest_queue_depth"] >= 7
    assert first["ingest_appends_accepted_total"] - before["ingest_appends_accepted_total"] == 5
    assert first["ingest_results_accepted_total"] - before["ingest_results_accepted_total"] == 50
    time.sleep(1.5)
    second = scrape(url)
    assert second["ingest_queue_oldest_waiting_seconds"] > first["ingest_queue_oldest_waiting_seconds"] >= 0
    assert second["ingest_queue_oldest_waiting_seconds"] >= 1.5
    reading = status(env)
    assert reading["waiting"] == 7 and reading["depth"] >= 7 and reading["oldest_waiting_seconds"] >= 1.5
    assert reading["queued_bytes"] > held

    worker = start_worker(env, logs / "worker.log")
    try:
        wait_for(lambda: scrape(url)['ingest_queue_messages{state="waiting"}'] == 0, what="the queue to drain")
        wait_for(lambda: scrape(url)["ingest_results_applied_total"]
                 - before["ingest_results_applied_total"] >= 50, what="the results to be counted")
        drained = scrape(url)
        assert drained["ingest_queue_oldest_waiting_seconds"] == 0
        assert drained["ingest_workers_alive"] >= 1
        reading = status(env)
        assert reading["waiting"] == 0 and reading["workers_alive"] >= 1
        assert reading["queued_bytes"] == held  # applied batches are deleted and discounted
        assert reading["results_applied"] >= drained["ingest_results_applied_total"]
        assert api.run(run_id)["total_count"] == 50
    finally:
        worker.stop()


def worker_metrics_url(worker: Service) -> str:
    port = worker.args[worker.args.index("--metrics-port") + 1]
    return f"http://127.0.0.1:{port}"


def test_every_metric_is_exported_and_the_probes_answer(pipeline: Pipeline, project: Project) -> None:
    run_id = project.api.create_run(project.id)
    project.api.append(project.api.create_thread(run_id), make_tests(3))
    project.api.complete_run(run_id)
    project.api.wait_completed(run_id)

    assert families(scrape(pipeline.url)) >= SHIM_METRICS
    worker_url = worker_metrics_url(pipeline.worker)
    assert families(scrape(worker_url)) >= WORKER_METRICS
    applied = scrape(worker_url)
    assert applied["ingest_worker_results_applied_total"] >= 3
    assert applied['ingest_worker_operations_applied_total{kind="thread.append"}'] >= 1

    assert httpx.get(f"{pipeline.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{pipeline.url}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "redis": "ok"}
    assert httpx.get(f"{worker_url}/healthz").status_code == 200


def test_readyz_fails_and_metrics_still_answer_without_a_database(logs: Path) -> None:
    service, url = start_api(service_env(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nope"),
                             logs / "api.log")
    try:
        ready = httpx.get(f"{url}/readyz", timeout=15)
        assert ready.status_code == 503 and int(ready.headers["retry-after"]) > 0
        assert ready.json()["checks"]["redis"] == "ok" and ready.json()["checks"]["database"] != "ok"
        assert httpx.get(f"{url}/healthz").status_code == 200
        samples = scrape(url)
        assert "ingest_queue_depth" in samples and "ingest_dead_letters" not in samples
    finally:
        service.stop()


def test_a_request_id_follows_the_request_into_the_worker(
        idle_queue: tuple[dict[str, str], str, Project], logs: Path) -> None:
    env, _, project = idle_queue
    api = project.api
    run_id = api.create_run(project.id)
    thread_id = api.create_thread(run_id)
    request_id = f"trace-{uuid.uuid4().hex}"
    response = api.post(f"/automation/runs/threads/{thread_id}/append", {"tests": make_tests(2)},
                        headers={"X-Request-ID": request_id})
    assert response.status_code == 204 and response.headers["x-request-id"] == request_id
    assert len(api.get(f"/automation/runs/{run_id}").headers["x-request-id"]) == 16  # made up when not given
    refused = api.post(f"/automation/runs/threads/{thread_id}/append", {"tests": [{"key": "x"}]})
    assert refused.status_code == 422

    worker = start_worker(env | {"INGEST_LOG_FORMAT": "json"}, logs / "worker.log")
    try:
        def applied_line() -> dict[str, Any] | None:
            for line in worker.output().splitlines():
                if line.startswith("{") and request_id in line:
                    entry: dict[str, Any] = orjson.loads(line)
                    return entry
            return None

        entry = wait_for(applied_line, what="the worker to log the request id")
        assert entry["level"] == "info" and request_id in entry["request_ids"]
        assert entry["message"].startswith("applied")
    finally:
        worker.stop()
    # The shim logged the refusal, as JSON, with its own request id and no body.
    api_log = (logs / "api.log").read_text()
    refusals = [orjson.loads(line) for line in api_log.splitlines() if '"status":422' in line]
    assert refusals and refusals[0]["route"] == "thread_append" and len(refusals[0]["request_id"]) == 16


def listening_address(port: int) -> str:
    """The address a local TCP port listens on, from /proc/net/tcp (hex, as the kernel writes it)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        address, _, hex_port = local.partition(":")
        if int(hex_port, 16) == port and state == "0A":
            return ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
    raise AssertionError(f"nothing listens on port {port}")


def test_a_scrape_reads_the_workers_without_scanning_a_large_keyspace(tmp_path: Path, logs: Path) -> None:
    """200,000 keys that are not the workers' (cached tokens, runs, batches...): a scrape reads the live workers
    from their registry, never scanning, and counts them right; workers that stopped beating are left out, and
    forgotten by the next heartbeat."""
    server = PrivateRedis(tmp_path)
    client: redis.Redis[bytes] = redis.Redis.from_url(server.url)
    try:
        for start in range(0, 200_000, 10_000):
            client.mset({f"unrelated:{i}": b"x" for i in range(start, start + 10_000)})
        seconds, _ = client.time()
        client.zadd(WORKERS_KEY, {"gone:1": seconds - 3600})  # a worker that died an hour ago
        client.hset(WORKER_INFO_KEY, "gone:1", orjson.dumps({"host": "gone", "pid": 1}))
        env = service_env(redis_url=server.url, queue=unique("metrics"))
        api, url = start_api(env, logs / "api.log")
        workers = [start_worker(env, logs / f"worker{i}.log", concurrency=1) for i in range(2)]
        try:
            wait_for(lambda: scrape(url)["ingest_workers_alive"] == 2, what="both workers to be counted")
            before = client.info("commandstats")
            with httpx.Client(base_url=url) as http:
                started = time.perf_counter()
                for _ in range(20):
                    assert "\ningest_workers_alive 2.0\n" in http.get("/metrics").text
                per_scrape = (time.perf_counter() - started) / 20
            after = client.info("commandstats")
            used = {name.removeprefix("cmdstat_") for name, stats in after.items()
                    if stats["calls"] > before.get(name, {"calls": 0})["calls"]}
            print(f"\n{client.dbsize():,} keys: {per_scrape * 1000:.1f} ms a scrape; commands: {sorted(used)}")
            assert "zrange" in used and not used & {"scan", "keys"}
            assert {w["pid"] for w in status(env)["workers"]} == {w.proc.pid for w in workers}
            assert client.zscore(WORKERS_KEY, "gone:1") is None and not client.hexists(WORKER_INFO_KEY, "gone:1")
            port = int(workers[0].args[workers[0].args.index("--metrics-port") + 1])
            assert listening_address(port) == "127.0.0.1"  # started with --metrics-host 127.0.0.1
        finally:
            api.stop()
            for worker in workers:
                worker.stop()
    finally:
        client.close()
        server.stop()


def test_a_flood_of_scrapes_asks_the_database_once_a_second(tmp_path: Path, logs: Path) -> None:
    """/metrics needs no token: 1,000 scrapes, four at a time, cost PostgreSQL one query a second at most."""
    pg, server = PrivatePostgres("shared_preload_libraries=pg_stat_statements"), PrivateRedis(tmp_path)
    engine = create_engine(pg.url, isolation_level="AUTOCOMMIT")
    try:
        upgrade(pg.url)
        api, url = start_api(service_env(database_url=pg.url, redis_url=server.url), logs / "api.log")
        try:
            with engine.connect() as conn:
                conn.execute(text("CREATE EXTENSION pg_stat_statements"))
                conn.execute(text("SELECT pg_stat_statements_reset()"))

                def scrapes(n: int) -> list[int]:
                    with httpx.Client(base_url=url, timeout=30) as http:
                        return [http.get("/metrics").status_code for _ in range(n)]

                started = time.monotonic()
                with ThreadPoolExecutor(4) as pool:
                    codes = [code for chunk in pool.map(scrapes, [250] * 4) for code in chunk]
                seconds = time.monotonic() - started
                queries = conn.execute(text(
                    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '%dead_letters%'"
                )).scalar_one()
            print(f"\n1,000 scrapes in {seconds:.1f} s: {queries} queries for the database's figures")
            assert codes == [200] * 1000
            assert 1 <= queries <= seconds + 1
        finally:
            api.stop()
    finally:
        engine.dispose()
        pg.close()
        server.stop()
