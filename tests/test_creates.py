"""Creates through the queue: answered with ids drawn ahead from PostgreSQL's sequences, their rows written
by workers; what a client reads after a create; idempotency keys on every POST. Real shims, workers, Redis
and PostgreSQL."""

import signal
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import Pipeline, Project, count_results, new_project
from sqlalchemy import Engine, text
from support import Api, make_tests, service_env, start_api, start_worker, wait_for
from test_pipeline import Paused, paused  # noqa: F401  (the fixture)

from ingest.admin import Admin


def test_a_create_answers_at_once_and_a_get_says_what_it_said_before_any_worker(paused: Paused) -> None:  # noqa: F811
    api = paused.project.api
    run_id = api.create_run(paused.project.id, name="not written yet", tags=["x"],
                            fields=[{"type": 1, "name": "f", "value": "v"}])
    thread_id = api.create_thread(run_id)
    api.append(thread_id, make_tests(3))  # accepted right after its thread's create

    # No worker has written anything: the run reads as its create left it, never 404.
    response = api.get(f"/automation/runs/{run_id}", params={"expands": "automation_sources"})
    assert response.status_code == 200, response.text
    run = response.json()["result"]
    assert (run["id"], run["name"], run["tags"], run["is_completed"], run["total_count"]) == (
        run_id, "not written yet", ["x"], False, 0)
    assert run["fields"] == [{"type": 1, "name": "f", "value": "v"}]

    paused.start_worker()
    api.complete_run(run_id)
    done = api.wait_completed(run_id)
    assert done["name"] == "not written yet" and done["total_count"] == 3 and done["thread_count"] == 1
    assert done["source_id"] == run["source_id"]  # the new source got the id the shim drew for it


def test_reads_right_after_creates_find_them(project: Project) -> None:
    api = project.api
    run_id = api.create_run(project.id)
    threads = [api.create_thread(run_id, name=f"job {i}") for i in range(3)]
    run = api.run(run_id)
    assert [t["id"] for t in run["threads"]] == threads and run["thread_count"] == 3
    assert run_id in [r["id"] for r in api.get(f"/projects/{project.id}/automation/runs").json()["result"]]


def test_ids_are_never_handed_out_twice_not_after_a_shim_is_killed(admin: Admin, pipeline: Pipeline,
                                                                     logs: Path, engine: Engine) -> None:
    first, url = start_api(service_env(), logs / "first.log")
    project = new_project(admin, url)
    runs = [project.api.create_run(project.id) for _ in range(3)]
    threads = [project.api.create_thread(runs[0]) for _ in range(3)]
    first.stop(signal.SIGKILL)  # with most of its blocks of ids unused
    project.api.close()

    second, url = start_api(service_env(), logs / "second.log")
    try:
        api = Api(url, project.token)
        runs += [api.create_run(project.id) for _ in range(3)]
        threads += [api.create_thread(runs[-1]) for _ in range(3)]
        # And the suite's own shim, drawing from the same sequences.
        suite = Api(pipeline.url, project.token)
        runs.append(suite.create_run(project.id))
        suite.close()
        assert len(set(runs)) == len(runs) and len(set(threads)) == len(threads)
        for run_id in runs:
            api.complete_run(run_id)
        for run_id in runs:
            api.wait_completed(run_id)
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM automation_run_threads WHERE id = ANY(:ids)"),
                                  {"ids": threads}).scalar_one()
        assert stored == len(threads)
        api.close()
    finally:
        second.stop()


# --- idempotency keys ----------------------------------------------------------------------------------------

def post(api: Api, path: str, body: object, key: str) -> httpx.Response:
    return api.http.post(path, content=orjson.dumps(body),
                         headers={"Content-Type": "application/json", "Idempotency-Key": key})


