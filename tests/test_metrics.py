"""What operators watch: /metrics, /healthz, /readyz, `ingest status`, and request ids in the logs."""

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import Pipeline, Project, new_project
from support import ROOT, Service, make_tests, service_env, start_api, start_worker, unique, wait_for

from ingest.admin import Admin

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
    run_id = api.create_run(project.id)
    thread_id = api.create_thread(run_id)
    before = scrape(url)
    held = status(env)["queued_bytes"]
    for i in range(5):
        api.append(thread_id, make_tests(10, prefix=f"{i}-"))  # one at a time: five messages

    first = scrape(url)
    assert first['ingest_queue_messages{state="waiting"}'] == 5
    assert first["ingest_queue_depth"] >= 5
    assert first["ingest_appends_accepted_total"] - before["ingest_appends_accepted_total"] == 5
    assert first["ingest_results_accepted_total"] - before["ingest_results_accepted_total"] == 50
    time.sleep(1.5)
    second = scrape(url)
    assert second["ingest_queue_oldest_waiting_seconds"] > first["ingest_queue_oldest_waiting_seconds"] >= 0
    assert second["ingest_queue_oldest_waiting_seconds"] >= 1.5
    reading = status(env)
    assert reading["waiting"] == 5 and reading["depth"] >= 5 and reading["oldest_waiting_seconds"] >= 1.5
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
