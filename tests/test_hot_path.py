"""The direct path for thread appends (api_shim/hot.py): the server's protocol answers plain thread appends itself,
so they must read exactly as the routes answer them, and leave the other requests of a connection in their
place. The routes' answers come from the app served in this process (tests/inprocess.py), which has no protocol
and so no direct path; the direct path's from the real shim of the pipeline."""

import asyncio
import json
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from conftest import Pipeline, Project
from inprocess import InProcess
from support import TEST_REDIS_URL, make_tests, read_responses

from api_shim.hot import HotPath, proxy_for
from schema.settings import Settings


@pytest.fixture(scope="module")
def routes(database_url: str, pipeline: Pipeline) -> Iterator[InProcess]:
    app = InProcess(Settings(database_url=database_url, redis_url=TEST_REDIS_URL, queue=pipeline.queue))
    yield app
    app.shutdown()


def body(**append: Any) -> bytes:
    return json.dumps(append).encode()


REFUSED = {
    "not JSON": (b'{"tests": [', {}),
    "not an object": (b"[1, 2]", {}),
    "a wrong type, with its path": (body(tests=[{"key": 1, "name": "n", "status": "passed"}]), {}),
    "an unknown field": (body(tests=[], bogus=True), {}),
    "an unknown status": (body(tests=make_tests(3, ["passed", "sort of"])), {}),
    "a string too long": (body(tests=[{"key": "k" * 256, "name": "n", "status": "passed"}]), {}),
    "no token": (body(tests=make_tests(1)), {"Authorization": ""}),
    "an unknown token": (body(tests=make_tests(1)), {"Authorization": "Bearer not-a-token"}),
    # The client behind a proxy is found by uvicorn's own middleware, as for every other request.
    "an unknown token, behind a proxy": (body(tests=make_tests(1)), {"Authorization": "Bearer not-a-token",
                                                                   "X-Forwarded-For": "203.0.113.9"}),
    "a bad idempotency key": (body(tests=make_tests(1)), {"Idempotency-Key": "k" * 300}),
}


def answers(project: Project, routes: InProcess, path: str, content: bytes,
            headers: dict[str, str]) -> tuple[httpx.Response, httpx.Response]:
    sent = {"Content-Type": "application/json", **headers}
    direct = project.api.http.post(path, content=content, headers=sent)
    with httpx.Client(base_url="http://shim/api/v1", transport=routes,
                      headers={"Authorization": f"Bearer {project.token}"}) as client:
        general = client.post(path, content=content, headers=sent)
    return direct, general


def assert_same(direct: httpx.Response, general: httpx.Response) -> None:
    assert direct.status_code == general.status_code, (direct.text, general.text)
    assert direct.headers.get("content-type") == general.headers.get("content-type")
    assert direct.headers.get("retry-after") == general.headers.get("retry-after")
    assert (direct.json() if direct.content else None) == (general.json() if general.content else None)
    assert len(direct.headers["x-request-id"]) == 16


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_append_reads_as_the_routes_refuse_it(project: Project, routes: InProcess, case: str) -> None:
    thread_id = project.api.create_thread(project.api.create_run(project.id))
    content, headers = REFUSED[case]
    direct, general = answers(project, routes, f"/automation/runs/threads/{thread_id}/append", content, headers)
    assert direct.status_code in (400, 401, 422), direct.text
    assert_same(direct, general)


def test_appends_to_threads_missing_or_completed_read_as_the_routes(project: Project, routes: InProcess) -> None:
    run_id = project.api.create_run(project.id)
    done = project.api.create_thread(run_id)
    assert project.api.post(f"/automation/runs/threads/{done}/complete", {}).status_code == 204
    for thread_id, status in ((done, 422), (10**15, 404), (10**19, 404)):
        direct, general = answers(project, routes, f"/automation/runs/threads/{thread_id}/append",
                                  body(tests=make_tests(2)), {})
        assert direct.status_code == status, direct.text
        assert_same(direct, general)


def test_an_accepted_append_reads_as_the_routes_accept_it(project: Project, routes: InProcess) -> None:
    run_id = project.api.create_run(project.id)
    thread_id = project.api.create_thread(run_id)
    direct, general = answers(project, routes, f"/automation/runs/threads/{thread_id}/append",
                              body(tests=make_tests(5)), {"X-Request-ID": "ci-job-7", "X-Forwarded-For": "10.1.2.3"})
    assert (direct.status_code, direct.content, direct.headers["x-request-id"]) == (204, b"", "ci-job-7")
    assert (general.status_code, general.content, general.headers["x-request-id"]) == (204, b"", "ci-job-7")
    assert "content-length" not in direct.headers and "transfer-encoding" not in direct.headers
    assert project.api.post(f"/automation/runs/{run_id}/complete", {}).status_code == 204
    assert project.api.wait_completed(run_id)["total_count"] == 10


