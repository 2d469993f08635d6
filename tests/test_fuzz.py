"""Property-based fuzzing of every operation of `GET /openapi.json` against the real API and its workers.

Schemathesis generates requests from the document (valid ones, and invalid ones in negative mode), sends them to
the running shim with a token for a project that owns a run and a thread, and checks every response: never a
5xx, status code, content type and body as the document says, and every error a JSON object with a message.
Path parameters point at the fixture's run and thread, so requests reach validation rather than 404s; the
completes go to a second run, so that the first stays open for the appends.

Bounded and reproducible: one test per operation and generation mode (positive: valid per the document;
negative: a broken body or query string), each of MAX_EXAMPLES generated cases (Hypothesis shrinks a failure
further, within its own limits), with Hypothesis derandomized (its random source derived from the test, so every
run sends the same requests), no example database, and no deadline (requests go over the network).
"""

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import jsonschema_rs
import msgspec
import pytest
import requests
import schemathesis
from conftest import Pipeline, Project, new_project
from schemathesis import BaseSchema, Case, CheckContext, GenerationMode, Response
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine, text
from support import Api, make_tests

from api_shim.openapi import document, without_discriminators
from ingest.admin import Admin
from schema.requests import BODIES, ThreadAppend
from schema.statuses import DEFAULT_STATUSES, alias_map

# Per operation and mode; INGEST_FUZZ_MAX_EXAMPLES raises it for a longer, still reproducible, session.
MAX_EXAMPLES = int(os.environ.get("INGEST_FUZZ_MAX_EXAMPLES", "25"))
OPERATIONS = 12


