"""Automation cases (reads.md): completed runs folded into cases per (project, source, key), exactly once, with
counts, elapsed_average and flaky_percent as reads.md defines them; GET /projects/{id}/automation/cases with
every parameter and error. On the real shim, workers, PostgreSQL and Redis."""

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from conftest import Pipeline, Project
from sqlalchemy import Engine, text
from support import TEST_REDIS_URL, Api, service_env, start_api, start_worker, unique, wait_for

from ingest.admin import Admin
from schema.messages import FOLD_TASK
from worker.cases import fold_owed

ENVELOPE = {"page", "prev_page", "next_page", "last_page", "per_page", "total", "result", "expands"}
CASE_FIELDS = {"id", "project_id", "source_id", "key", "name", "folder", "status", "run_count", "result_count",
               "success_count", "failure_count", "elapsed_average", "flaky_percent", "last_run_id", "created_at",
               "updated_at"}
NEUTRAL, SUCCESS, FAILURE = 1, 2, 3


def result(key: str, status: str, elapsed: int | None = None, name: str | None = None) -> dict[str, Any]:
    return {"key": key, "name": name or NAMES[key], "folder": "suite/" + key, "status": status,
            **({"elapsed": elapsed} if elapsed is not None else {})}


NAMES = {"a": "Alpha login", "b": "Beta", "c": "Gamma rerun", "d": "Delta skipped", "e": "Epsilon"}

# Three runs of one source, in order. "a" passes, fails, passes; "c" is rerun in the first run (it passes and
# fails there); "d" is only ever skipped; "e" fails twice, then passes.
RUNS = [
    [result("a", "passed", 100), result("b", "passed", 10), result("c", "passed"), result("c", "failed"),
     result("d", "skipped"), result("e", "failed", 5)],
    [result("a", "failed", 200), result("b", "passed", 20), result("c", "passed"), result("d", "skipped"),
     result("e", "failed", 7)],
    [result("a", "passed", 300), result("b", "passed"), result("c", "passed"), result("d", "skipped"),
     result("e", "passed", 9)],
]
# Worked out by hand from reads.md: a run is flaky for a case when it both passed and failed in it, or when
# its outcome differs from the previous non-neutral run's; flaky_percent = 100 x flaky runs / runs considered.
EXPECTED = {
    # outcomes S F S: runs 2 and 3 differ from the one before -> 2 of 3
    "a": dict(status=SUCCESS, run_count=3, result_count=3, success_count=2, failure_count=1,
              elapsed_average=200, flaky_percent=66.7),
    "b": dict(status=SUCCESS, run_count=3, result_count=3, success_count=3, failure_count=0,
              elapsed_average=15, flaky_percent=0.0),
    # both (a failure) S S: run 1 passed and failed, run 2 differs from run 1's failure -> 2 of 3
    "c": dict(status=SUCCESS, run_count=3, result_count=4, success_count=3, failure_count=1,
              elapsed_average=None, flaky_percent=66.7),
    # neutral only: never compared, never flaky
    "d": dict(status=NEUTRAL, run_count=3, result_count=3, success_count=0, failure_count=0,
              elapsed_average=None, flaky_percent=0.0),
    # F F S: run 3 differs -> 1 of 3
    "e": dict(status=SUCCESS, run_count=3, result_count=3, success_count=1, failure_count=2,
              elapsed_average=7, flaky_percent=33.3),
}


def cases(api: Api, project_id: int, **params: Any) -> dict[str, Any]:
    response = api.get(f"/projects/{project_id}/automation/cases", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == ENVELOPE
    return body


def refused(api: Api, project_id: int, **params: Any) -> set[str]:
    response = api.get(f"/projects/{project_id}/automation/cases", params=params)
    assert response.status_code == 422, response.text
    return set(response.json()["errors"])


def submit(api: Api, project_id: int, tests: list[dict[str, Any]], source: str = "suite") -> int:
    """A run of `tests` in one thread, completed by its client."""
    run_id = api.create_run(project_id, source=source)
    thread_id = api.create_thread(run_id)
    api.append(thread_id, tests)
    api.complete_run(run_id)
    return run_id


def folded(engine: Engine, run_id: int) -> bool:
    """The run is complete and no fold is owed for it any more."""
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT r.is_completed AND NOT EXISTS (SELECT 1 FROM case_folds f WHERE f.run_id = r.id) "
            "FROM automation_runs r WHERE r.id = :r"), {"r": run_id}).scalar())


def by_key(api: Api, project_id: int, **params: Any) -> dict[tuple[int, str], dict[str, Any]]:
    return {(c["source_id"], c["key"]): c for c in cases(api, project_id, **params)["result"]}


