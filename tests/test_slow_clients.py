"""Slow and broken clients: one that leaves mid-body is a quiet 499 in the log, and meanwhile every well-behaved
client is answered as fast as ever.

The clients are raw sockets, so that nothing between the test and the server completes or cuts off a request on
its own.
"""

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from support import POSTS, Api, Service, make_tests, service_env, start_api, unique

from ingest.admin import Admin


@dataclass
class Shim:
    service: Service
    url: str
    port: int
    token: str
    thread_id: int

    def append_path(self) -> str:
        return "/api/v1" + POSTS["thread append"].format(thread=self.thread_id)

    def request_head(self, body: str = "length", length: int = 0, token: bool = True) -> bytes:
        """The head of an append, announcing a body of `length` bytes (or a chunked body)."""
        lines = [f"POST {self.append_path()} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
        if token:
            lines.append(f"Authorization: Bearer {self.token}")
        lines.append(f"Content-Length: {length}" if body == "length" else "Transfer-Encoding: chunked")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def logs(self) -> str:
        return self.service.output()


def start_shim(admin: Admin, log: Path) -> Shim:
    service, url = start_api(service_env(log_level="INFO"), log)
    try:
        project_id = admin.create_project(unique("slow-clients"))
        token = admin.create_token(unique("user"), [project_id])
        api = Api(url, token)
        try:
            thread_id = api.create_thread(api.create_run(project_id))
        finally:
            api.close()
    except BaseException:
        service.stop()
        raise
    return Shim(service, url, int(url.rsplit(":", 1)[1]), token, thread_id)


@pytest.fixture(scope="module")
def shim(admin: Admin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    shim = start_shim(admin, tmp_path_factory.mktemp("slow-clients") / "api.log")
    yield shim
    shim.service.stop()


def append_body(n: int = 10) -> bytes:
    return json.dumps({"tests": make_tests(n)}).encode()


# --- a well-behaved client, measured ---------------------------------------------------------------------------

@dataclass
class Appender:
    """The official CLI's way: one thread, one append after another, a new connection for each."""

    shim: Shim
    latencies: list[float] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = append_body()
        headers = {"Authorization": f"Bearer {self.shim.token}", "Content-Type": "application/json",
                   "Connection": "close"}
        with httpx.Client(base_url=self.shim.url, timeout=30) as http:
            while not self.stop.is_set():
                start = time.perf_counter()
                response = http.post(self.shim.append_path(), content=body, headers=headers)
                self.latencies.append(time.perf_counter() - start)
                self.codes.append(response.status_code)

    def __enter__(self) -> "Appender":
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)


def test_clients_that_leave_mid_body_are_quiet_499s(shim: Shim) -> None:
    """500 clients leave at once half-way through their bodies: each is one 499 line in the log, with no
    traceback and no 500, and the event loop is not held: a client's appends meanwhile stay fast."""
    body = append_body()
    head = shim.request_head(length=len(body))
    before = shim.logs().count('"message":"POST thread_append 499"')
    with Appender(shim) as appender:
        socks = [socket.create_connection(("127.0.0.1", shim.port)) for _ in range(500)]
        try:
            for sock in socks:
                sock.sendall(head + body[:20])
            time.sleep(1)  # the server is now waiting for the rest of each body
            first = len(appender.latencies)
        finally:
            for sock in socks:
                sock.close()
        time.sleep(1.5)
    during = appender.latencies[first:]
    print(f"appends after the disconnects: {len(during)}, max {max(during) * 1000:.1f} ms")
    assert set(appender.codes) == {204}
    assert max(during) < 0.2  # each traceback logged, as before, held the loop for 0.6 s
    logs = shim.logs()
    assert logs.count('"message":"POST thread_append 499"') - before == 500
    assert "Traceback" not in logs and '"status":500' not in logs

