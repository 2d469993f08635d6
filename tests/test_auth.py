"""Bearer tokens on every endpoint (compat.md section 6): 401 without a valid token, 403 beyond its grants."""

import hashlib
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import Pipeline, Project, new_project
from sqlalchemy import Engine, create_engine, text
from support import (
    TEST_REDIS_URL,
    Api,
    HoldingProxy,
    PrivatePostgres,
    PrivateRedis,
    make_tests,
    service_env,
    start_api,
    unique,
    wait_for,
)

from api_shim.lru import Lru
from ingest.admin import Admin
from schema.db import upgrade
from schema.settings import Settings
from schema.tokens import token_hash


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


# --- revokes and grants racing lookups ---------------------------------------------------------------------------

WINDOW = 3.0  # INGEST_AUTH_CACHE_SECONDS of the shims below
# Polling the shims every 0.1 s, and answering, takes a little past the moment a change takes effect.
SLACK = 0.5


def redis_url_through(proxy: HoldingProxy, url: str) -> str:
    return urllib.parse.urlsplit(url)._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


def writes_entry_of(token: str) -> Callable[[bytes], bool]:
    """Matches what a shim sends to write what it read about `token` (a SET or a script), not its reads."""
    hashed = token_hash(token).encode()
    return lambda data: hashed in data and any(command in data for command in (
        b"\r\nSET\r\n", b"\r\nEVALSHA\r\n", b"\r\nEVAL\r\n"))


def race(proxy: HoldingProxy, token: str, request: Callable[[], httpx.Response],
         change: Callable[[], None]) -> tuple[float, httpx.Response]:
    """`request` makes a shim whose Redis is behind `proxy` look `token` up in PostgreSQL; its write of what it read
    is held back while `change` (a revoke, a grant) is made, then let through: the interleaving that left a stale
    entry in Redis for a day. Returns when the shim's read had been made, at the latest, and the response."""
    proxy.hold(writes_entry_of(token))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(request)
        assert proxy.held.wait(15), "the shim never wrote what it read about the token"
        read_by = time.monotonic()
        change()
        proxy.release()
        return read_by, pending.result(timeout=30)


def first_moment(url: str, path: str, token: str, code: int) -> float:
    """When `GET path` with `token` was first answered `code`; it must stay so."""
    headers = {"Authorization": f"Bearer {token}"}

    def answered() -> float | None:
        return time.monotonic() if httpx.get(f"{url}{path}", headers=headers, timeout=10).status_code == code else None

    moment = wait_for(answered, timeout=WINDOW + 10, interval=0.1, what=f"{path} to answer {code}")
    assert [httpx.get(f"{url}{path}", headers=headers, timeout=10).status_code for _ in range(3)] == [code] * 3
    return moment


@dataclass
class Racing:
    proxy: HoldingProxy
    proxied: str  # a shim whose Redis traffic goes through the proxy
    other: str  # another shim, straight to Redis


@pytest.fixture(scope="module")
def racing(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Racing]:
    logs = tmp_path_factory.mktemp("racing")
    proxy = HoldingProxy(urllib.parse.urlsplit(TEST_REDIS_URL).port or 6379)
    proxied, proxied_url = start_api(service_env(auth_cache_seconds=WINDOW,
                                                 redis_url=redis_url_through(proxy, TEST_REDIS_URL)), logs / "a.log")
    other, other_url = start_api(service_env(auth_cache_seconds=WINDOW), logs / "b.log")
    yield Racing(proxy, proxied_url, other_url)
    proxied.stop()
    other.stop()
    proxy.close()


def test_a_revoke_racing_a_lookup_takes_effect_within_the_cache_time(admin: Admin, racing: Racing) -> None:
    token = admin.create_token(unique("user"), [admin.create_project(unique("project"))])
    read_by, response = race(racing.proxy, token, lambda: httpx.get(
        f"{racing.proxied}/api/v1/user", headers={"Authorization": f"Bearer {token}"}, timeout=30),
        lambda: admin.revoke_token(token))
    assert response.status_code == 200, response.text  # what the shim read, before the revoke
    for url in (racing.proxied, racing.other):
        assert first_moment(url, "/api/v1/user", token, 401) <= read_by + WINDOW + SLACK, url