@pytest.fixture
def planted(project: Project, engine: Engine) -> tuple[Project, list[int], int]:
    """The three runs of RUNS folded in order, then one run of another source holding "a" failed."""
    runs = []
    for tests in RUNS:
        runs.append(submit(project.api, project.id, tests))
        wait_for(lambda: folded(engine, runs[-1]) or None, what="the run folded")
    other = submit(project.api, project.id, [result("a", "failed", 50)], source="other")
    wait_for(lambda: folded(engine, other) or None, what="the other source's run folded")
    return project, runs, other


def test_cases_counted_and_flaky_as_worked_out_by_hand(planted: tuple[Project, list[int], int]) -> None:
    project, runs, other = planted
    api = project.api
    run = api.run(runs[0])
    found = by_key(api, project.id)
    assert len(found) == 6
    suite = {key: case for (source, key), case in found.items() if source == run["source_id"]}
    for key, expected in EXPECTED.items():
        case = suite[key]
        assert set(case) == CASE_FIELDS
        assert {name: case[name] for name in expected} == expected, key
        assert (case["project_id"], case["name"], case["folder"]) == (project.id, NAMES[key], "suite/" + key)
        assert case["last_run_id"] == runs[-1]
    # The same key in another source is another case.
    [(source, _)] = [k for k in found if k[0] != run["source_id"]]
    assert source == api.run(other)["source_id"]
    apart = found[(source, "a")]
    assert (apart["status"], apart["run_count"], apart["failure_count"], apart["flaky_percent"],
            apart["last_run_id"]) == (FAILURE, 1, 1, 0.0, other)
    assert apart["id"] != suite["a"]["id"]


def test_sorts_filters_and_pages(planted: tuple[Project, list[int], int]) -> None:
    project, runs, other = planted
    api = project.api
    suite_source, other_source = api.run(runs[0])["source_id"], api.run(other)["source_id"]

    def keys(**params: Any) -> list[tuple[int, str]]:
        return [(c["source_id"], c["key"]) for c in cases(api, project.id, **params)["result"]]

    # Default: when first seen, oldest first; the other source's case came last.
    assert keys()[-1] == (other_source, "a")
    flaky = cases(api, project.id, sort="automation_cases:flaky_percent", order="desc")["result"]
    assert [c["flaky_percent"] for c in flaky] == sorted((c["flaky_percent"] for c in flaky), reverse=True)
    assert {c["key"] for c in flaky[:2]} == {"a", "c"} and flaky[2]["key"] == "e"
    failures = cases(api, project.id, sort="automation_cases:failure_count", order="desc")["result"]
    assert failures[0]["key"] == "e"
    names = [c["name"] for c in cases(api, project.id, sort="automation_cases:name")["result"]]
    assert names == sorted(names)
    averages = [c["elapsed_average"] for c in
                cases(api, project.id, sort="automation_cases:elapsed_average", order="desc")["result"]]
    assert averages == [200, 50, 15, 7, None, None]  # none reported: last in either order

    assert set(keys(source_id=other_source)) == {(other_source, "a")}
    assert len(keys(source_id=f"{suite_source},{other_source}")) == 6
    assert keys(status=NEUTRAL) == [(suite_source, "d")]
    assert keys(status=FAILURE) == [(other_source, "a")]
    assert len(keys(status="1,2")) == 5
    # Totals, kept per source and status by the folds, and counted where a name or folder filters.
    assert [cases(api, project.id, **params)["total"] for params in (
        {}, {"status": "1,2"}, {"source_id": other_source}, {"source_id": suite_source, "status": FAILURE},
        {"name": "alpha"}, {"folder": "suite/c"})] == [6, 5, 1, 0, 2, 1]
    assert set(keys(name="ALPHA")) == {(suite_source, "a"), (other_source, "a")}  # any case, a substring
    assert keys(name="%") == []  # a wildcard is a character like any other
    assert keys(folder="suite/c") == [(suite_source, "c")]
    assert keys(folder="suite") == []  # exact

    first = cases(api, project.id, per_page=15)
    assert (first["page"], first["next_page"], first["last_page"], first["total"]) == (1, None, 1, 6)
    assert cases(api, project.id, page=2, per_page=15)["result"] == []
    body = cases(api, project.id, expands="automation_sources,statuses")
    assert {s["id"]: s["name"] for s in body["expands"]["automation_sources"]} == {suite_source: "suite",
                                                                                    other_source: "other"}
    assert {s["id"] for s in body["expands"]["statuses"]} >= {1, 2, 3}


