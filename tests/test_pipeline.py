"""Appends and completes through the real pipeline: shim, Redis, Celery worker processes, PostgreSQL."""

from conftest import Project, count_results
from sqlalchemy import Engine
from support import make_tests


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
