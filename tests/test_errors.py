"""Error statuses and bodies of compat.md section 6, and the completion rules that answer 422 or 204."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import Pipeline, new_project
from support import POSTS, Api, make_tests, service_env, start_api, unique

from ingest.admin import Admin
from schema.statuses import DEFAULT_STATUSES

HUGE = 99999999999999999999
BIGINT_MAX = 2**63 - 1


class Target:
    """A project with an open run and thread, reached through one token."""

    def __init__(self, admin: Admin, url: str) -> None:
        self.project = new_project(admin, url)
        self.api = self.project.api
        self.run_id = self.api.create_run(self.project.id)
        self.thread_id = self.api.create_thread(self.run_id)

    def path(self, template: str) -> str:
        return template.format(project=self.project.id, run=self.run_id, thread=self.thread_id)

    def endpoint(self, kind: str) -> str:
        return self.path(POSTS[kind])

    def post_raw(self, kind: str, content: bytes) -> httpx.Response:
        return self.api.http.post(self.endpoint(kind), content=content,
                                  headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def target(admin: Admin, pipeline: Pipeline) -> Iterator[Target]:
    target = Target(admin, pipeline.url)
    yield target
    target.api.close()


@pytest.fixture
def fresh(admin: Admin, pipeline: Pipeline) -> Iterator[Target]:
    target = Target(admin, pipeline.url)
    yield target
    target.api.close()


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert isinstance(body["message"], str) and body["message"]
    assert set(body) <= {"message", "errors"}
    return body


def assert_422(response: httpx.Response, field: str) -> list[str]:
    body = assert_error(response, 422)
    errors = body["errors"]
    assert field in errors, errors
    assert all(isinstance(m, str) and m for messages in errors.values() for m in messages)
    messages: list[str] = errors[field]
    return messages


# --- 400 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(POSTS))
@pytest.mark.parametrize("content", [b"{", b"not json", b'{"name": "a",}', b"\xff\xfe", b"{}{}"],
                         ids=["truncated", "text", "trailing-comma", "not-utf8", "two-objects"])
def test_invalid_json_is_400(target: Target, kind: str, content: bytes) -> None:
    body = assert_error(target.post_raw(kind, content), 400)
    assert "errors" not in body


@pytest.mark.parametrize("kind", list(POSTS))
@pytest.mark.parametrize("content", [b"[]", b'[{"name": "a"}]', b'"a string"', b"42", b"true", b"null"])
def test_json_that_is_not_an_object_is_400(target: Target, kind: str, content: bytes) -> None:
    assert_error(target.post_raw(kind, content), 400)


# --- 404 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("unknown", [999_999_999, BIGINT_MAX, BIGINT_MAX + 1, HUGE, 0])
@pytest.mark.parametrize(("method", "template"), [
    ("GET", "/projects/{id}/automation/runs"),
    ("POST", "/projects/{id}/automation/runs"),
    ("GET", "/automation/runs/{id}"),
    ("POST", "/automation/runs/{id}/append"),
    ("POST", "/automation/runs/{id}/threads"),
    ("POST", "/automation/runs/{id}/complete"),
    ("POST", "/automation/runs/threads/{id}/append"),
    ("POST", "/automation/runs/threads/{id}/complete"),
])
def test_unknown_ids_are_404(target: Target, method: str, template: str, unknown: int) -> None:
    body: dict[str, Any] = {"name": "Run", "source": "backend"} if template.endswith("/runs") else {}
    response = target.api.http.request(method, template.format(id=unknown), json=body)
    assert_error(response, 404)


@pytest.mark.parametrize("path", [
    "/", "/api", "/api/v1", "/api/v1/nope", "/api/v2/user", "/api/v1/automation/runs/abc",
    "/api/v1/automation/runs/-1", "/api/v1/automation/runs/threads/1", "/api/v1/projects/1/automation",
    "/api/v1/automation/runs/1/threads/1", "/api/v1/user/1",
])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_paths_are_404(target: Target, path: str, method: str) -> None:
    response = target.api.http.request(method, httpx.URL(target.api.http.base_url.join(path)), json={})
    assert_error(response, 404)


# --- 405 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "template", "allowed"), [
    ("DELETE", "/automation/runs/{run}", "GET"),
    ("PUT", "/automation/runs/{run}", "GET"),
    ("POST", "/automation/runs/{run}", "GET"),
    ("GET", "/automation/runs/{run}/append", "POST"),
    ("GET", "/automation/runs/{run}/complete", "POST"),
    ("DELETE", "/automation/runs/{run}/threads", "POST"),
    ("GET", "/automation/runs/threads/{thread}/append", "POST"),
    ("DELETE", "/automation/runs/threads/{thread}/complete", "POST"),
    ("POST", "/user", "GET"),
    ("DELETE", "/projects/{project}/automation/runs", "GET"),
])
def test_wrong_method_on_a_known_path_is_405(target: Target, method: str, template: str,
                                            allowed: str) -> None:
    response = target.api.http.request(method, target.path(template), json={})
    assert_error(response, 405)
    assert allowed in response.headers["allow"]


def test_405_allow_header_lists_every_method_of_the_path(target: Target) -> None:
    response = target.api.http.request("DELETE", target.path("/projects/{project}/automation/runs"))
    assert_error(response, 405)
    assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "POST"}


# --- 413 ------------------------------------------------------------------------------------------------

def test_body_over_the_limit_is_413(admin: Admin, logs: Path) -> None:
    service, url = start_api(service_env(max_body_bytes=1000), logs / "api.log")
    project = new_project(admin, url)
    try:
        api = project.api
        run_id = api.create_run(project.id)
        thread_id = api.create_thread(run_id)
        big = {"tests": [*make_tests(1), {"key": "k", "name": "x" * 2000, "status": "passed"}]}
        for path, body in [
            (f"/projects/{project.id}/automation/runs", {"name": "x" * 2000, "source": "backend"}),
            (f"/automation/runs/{run_id}/append",
             {"fields": [{"type": 2, "name": "f", "value": "x" * 2000}]}),
            (f"/automation/runs/{run_id}/threads", {"name": "x" * 2000}),
            (f"/automation/runs/threads/{thread_id}/append", big),
        ]:
            assert_error(api.post(path, body), 413)

        chunked = api.http.post(f"/automation/runs/threads/{thread_id}/append",
                                content=iter([b'{"tests": [', b" " * 1000, b" " * 1000, b"]}"]),
                                headers={"Content-Type": "application/json"})
        assert "content-length" not in chunked.request.headers
        assert_error(chunked, 413)

        api.append(thread_id, make_tests(1))
        # No worker runs here: the run reads as its create left it.
        assert api.run(run_id)["id"] == run_id
    finally:
        project.api.close()
        service.stop()


# --- other refusals and defaults ------------------------------------------------------------------------

def test_compressed_body_is_415(target: Target) -> None:
    response = target.api.http.post(target.endpoint("thread append"), content=b"\x1f\x8b\x08\x00",
                                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert_error(response, 415)


def test_complete_without_a_body_is_204(fresh: Target) -> None:
    api = fresh.api
    assert api.http.post(fresh.endpoint("thread complete")).status_code == 204
    assert api.http.post(fresh.endpoint("run complete")).status_code == 204
    run = api.wait_completed(fresh.run_id)
    assert run["threads"][0]["is_completed"] is True


# --- 422: the schema ------------------------------------------------------------------------------------

RUN = {"name": "Run", "source": "backend"}
TEST = {"key": "k1", "name": "Test 1", "status": "passed"}


def one_test(**changes: Any) -> dict[str, Any]:
    return {"tests": [TEST | changes]}


SCHEMA_VIOLATIONS: list[tuple[str, Any, str]] = [
    ("create run", {"source": "backend"}, "name"),
    ("create run", {"name": "Run"}, "source"),
    ("create run", RUN | {"name": ""}, "name"),
    ("create run", RUN | {"source": "my source"}, "source"),
    ("create run", RUN | {"source": "api_tests"}, "source"),
    ("create run", RUN | {"tags": ["bad tag"]}, "tags.0"),
    ("create run", RUN | {"tags": ["ok", "b@d"]}, "tags.1"),
    ("create run", RUN | {"tags": "nightly"}, "tags"),
    ("create run", RUN | {"name": 123}, "name"),
    ("create run", RUN | {"config_id": "1"}, "config_id"),
    ("create run", RUN | {"milestone_id": 0}, "milestone_id"),
    ("create run", RUN | {"bogus": 1}, "bogus"),
    ("create run", RUN | {"fields": [{"type": 6, "name": "f", "value": "v"}]}, "fields.0.type"),
    ("create run", RUN | {"fields": [{"type": "1", "name": "f", "value": "v"}]}, "fields.0.type"),
    ("create run", RUN | {"fields": [{"type": 1, "name": "f", "value": "x" * 751}]}, "fields.0.value"),
    ("create run", RUN | {"links": [{"name": "l"}]}, "links.0.url"),
    ("create run", RUN | {"artifacts": [{"name": "a", "url": "u", "size": -1}]}, "artifacts.0.size"),
    ("run append", {"links": [{"name": "l", "url": "u", "extra": True}]}, "links.0.extra"),
    ("create thread", {"elapsed_observed": -1}, "elapsed_observed"),
    ("create thread", {"elapsed_computed": 1.5}, "elapsed_computed"),
    ("create thread", {"links": []}, "links"),
    ("thread append", one_test(status="passd"), "tests.0.status"),
    ("thread append", one_test(status=2), "tests.0.status"),
    ("thread append", one_test(elapsed=-1), "tests.0.elapsed"),
    ("thread append", one_test(line="3"), "tests.0.line"),
    ("thread append", one_test(statuss="passed"), "tests.0.statuss"),
    ("thread append", {"tests": [TEST, {"name": "no key", "status": "passed"}]}, "tests.1.key"),
    ("thread append", {"tests": {"0": TEST}}, "tests"),
    ("thread append", {"tests": make_tests(1001)}, "tests"),
    ("thread append", {"elapsed_observed": -5}, "elapsed_observed"),
    ("thread append", one_test(fields=[{"type": 1, "name": "f", "value": "v", "meta": {"k": [1]}}]),
     "tests.0.fields.0.meta.k"),
    ("thread append", one_test(fields=[{"type": 1, "name": "f", "value": "v", "meta": {"k": "x" * 751}}]),
     "tests.0.fields.0.meta.k"),
    ("thread complete", {"elapsed_computed": -1}, "elapsed_computed"),
    ("thread complete", {"tests": []}, "tests"),
    ("run complete", {"measure_elapsed": "yes"}, "measure_elapsed"),
    ("run complete", {"measure": True}, "measure"),
]


@pytest.mark.parametrize(("kind", "body", "field"), SCHEMA_VIOLATIONS,
                         ids=[f"{kind}:{field}" for kind, _, field in SCHEMA_VIOLATIONS])
def test_schema_violations_are_422_under_their_field_path(target: Target, kind: str, body: Any,
                                                          field: str) -> None:
    response = target.api.post(target.endpoint(kind), body)
    assert_422(response, field)
    assert response.json()["message"] == "The given data was invalid."


def test_unknown_status_lists_the_accepted_strings(target: Target) -> None:
    [message] = assert_422(target.api.post(target.endpoint("thread append"), one_test(status="passd")),
                           "tests.0.status")
    for status in DEFAULT_STATUSES:
        for alias in status.aliases:
            assert alias in message


def test_every_problem_is_reported(target: Target) -> None:
    body = {"name": "", "source": "a b", "tags": ["?"], "bogus": 1}
    response = target.api.post(target.endpoint("create run"), body)
    assert set(assert_error(response, 422)["errors"]) == {"name", "source", "tags.0", "bogus"}


def test_errors_name_field_paths_not_schema_internals(target: Target) -> None:
    meta = {"k": [1], "fine": 1}
    body = one_test(fields=[{"type": 1, "name": "f", "value": "v", "meta": meta}])
    errors = assert_error(target.api.post(target.endpoint("thread append"), body), 422)["errors"]
    assert list(errors) == ["tests.0.fields.0.meta.k"]


def test_status_strings_are_case_insensitive(fresh: Target) -> None:
    fresh.api.append(fresh.thread_id, [TEST | {"key": "a", "status": "PASSED"},
                                       TEST | {"key": "b", "status": "Fail"}])
    fresh.api.complete_run(fresh.run_id)
    run = fresh.api.wait_completed(fresh.run_id)
    assert (run["status1_count"], run["status2_count"]) == (1, 1)


def test_refused_appends_are_not_applied(fresh: Target) -> None:
    api = fresh.api
    for body in (one_test(status="passd"), {"tests": [TEST, TEST | {"elapsed": -1}]},
                 {"tests": make_tests(1001)}):
        assert api.post(fresh.endpoint("thread append"), body).status_code == 422
    assert api.post(fresh.endpoint("run append"), {"fields": [{"type": 9, "name": "f", "value": "v"}]}
                    ).status_code == 422
    api.append(fresh.thread_id, make_tests(2))
    api.complete_run(fresh.run_id)
    run = api.wait_completed(fresh.run_id)
    assert run["total_count"] == 2 and run["fields"] == []


# --- 422 and 204: completed runs and threads ------------------------------------------------------------

def test_thread_refuses_appends_once_its_complete_is_accepted(fresh: Target) -> None:
    api = fresh.api
    api.append(fresh.thread_id, make_tests(2))
    api.complete_thread(fresh.thread_id)
    # No wait: the complete has been accepted, whether or not a worker has applied it yet.
    messages = assert_422(api.post(fresh.endpoint("thread append"), {"tests": make_tests(1, prefix="late")}),
                          "thread")
    assert "completed" in messages[0]
    api.complete_thread(fresh.thread_id)

    other = api.create_thread(fresh.run_id)
    api.append(other, make_tests(1, prefix="other"))
    api.complete_run(fresh.run_id)
    run = api.wait_completed(fresh.run_id)
    assert run["total_count"] == 3


def test_completed_run_refuses_threads_and_appends(fresh: Target) -> None:
    api = fresh.api
    api.complete_run(fresh.run_id)
    # Refused as soon as the complete is accepted...
    assert_422(api.post(fresh.endpoint("create thread"), {}), "run")
    api.wait_completed(fresh.run_id)
    # ...and after it has been applied.
    assert_422(api.post(fresh.endpoint("create thread"), {}), "run")
    assert_422(api.post(fresh.endpoint("run append"), {"fields": [{"type": 1, "name": "f", "value": "v"}]}),
               "run")
    # The run's complete completed its open thread too.
    assert_error(api.post(fresh.endpoint("thread append"), {"tests": make_tests(1)}), 422)
    run = api.run(fresh.run_id)
    assert run["thread_count"] == 1 and run["total_count"] == 0 and run["fields"] == []
    assert run["threads"][0]["is_completed"] is True


def test_completing_twice_is_204_and_changes_nothing(fresh: Target) -> None:
    api = fresh.api
    api.append(fresh.thread_id, make_tests(1))
    api.complete_thread(fresh.thread_id, elapsed_observed=1000)
    api.complete_thread(fresh.thread_id, elapsed_observed=9_000_000)
    api.complete_run(fresh.run_id, measure_elapsed=False)
    api.complete_run(fresh.run_id, measure_elapsed=True)
    first = api.wait_completed(fresh.run_id)
    assert first["elapsed"] == 1000

    api.complete_run(fresh.run_id)
    api.complete_thread(fresh.thread_id, elapsed_observed=5)
    assert api.run(fresh.run_id) == first


# --- 429 ------------------------------------------------------------------------------------------------

def test_appends_and_thread_creates_are_shed_over_the_high_water_mark_but_completes_are_not(
        admin: Admin, logs: Path, redis_client: "redis.Redis[bytes]") -> None:
    queue = unique("q")
    service, url = start_api(service_env(queue_high_water=5, queue=queue), logs / "api.log")
    project = new_project(admin, url)
    try:
        api = project.api
        run_id = api.create_run(project.id)
        thread_id = api.create_thread(run_id)
        for i in range(3):
            api.append(thread_id, make_tests(1, prefix=f"a{i}-"))
        assert redis_client.llen(queue) == 5  # the two creates' messages, and the three appends'

        shed = api.post(f"/automation/runs/threads/{thread_id}/append", {"tests": make_tests(1)})
        assert_error(shed, 429)
        assert int(shed.headers["retry-after"]) > 0
        run_append = api.post(f"/automation/runs/{run_id}/append", {"fields": []})
        assert_error(run_append, 429)
        assert int(run_append.headers["retry-after"]) > 0
        assert redis_client.llen(queue) == 5

        # A new thread would only add appends to the backlog: shed too. Completes let the backlog drain.
        assert_error(api.post(f"/automation/runs/{run_id}/threads", {}), 429)
        api.complete_thread(thread_id)
        api.complete_run(run_id)
        assert redis_client.llen(queue) == 7
    finally:
        project.api.close()
        service.stop()
        redis_client.delete(queue)


# --- 503 ------------------------------------------------------------------------------------------------

def test_database_down_is_503(target: Target, logs: Path) -> None:
    service, url = start_api(service_env(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nope"),
                             logs / "api.log")
    api = Api(url, target.project.token)
    try:
        for response in (
            api.post(f"/projects/{target.project.id}/automation/runs", RUN),
            api.get(f"/projects/{target.project.id}/automation/runs"),
            api.get(f"/automation/runs/{target.run_id}"),
            api.get("/user"),
        ):
            assert_error(response, 503)
            assert int(response.headers["retry-after"]) > 0
    finally:
        api.close()
        service.stop()


def test_queue_down_is_503(target: Target, logs: Path) -> None:
    service, url = start_api(service_env(redis_url="redis://127.0.0.1:1/0"), logs / "api.log")
    api = Api(url, target.project.token)
    try:
        for response in (
            api.post(f"/automation/runs/threads/{target.thread_id}/append", {"tests": make_tests(1)}),
            api.post(f"/automation/runs/{target.run_id}/complete", {}),
            api.post(f"/projects/{target.project.id}/automation/runs", RUN),
        ):
            assert_error(response, 503)
            assert int(response.headers["retry-after"]) > 0
    finally:
        api.close()
        service.stop()


def test_refused_requests_left_the_shared_run_untouched(target: Target) -> None:
    """Last in the module: every 400, 404, 405 and 422 above aimed at this run and thread."""
    target.api.complete_run(target.run_id)
    run = target.api.wait_completed(target.run_id)
    assert run["total_count"] == 0 and run["thread_count"] == 1
    assert run["fields"] == [] and run["links"] == [] and run["artifacts"] == []
    assert target.api.get(f"/projects/{target.project.id}/automation/runs").json()["total"] == 1