def error_body_is_json_with_a_message(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """compat.md section 6: every error is `{"message": str, "errors"?: {field path: [str, ...]}}`."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type == "application/json", f"error with content type {content_type!r}"
    body = response.json()
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    assert isinstance(body.get("message"), str) and body["message"], f"error without a message: {body!r}"
    assert set(body) <= {"message", "errors"}, f"unexpected keys in an error: {sorted(body)}"
    errors = body.get("errors", {})
    assert isinstance(errors, dict)
    for path, problems in errors.items():
        assert path and isinstance(problems, list) and problems, f"empty problem list for {path!r}"
        assert all(isinstance(p, str) and p for p in problems), f"bad problems for {path!r}: {problems!r}"
    return True


CHECKS: list[CheckFunction] = [not_a_server_error, status_code_conformance, content_type_conformance,
                               response_schema_conformance, error_body_is_json_with_a_message]


@dataclass
class FuzzTarget:
    project: Project
    run_id: int
    thread_id: int
    # The completes are fuzzed on these, so that the run and thread above stay open for appends.
    closing_run_id: int
    closing_thread_id: int
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    accepted_tests: int = 0
    created_threads: int = 0

    def path_parameters(self, label: str) -> dict[str, int]:
        if label.endswith("/complete"):
            return {"run_id": self.closing_run_id, "thread_id": self.closing_thread_id}
        return {"project_id": self.project.id, "run_id": self.run_id, "thread_id": self.thread_id}

    def record(self, label: str, case: Case, status: int) -> None:
        self.statuses[label][status] += 1
        if status == 204 and label.endswith("/threads/{thread_id}/append") and isinstance(case.body, dict):
            tests = case.body.get("tests")
            self.accepted_tests += len(tests) if isinstance(tests, list) else 0
        if status == 201 and label.endswith("/threads"):
            self.created_threads += 1


@pytest.fixture(scope="module")
def fuzz_target(admin: Admin, pipeline: Pipeline) -> Iterator[FuzzTarget]:
    project = new_project(admin, pipeline.url)
    api = project.api
    run_id = api.create_run(project.id, name="Fuzzed")
    thread_id = api.create_thread(run_id)
    closing_run_id = api.create_run(project.id, name="Fuzzed completes")
    closing_thread_id = api.create_thread(closing_run_id)
    yield FuzzTarget(project, run_id, thread_id, closing_run_id, closing_thread_id)
    api.close()


@pytest.fixture(scope="module")
def api_schema(pipeline: Pipeline) -> BaseSchema:
    """The document as the running server serves it."""
    return schemathesis.openapi.from_url(f"{pipeline.url}/openapi.json",
                                         config=schemathesis.Config.from_dict({"request-timeout": 30}))


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    yield session
    session.close()


# --- the document ---------------------------------------------------------------------------------------

def test_document_is_served_without_a_token(pipeline: Pipeline) -> None:
    anonymous = Api(pipeline.url, None)
    try:
        response = anonymous.http.get(f"{pipeline.url}/openapi.json")
    finally:
        anonymous.close()
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    served = response.json()
    # The one the fuzzing below is parametrized from.
    assert served == json.loads(json.dumps(document()))
    assert served["openapi"] == "3.1.0"
    operations = [(method, path) for path, item in served["paths"].items() for method in item
                  if method in ("get", "post")]
    assert len(operations) == OPERATIONS
    assert ("get", "/api/v1/user") in operations
    assert served["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert served["security"] == [{"bearer": []}]

    # Request bodies are the validators' own schemas.
    schemas = served["components"]["schemas"]
    _, expected = msgspec.json.schema_components(BODIES, ref_template="#/components/schemas/{name}")
    for body_type in BODIES:
        assert schemas[body_type.__name__] == without_discriminators(expected[body_type.__name__])
    append = served["paths"]["/api/v1/automation/runs/threads/{thread_id}/append"]["post"]
    assert append["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{ThreadAppend.__name__}"}
    status = schemas["ResultIn"]["properties"]["status"]
    assert status["type"] == "string"

    # Every schema is a valid JSON Schema (2020-12, the dialect of OpenAPI 3.1).
    for name, schema in schemas.items():
        assert jsonschema_rs.meta.is_valid(schema), name


# --- fuzzing --------------------------------------------------------------------------------------------

# One test per operation and generation mode. (schemathesis's own pytest integration, `from_fixture`, does not
# run on this pytest: it sets `Function._nodeid`, which pytest 9.2 no longer has.) Negative mode needs something
# to break besides the path, which is pinned: a body or a query string.
CASES = [
    pytest.param(f"{method.upper()} {path}", mode, id=f"{method.upper()} {path} {mode.value}")
    for path, item in document()["paths"].items() for method, operation in item.items()
    if method in ("get", "post")
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or "requestBody" in operation or "parameters" in operation
]
ALIASES = sorted(alias_map(DEFAULT_STATUSES))


def _plausible(value: Any, key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _plausible(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_plausible(v, key) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if key == "status" and isinstance(value, str):
        return ALIASES[len(value) % len(ALIASES)]
    return value


def plausible(case: Case) -> Case:
    """The same body as the server would more likely accept it, to reach past validation more often.

    A generated status string is almost never one of the status table's, and JSON Schema's `integer` lets the
    generator write 2.0, which the server's strict models refuse (422): map those to an accepted alias and to 2.
    The result still conforms to the document.
    """
    if isinstance(case.body, dict):
        case.body = _plausible(case.body)
    return case


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_fuzz(label: str, mode: GenerationMode, api_schema: BaseSchema, fuzz_target: FuzzTarget,
              http: requests.Session) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=fuzz_target.path_parameters(label),
                                     headers={"Authorization": f"Bearer {fuzz_target.project.token}"})
    if mode is GenerationMode.POSITIVE and label.startswith("POST"):
        strategy = strategy | strategy.map(plausible)

    @hypothesis.settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                         suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                                hypothesis.HealthCheck.data_too_large])
    @hypothesis.given(case=strategy)
    def fuzz(case: Case) -> None:
        response = case.call_and_validate(session=http, checks=CHECKS)
        fuzz_target.record(label, case, response.status_code)

    fuzz()


def test_fuzzing_reached_the_server_logic_and_lost_nothing(fuzz_target: FuzzTarget, engine: Engine) -> None:
    """After the fuzzing: every write was both accepted and refused at least once, and every accepted
    operation was applied, exactly, with no dead letter."""
    statuses = fuzz_target.statuses
    if len(statuses) < OPERATIONS:
        pytest.skip("needs every test_fuzz case to run first")
    for label, seen in statuses.items():
        assert not any(code >= 500 for code in seen), (label, seen)
        assert any(200 <= code < 300 for code in seen), f"{label} never succeeded: {dict(seen)}"
        if label != "GET /api/v1/user":
            assert any(code in (400, 422) for code in seen), f"{label} never refused: {dict(seen)}"

    api = fuzz_target.project.api
    # Whether or not the generator's appends carried tests, the run's count below then checks stored results.
    api.append(fuzz_target.thread_id, make_tests(3))
    fuzz_target.accepted_tests += 3
    api.complete_run(fuzz_target.run_id)
    run = api.wait_completed(fuzz_target.run_id)
    assert run["total_count"] == fuzz_target.accepted_tests
    assert run["thread_count"] == 1 + fuzz_target.created_threads
    closing = api.wait_completed(fuzz_target.closing_run_id)
    assert closing["threads"][0]["is_completed"] is True
    with engine.connect() as conn:
        dead = conn.execute(text(
            "SELECT count(*) FROM dead_letters d JOIN automation_runs r ON r.id = d.run_id "
            "WHERE r.project_id = :p"), {"p": fuzz_target.project.id}).scalar_one()
    assert dead == 0
