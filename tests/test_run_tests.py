"""GET /api/v1/automation/runs/{run_id}/tests (reads.md): a run's results, as soon as they are applied, with
every parameter and error of the endpoint; on the real shim and workers."""

from typing import Any

import httpx
import pytest
from conftest import Project
from support import Api, wait_for

from schema.responses import RunTest

ENVELOPE = {"page", "prev_page", "next_page", "last_page", "per_page", "total", "result", "expands"}
TEST_FIELDS = {"id", "project_id", "run_id", "thread_id", "case_id", "repository_case_id", "status_id", "key",
               "name", "folder", "elapsed", "file", "line", "assertions", "fields", "artifacts", "created_at"}
STATUS_IDS = {"passed": 2, "failed": 3, "skipped": 6}
FIELD = {"type": 1, "name": "Output", "value": "stack trace", "meta": {"exit": 1}, "is_highlight": True}
ARTIFACT = {"name": "log.txt", "url": "https://example.com/log.txt", "mime_type": "text/plain", "size": 12}


def page_of_results(api: Api, run_id: int, **params: Any) -> dict[str, Any]:
    response = api.get(f"/automation/runs/{run_id}/tests", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == ENVELOPE
    # Written compactly, as every other body (no test here sends a value holding '" : ').
    assert b'" : ' not in response.content
    return body


def refused(api: Api, run_id: int, **params: Any) -> dict[str, list[str]]:
    response = api.get(f"/automation/runs/{run_id}/tests", params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["message"].startswith("The given data was invalid.")
    errors: dict[str, list[str]] = body["errors"]
    return errors


def suite(n: int, thread: int) -> list[dict[str, Any]]:
    """`n` tests of varied status, name, elapsed (some none) and folder."""
    statuses = ["passed", "failed", "passed", "skipped", "passed"]
    return [{"key": f"k{thread}-{i}", "name": f"test {(i * 7) % n:04d} of {thread}", "folder": f"f{i % 3}",
             "status": statuses[i % len(statuses)], **({"elapsed": (i * 37) % 1000} if i % 4 else {})}
            for i in range(n)]


@pytest.fixture
def filled(project: Project) -> tuple[Project, int, list[int], list[dict[str, Any]]]:
    """A run of two threads and 300 results, all applied, not completed."""
    api = project.api
    run_id = api.create_run(project.id)
    threads = [api.create_thread(run_id), api.create_thread(run_id)]
    sent: list[dict[str, Any]] = []
    for n, thread_id in enumerate(threads):
        for part in range(3):
            tests = suite(50, n * 10 + part)
            api.append(thread_id, tests)
            sent.extend(t | {"thread_id": thread_id} for t in tests)
    wait_for(lambda: page_of_results(api, run_id)["total"] == 300 or None, what="the results applied")
    return project, run_id, threads, sent


def every_result(api: Api, run_id: int, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    page = 1
    while True:
        body = page_of_results(api, run_id, per_page=100, page=page, **params)
        out.extend(body["result"])
        if body["next_page"] is None:
            return out
        page = body["next_page"]


def test_results_are_listed_as_applied_with_every_field(project: Project) -> None:
    api = project.api
    run_id = api.create_run(project.id)
    thread_id = api.create_thread(run_id)
    assert page_of_results(api, run_id)["result"] == []  # nothing applied yet, or nothing sent: an empty page
    full = {"key": "full", "name": "with everything", "status": "failed", "folder": "a/b", "elapsed": 1234,
            "file": "tests/test_a.py", "line": 42, "assertions": 3, "fields": [FIELD], "artifacts": [ARTIFACT]}
    bare = {"key": "bare", "name": "with nothing", "status": "passed"}
    api.append(thread_id, [full, bare])
    body = wait_for(lambda: ((b := page_of_results(api, run_id))["total"] == 2 and b) or None, what="the results")
    assert (body["page"], body["prev_page"], body["next_page"], body["last_page"], body["per_page"]) == (1, None,
                                                                                                       None, 1, 100)
    first, second = body["result"]  # newest first: the default order is id desc
    assert set(first) == set(second) == TEST_FIELDS
    assert list(first) == list(RunTest.__struct_fields__)  # in the documented order
    assert first["id"] > second["id"]
    for result, sent in ((second, full), (first, bare)):
        assert result["project_id"] == project.id and result["run_id"] == run_id
        assert result["thread_id"] == thread_id
        assert result["case_id"] is None and result["repository_case_id"] is None  # the run is not complete
        assert result["status_id"] == STATUS_IDS[sent["status"]]
        for name in ("key", "name", "folder", "elapsed", "file", "line", "assertions"):
            assert result[name] == sent.get(name), name
        assert result["fields"] == sent.get("fields", [])
        assert result["artifacts"] == sent.get("artifacts", [])
        assert result["created_at"].endswith("Z")


def test_the_listing_stays_after_completion_with_case_ids(project: Project) -> None:
    api = project.api
    run_id = api.create_run(project.id)
    thread_id = api.create_thread(run_id)
    api.append(thread_id, suite(20, 1))
    api.complete_run(run_id)
    api.wait_completed(run_id)

    def folded() -> list[dict[str, Any]] | None:
        result: list[dict[str, Any]] = page_of_results(api, run_id)["result"]
        return result if all(r["case_id"] for r in result) else None

    result = wait_for(folded, what="the run folded into its cases")
    assert len(result) == 20
    cases = api.get(f"/projects/{project.id}/automation/cases").json()["result"]
    assert {r["key"]: r["case_id"] for r in result} == {c["key"]: c["id"] for c in cases}


@pytest.mark.parametrize("sort", ["id", "name", "status", "elapsed", "created_at"])
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_every_sort_in_both_orders(filled: tuple[Project, int, list[int], list[dict[str, Any]]], sort: str,
                                   order: str) -> None:
    project, run_id, _, _ = filled
    result = every_result(project.api, run_id, sort=f"automation_run_tests:{sort}", order=order)
    assert len(result) == 300 and len({r["id"] for r in result}) == 300
    column = {"status": "status_id"}.get(sort, sort)

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        value = r[column]
        if sort == "elapsed":  # results without elapsed go last in either order
            return (value is None, value if value is None else (value if order == "asc" else -value),
                    r["id"] if order == "asc" else -r["id"])
        return (value, r["id"])

    if sort == "elapsed":
        assert result == sorted(result, key=key)
    else:
        assert result == sorted(result, key=key, reverse=order == "desc")


def test_default_order_is_newest_first(filled: tuple[Project, int, list[int], list[dict[str, Any]]]) -> None:
    project, run_id, _, _ = filled
    ids = [r["id"] for r in page_of_results(project.api, run_id)["result"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == 100


def test_filters_by_thread_and_status_with_their_totals(
        filled: tuple[Project, int, list[int], list[dict[str, Any]]]) -> None:
    project, run_id, threads, sent = filled
    api = project.api
    body = page_of_results(api, run_id, thread_id=threads[1], per_page=1000)
    assert body["total"] == 150 and {r["thread_id"] for r in body["result"]} == {threads[1]}
    assert sorted(r["key"] for r in body["result"]) == sorted(t["key"] for t in sent if t["thread_id"] == threads[1])

    failed = [t for t in sent if t["status"] == "failed"]
    body = page_of_results(api, run_id, status_id="3", per_page=1000)
    assert body["total"] == len(failed) == len(body["result"])
    assert {r["status_id"] for r in body["result"]} == {3}

    body = page_of_results(api, run_id, status_id="3,6", thread_id=threads[0], per_page=1000)
    expected = [t for t in sent if t["status"] in ("failed", "skipped") and t["thread_id"] == threads[0]]
    assert body["total"] == len(expected) == len(body["result"])
    assert sorted(r["key"] for r in body["result"]) == sorted(t["key"] for t in expected)


def test_pages_of_any_size_in_the_range(filled: tuple[Project, int, list[int], list[dict[str, Any]]]) -> None:
    project, run_id, _, _ = filled
    api = project.api
    first = page_of_results(api, run_id, per_page=137)
    assert (first["page"], first["next_page"], first["last_page"], first["total"]) == (1, 2, 3, 300)
    last = page_of_results(api, run_id, per_page=137, page=3)
    assert (last["prev_page"], last["next_page"], len(last["result"])) == (2, None, 300 - 274)
    assert page_of_results(api, run_id, per_page=1000)["last_page"] == 1
    beyond = page_of_results(api, run_id, page=9)
    assert beyond["result"] == [] and beyond["total"] == 300


def test_expands(filled: tuple[Project, int, list[int], list[dict[str, Any]]]) -> None:
    project, run_id, _, _ = filled
    body = page_of_results(project.api, run_id, expands="statuses,users")
    assert {s["id"] for s in body["expands"]["statuses"]} >= {1, 2, 3, 4, 5, 6}
    me = project.api.get("/user").json()
    assert body["expands"]["users"] == [{"id": me["id"], "name": me["name"]}]


def test_every_refusal(filled: tuple[Project, int, list[int], list[dict[str, Any]]],
                       other_project: Project) -> None:
    project, run_id, threads, _ = filled
    api = project.api
    assert set(refused(api, run_id, per_page=99)) == {"per_page"}
    assert set(refused(api, run_id, per_page=1001)) == {"per_page"}
    assert set(refused(api, run_id, per_page="ten")) == {"per_page"}
    assert set(refused(api, run_id, page=0)) == {"page"}
    assert set(refused(api, run_id, sort="automation_runs:created_at")) == {"sort"}
    assert set(refused(api, run_id, order="up")) == {"order"}
    assert set(refused(api, run_id, status_id="2,x")) == {"status_id"}
    assert set(refused(api, run_id, status_id="99")) == {"status_id"}
    assert set(refused(api, run_id, expands="cases")) == {"expands"}
    assert set(refused(api, run_id, thread_id="abc")) == {"thread_id"}
    other_run = other_project.api.create_run(other_project.id)
    foreign_thread = other_project.api.create_thread(other_run)
    wait_for(lambda: other_project.api.run(other_run)["thread_count"] == 1 or None)
    assert set(refused(api, run_id, thread_id=foreign_thread)) == {"thread_id"}  # a thread of another run
    everything = refused(api, run_id, per_page=5, sort="x", order="x", status_id="x", expands="x")
    assert set(everything) == {"per_page", "sort", "order", "status_id", "expands"}

    assert api.get("/automation/runs/999999999999/tests").status_code == 404
    assert other_project.api.get(f"/automation/runs/{run_id}/tests").status_code == 403
    base = str(api.http.base_url).rstrip("/")
    assert httpx.get(f"{base}/automation/runs/{run_id}/tests").status_code == 401
    assert httpx.get(f"{base}/automation/runs/{run_id}/tests",
                     headers={"Authorization": "Bearer nope"}).status_code == 401
    assert threads  # the fixture's threads exist: the refusals above are about the parameters alone
