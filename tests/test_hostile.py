"""Hostile input: each refusal is a clear 4xx (compat.md section 6, 415 for compressed bodies) that leaves the stored
data as it was; each odd but legal input is accepted and stored byte for byte.

Refusals are sent to the shim served in this process, with no worker (`Offline`): an accepted request is
answered only once its operation is in Redis, so "as it was" is read from Redis the moment the answer is back:
the queue, and the run's and thread's operation counts and resources. What is accepted goes through the real
pipeline (`Target`): the test completes its run and waits for the completion barrier, then reads the stored
rows and the dead letters.

Decisions pinned here (compat.md is silent on them):
- Duplicate keys in a JSON object: the last one wins, as in most JSON parsers; the other values are ignored
  (a NUL in an ignored value does not matter).
- Integers must be written as integers: `1.0`, `1e3` are 422 like any wrong type (the models are strict),
  except that an integer beyond what its column holds (elapsed, line, assertions, size), in any notation, is
  stored as the largest value the column holds: JavaScript prints a huge JUnit time as `1e+26`.
- A lone surrogate escape (half an emoji, where the official CLI cut a long value) and an escaped NUL are
  stored as U+FFFD: PostgreSQL text holds neither, and refusing them would lose the CLI's whole batch.
- Nesting deeper than the JSON parser's limit is 400 (not valid JSON); shallower nesting where a scalar is
  expected is 422.
- A URL of 64 KiB or more is refused by the HTTP server itself (uvicorn: 400, plain text) before the API sees it.
"""

import gzip
import http.client
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import redis
from conftest import Pipeline, new_project
from inprocess import InProcess
from sqlalchemy import Engine, text
from support import POSTS, TEST_REDIS_URL, unique, wait_for

from ingest.admin import Admin
from schema.messages import accounted, pending_key, run_key, thread_key, unwritten_runs_key
from schema.settings import Settings
from schema.status import STATS_KEY

# --- targets and checks ---------------------------------------------------------------------------------

BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
RAW = "@raw@"  # a string value replaced by a raw JSON literal (NaN, 1e400) when a body is encoded


@dataclass
class Target:
    """A project of its own with one open run and thread, reached through one token."""

    admin: Admin
    engine: Engine
    url: str
    transport: httpx.BaseTransport | None = None

    def __post_init__(self) -> None:
        self.project = new_project(self.admin, self.url, transport=self.transport)
        self.api = self.project.api
        # As the official CLI does: a new connection per request, so that a 500 (after which the server drops the
        # connection) cannot break the next request.
        self.api.http.headers["Connection"] = "close"
        self.run_id = self.api.create_run(self.project.id)
        self.thread_id = self.api.create_thread(self.run_id)

    def endpoint(self, kind: str) -> str:
        return POSTS[kind].format(project=self.project.id, run=self.run_id, thread=self.thread_id)

    def post(self, kind: str, body: Any, raw: str | None = None, ascii_only: bool = True) -> httpx.Response:
        """`body` encoded as JSON (escaping everything outside ASCII unless `ascii_only` is false); `raw`
        replaces the string value RAW."""
        content = json.dumps(body, ensure_ascii=ascii_only)
        if raw is not None:
            assert f'"{RAW}"' in content
            content = content.replace(f'"{RAW}"', raw)
        return self.post_raw(kind, content.encode("utf-8", "surrogatepass"))

    def post_raw(self, kind: str, content: bytes | Iterator[bytes], **headers: str) -> httpx.Response:
        return self.api.http.post(self.endpoint(kind), content=content,
                                  headers={"Content-Type": "application/json", **headers})

    def list_runs(self, query: str) -> httpx.Response:
        return self.api.http.get(f"/projects/{self.project.id}/automation/runs?{query}")

    def scalar(self, sql: str, **binds: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), binds).scalar_one()

    def dead_letters(self) -> int:
        return len(self.dead_letter_errors())

    def dead_letter_errors(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT kind || ': ' || error FROM dead_letters "
                "WHERE run_id IN (SELECT id FROM automation_runs WHERE project_id = :p) ORDER BY id"),
                {"p": self.project.id}).scalars())

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        """Complete the run and wait until a worker has applied everything accepted before: the run, as read."""
        self.api.complete_run(self.run_id)
        return self.api.wait_completed(self.run_id, timeout=timeout)

    def assert_untouched(self) -> None:
        """Nothing refused was stored, nor queued: after the completion barrier, the run is as it was created."""
        run = self.finish()
        assert run["total_count"] == 0 and run["thread_count"] == 1, run
        assert (run["name"], run["fields"], run["links"], run["artifacts"], run["tags"]) == ("Run", [], [], [], [])
        [thread] = run["threads"]
        assert (thread["name"], thread["fields"], thread["artifacts"], thread["elapsed"]) == (None, [], [], None)
        assert self.scalar("SELECT count(*) FROM automation_runs WHERE project_id = :p", p=self.project.id) == 1
        assert self.scalar("SELECT count(*) FROM automation_results WHERE run_id = :r", r=self.run_id) == 0
        assert self.dead_letters() == 0

    def results(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT key, name, folder, elapsed, file, line, assertions, fields, artifacts, status_id, "
                "  convert_to(key, 'UTF8') AS key_bytes, convert_to(name, 'UTF8') AS name_bytes "
                "FROM automation_results WHERE run_id = :r ORDER BY id"), {"r": self.run_id}).mappings().all()
        return [dict(r) for r in rows]

    def close(self) -> None:
        self.api.close()


@pytest.fixture
def target(admin: Admin, pipeline: Pipeline, engine: Engine) -> Iterator[Target]:
    target = Target(admin, engine, pipeline.url)
    yield target
    target.close()