def test_every_refusal(project: Project, other_project: Project) -> None:
    api = project.api
    assert refused(api, project.id, per_page=10) == {"per_page"}
    assert refused(api, project.id, per_page=1000) == {"per_page"}
    assert refused(api, project.id, page="x") == {"page"}
    assert refused(api, project.id, sort="automation_cases:key") == {"sort"}
    assert refused(api, project.id, order="sideways") == {"order"}
    assert refused(api, project.id, status=4) == {"status"}
    assert refused(api, project.id, source_id="one") == {"source_id"}
    assert refused(api, project.id, expands="users") == {"expands"}
    assert refused(api, project.id, per_page=1, sort="x", status=9) == {"per_page", "sort", "status"}
    assert api.get("/projects/999999999999/automation/cases").status_code == 404
    assert other_project.api.get(f"/projects/{project.id}/automation/cases").status_code == 403
    base = str(api.http.base_url).rstrip("/")
    assert httpx.get(f"{base}/projects/{project.id}/automation/cases").status_code == 401


def test_a_fold_delivered_again_changes_nothing(planted: tuple[Project, list[int], int], engine: Engine,
                                                pipeline: Pipeline, redis_client: Any) -> None:
    project, runs, _ = planted
    before = by_key(project.api, project.id)
    # Through the real workers: the fold task sent again for every run already folded...
    sender = Celery("test", broker=TEST_REDIS_URL)
    for run_id in runs:
        sender.send_task(FOLD_TASK, args=[run_id], queue=pipeline.queue, serializer="json")
    wait_for(lambda: redis_client.llen(pipeline.queue) == 0 or None, what="the folds taken")
    # ...and in this process, where the answer says so: none of these runs is owed a fold any more.
    with engine.begin() as conn:
        assert not set(fold_owed(conn)) & set(runs)
    assert by_key(project.api, project.id) == before
    assert all(case["run_count"] in (1, 3) for case in before.values())


@pytest.fixture
def stack(admin: Admin, tmp_path: Path) -> Iterator[tuple[dict[str, str], str, list[Any]]]:
    """A shim and workers on a queue of their own, for a test that kills them."""
    env = service_env(queue=unique("cases"), visibility_timeout=3)
    api, url = start_api(env, tmp_path / "api.log")
    workers = [start_worker(env, tmp_path / "worker0.log")]
    yield env, url, workers
    api.stop()
    for worker in workers:
        worker.stop(signal.SIGKILL)


def test_a_worker_killed_while_folding_loses_nothing_and_folds_once(
        stack: tuple[dict[str, str], str, list[Any]], admin: Admin, engine: Engine, tmp_path: Path) -> None:
    env, url, workers = stack
    project_id = admin.create_project(unique("project"))
    api = Api(url, admin.create_token(unique("user"), [project_id]))
    first = submit(api, project_id, RUNS[0])
    wait_for(lambda: folded(engine, first) or None, what="the first run folded")
    bystander_run = api.create_run(project_id, source="bystander")
    bystander_thread = api.create_thread(bystander_run)

    with engine.connect() as blocker:
        # Hold the suite's case rows: the next fold waits for them, midway through its transaction.
        blocker.execute(text("SELECT id FROM automation_cases WHERE project_id = :p FOR UPDATE"), {"p": project_id})
        holder = blocker.execute(text("SELECT pg_backend_pid()")).scalar()
        second = submit(api, project_id, RUNS[1])

        def fold_waiting() -> bool:
            with engine.connect() as conn:
                return bool(conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE :holder = ANY(pg_blocking_pids(pid))"),
                    {"holder": holder}).scalar())

        wait_for(lambda: fold_waiting() or None, what="the fold to wait on the case rows")
        # Ingestion does not wait on the fold: another run's appends are applied meanwhile.
        api.append(bystander_thread, [result("z", "passed", name="bystander")] * 50)
        wait_for(lambda: api.run(bystander_run)["total_count"] == 50 or None, what="the bystander applied")
        os.killpg(workers[0].proc.pid, signal.SIGKILL)
        workers[0].proc.wait()
        blocker.rollback()

    # Its transaction never committed: the fold is still owed, and a new worker takes the message over.
    assert not folded(engine, second)
    workers.append(start_worker(env, tmp_path / "worker1.log"))
    wait_for(lambda: folded(engine, second) or None, timeout=60, what="the fold redone by the new worker")
    found = by_key(api, project_id)
    suite = {key: case for (_, key), case in found.items() if key in NAMES}
    assert {key: (case["run_count"], case["result_count"]) for key, case in suite.items()} == {
        "a": (2, 2), "b": (2, 2), "c": (2, 3), "d": (2, 2), "e": (2, 2)}
    assert suite["a"]["flaky_percent"] == 50.0  # S then F: the second run differs
    api.close()
