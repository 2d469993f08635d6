"""Bearer tokens on every endpoint (compat.md section 6): 401 without a valid token, 403 beyond its grants."""

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import Pipeline, Project, new_project
from sqlalchemy import Engine, text
from support import Api, make_tests, service_env, start_api, unique

from ingest.admin import Admin


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    body: dict[str, Any] | None = None

    def url(self, target: "Target") -> str:
        path = self.path.format(project=target.project.id, run=target.run_id, thread=target.thread_id)
        return f"/api/v1{path}"


ENDPOINTS = [
    Endpoint("GET", "/user"),
    Endpoint("GET", "/projects/{project}/automation/runs"),
    Endpoint("POST", "/projects/{project}/automation/runs", {"name": "Run", "source": "backend"}),
    Endpoint("GET", "/automation/runs/{run}"),
    Endpoint("POST", "/automation/runs/{run}/append", {"fields": [{"type": 1, "name": "f", "value": "v"}]}),
    Endpoint("POST", "/automation/runs/{run}/threads", {}),
    Endpoint("POST", "/automation/runs/threads/{thread}/append", {"tests": make_tests(1)}),
    Endpoint("POST", "/automation/runs/threads/{thread}/complete", {}),
    Endpoint("POST", "/automation/runs/{run}/complete", {"measure_elapsed": True}),
]
PROJECT_ENDPOINTS = [e for e in ENDPOINTS if e.path != "/user"]


def endpoint_id(endpoint: Endpoint) -> str:
    return f"{endpoint.method} {endpoint.path}"


@dataclass
class Target:
    project: Project
    run_id: int
    thread_id: int


def new_target(admin: Admin, url: str) -> Target:
    project = new_project(admin, url)
    run_id = project.api.create_run(project.id)
    return Target(project, run_id, project.api.create_thread(run_id))


@pytest.fixture(scope="module")
def target(admin: Admin, pipeline: Pipeline) -> Iterator[Target]:
    """An open run and thread. Requests refused by auth must leave them open and empty."""
    target = new_target(admin, pipeline.url)
    yield target
    target.project.api.close()


@pytest.fixture(scope="module")
def raw(pipeline: Pipeline) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pipeline.url, timeout=30) as client:
        yield client


def send(client: httpx.Client, endpoint: Endpoint, target: Target, headers: dict[str, str]) -> httpx.Response:
    return client.request(endpoint.method, endpoint.url(target), json=endpoint.body, headers=headers)


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    message = response.json()["message"]
    assert isinstance(message, str) and message


def assert_untouched(target: Target) -> None:
    """Nothing a refused request carried may have been accepted: complete the run and look."""
    api = target.project.api
    api.complete_run(target.run_id)
    run = api.wait_completed(target.run_id)
    assert run["total_count"] == 0
    assert run["fields"] == [] and run["updated_at"] is None
    assert run["thread_count"] == 1
    assert api.get(f"/projects/{target.project.id}/automation/runs").json()["total"] == 1


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=endpoint_id)
@pytest.mark.parametrize("authorization", [
    None, "", "Basic xyz", "Bearer", "Token abc", "bearer", "Bearer " + "x" * 300, "Bearer a b",
], ids=["none", "empty", "basic", "bearer-alone", "other-scheme", "lowercase-alone", "too-long", "two-words"])
def test_missing_or_malformed_header_is_401(raw: httpx.Client, target: Target, endpoint: Endpoint,
                                            authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    assert_401(send(raw, endpoint, target, headers))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=endpoint_id)
def test_unknown_token_is_401(raw: httpx.Client, target: Target, endpoint: Endpoint) -> None:
    assert_401(send(raw, endpoint, target, {"Authorization": f"Bearer {unique('ingest_unknown')}"}))


def test_scheme_is_case_insensitive(raw: httpx.Client, target: Target) -> None:
    response = raw.get("/api/v1/user", headers={"Authorization": f"bearer {target.project.token}"})
    assert response.status_code == 200


def test_revoked_token_that_was_never_used_is_401(admin: Admin, pipeline: Pipeline,
                                                  raw: httpx.Client) -> None:
    target = new_target(admin, pipeline.url)
    try:
        token = admin.create_token(unique("user"), [target.project.id])
        admin.revoke_token(token)
        for endpoint in ENDPOINTS:
            assert_401(send(raw, endpoint, target, {"Authorization": f"Bearer {token}"}))
    finally:
        target.project.api.close()


def test_revoked_token_stops_working_on_a_running_shim(admin: Admin, pipeline: Pipeline, logs: Path) -> None:
    target = new_target(admin, pipeline.url)
    service, url = start_api(service_env(auth_cache_seconds=0), logs / "api.log")
    try:
        token = admin.create_token(unique("user"), [target.project.id])
        with httpx.Client(base_url=url, timeout=30) as client:
            headers = {"Authorization": f"Bearer {token}"}
            assert client.get("/api/v1/user", headers=headers).status_code == 200
            assert client.get(f"/api/v1/automation/runs/{target.run_id}", headers=headers).status_code == 200
            admin.revoke_token(token)
            for endpoint in ENDPOINTS:
                assert_401(send(client, endpoint, target, headers))
            still = {"Authorization": f"Bearer {target.project.token}"}
            assert client.get(f"/api/v1/automation/runs/{target.run_id}", headers=still).status_code == 200
        assert_untouched(target)
    finally:
        service.stop()
        target.project.api.close()


@pytest.mark.parametrize("endpoint", PROJECT_ENDPOINTS, ids=endpoint_id)
def test_another_projects_objects_are_403(raw: httpx.Client, target: Target, other_project: Project,
                                          endpoint: Endpoint) -> None:
    response = send(raw, endpoint, target, {"Authorization": f"Bearer {other_project.token}"})
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["message"], str)


def test_a_token_reaches_every_project_it_was_granted(admin: Admin, pipeline: Pipeline, project: Project,
                                                      other_project: Project) -> None:
    api = Api(pipeline.url, admin.create_token(unique("user"), [project.id, other_project.id]))
    try:
        for p in (project, other_project):
            run_id = api.create_run(p.id)
            assert api.run(run_id)["project_id"] == p.id
    finally:
        api.close()


def test_tokens_are_stored_only_hashed(admin: Admin, engine: Engine, pipeline: Pipeline,
                                       redis_client: "redis.Redis[bytes]") -> None:
    token = admin.create_token(unique("user"), [])
    hashed = hashlib.sha256(token.encode()).hexdigest()
    with httpx.Client(base_url=pipeline.url, timeout=30) as client:
        assert client.get("/api/v1/user", headers={"Authorization": f"Bearer {token}"}).status_code == 200

    with engine.connect() as conn:
        leaked = conn.execute(text("SELECT count(*) FROM api_tokens t WHERE strpos(t::text, :raw) > 0"),
                              {"raw": token}).scalar_one()
        stored = conn.execute(text(
            "SELECT count(*) FROM api_tokens WHERE token_hash = :h AND revoked_at IS NULL"),
            {"h": hashed}).scalar_one()
    assert leaked == 0
    assert stored == 1
    for key in redis_client.scan_iter():
        assert token.encode() not in key
        if redis_client.type(key) == b"string":
            assert token.encode() not in (redis_client.get(key) or b"")


def test_refused_requests_left_the_shared_run_untouched(target: Target) -> None:
    """Last in the module: every 401 and 403 above aimed at this run and thread."""
    assert_untouched(target)