@dataclass
class Offline(Target):
    """A Target on the shim served in this process (tests/inprocess.py), with no worker: for refusals. A
    request the shim accepts is in Redis by the time it is answered, so "untouched" is read from Redis at once:
    the queue, and the run's and thread's hot-path state (operations accepted, resources held)."""

    redis: "redis.Redis[bytes]" = field(kw_only=True)
    queue: str = field(kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.created = self.queued()

    def queued(self) -> dict[str, Any]:
        return {"queue": self.redis.llen(self.queue), "pending": self.redis.llen(pending_key(self.queue)),
                "run": self.redis.hgetall(run_key(self.run_id)),
                "thread": self.redis.hgetall(thread_key(self.thread_id)),
                "unwritten": self.redis.smembers(unwritten_runs_key(self.project.id))}

    def assert_untouched(self) -> None:
        assert self.queued() == self.created


@pytest.fixture(scope="module")
def shim_in_process(database_url: str, redis_client: "redis.Redis[bytes]") -> Iterator[tuple[InProcess, str]]:
    queue = unique("offline")
    app = InProcess(Settings(database_url=database_url, redis_url=TEST_REDIS_URL, queue=queue))
    yield app, queue
    app.shutdown()
    # The batches no worker will take: deleted, and taken off what the installation counts as queued.
    for batch in redis_client.lrange(pending_key(queue), 0, -1):
        size = redis_client.strlen(batch)
        if redis_client.delete(batch):
            redis_client.hincrby(STATS_KEY, "queued_bytes", -accounted(size))
    redis_client.delete(queue, pending_key(queue))


@pytest.fixture
def offline(admin: Admin, engine: Engine, redis_client: "redis.Redis[bytes]",
            shim_in_process: tuple[InProcess, str]) -> Iterator[Offline]:
    app, queue = shim_in_process
    target = Offline(admin, engine, "http://shim", transport=app, redis=redis_client, queue=queue)
    yield target
    target.close()


def test_the_offline_check_sees_what_the_shim_accepts(offline: Offline) -> None:
    assert offline.post("thread append", {"tests": [TEST]}).status_code == 204
    with pytest.raises(AssertionError):
        offline.assert_untouched()


def assert_refused(response: httpx.Response, status: int) -> dict[str, Any]:
    """A clear refusal: the status, and the JSON error body of compat.md section 6."""
    assert response.status_code == status, (response.status_code, response.text[:2000])
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert isinstance(body["message"], str) and body["message"]
    assert set(body) <= {"message", "errors"}
    for problems in body.get("errors", {}).values():
        assert problems and all(isinstance(p, str) and p for p in problems)
    return body


def assert_422(response: httpx.Response, path: str, only: bool = True) -> list[str]:
    errors = assert_refused(response, 422)["errors"]
    assert path in errors, errors
    if only:
        assert list(errors) == [path], errors
    problems: list[str] = errors[path]
    return problems


# --- bodies ---------------------------------------------------------------------------------------------

FIELD = {"type": 2, "name": "Field", "value": "value", "meta": {"k": "v"}, "is_highlight": True}
ARTIFACT = {"name": "a.png", "url": "https://example.com/a.png", "mime_type": "image/png", "size": 1, "note": "n"}
LINK = {"name": "Link", "url": "https://example.com", "note": "n"}
TEST = {"key": "k1", "name": "Test 1", "status": "passed", "folder": "Suite", "elapsed": 1, "file": "t.py",
        "line": 1, "assertions": 1, "fields": [FIELD], "artifacts": [ARTIFACT]}
# Every field of every body, each with a valid value.
FULL: dict[str, dict[str, Any]] = {
    "create run": {"name": "Run", "source": "backend", "tags": ["t"], "fields": [FIELD], "links": [LINK],
                   "artifacts": [ARTIFACT]},
    "run append": {"fields": [FIELD], "links": [LINK], "artifacts": [ARTIFACT]},
    "create thread": {"name": "Thread", "elapsed_observed": 1, "elapsed_computed": 1, "fields": [FIELD],
                      "artifacts": [ARTIFACT]},
    "thread append": {"elapsed_observed": 1, "elapsed_computed": 1, "fields": [FIELD], "artifacts": [ARTIFACT],
                      "tests": [TEST]},
    "thread complete": {"elapsed_observed": 1, "elapsed_computed": 1},
    "run complete": {"measure_elapsed": True},
}
APPENDS = ("run append", "thread append")


def leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every field path of a body (dicts by key, lists by their first item) with its value, containers too."""
    items = value.items() if isinstance(value, dict) else enumerate(value[:1]) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        yield path, item
        yield from leaves(item, path)


def replaced(body: Any, path: str, value: Any) -> Any:
    body = json.loads(json.dumps(body))  # not deepcopy, which would keep FIELD shared between its places
    *parents, last = path.split(".")
    container = body
    for part in parents:
        container = container[int(part)] if isinstance(container, list) else container[part]
    if isinstance(container, list):
        container[int(last)] = value
    else:
        container[last] = value
    return body


def at(value: Any, path: str) -> Any:
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def wrong_values(path: str, value: Any) -> list[Any]:
    """Values of a JSON type the field never takes."""
    if ".meta." in path:  # any scalar goes
        return [["x"], {"s": "x"}]
    if isinstance(value, bool):
        return ["true", 1, 0, [True]]
    if isinstance(value, int):
        return ["1", True, 1.5, 1.0, [1], {"n": 1}]
    if isinstance(value, str):
        return [1, True, 1.5, ["x"], {"s": "x"}]
    if isinstance(value, list):
        return [{"0": value[0] if value else 1}, "x", 1, None]
    assert isinstance(value, dict)
    return ["x", 1, True, [value]]


# The full bodies are accepted: every refusal below is caused by the one value it changes.
def test_the_full_bodies_are_accepted_and_stored(target: Target) -> None:
    for kind in ("create run", "run append", "create thread", "thread append", "thread complete"):
        response = target.post(kind, FULL[kind])
        assert response.status_code in (201, 204), (kind, response.text)
    run = target.finish()
    assert run["fields"] == [FIELD] and run["links"] == [LINK] and run["artifacts"] == [ARTIFACT]
    assert run["thread_count"] == 2 and run["total_count"] == 1
    [result] = target.results()
    assert {k: result[k] for k in ("key", "name", "folder", "elapsed", "file", "line", "assertions")} == {
        k: TEST[k] for k in ("key", "name", "folder", "elapsed", "file", "line", "assertions")}
    assert (result["fields"], result["artifacts"]) == ([FIELD], [ARTIFACT])
    assert target.dead_letters() == 0


# --- malformed JSON -------------------------------------------------------------------------------------

VALID_APPEND = json.dumps({"tests": [TEST]}).encode()


@pytest.mark.parametrize("content", [
    VALID_APPEND[:-1], VALID_APPEND[: len(VALID_APPEND) // 2], b'{"tests": [', b'{"tests"', b"{",
    VALID_APPEND + b"garbage", VALID_APPEND + b"}", VALID_APPEND + b"\x00", VALID_APPEND + b"{}",
    VALID_APPEND + b", 1", b"\xef\xbb\xbf" + VALID_APPEND, b"\x00" + VALID_APPEND,
    VALID_APPEND.replace(b'"passed"', b"'passed'"), VALID_APPEND.replace(b'"key"', b"key"),
    VALID_APPEND.replace(b"Test 1", b"Test\n1"), VALID_APPEND.replace(b"Test 1", b"Test\x011"),
    VALID_APPEND.replace(b"Test 1", b"Test \\x41"), VALID_APPEND.replace(b"Test 1", b"Test \\u12"),
    b'{"tests": [], }', b"{'tests': []}", b'{"tests": [] /* comment */}',
], ids=["truncated-1", "truncated-half", "open-list", "open-key", "open-brace", "trailing-garbage",
        "trailing-brace", "trailing-nul", "trailing-object", "trailing-comma-value", "utf8-bom", "leading-nul",
        "single-quoted-value", "bare-key", "raw-newline-in-string", "raw-control-in-string", "bad-escape",
        "short-unicode-escape", "trailing-comma", "single-quotes", "comment"])
def test_malformed_json_is_400(offline: Offline, content: bytes) -> None:
    body = assert_refused(offline.post_raw("thread append", content), 400)
    assert "errors" not in body
    offline.assert_untouched()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("kind, path", [
    pytest.param("create run", "fields.0.meta.k"),
    pytest.param("thread append", "tests.0.fields.0.meta.k"),
    pytest.param("thread append", "tests.0.elapsed"),
])
def test_non_json_number_literals_are_400(offline: Offline, kind: str, path: str, literal: str) -> None:
    response = offline.post(kind, replaced(FULL[kind], path, RAW), raw=literal)
    assert_refused(response, 400)
    offline.assert_untouched()


def test_nan_with_an_escaped_nul_is_400(target: Target) -> None:
    body = {"name": "Run", "source": "backend",
            "fields": [{"type": 1, "name": "f", "value": "a\u0000b", "meta": {"k": RAW}}]}
    assert_refused(target.post("create run", body, raw="NaN"), 400)
    target.assert_untouched()


def test_duplicate_keys_the_last_one_wins(target: Target) -> None:
    first = TEST | {"key": "first"}
    last = TEST | {"key": "last"}
    content = b'{"tests": %s, "tests": %s}' % (json.dumps([first]).encode(), json.dumps([last]).encode())
    assert target.post_raw("thread append", content).status_code == 204
    # The ignored value is not validated: its NUL is never stored.
    content = b'{"name": "a\\u0000b", "name": "Second", "name": "Third", "source": "backend"}'
    response = target.post_raw("create run", content)
    assert response.status_code == 201, response.text
    assert target.api.run(response.json()["id"])["name"] == "Third"
    # The last one is, as U+FFFD.
    response = target.post_raw("create run", b'{"name": "Fine", "name": "a\\u0000b", "source": "backend"}')
    assert response.status_code == 201, response.text
    assert target.api.run(response.json()["id"])["name"] == "a\ufffdb"
    assert_422(target.post_raw("thread append", b'{"tests": [], "tests": "x"}'), "tests")

    target.api.complete_run(target.run_id)
    target.api.wait_completed(target.run_id)
    assert [r["key"] for r in target.results()] == ["last"]
    assert target.dead_letters() == 0


# --- wrong types ----------------------------------------------------------------------------------------

WRONG_TYPES = [(kind, path) for kind in (*APPENDS, "create run", "create thread", "thread complete", "run complete")
               for path, _ in leaves(FULL[kind])]


@pytest.mark.parametrize(("kind", "path"), WRONG_TYPES, ids=[f"{k}:{p}" for k, p in WRONG_TYPES])
def test_wrong_types_are_422_naming_the_field(offline: Offline, kind: str, path: str) -> None:
    for wrong in wrong_values(path, at(FULL[kind], path)):
        problems = assert_422(offline.post(kind, replaced(FULL[kind], path, wrong)), path)
        assert problems, wrong
    offline.assert_untouched()


# --- sizes ----------------------------------------------------------------------------------------------

def typed_field(field_type: int, value: str) -> dict[str, Any]:
    return {"type": field_type, "name": "Field", "value": value}


# (kind, path, limit, body with the path to fill): every string limit of schema/requests.py.
LIMITS: list[tuple[str, str, int, dict[str, Any]]] = [
    ("create run", "name", 750, FULL["create run"]),
    ("create run", "source", 750, FULL["create run"]),
    ("create run", "tags.0", 750, FULL["create run"]),
    ("create thread", "name", 750, FULL["create thread"]),
    ("run append", "links.0.name", 750, FULL["run append"]),
    ("run append", "links.0.url", 2048, FULL["run append"]),
    ("run append", "links.0.note", 255, FULL["run append"]),
    ("run append", "fields.0.name", 750, FULL["run append"]),
    ("thread append", "artifacts.0.name", 750, FULL["thread append"]),
    ("thread append", "artifacts.0.url", 2048, FULL["thread append"]),
    ("thread append", "artifacts.0.mime_type", 750, FULL["thread append"]),
    ("thread append", "artifacts.0.note", 255, FULL["thread append"]),
    ("thread append", "tests.0.key", 255, FULL["thread append"]),
    ("thread append", "tests.0.name", 750, FULL["thread append"]),
    ("thread append", "tests.0.folder", 750, FULL["thread append"]),
    ("thread append", "tests.0.file", 750, FULL["thread append"]),
    ("thread append", "tests.0.fields.0.meta.k", 750, FULL["thread append"]),
    *[("thread append", "fields.0.value", limit, {"fields": [typed_field(field_type, "")]})
      for field_type, limit in ((1, 750), (2, 65536), (3, 65536), (4, 65536), (5, 2048))],
    *[("run append", "fields.0.value", limit, {"fields": [typed_field(field_type, "")]})
      for field_type, limit in ((1, 750), (4, 65536), (5, 2048))],
]
LIMIT_IDS = [f"{kind}:{path}{'' if body in FULL.values() else ':type' + str(body['fields'][0]['type'])}:{limit}"
             for kind, path, limit, body in LIMITS]


@pytest.mark.parametrize(("kind", "path", "limit", "body"), LIMITS, ids=LIMIT_IDS)
def test_strings_over_their_limit_are_422(offline: Offline, kind: str, path: str, limit: int,
                                          body: dict[str, Any]) -> None:
    for char in ("a", "é", "😀"):
        assert_422(offline.post(kind, replaced(body, path, char * (limit + 1))), path)
    if path.endswith("meta.k"):
        key_path = path.removesuffix(".k")
        long_key = "k" * 751
        assert_422(offline.post(kind, replaced(body, key_path, {long_key: "v"})), f"{key_path}.{long_key}")
    offline.assert_untouched()


@pytest.mark.parametrize(("kind", "path", "limit", "body"), LIMITS, ids=LIMIT_IDS)
def test_strings_at_their_limit_are_stored_whole(target: Target, kind: str, path: str, limit: int,
                                                 body: dict[str, Any]) -> None:
    # Limits count characters, not bytes: 4-byte emoji up to the limit are fine where the text is free.
    char = "a" if path in ("source", "tags.0") else "😀"
    value = char * limit
    response = target.post(kind, replaced(body, path, value), ascii_only=False)
    assert response.status_code in (201, 204), response.text
    run = target.finish()
    if path == "source":
        assert target.scalar("SELECT count(*) FROM automation_sources WHERE project_id = :p AND name = :n",
                             p=target.project.id, n=value) == 1
    elif kind == "create run":
        assert at(target.api.run(response.json()["id"]), path) == value
    elif kind == "create thread":
        assert at(run["threads"][-1], path) == value
    elif path.startswith("tests."):
        [result] = target.results()
        assert at(result, path.removeprefix("tests.0.")) == value
    elif kind == "thread append":
        assert at(run["threads"][0], path) == value
    else:
        assert at(run, path) == value
    assert target.dead_letters() == 0


def test_100_000_tests_in_one_body_are_refused(offline: Offline) -> None:
    tests = [{"key": f"k{i}", "name": f"Test {i}", "status": "passed"} for i in range(100_000)]
    response = offline.post("thread append", {"tests": tests})
    assert response.status_code in (413, 422), response.text[:500]
    if response.status_code == 422:
        assert_422(response, "tests")
    else:
        assert_refused(response, 413)
    offline.assert_untouched()


def test_bodies_over_the_size_limit_are_413(target: Target) -> None:
    limit = 10 * 1024 * 1024  # INGEST_MAX_BODY_BYTES's default, which the pipeline uses
    padding = b" " * (limit + 1)
    declared = target.post_raw("thread append", b'{"tests": []' + padding + b"}")
    assert declared.request.headers["content-length"] == str(limit + 14)
    assert_refused(declared, 413)

    def chunks() -> Iterator[bytes]:
        yield b'{"tests": ['
        for _ in range(11):
            yield b" " * (1024 * 1024)
        yield b"]}"

    chunked = target.post_raw("thread append", chunks())
    assert "content-length" not in chunked.request.headers
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    assert_refused(chunked, 413)
    assert_refused(target.post_raw("create run", b'{"name": "Run", "source": "backend"}' + padding), 413)
    target.assert_untouched()


# --- compression ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("encoding", "compress"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("GZIP", gzip.compress), ("x-gzip", gzip.compress),
    ("br", lambda data: data), ("compress", lambda data: data), ("gzip, identity", gzip.compress),
    ("identity, gzip", gzip.compress),
])
def test_compressed_bodies_are_415(offline: Offline, encoding: str, compress: Any) -> None:
    content = compress(VALID_APPEND)
    response = offline.post_raw("thread append", content, **{"Content-Encoding": encoding})
    assert_refused(response, 415)
    assert_refused(offline.post_raw("create run", compress(b'{"name": "Run", "source": "backend"}'),
                                   **{"Content-Encoding": encoding}), 415)
    offline.assert_untouched()


def test_identity_encoding_is_accepted(target: Target) -> None:
    assert target.post_raw("thread append", VALID_APPEND, **{"Content-Encoding": "identity"}).status_code == 204
    assert target.finish()["total_count"] == 1


def test_a_gzip_bomb_without_the_header_is_not_json(offline: Offline) -> None:
    bomb = gzip.compress(b"[" * 10_000_000 + b"]" * 10_000_000, compresslevel=9)
    assert len(bomb) < 100_000
    assert_refused(offline.post_raw("thread append", bomb), 400)
    assert_refused(offline.post_raw("create run", gzip.compress(json.dumps(FULL["create run"]).encode())), 400)
    offline.assert_untouched()


# --- nesting --------------------------------------------------------------------------------------------

DEPTH = 10_000


@pytest.mark.parametrize("content", [
    b"[" * DEPTH + b"]" * DEPTH,
    b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    b'{"tests": ' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    b'{"fields": [{"type": 1, "name": "f", "value": "v", "meta": {"k": ' + b"[" * DEPTH + b"]" * DEPTH + b"}}]}",
    b'{"fields": [{"type": 1, "name": "f", "value": "v", "meta": {"k": ' + b'{"a":' * DEPTH + b"1"
    + b"}" * DEPTH + b"}}]}",
], ids=["arrays-as-body", "objects-as-body", "arrays-in-tests", "arrays-in-meta", "objects-in-meta"])
def test_nesting_beyond_the_parser_limit_is_400(offline: Offline, content: bytes) -> None:
    assert_refused(offline.post_raw("thread append", content), 400)
    offline.assert_untouched()


@pytest.mark.parametrize("depth", [1, 2, 50])
def test_nesting_where_a_scalar_is_expected_is_422(offline: Offline, depth: int) -> None:
    nested: Any = 1
    for _ in range(depth):
        nested = [nested]
    assert_422(offline.post("thread append", replaced(FULL["thread append"], "tests.0.fields.0.meta.k", nested)),
               "tests.0.fields.0.meta.k")
    assert_422(offline.post("thread append", replaced(FULL["thread append"], "tests.0.name", nested)),
               "tests.0.name")
    offline.assert_untouched()


# --- numbers --------------------------------------------------------------------------------------------

# (kind, path, the largest value it takes)
NUMBERS: list[tuple[str, str, int]] = [
    ("thread append", "elapsed_observed", BIGINT_MAX),
    ("thread append", "elapsed_computed", BIGINT_MAX),
    ("thread append", "tests.0.elapsed", BIGINT_MAX),
    ("thread append", "tests.0.line", INT_MAX),
    ("thread append", "tests.0.assertions", INT_MAX),
    ("thread append", "artifacts.0.size", BIGINT_MAX),
    ("thread append", "tests.0.artifacts.0.size", BIGINT_MAX),
    ("thread append", "fields.0.type", 5),
    ("create thread", "elapsed_observed", BIGINT_MAX),
    ("create thread", "elapsed_computed", BIGINT_MAX),
    ("thread complete", "elapsed_observed", BIGINT_MAX),
    ("thread complete", "elapsed_computed", BIGINT_MAX),
    ("create run", "config_id", BIGINT_MAX),
    ("create run", "milestone_id", BIGINT_MAX),
]


# The integers whose column's largest value is stored for anything larger (compat.md section 1).
SATURATING = {"elapsed_observed", "elapsed_computed", "elapsed", "line", "assertions", "size"}


@pytest.mark.parametrize(("kind", "path", "largest"), NUMBERS, ids=[f"{k}:{p}" for k, p, _ in NUMBERS])
def test_negative_fractional_and_overflowing_integers_are_422(offline: Offline, kind: str, path: str,
                                                               largest: int) -> None:
    smallest = 1 if path in ("config_id", "milestone_id", "fields.0.type") else 0
    saturates = path.rsplit(".", 1)[-1] in SATURATING
    too_large = () if saturates else (largest + 1, 2**64, 10**100, 1e300)
    for value in (smallest - 1, -1, -(2**63) - 1, 1.5, 0.5, -0.0, *too_large):
        assert_422(offline.post(kind, replaced(FULL[kind], path, value)), path)
    too_large_raw = () if saturates else ("100000000000000000000000000000000000000000000",)
    for raw in ("1e400", "-1e400", "1e3", "1E2", "1.0", *too_large_raw):
        assert_422(offline.post(kind, replaced(FULL[kind], path, RAW), raw=raw), path)
    offline.assert_untouched()


@pytest.mark.parametrize(("raw", "bigint", "int4"), [
    ("2147483648", 2147483648, INT_MAX),
    ("9223372036854775808", BIGINT_MAX, INT_MAX),
    ("18446744073709551616", BIGINT_MAX, INT_MAX),
    ("1e+26", BIGINT_MAX, INT_MAX),  # JSON.stringify of a JUnit time of 10^20 seconds, in microseconds
    ("1E300", BIGINT_MAX, INT_MAX),
    ("1" + "0" * 44, BIGINT_MAX, INT_MAX),
])
def test_integers_beyond_their_column_are_stored_as_its_largest_value(target: Target, raw: str, bigint: int,
                                                                      int4: int) -> None:
    created = target.post("create thread", {"elapsed_observed": RAW, "elapsed_computed": RAW}, raw=raw)
    assert created.status_code == 201, created.text
    target.thread_id = created.json()["id"]
    test = TEST | {"elapsed": RAW, "line": RAW, "assertions": RAW, "artifacts": [ARTIFACT | {"size": RAW}]}
    body = {"elapsed_computed": RAW, "artifacts": [ARTIFACT | {"size": RAW}], "tests": [test]}
    assert target.post("thread append", body, raw=raw).status_code == 204
    assert target.post("thread complete", {"elapsed_observed": RAW}, raw=raw).status_code == 204
    run = target.finish()
    [result] = target.results()
    assert (result["elapsed"], result["line"], result["assertions"]) == (bigint, int4, int4)
    assert result["artifacts"][0]["size"] == bigint
    [thread] = [t for t in run["threads"] if t["id"] == target.thread_id]
    assert thread["elapsed"] == min(BIGINT_MAX, 2 * bigint)  # observed at create, and again at complete
    assert thread["artifacts"][0]["size"] == bigint
    assert target.dead_letters() == 0


def test_the_largest_integers_are_stored_exactly(target: Target) -> None:
    test = TEST | {"elapsed": BIGINT_MAX, "line": INT_MAX, "assertions": INT_MAX,
                   "artifacts": [ARTIFACT | {"size": BIGINT_MAX}]}
    target.api.append(target.thread_id, [test])
    target.finish()
    [result] = target.results()
    assert (result["elapsed"], result["line"], result["assertions"]) == (BIGINT_MAX, INT_MAX, INT_MAX)
    assert result["artifacts"][0]["size"] == BIGINT_MAX
    assert target.dead_letters() == 0


def assert_completes_without_dead_letters(target: Target) -> dict[str, Any]:
    """Complete the run; it must complete, and no accepted operation may end in dead_letters on the way."""
    target.api.complete_run(target.run_id)
    wait_for(lambda: target.dead_letters() or target.api.run(target.run_id)["is_completed"],
             what="the run to complete or an operation to be dead-lettered")
    assert target.dead_letter_errors() == []
    run = target.api.run(target.run_id)
    assert run["is_completed"]
    return run


def assert_accepted_and_applied(target: Target, response: httpx.Response, results: int) -> None:
    """What the server accepts, it must apply: no dead letter, the results stored, the run completed."""
    if response.status_code == 422:
        return
    assert response.status_code == 204, response.text
    run = assert_completes_without_dead_letters(target)
    assert run["total_count"] == results and len(target.results()) == results


def test_elapsed_that_sum_past_bigint_in_one_append_are_refused_or_applied(target: Target) -> None:
    tests = [TEST | {"key": "a", "elapsed": 2**62}, TEST | {"key": "b", "elapsed": 2**62}]
    assert_accepted_and_applied(target, target.post("thread append", {"tests": tests}), 2)


def test_elapsed_parts_that_sum_past_bigint_are_refused_or_applied(target: Target) -> None:
    thread_id = target.api.create_thread(target.run_id, elapsed_observed=BIGINT_MAX)
    response = target.api.post(f"/automation/runs/threads/{thread_id}/append",
                               {"elapsed_observed": 1, "tests": [TEST]})
    assert_accepted_and_applied(target, response, 1)


def test_a_complete_whose_elapsed_overflows_does_not_wedge_the_run(target: Target) -> None:
    thread_id = target.api.create_thread(target.run_id, elapsed_observed=BIGINT_MAX)
    response = target.api.post(f"/automation/runs/threads/{thread_id}/complete", {"elapsed_observed": 1})
    if response.status_code != 422:
        assert response.status_code == 204
    run = assert_completes_without_dead_letters(target)
    assert all(t["is_completed"] for t in run["threads"])


# Field meta values are the one place where any JSON number goes.
META_KINDS = ["create run", "run append", "create thread", "thread append"]


def with_meta(kind: str, value: Any) -> dict[str, Any]:
    return {**FULL[kind], "fields": [FIELD | {"meta": {"k": value}}]}


@pytest.mark.parametrize("kind", META_KINDS)
@pytest.mark.parametrize("value", [2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30])
def test_meta_integers_beyond_64_bits_are_422(offline: Offline, kind: str, value: int) -> None:
    assert_422(offline.post(kind, with_meta(kind, value)), "fields.0.meta.k", only=False)
    offline.assert_untouched()


@pytest.mark.parametrize("literal", ["1e400", "-1e400"])
def test_meta_numbers_beyond_double_range_are_422(offline: Offline, literal: str) -> None:
    assert_422(offline.post("create run", with_meta("create run", RAW), raw=literal), "fields.0.meta.k", only=False)
    offline.assert_untouched()


@pytest.mark.parametrize("kind", ["create run", "run append"])
def test_meta_floats_beyond_1e15_are_422(offline: Offline, kind: str) -> None:
    # jsonb would print 1e20 back as a 21-digit integer, which no JSON encoder here can write out again: such
    # a run could never be read. The server refuses them up front.
    assert_422(offline.post(kind, with_meta(kind, 1e20)), "fields.0.meta.k", only=False)
    offline.assert_untouched()


def test_ordinary_meta_numbers_round_trip(target: Target) -> None:
    meta = {"int": BIGINT_MAX, "neg": -(2**63), "float": 1.5, "tiny": 5e-324, "big": 1e15,
            "zero": 0, "negzero": -0.0, "t": True, "n": None, "s": "x"}
    response = target.post("create run", {**FULL["create run"], "fields": [FIELD | {"meta": meta}]})
    assert response.status_code == 201, response.text
    stored = target.api.run(response.json()["id"])["fields"][0]["meta"]
    assert stored == meta
    assert target.list_runs("").status_code == 200


# --- unknown fields -------------------------------------------------------------------------------------

UNKNOWN: list[tuple[str, str]] = [
    *[(kind, "") for kind in POSTS],
    ("thread append", "fields.0"), ("thread append", "artifacts.0"), ("thread append", "tests.0"),
    ("thread append", "tests.0.fields.0"), ("thread append", "tests.0.artifacts.0"), ("run append", "links.0"),
    ("create run", "fields.0"), ("create run", "links.0"), ("create run", "artifacts.0"),
    ("create thread", "fields.0"), ("create thread", "artifacts.0"),
]
# Keys of the queued operation itself, which a body merged into it must never set (api_shim/writes.py).
INTERNAL_KEYS = ["id", "kind", "run_id", "thread_id", "user_id", "at", "expected", "results", "counts",
                 "results_elapsed", "project_id", "status", "is_completed", "created_by", "total_count"]


@pytest.mark.parametrize(("kind", "path"), UNKNOWN, ids=[f"{k}:{p or 'body'}" for k, p in UNKNOWN])
def test_unknown_fields_are_422_at_every_level(offline: Offline, kind: str, path: str) -> None:
    body = FULL[kind]
    for key in ("bogus", "Name", "name ", "", "__proto__", "constructor", "💥", "a.b"):
        obj = at(body, path) if path else body
        if key in obj:
            continue
        changed = replaced(body, path, obj | {key: 1}) if path else body | {key: 1}
        field = f"{path}.{key}" if path else key
        assert_422(offline.post(kind, changed), field or "body", only=False)
    offline.assert_untouched()


@pytest.mark.parametrize("kind", ["thread append", "thread complete", "run append", "run complete"])
def test_the_queued_operation_cannot_be_set_from_the_body(offline: Offline, kind: str) -> None:
    for key in INTERNAL_KEYS:
        if key in FULL[kind]:
            continue
        value: Any = [[2, 5]] if key in ("results", "counts") else offline.run_id + 1000
        assert_422(offline.post(kind, FULL[kind] | {key: value}), key)
    offline.assert_untouched()


# --- strings: injection, control characters, Unicode -------------------------------------------------------

LEGAL_STRINGS = {
    "sql-drop": "'; DROP TABLE automation_results; --",
    "sql-quotes": "Robert'); DROP TABLE students;-- \" OR \"1\"=\"1' OR '1'='1",
    "sql-sleep": "1); SELECT pg_sleep(30); --",
    "bind-parameters": ":name %s %(name)s $1 ?? {0} {} %%",
    "copy-escapes": "\\N \\. \\\\ \\x00 \\u0000 \\t a\tb\nc\rd\\",
    "controls": "".join(chr(c) for c in range(1, 32)) + "\x7f",
    "c1-controls": "\x80\x85\x9f\xa0",
    "bidi": "\u202eevil.exe\u202c \u200f\u200e \u2066x\u2069",
    "zero-width": "a\u200bb\u200dc\ufeffd\u2060",
    "line-separators": "\u2028\u2029\u0085",
    "emoji": "😀💩 🏳️‍🌈 👨‍👩‍👧 \U0001f600",
    "astral": "\U00010000\U0010ffff\U000e0001",
    "noncharacters": "\ufffe\uffff\ufdd0\ufffd",
    "combining": "e\u0301 \u0065\u0301\u0301 Z\u0351\u0352\u0353",
    "markup": "<script>alert(1)</script>&amp; ${jndi:ldap://x} {{7*7}}",
    "percent": "%00 %ZZ % %u0000",
    "whitespace": " \u00a0\u3000 ",
}


def everywhere(s: str) -> dict[str, dict[str, Any]]:
    """Bodies with `s` in every free string field (source, tags and status have their own patterns)."""
    field = {"type": 2, "name": s, "value": s, "meta": {s: s, "k": s}, "is_highlight": False}
    artifact = {"name": s, "url": s, "mime_type": s, "size": 1, "note": s}
    link = {"name": s, "url": s, "note": s}
    test = {"key": s, "name": s, "status": "passed", "folder": s, "file": s, "fields": [field],
            "artifacts": [artifact]}
    return {
        "create run": {"name": s, "source": "hostile", "config": s, "milestone": s, "fields": [field],
                       "links": [link], "artifacts": [artifact]},
        "run append": {"fields": [field], "links": [link], "artifacts": [artifact]},
        "create thread": {"name": s, "fields": [field], "artifacts": [artifact]},
        "thread append": {"fields": [field], "artifacts": [artifact], "tests": [test]},
    }


@pytest.mark.parametrize("ascii_only", [True, False], ids=["escaped", "utf8"])
@pytest.mark.parametrize("s", list(LEGAL_STRINGS.values()), ids=list(LEGAL_STRINGS))
def test_legal_strings_are_stored_byte_for_byte(target: Target, s: str, ascii_only: bool) -> None:
    assert_stored_everywhere(target, s, s, ascii_only)


# Sent (as JSON escapes) -> stored: what PostgreSQL text cannot hold is stored as U+FFFD, never refused.
UNSTORABLE = {
    "nul": ("\u0000a\u0000b\u0000", "\ufffda\ufffdb\ufffd"),
    "high-surrogate-at-the-end": ("cut 😀 \ud83d", "cut 😀 \ufffd"),  # where the CLI cut a value
    "low-surrogate-at-the-start": ("\ude00 tail", "\ufffd tail"),  # the other side of that cut
    "reversed-pair": ("\ude00\ud83d", "\ufffd\ufffd"),
    "two-highs-then-a-low": ("\ud800\ud83d\ude00", "\ufffd😀"),
    "beside-other-characters": ("\ud800A\udbff\uffff\udfff", "\ufffdA\ufffd\uffff\ufffd"),
    "beside-an-escaped-backslash": ("\\ud800 \\u0000 \ud800\\", "\\ud800 \\u0000 \ufffd\\"),
}


@pytest.mark.parametrize(("sent", "stored"), list(UNSTORABLE.values()), ids=list(UNSTORABLE))
def test_lone_surrogates_and_nul_are_stored_as_replacement_characters(target: Target, sent: str,
                                                                      stored: str) -> None:
    assert_stored_everywhere(target, sent, stored, ascii_only=True)


def assert_stored_everywhere(target: Target, sent: str, stored: str, ascii_only: bool) -> None:
    """`sent` in every free string field of every body is accepted, and read back as `stored`."""
    config_id = target.admin.create_named("configs", target.project.id, stored)
    milestone_id = target.admin.create_named("milestones", target.project.id, stored)
    bodies, expected = everywhere(sent), everywhere(stored)
    created = target.post("create run", bodies["create run"], ascii_only=ascii_only)
    assert created.status_code == 201, created.text
    # Appends and the thread go to the fixture's run, which is then completed.
    assert target.post("run append", bodies["run append"], ascii_only=ascii_only).status_code == 204
    thread = target.post("create thread", bodies["create thread"], ascii_only=ascii_only)
    assert thread.status_code == 201, thread.text
    target.thread_id = thread.json()["id"]
    assert target.post("thread append", bodies["thread append"], ascii_only=ascii_only).status_code == 204
    run = target.finish()

    new_run = target.api.run(created.json()["id"])
    assert (new_run["name"], new_run["config_id"], new_run["milestone_id"]) == (stored, config_id, milestone_id)
    body = expected["create run"]
    assert (new_run["fields"], new_run["links"], new_run["artifacts"]) == (body["fields"], body["links"],
                                                                           body["artifacts"])
    body = expected["run append"]
    assert (run["fields"], run["links"], run["artifacts"]) == (body["fields"], body["links"], body["artifacts"])
    stored_thread = next(t for t in run["threads"] if t["id"] == target.thread_id)
    assert stored_thread["name"] == stored
    assert stored_thread["fields"] == expected["create thread"]["fields"] + expected["thread append"]["fields"]
    assert stored_thread["artifacts"] == (expected["create thread"]["artifacts"]
                                          + expected["thread append"]["artifacts"])

    [result] = target.results()
    test = expected["thread append"]["tests"][0]
    assert (result["key"], result["name"], result["folder"], result["file"]) == (stored, stored, stored, stored)
    assert result["key_bytes"] == result["name_bytes"] == stored.encode("utf-8")
    assert (result["fields"], result["artifacts"]) == (test["fields"], test["artifacts"])
    assert target.scalar("SELECT convert_to(name, 'UTF8') FROM automation_runs WHERE id = :r",
                         r=created.json()["id"]) == stored.encode("utf-8")
    assert target.scalar("SELECT convert_to(name, 'UTF8') FROM automation_run_threads WHERE id = :t",
                         t=target.thread_id) == stored.encode("utf-8")

    listed = target.list_runs("expands=configs,milestones,users")
    assert listed.status_code == 200, listed.text
    assert listed.json()["expands"]["configs"] == [{"id": config_id, "name": stored}]
    assert target.scalar("SELECT count(*) FROM automation_results") > 0  # the table is still there
    assert target.dead_letters() == 0


INVALID_UTF8 = [b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'"\xff"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"', b'"\x80"']


@pytest.mark.parametrize(("kind", "path"), [
    ("create run", "name"), ("create thread", "name"), ("run append", "links.0.url"),
    ("thread append", "tests.0.name"), ("thread append", "tests.0.fields.0.meta.k"),
])
def test_invalid_utf8_is_400(offline: Offline, kind: str, path: str) -> None:
    body = FULL[kind]
    for raw in INVALID_UTF8:
        content = json.dumps(replaced(body, path, RAW)).encode().replace(f'"{RAW}"'.encode(), raw)
        assert_refused(offline.post_raw(kind, content), 400)
    offline.assert_untouched()


# --- the query string of the list -----------------------------------------------------------------------

QUERIES_422 = {
    "page": ["1000000000", "0", "-1", "+1", " 1", "1.5", "1e3", "0x10", "99999999999999999999999", "", "1 OR 1=1",
             "1;DROP TABLE automation_runs", "\x00"],
    "per_page": ["0", "-15", "16", "1000", "15.0", "1e2", "", "100; DROP TABLE automation_runs"],
    "sort": ["created_at; DROP TABLE automation_runs; --", "automation_runs:created_at desc", "id", ""],
    "order": ["desc; DROP TABLE automation_runs", "descending", "asc--", "\x00"],
    "config_id": ["1 OR 1=1", "1;DROP TABLE configs", "-1", "9" * 19, "1.0", "0x1", "a", ","],
    "status": ["2) OR (1=1", "-3", "2,,x"],
    "state": ["' OR ''='", "1e2"],
    "created_by": ["1 UNION SELECT token_hash FROM api_tokens"],
    "tags": ["' OR 1=1 --", "a" * 751, "a b", "tag\x00", "%", "x,'y"],
    "created_after": ["2026-01-01'; DROP TABLE automation_runs; --", "2026-01-01", "yesterday", "\x00", "1e9"],
    "created_before": ["2026-13-01T00:00:00Z", "2026-01-01T25:00:00Z", "0000-01-01T00:00:00Z"],
    "expands": ["x" * 10_000, "users;DROP TABLE users", "users,x", "USERS", ",".join(f"x{i}" for i in range(10_000))],
}
QUERY_422 = [(name, value) for name, values in QUERIES_422.items() for value in values]


@pytest.mark.parametrize(("name", "value"), QUERY_422, ids=[f"{n}={v[:40]!r}" for n, v in QUERY_422])
def test_query_string_abuse_is_422(target: Target, name: str, value: str) -> None:
    assert_422(target.list_runs(f"{name}={quote(value, safe=',')}"), name)


QUERIES_EMPTY = {
    "page": ["999999999", "2"],
    "config_id": ["9" * 18, ",".join(["1"] * 10_000)],
    "status": ["2,3"],
    "state": ["3"],
    "tags": ["x,y", "nightly"],
    "created_after": ["9999-12-31T23:59:59+00:00", "2999-01-01T00:00:00Z"],
    "created_before": ["0001-01-01T00:00:00+00:00", "1970-01-01T00:00:00Z"],
}
QUERY_EMPTY = [(name, value) for name, values in QUERIES_EMPTY.items() for value in values]


@pytest.mark.parametrize(("name", "value"), QUERY_EMPTY, ids=[f"{n}={v[:40]!r}" for n, v in QUERY_EMPTY])
def test_query_strings_that_match_nothing_give_a_correct_empty_page(target: Target, name: str, value: str) -> None:
    response = target.list_runs(f"{name}={quote(value, safe=',')}")
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["result"] == []
    if name == "page":  # past the last page of the project's one run
        assert (page["total"], page["last_page"], page["page"], page["next_page"]) == (1, 1, int(value), None)
        assert page["prev_page"] == int(value) - 1
    else:
        assert page == {"page": None, "prev_page": None, "next_page": None, "last_page": None, "per_page": 100,
                        "total": 0, "result": [], "expands": {}}


def test_ten_thousand_expands_list_each_once(target: Target) -> None:
    query = "expands=" + ",".join(["users"] * 10_000)
    listed = target.list_runs(query)
    assert listed.status_code == 200, listed.text[:500]
    page = listed.json()
    assert page["total"] == 1 and [r["id"] for r in page["result"]] == [target.run_id]
    user = page["result"][0]["created_by"]
    assert [u["id"] for u in page["expands"]["users"]] == [user] and list(page["expands"]) == ["users"]
    one = target.api.get(f"/automation/runs/{target.run_id}?{query}")
    assert one.status_code == 200, one.text[:500]
    assert [u["id"] for u in one.json()["expands"]["users"]] == [user]


def test_lenient_but_valid_queries_are_200(target: Target) -> None:
    for query in ("order=ASC", "order=Desc", "config_id=%201%20,%202", "status=4", "state=4",
                  "created_after=2000-01-01T00:00:00%2B14:00"):
        response = target.list_runs(query)
        assert response.status_code == 200, (query, response.text)


@pytest.mark.parametrize("name", ["page", "per_page", "config_id", "status"])
def test_unicode_digits_are_422(target: Target, name: str) -> None:
    assert_422(target.list_runs(f"{name}={quote('²')}"), name)


def test_a_url_of_64_kib_is_refused_by_the_http_server(target: Target) -> None:
    """Decision pinned: uvicorn's parser refuses a request line from 64 KiB on, before the API (plain text)."""
    parts = urlsplit(target.url)
    assert parts.hostname is not None and parts.port is not None
    path = f"/api/v1/projects/{target.project.id}/automation/runs?tags={'a' * 65_536}"
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {target.project.token}"})
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert 400 <= response.status < 500