def test_a_create_retried_with_its_key_gets_the_same_id_and_makes_nothing_more(project: Project,
                                                                               engine: Engine) -> None:
    api = project.api
    body = {"name": "once", "source": "idem"}
    first = post(api, f"/projects/{project.id}/automation/runs", body, "run-1")
    again = post(api, f"/projects/{project.id}/automation/runs", body, "run-1")
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    run_id = first.json()["id"]
    assert again.json() == {"id": run_id}
    other = post(api, f"/projects/{project.id}/automation/runs", body | {"name": "other"}, "run-1")
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["errors"], other.text

    thread = post(api, f"/automation/runs/{run_id}/threads", {"name": "t"}, "thread-1")
    thread_again = post(api, f"/automation/runs/{run_id}/threads", {"name": "t"}, "thread-1")
    assert thread.status_code == thread_again.status_code == 201
    assert thread.json() == thread_again.json()
    thread_id = thread.json()["id"]

    tests = {"tests": make_tests(5)}
    for _ in range(3):
        response = post(api, f"/automation/runs/threads/{thread_id}/append", tests, "append-1")
        assert response.status_code == 204, response.text
    refused = post(api, f"/automation/runs/threads/{thread_id}/append", {"tests": make_tests(6)}, "append-1")
    assert refused.status_code == 422, refused.text
    for _ in range(2):
        assert post(api, f"/automation/runs/{run_id}/append", {"links": [{"name": "l", "url": "https://x"}]},
                    "run-append-1").status_code == 204
        assert post(api, f"/automation/runs/threads/{thread_id}/complete", {}, "complete-1").status_code == 204
        assert post(api, f"/automation/runs/{run_id}/complete", {}, "run-complete-1").status_code == 204

    run = api.wait_completed(run_id)
    assert run["total_count"] == 5 and run["thread_count"] == 1 and len(run["links"]) == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM automation_runs WHERE project_id = :p AND name = 'once'"),
                            {"p": project.id}).scalar_one() == 1
    assert count_results(engine, run_id) == {2: 5}


def test_two_tokens_keys_never_meet(admin: Admin, pipeline: Pipeline) -> None:
    project = new_project(admin, pipeline.url)
    other = Api(pipeline.url, admin.create_token("other-user", [project.id]))
    try:
        body = {"name": "same key", "source": "idem"}
        mine = post(project.api, f"/projects/{project.id}/automation/runs", body, "shared")
        theirs = post(other, f"/projects/{project.id}/automation/runs", body, "shared")
        assert mine.status_code == theirs.status_code == 201
        assert mine.json()["id"] != theirs.json()["id"]
    finally:
        other.close()
        project.api.close()


@pytest.mark.parametrize("key", ["", "x" * 256, "ü", "a\tb"])
def test_a_malformed_key_is_422(project: Project, key: str) -> None:
    response = project.api.http.post(f"/projects/{project.id}/automation/runs",
                                     json={"name": "r", "source": "s"},
                                     headers={"Idempotency-Key": key.encode("utf-8")})
    assert response.status_code == 422 and "Idempotency-Key" in response.json()["errors"], response.text


def test_workers_converge_whatever_order_they_take_creates_in(paused: Paused, engine: Engine) -> None:  # noqa: F811
    """A thread's create applied before its run's, appends before their thread's: the same rows as in order.
    (Two workers, messages delivered newest first.)"""
    api = paused.project.api
    run_id = api.create_run(paused.project.id)
    threads = [api.create_thread(run_id) for _ in range(4)]
    for thread_id in threads:
        api.append(thread_id, make_tests(5, ["passed", "failed"], prefix=f"{thread_id}-"))
        api.complete_thread(thread_id)
    api.complete_run(run_id)
    paused.requeue(list(reversed(paused.messages())))
    paused.start_worker()
    second = start_worker(paused.env, paused.logs / "second-worker.log")
    try:
        run = api.wait_completed(run_id, timeout=60)
    finally:
        second.stop()
    assert run["thread_count"] == 4 and run["total_count"] == 20 and run["failure_count"] == 8
    assert all(t["is_completed"] and t["total_count"] == 5 for t in run["threads"])
    assert count_results(engine, run_id) == {2: 12, 3: 8}
    wait_for(lambda: paused.redis.llen(paused.queue) == 0, what="the queue to drain")
