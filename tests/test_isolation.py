"""One client must never hurt another (issue 13): a hostile or broken request next to a well-behaved client,
both driving the real shim over HTTP, with the real workers applying what was accepted.

What each test shows: the hostile request gets a clear, bounded answer, and everything the well-behaved client
sent is accepted, fast, and applied.
"""

import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from conftest import Pipeline, Project, count_results, new_project
from sqlalchemy import Engine, text
from support import Api, PrivateRedis, make_tests, service_env, start_api, unique

from ingest.admin import Admin
from schema.requests import OBJECT_BYTES_MAX, OBJECT_ITEMS_MAX
from schema.settings import Settings

# --- a well-behaved client beside a hostile one -------------------------------------------------------------


class Bystander:
    """Another project's CI job, in a process of its own (tests/bystander.py): appends of 20 tests, one after
    another, each timed."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.run_id = project.api.create_run(project.id, name="bystander")
        self.thread_id = project.api.create_thread(self.run_id)
        self.latencies: list[tuple[float, float]] = []  # (sent at, seconds)
        self.hostile_from = self.hostile_until = 0.0
        self.codes: dict[int, int] = {}
        self.sent = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> "Bystander":
        url = str(self.project.api.http.base_url).removesuffix("/api/v1").removesuffix("/api/v1/")
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("bystander.py")), url, self.project.token,
             str(self.thread_id)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None and self._proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # its own pace first, on this machine as loaded as it is now
        self.hostile_from = time.time()
        return self

    def __exit__(self, *_: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        self.hostile_until = time.time()
        time.sleep(0.3)  # and a few after it
        self._proc.stdin.close()
        out = self._proc.stdout.read()
        self._proc.stdout.close()
        self._proc.wait(timeout=60)
        result = json.loads(out.strip().splitlines()[-1])
        self.latencies, self.sent = result["latencies"], result["sent"]
        self.codes = {int(code): n for code, n in result["codes"].items()}

    def p99_ms(self, before: bool = False) -> float:
        """The p99 of the appends sent while the hostile client was at it (or, `before`, of those before)."""
        window = [seconds for at, seconds in self.latencies
                  if (at < self.hostile_from if before else self.hostile_from <= at <= self.hostile_until)]
        return statistics.quantiles(window, n=100)[98] * 1000 if len(window) > 1 else 0.0

    def assert_unhurt(self) -> None:
        """The hostile client once held the event loop for seconds. The p99 is printed (on a quiet machine it is
        within 20 ms); what is asserted is only what a held loop would break, with room for a machine busy with
        other work (CI shares these two cores), where this client alone already varies by tens of ms."""
        during, alone = self.p99_ms(), self.p99_ms(before=True)
        print(f"bystander append p99: {alone:.1f} ms alone, {during:.1f} ms beside the hostile client")
        assert during <= max(100.0, 3 * alone), (during, alone)

    def assert_all_applied(self, engine: Engine) -> None:
        assert set(self.codes) == {204}, self.codes
        assert self.sent > 10, self.sent
        self.project.api.complete_run(self.run_id)
        run = self.project.api.wait_completed(self.run_id, timeout=60)
        assert run["total_count"] == 20 * self.sent
        assert sum(count_results(engine, self.run_id).values()) == 20 * self.sent


@pytest.fixture
def bystander(admin: Admin, pipeline: Pipeline) -> Iterator[Bystander]:
    project = new_project(admin, pipeline.url)
    yield Bystander(project)
    project.api.close()


# --- 1. one bad body ------------------------------------------------------------------------------------------

def post_timed(url: str, path: str, token: str, body: bytes) -> tuple[int, bytes, float]:
    """POST `body`; the status, the body of the answer, and the seconds from the last byte sent to the answer."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    try:
        conn.request("POST", path, body, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        sent = time.perf_counter()
        response = conn.getresponse()
        content = response.read()
        return response.status, content, time.perf_counter() - sent
    finally:
        conn.close()


def all_wrong_append(size: int, tests: int) -> bytes:
    """A thread append of about `size` bytes and `tests` tests, every one wrong in every field."""
    test: dict[str, Any] = {"key": 1, "name": 2, "status": 3, "folder": 4, "elapsed": "x", "line": "y"}
    if tests <= 1000:
        test |= {"fields": [{"type": "t", "name": 5, "value": 6, "meta": [7]}] * 100,
                 "artifacts": [{"url": 8}] * 100}
    padding = (size - 20) // tests - len(json.dumps(test, separators=(",", ":"))) - 20
    test["file"] = [1] * max(0, padding // 2)  # a string is expected
    one = json.dumps(test, separators=(",", ":")).encode()
    body = b'{"tests":[' + b",".join([one] * tests) + b"]}"
    assert size * 0.9 < len(body) <= size, (len(body), size)
    return body


@pytest.mark.parametrize("tests", [1000, 10_000], ids=["1000-big-tests", "too-many-tests"])
def test_a_10_mb_body_wrong_everywhere_gets_a_small_422_fast(project: Project, bystander: Bystander,
                                                           pipeline: Pipeline, engine: Engine, tests: int) -> None:
    body = all_wrong_append(10 * 1024 * 1024 - 100, tests)
    thread_id = project.api.create_thread(project.api.create_run(project.id))
    rss_before = pipeline.api.rss()
    with bystander:
        timings = []
        for _ in range(5):
            status, content, seconds = post_timed(pipeline.url, f"/api/v1/automation/runs/threads/{thread_id}/append",
                                                  project.token, body)
            timings.append(seconds)
            assert status == 422, content[:500]
            assert len(content) <= 64 * 1024
            problems = json.loads(content)
            assert problems["message"].startswith("The given data was invalid.")
            if tests == 1000:
                assert "first" in problems["message"]  # there were more than it lists
                assert "tests.0.key" in problems["errors"]
            else:
                assert list(problems["errors"]) == ["tests"]
    assert pipeline.api.rss() - rss_before <= 50 * 1024 * 1024
    print(f"422 after the last byte, median of 5: {statistics.median(timings) * 1000:.0f} ms")
    assert statistics.median(timings) < 0.5, timings  # 5-6 s when every error was built
    bystander.assert_unhurt()
    bystander.assert_all_applied(engine)


# --- 2. client values stay data -------------------------------------------------------------------------------

HOSTILE_REQUEST_IDS = ["-7777777777", '"}], "x": [{"', "a" * 65, "bad id", "ünïcode", ",\"expected\":1}", ""]


def test_no_request_id_fails_anyone(project: Project, other_project: Project, engine: Engine) -> None:
    run_id = project.api.create_run(project.id)
    threads = [project.api.create_thread(run_id) for _ in HOSTILE_REQUEST_IDS]
    other_run = other_project.api.create_run(other_project.id)
    other_thread = other_project.api.create_thread(other_run)
    codes: list[int] = []

    def others() -> None:
        for i in range(50):
            response = other_project.api.post(f"/automation/runs/threads/{other_thread}/append",
                                              {"tests": make_tests(5, prefix=f"o{i}-")})
            codes.append(response.status_code)

    burst = threading.Thread(target=others)
    burst.start()
    echoed = []
    for thread_id, request_id in zip(threads, HOSTILE_REQUEST_IDS, strict=True):
        headers = {"X-Request-ID": request_id.encode("utf-8")}
        append = project.api.http.post(f"/automation/runs/threads/{thread_id}/append",
                                       json={"tests": make_tests(3)}, headers=headers)
        complete = project.api.http.post(f"/automation/runs/threads/{thread_id}/complete", json={},
                                         headers=headers)
        assert (append.status_code, complete.status_code) == (204, 204), (request_id, complete.text)
        echoed.append(complete.headers["x-request-id"])
    burst.join()
    assert codes == [204] * 50
    # A request id is kept only if it is plainly an id; the others are replaced.
    assert echoed[0] == "-7777777777"
    assert all(e != sent and len(e) == 16 for e, sent in zip(echoed[1:], HOSTILE_REQUEST_IDS[1:], strict=True))

    project.api.complete_run(run_id)
    run = project.api.wait_completed(run_id)
    assert run["total_count"] == 3 * len(threads) and run["thread_completed_count"] == len(threads)
    other_project.api.complete_run(other_run)
    assert other_project.api.wait_completed(other_run)["total_count"] == 250


# --- 5. objects do not grow without bound ----------------------------------------------------------------------

def field(i: int, value: str = "v") -> dict[str, Any]:
    return {"type": 2, "name": f"f{i}", "value": value}


def test_fields_links_and_artifacts_per_run_and_thread_are_capped(project: Project) -> None:
    api = project.api
    run_id = api.create_run(project.id, fields=[field(i) for i in range(100)])
    thread_id = api.create_thread(run_id, artifacts=[{"name": f"a{i}", "url": "https://x"} for i in range(100)])
    for _ in range(OBJECT_ITEMS_MAX // 100 - 1):  # up to the cap, counting what the create carried
        assert api.post(f"/automation/runs/{run_id}/append", {"fields": [field(i) for i in range(100)]}
                        ).status_code == 204
        assert api.post(f"/automation/runs/threads/{thread_id}/append",
                        {"artifacts": [{"name": "a", "url": "https://x"}] * 100}).status_code == 204
    over = api.post(f"/automation/runs/{run_id}/append", {"fields": [field(0)]})
    assert over.status_code == 422, over.text
    assert "fields" in over.json()["errors"]
    over = api.post(f"/automation/runs/threads/{thread_id}/append",
                    {"artifacts": [{"name": "a", "url": "https://x"}], "tests": make_tests(2)})
    assert over.status_code == 422 and "artifacts" in over.json()["errors"], over.text
    # Other resources, and tests, still go.
    assert api.post(f"/automation/runs/{run_id}/append", {"links": [{"name": "l", "url": "https://x"}]}
                    ).status_code == 204
    api.append(thread_id, make_tests(2))

    # Bytes: a fresh thread takes values up to the cap in bytes, and not past it.
    big = "x" * 60_000
    thread_id = api.create_thread(run_id)
    sent = 0
    while True:
        response = api.post(f"/automation/runs/threads/{thread_id}/append", {"fields": [field(0, big)]})
        if response.status_code != 204:
            break
        sent += 1
    assert response.status_code == 422 and "body" in response.json()["errors"], response.text
    assert OBJECT_BYTES_MAX // 60_100 <= sent <= OBJECT_BYTES_MAX // 60_000

    api.complete_run(run_id)
    run = api.wait_completed(run_id)
    assert len(run["fields"]) == OBJECT_ITEMS_MAX and len(run["links"]) == 1
    threads = {t["id"]: t for t in run["threads"]}
    assert len(threads[thread_id]["fields"]) == sent
    assert run["total_count"] == 2


def test_a_run_of_10_000_threads_gets_a_small_get(project: Project, engine: Engine) -> None:
    run_id = project.api.create_run(project.id)
    project.api.run(run_id)  # written by a worker by then
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO automation_run_threads (run_id, project_id, created_by, fields) "
            "SELECT :r, :p, (SELECT created_by FROM automation_runs WHERE id = :r), "
            "  jsonb_build_array(jsonb_build_object('type', 4, 'name', 'Output', 'value', repeat('o', 2000))) "
            "FROM generate_series(1, 10000)"), {"r": run_id, "p": project.id})
    response = project.api.get(f"/automation/runs/{run_id}")
    assert response.status_code == 200
    run = response.json()["result"]
    assert run["thread_count"] == 10_000 and len(run["threads"]) == 100
    assert [t["index"] for t in run["threads"]] == list(range(1, 101))
    assert len(response.content) < 400_000

    # All of them, a page at a time.
    seen = []
    page: int | None = 1
    while page is not None:
        listed = project.api.get(f"/automation/runs/{run_id}/threads", params={"page": page, "per_page": 100})
        assert listed.status_code == 200, listed.text
        body = listed.json()
        assert body["total"] == 10_000 and body["last_page"] == 100
        seen += [t["index"] for t in body["result"]]
        page = body["next_page"]
    assert seen == list(range(1, 10_001))
    assert project.api.get(f"/automation/runs/{run_id}/threads", params={"per_page": 7}).status_code == 422


# --- 7. shedding bounds what Redis really holds ----------------------------------------------------------------

HIGH_WATER_BYTES = 16 * 1024 * 1024


def test_shedding_bounds_the_memory_redis_really_uses(tmp_path: Path, database_url: str) -> None:
    """No worker runs: appends pile up in a Redis of the test's own until the high-water mark in bytes sheds
    them. What Redis then holds for the queue, by its own account, stays under the mark (plus one batch)."""
    redis_server = PrivateRedis(tmp_path)
    api = None
    try:
        env = service_env(queue=unique("shed"), redis_url=redis_server.url, queue_high_water=0,
                          queue_high_water_bytes=HIGH_WATER_BYTES)
        admin = Admin(Settings(database_url=database_url, redis_url=redis_server.url))
        project_id = admin.create_project(unique("shed"))
        token = admin.create_token(unique("ci"), [project_id])
        admin.close()
        api, url = start_api(env, tmp_path / "api.log")
        client = Api(url, token)
        run_id = client.create_run(project_id)
        threads = [client.create_thread(run_id) for _ in range(4)]
        probe = redis.Redis.from_url(redis_server.url)
        before = int(probe.info("memory")["used_memory"])

        # Small appends cost Redis most per byte sent (each batch has its message and keys): mostly those.
        shed = False
        sent = 0
        while not shed and sent < 100_000:
            for i, thread_id in enumerate(threads):
                tests = make_tests(100 if i == 0 else 1, prefix=f"s{sent}-")
                response = client.post(f"/automation/runs/threads/{thread_id}/append", {"tests": tests})
                if response.status_code == 429:
                    shed = True
                    break
                assert response.status_code == 204, response.text
                sent += 1
        assert shed, "the high-water mark in bytes never shed an append"
        held = int(probe.info("memory")["used_memory"]) - before
        assert held <= HIGH_WATER_BYTES + 64 * 1024, (held, HIGH_WATER_BYTES)
        assert held >= HIGH_WATER_BYTES // 2, held  # the estimate is from above, but not wildly so

        # Past the mark, a new thread is shed too; completes still go, so that the backlog can drain.
        created = client.post(f"/automation/runs/{run_id}/threads", {})
        assert created.status_code == 429 and int(created.headers["retry-after"]) > 0, created.text
        for thread_id in threads:
            client.complete_thread(thread_id)
        client.complete_run(run_id)
        client.close()
        probe.close()
    finally:
        if api is not None:
            api.stop()
        redis_server.stop()