def test_pipelined_requests_are_answered_in_order(pipeline: Pipeline, project: Project) -> None:
    """Appends sent back to back with other requests on one connection, before any answer: each is answered,
    in the order sent, whether it went the direct way or waited behind another."""
    run_id = project.api.create_run(project.id)
    thread_id = project.api.create_thread(run_id)

    def request(method: str, path: str, content: bytes = b"") -> bytes:
        return (f"{method} /api/v1{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {project.token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n").encode() + content

    append = f"/automation/runs/threads/{thread_id}/append"
    requests = [request("POST", append, body(tests=make_tests(20, prefix="a"))), request("GET", "/user"),
                request("POST", append, b"{"), request("POST", append, body(tests=make_tests(30, prefix="b"))),
                request("POST", append, body(tests=make_tests(40, prefix="c")))]
    port = int(pipeline.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"".join(requests))
        got = read_responses(sock, len(requests))
    assert [status for status, _, _ in got] == [204, 200, 400, 204, 204]
    assert "id" in json.loads(got[1][2]) and json.loads(got[2][2]) == {"message": "The request body is not valid JSON."}
    assert len({headers["x-request-id"] for _, headers, _ in got}) == len(requests)
    assert project.api.post(f"/automation/runs/{run_id}/complete", {}).status_code == 204
    assert project.api.wait_completed(run_id)["total_count"] == 90


def test_only_plain_appends_take_the_direct_path() -> None:
    """What the protocol hands to the direct path, by the request's head; the rest goes to the routes."""
    services = SimpleNamespace(settings=SimpleNamespace(max_body_bytes=1000))
    hot = HotPath(SimpleNamespace(state=SimpleNamespace(services=services)), error_for=None)  # type: ignore[arg-type]
    plain = [(b"authorization", b"Bearer t"), (b"content-length", b"12"), (b"idempotency-key", b"k1"),
             (b"x-request-id", b"job-1")]

    def take(url: bytes, *headers: tuple[bytes, bytes], keep_alive: bool = True) -> Any:
        return hot.take(url, [*headers], keep_alive, {"client": ("127.0.0.1", 1)}, 0.0)

    append = take(b"/api/v1/automation/runs/threads/42/append", *plain)
    assert (append.thread_id, append.authorization, append.idempotency_key, append.request_id) == \
        (42, "Bearer t", "k1", "job-1")
    assert take(b"/api/v1/automation/runs/threads/42/append", (b"content-length", b"0")).authorization is None
    for url in (b"/api/v1/automation/runs/threads/42/append?x=1", b"/api/v1/automation/runs/threads/4%32/append",
                b"/api/v1/automation/runs/42/append", b"/api/v1/automation/runs/threads/" + b"9" * 20 + b"/append"):
        assert take(url, *plain) is None, url
    url = b"/api/v1/automation/runs/threads/42/append"
    assert take(url, (b"authorization", b"Bearer t")) is None  # no Content-Length: chunked, or none
    assert take(url, (b"content-length", b"1001")) is None  # over the limit: the routes' 413
    assert take(url, (b"content-length", b"+12")) is None
    for name, value in ((b"content-encoding", b"gzip"), (b"transfer-encoding", b"chunked"),
                        (b"expect", b"100-continue")):
        assert take(url, *plain, (name, value)) is None, name


def test_the_client_behind_a_proxy_is_the_one_uvicorn_finds() -> None:
    """Failed tokens are charged to the client's address (api_shim/auth.py): behind a trusted proxy, the one it
    forwards; from anywhere else, the peer's, whatever it claims."""
    proxy = proxy_for("127.0.0.1")

    async def nothing(*_: Any) -> Any:
        return None
    for peer, client in ((("127.0.0.1", 5), ("203.0.113.9", 0)), (("10.0.0.1", 5), ("10.0.0.1", 5))):
        scope = {"type": "http", "client": peer, "headers": [(b"x-forwarded-for", b"203.0.113.9")]}
        asyncio.run(proxy(scope, nothing, nothing))
        assert scope["client"] == client