def test_a_grant_racing_a_lookup_takes_effect_within_the_cache_time(admin: Admin, racing: Racing) -> None:
    user = unique("user")
    first, second = admin.create_project(unique("project")), admin.create_project(unique("project"))
    token = admin.create_token(user, [first])
    path = f"/api/v1/projects/{second}/automation/runs"
    read_by, response = race(racing.proxy, token, lambda: httpx.get(
        f"{racing.proxied}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30),
        lambda: admin.create_token(user, [second]))  # grants the user the second project
    assert response.status_code == 403, response.text
    for url in (racing.proxied, racing.other):
        assert first_moment(url, path, token, 200) <= read_by + WINDOW + SLACK, url


@pytest.fixture
def private(tmp_path: Path) -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    """A migrated PostgreSQL that counts the statements it runs (pg_stat_statements), and a Redis, of the test's
    own: to stop at will, and to measure."""
    pg, redis_server = PrivatePostgres("shared_preload_libraries=pg_stat_statements"), PrivateRedis(tmp_path)
    upgrade(pg.url)
    yield pg, redis_server
    pg.close()
    redis_server.stop()


def test_through_a_database_outage_valid_tokens_work_and_revoked_ones_stay_refused(
        private: tuple[PrivatePostgres, PrivateRedis], logs: Path) -> None:
    pg, redis_server = private
    proxy = HoldingProxy(redis_server.port)
    service, url = start_api(service_env(database_url=pg.url, redis_url=redis_url_through(proxy, redis_server.url),
                                         auth_cache_seconds=1, auth_negative_cache_seconds=1), logs / "api.log")
    admin = Admin(Settings(database_url=pg.url, redis_url=redis_server.url))
    try:
        project_id = admin.create_project(unique("project"))
        kept, revoked, unused = (admin.create_token(unique("user"), [project_id]) for _ in range(3))
        api = Api(url, kept)
        thread_id = api.create_thread(api.create_run(project_id))
        # A revoke landing between a lookup's read and its write: the write must not bring the token back as the
        # last valid view the shims fall back on.
        race(proxy, revoked, lambda: httpx.get(f"{url}/api/v1/projects/{project_id}/automation/runs",
                                               headers={"Authorization": f"Bearer {revoked}"}, timeout=30),
             lambda: admin.revoke_token(revoked))
        pg.stop()
        time.sleep(1.5)  # past every cached view, positive or negative
        append = f"/automation/runs/threads/{thread_id}/append"
        until = time.monotonic() + 3  # several cache times
        while time.monotonic() < until:
            api.append(thread_id, make_tests(1))
        refused, never_seen = Api(url, revoked), Api(url, unused)
        assert refused.post(append, {"tests": make_tests(1)}).status_code == 401
        # No shim has a view of it: it cannot be checked without the database.
        response = never_seen.post(append, {"tests": make_tests(1)})
        assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
        refused.close()
        never_seen.close()
        pg.start()
        api.close()
    finally:
        admin.close()
        service.stop()
        proxy.close()


# --- unauthenticated floods --------------------------------------------------------------------------------------

FLOOD = 10_000


def test_a_flood_of_unknown_tokens_costs_the_database_little(
        private: tuple[PrivatePostgres, PrivateRedis], logs: Path) -> None:
    """10,000 requests, each with a token of its own that no one issued, from one address: PostgreSQL is asked
    about no more than 100 of them, while a client with a valid token from the same address is served."""
    pg, redis_server = private
    # A short cache time: the valid token's view expires, and is read again, several times during the flood.
    service, url = start_api(service_env(database_url=pg.url, redis_url=redis_server.url, auth_cache_seconds=2),
                             logs / "api.log")
    admin = Admin(Settings(database_url=pg.url, redis_url=redis_server.url))
    engine = create_engine(pg.url, isolation_level="AUTOCOMMIT")
    try:
        project_id = admin.create_project(unique("project"))
        api = Api(url, admin.create_token(unique("user"), [project_id]))
        thread_id = api.create_thread(api.create_run(project_id))
        append = f"/automation/runs/threads/{thread_id}/append"
        with engine.connect() as conn:
            conn.execute(text("CREATE EXTENSION pg_stat_statements"))
            conn.execute(text("SELECT pg_stat_statements_reset()"))

            done = threading.Event()
            served: list[int] = []

            def well_behaved() -> None:
                while not done.is_set():
                    served.append(api.post(append, {"tests": make_tests(5)}).status_code)

            def flood(requests: int) -> Counter[int]:
                codes: Counter[int] = Counter()
                with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as client:
                    for _ in range(requests):
                        response = client.post(append, json={"tests": []},
                                               headers={"Authorization": f"Bearer {unique('ingest_guess')}"})
                        codes[response.status_code] += 1
                        if response.status_code == 429 and codes[429] == 1:
                            assert int(response.headers["retry-after"]) >= 1
                            assert response.headers["content-type"] == "application/json"
                            assert isinstance(response.json()["message"], str)
                return codes

            client = threading.Thread(target=well_behaved)
            client.start()
            started = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                codes = sum(pool.map(flood, [FLOOD // 4] * 4), Counter[int]())
            seconds = time.monotonic() - started
            done.set()
            client.join()
            statements = conn.execute(text(
                "SELECT query, calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                "WHERE d.datname = current_database() AND query NOT LIKE '%pg_stat_statements%' "
                "ORDER BY calls DESC")).all()
        lookups = sum(calls for query, calls in statements if "api_tokens" in query)
        transactions = sum(calls for query, calls in statements if query == "BEGIN")
        queries = sum(calls for query, calls in statements if query not in ("BEGIN", "COMMIT", "ROLLBACK"))
        print(f"\n{FLOOD} unknown tokens in {seconds:.1f} s: {dict(codes)}; {lookups} token lookups, {queries} "
              f"queries in {transactions} transactions in all; valid client: {Counter(served)}")
        assert codes.total() == FLOOD and set(codes) == {401, 429}
        assert lookups <= 100, statements
        # Besides, the shim may refresh its status table once during the flood.
        assert queries <= lookups + 1 and transactions <= lookups + 1, statements
        assert len(served) >= 10 and set(served) == {204}
        api.close()
    finally:
        engine.dispose()
        admin.close()
        service.stop()


def test_the_token_cache_forgets_the_least_recently_used_one_at_a_time() -> None:
    cache: Lru[str, int] = Lru(3)
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert cache.get("a") == 0  # now the most recently used
    cache.put("d", 3)
    assert "b" not in cache and len(cache) == 3 and [cache.get(k) for k in "acd"] == [0, 2, 3]
    cache.put("e", 4)
    assert "a" not in cache and len(cache) == 3  # "c" and "d" were used after it
