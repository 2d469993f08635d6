"""The GET endpoints against compat.md sections 2, 4 and 5: objects, references by name, lists, expands."""

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from conftest import Pipeline, Project
from sqlalchemy import Engine, text
from support import Api, make_tests, unique, wait_for

from ingest.admin import Admin

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
COUNTERS = ("untested_count", *(f"status{i}_count" for i in range(1, 25)),
            "success_count", "failure_count", "completed_count", "total_count")
RUN_FIELDS = {
    "id", "project_id", "source_id", "name", "status", "config_id", "milestone_id", "elapsed", "is_completed",
    "tags", "artifacts", "fields", "links", *COUNTERS, "thread_count", "thread_active_count",
    "thread_completed_count", "created_at", "created_by", "updated_at", "updated_by", "completed_at",
    "completed_by",
}
THREAD_FIELDS = {
    "id", "index", "name", "status", "elapsed", "is_completed", "artifacts", "fields", *COUNTERS,
    "created_at", "created_by", "completed_at", "completed_by",
}
ENVELOPE = {"page", "prev_page", "next_page", "last_page", "per_page", "total", "result", "expands"}
STATUS_FIELDS = {"id", "name", "system_name", "color", "is_final", "is_untested", "is_passed", "is_failed",
                 "aliases"}

FULL_ARTIFACT = {"name": "shot.png", "url": "https://example.com/shot.png", "mime_type": "image/png",
                 "size": 1048576, "note": "after login"}
FULL_FIELD = {"type": 4, "name": "Output", "value": "line 1\nline 2", "meta": {"exit": 0, "shell": "bash"},
              "is_highlight": True}
FULL_LINK = {"name": "CI job", "url": "https://ci.example.com/jobs/1", "note": "build 1"}


def is_int(value: Any) -> bool:
    return type(value) is int


def is_timestamp(value: Any) -> bool:
    return isinstance(value, str) and TIMESTAMP.match(value) is not None


def user_id(api: Api) -> int:
    response = api.get("/user")
    assert response.status_code == 200, response.text
    return int(response.json()["id"])


def list_runs(api: Api, project_id: int, **params: Any) -> dict[str, Any]:
    response = api.get(f"/projects/{project_id}/automation/runs", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == ENVELOPE
    return body


def listed_ids(api: Api, project_id: int, **params: Any) -> list[int]:
    return [r["id"] for r in list_runs(api, project_id, **params)["result"]]


def assert_422(response: httpx.Response, *fields: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["message"] == "The given data was invalid."
    for field in fields:
        assert field in body["errors"], body
        assert all(isinstance(m, str) and m for m in body["errors"][field])


def set_created_at(engine: Engine, run_id: int, moment: str) -> None:
    def written() -> bool:  # a worker writes a new run's row shortly after its create is answered
        with engine.begin() as conn:
            return conn.execute(text("UPDATE automation_runs SET created_at = :at WHERE id = :id"),
                                {"at": datetime.fromisoformat(moment), "id": run_id}).rowcount == 1

    wait_for(written, what=f"run {run_id} to be written")


@pytest.fixture
def second_user(admin: Admin, pipeline: Pipeline, project: Project) -> Iterator[Api]:
    """Another user with access to `project`."""
    api = Api(pipeline.url, admin.create_token(unique("user"), [project.id]))
    yield api
    api.close()


# --- one run ----------------------------------------------------------------------------------------------

def assert_run_shape(run: dict[str, Any]) -> None:
    assert set(run) >= RUN_FIELDS
    for name in ("id", "project_id", "source_id", "status", "created_by", *COUNTERS, "thread_count",
                 "thread_active_count", "thread_completed_count"):
        assert is_int(run[name]), (name, run[name])
    assert isinstance(run["name"], str)
    assert isinstance(run["is_completed"], bool)
    for name in ("tags", "artifacts", "fields", "links"):
        assert isinstance(run[name], list), name
    assert is_timestamp(run["created_at"])
    for name in ("config_id", "milestone_id", "updated_by", "completed_by"):
        assert run[name] is None or is_int(run[name]), (name, run[name])
    for name in ("updated_at", "completed_at"):
        assert run[name] is None or is_timestamp(run[name]), (name, run[name])
    assert run["elapsed"] is None or is_int(run["elapsed"])


def assert_thread_shape(thread: dict[str, Any]) -> None:
    assert set(thread) == THREAD_FIELDS
    for name in ("id", "index", "status", "created_by", *COUNTERS):
        assert is_int(thread[name]), (name, thread[name])
    assert thread["name"] is None or isinstance(thread["name"], str)
    assert isinstance(thread["is_completed"], bool)
    assert isinstance(thread["artifacts"], list) and isinstance(thread["fields"], list)
    assert is_timestamp(thread["created_at"])
    assert thread["completed_at"] is None or is_timestamp(thread["completed_at"])
    assert thread["completed_by"] is None or is_int(thread["completed_by"])
    assert thread["elapsed"] is None or is_int(thread["elapsed"])


def test_open_run_has_every_field_and_nulls_for_what_is_unset(project: Project) -> None:
    api = project.api
    me = user_id(api)
    run_id = api.create_run(project.id, name="shape")
    thread_id = api.create_thread(run_id, name="job 1")

    response = api.get(f"/automation/runs/{run_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"result", "expands"}
    assert body["expands"] == {}
    run = body["result"]
    assert set(run) == RUN_FIELDS | {"threads"}
    assert_run_shape(run)
    assert run["id"] == run_id and run["project_id"] == project.id and run["name"] == "shape"
    assert run["status"] == 4 and run["is_completed"] is False
    assert run["config_id"] is None and run["milestone_id"] is None and run["elapsed"] is None
    assert run["updated_at"] is None and run["updated_by"] is None
    assert run["completed_at"] is None and run["completed_by"] is None
    assert run["created_by"] == me
    assert all(run[c] == 0 for c in COUNTERS)
    assert (run["thread_count"], run["thread_active_count"], run["thread_completed_count"]) == (1, 1, 0)

    [thread] = run["threads"]
    assert_thread_shape(thread)
    assert thread["id"] == thread_id and thread["index"] == 1 and thread["name"] == "job 1"
    assert thread["status"] == 4 and thread["is_completed"] is False
    assert thread["completed_at"] is None and thread["completed_by"] is None and thread["elapsed"] is None
    assert thread["created_by"] == me


def test_completed_run_has_counters_timestamps_and_elapsed(project: Project) -> None:
    api = project.api
    me = user_id(api)
    run_id = api.create_run(project.id)
    first = api.create_thread(run_id, elapsed_observed=5_000_000)
    second = api.create_thread(run_id, elapsed_computed=7_000_000)
    api.append(first, make_tests(3, ["passed", "failed", "skipped"]))
    api.append(second, make_tests(2, ["untested", "blocked"], prefix="u"))
    api.post(f"/automation/runs/{run_id}/append", {"fields": [FULL_FIELD]})
    api.complete_thread(first)
    api.complete_run(run_id, measure_elapsed=False)

    run = api.wait_completed(run_id)
    assert set(run) == RUN_FIELDS | {"threads"}
    assert_run_shape(run)
    assert run["status"] == 3
    assert run["elapsed"] == 7_000_000
    assert is_timestamp(run["completed_at"]) and run["completed_by"] == me
    assert is_timestamp(run["updated_at"]) and run["updated_by"] == me
    assert (run["untested_count"], run["status1_count"], run["status2_count"], run["status4_count"],
            run["status5_count"]) == (1, 1, 1, 1, 1)
    assert (run["success_count"], run["failure_count"], run["completed_count"],
            run["total_count"]) == (1, 1, 4, 5)
    assert (run["thread_count"], run["thread_active_count"], run["thread_completed_count"]) == (2, 0, 2)

    threads = {t["id"]: t for t in run["threads"]}
    assert [t["index"] for t in run["threads"]] == [1, 2]
    for thread in threads.values():
        assert_thread_shape(thread)
        assert thread["is_completed"] is True
        assert is_timestamp(thread["completed_at"]) and thread["completed_by"] == me
    assert threads[first]["status"] == 3 and threads[first]["elapsed"] == 5_000_000
    assert threads[first]["total_count"] == 3 and threads[first]["failure_count"] == 1
    assert threads[second]["status"] == 2 and threads[second]["elapsed"] == 7_000_000
    assert threads[second]["untested_count"] == 1 and threads[second]["status4_count"] == 1


def test_run_round_trips_tags_fields_links_and_artifacts(project: Project) -> None:
    api = project.api
    run_id = api.create_run(project.id, tags=["nightly", "os_linux", "tag-b"], fields=[FULL_FIELD],
                            links=[FULL_LINK], artifacts=[FULL_ARTIFACT])
    thread_id = api.create_thread(run_id, fields=[FULL_FIELD], artifacts=[FULL_ARTIFACT])

    run = api.run(run_id)
    assert run["tags"] == ["nightly", "os_linux", "tag-b"]
    assert run["fields"] == [FULL_FIELD]
    assert run["links"] == [FULL_LINK]
    assert run["artifacts"] == [FULL_ARTIFACT]
    [thread] = run["threads"]
    assert thread["id"] == thread_id
    assert thread["fields"] == [FULL_FIELD] and thread["artifacts"] == [FULL_ARTIFACT]


def test_objects_come_back_with_the_keys_they_were_sent_with(project: Project) -> None:
    api = project.api
    artifact = {"name": "log.txt", "url": "https://example.com/log.txt"}
    field = {"type": 1, "name": "Browser", "value": "firefox"}
    link = {"name": "Docs", "url": "https://example.com/docs"}
    run_id = api.create_run(project.id, fields=[field], links=[link], artifacts=[artifact])
    response = api.post(f"/automation/runs/{run_id}/append", {"fields": [field], "links": [link],
                                                             "artifacts": [artifact]})
    assert response.status_code == 204
    api.complete_run(run_id)

    run = api.wait_completed(run_id)
    assert run["fields"] == [field, field]
    assert run["links"] == [link, link]
    assert run["artifacts"] == [artifact, artifact]


# --- references by name -----------------------------------------------------------------------------------

def test_source_is_created_on_first_use_then_reused(project: Project, other_project: Project,
                                                    engine: Engine) -> None:
    api = project.api
    first = api.run(api.create_run(project.id, source="api-tests"))
    second = api.run(api.create_run(project.id, source="api-tests"))
    other = api.run(api.create_run(project.id, source="ui-tests"))
    elsewhere = other_project.api.run(other_project.api.create_run(other_project.id, source="api-tests"))

    assert first["source_id"] == second["source_id"]
    assert other["source_id"] != first["source_id"]
    assert elsewhere["source_id"] != first["source_id"]
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT name FROM automation_sources WHERE project_id = :p ORDER BY name"),
                            {"p": project.id}).scalars().all()
    assert rows == ["api-tests", "ui-tests"]


@pytest.mark.parametrize("kind", ["config", "milestone"])
def test_config_and_milestone_resolve_by_name_or_id_and_the_id_wins(project: Project, admin: Admin,
                                                                     kind: str) -> None:
    api = project.api
    linux = admin.create_named(f"{kind}s", project.id, "Linux")
    mac = admin.create_named(f"{kind}s", project.id, "macOS")

    assert api.run(api.create_run(project.id, **{kind: "macOS"}))[f"{kind}_id"] == mac
    assert api.run(api.create_run(project.id, **{f"{kind}_id": linux}))[f"{kind}_id"] == linux
    both = api.run(api.create_run(project.id, **{kind: "macOS", f"{kind}_id": linux}))
    assert both[f"{kind}_id"] == linux


@pytest.mark.parametrize(("body", "field"), [
    ({"config": "no-such-config"}, "config"),
    ({"config_id": 999_999_999}, "config_id"),
    ({"milestone": "no-such-milestone"}, "milestone"),
    ({"milestone_id": 999_999_999}, "milestone_id"),
    ({"config": "Linux", "config_id": 999_999_999}, "config_id"),
])
def test_unknown_config_or_milestone_is_422_naming_it(project: Project, admin: Admin, body: dict[str, Any],
                                                      field: str) -> None:
    admin.create_named("configs", project.id, "Linux")
    response = project.api.post(f"/projects/{project.id}/automation/runs",
                                {"name": "Run", "source": "backend"} | body)
    assert_422(response, field)
    assert list(response.json()["errors"]) == [field]
    assert listed_ids(project.api, project.id) == []


@pytest.mark.parametrize("kind", ["config", "milestone"])
def test_config_or_milestone_of_another_project_is_422(project: Project, other_project: Project,
                                                       admin: Admin, kind: str) -> None:
    foreign = admin.create_named(f"{kind}s", other_project.id, "Windows")
    url = f"/projects/{project.id}/automation/runs"
    base = {"name": "Run", "source": "backend"}
    assert_422(project.api.post(url, base | {f"{kind}_id": foreign}), f"{kind}_id")
    assert_422(project.api.post(url, base | {kind: "Windows"}), kind)


# --- lists ------------------------------------------------------------------------------------------------

def test_pagination_envelope_across_pages(project: Project) -> None:
    api = project.api
    ids = [api.create_run(project.id, name=f"run {i}") for i in range(30)]

    page1 = list_runs(api, project.id, per_page=15)
    assert {k: v for k, v in page1.items() if k not in ("result", "expands")} == {
        "page": 1, "prev_page": None, "next_page": 2, "last_page": 2, "per_page": 15, "total": 30}
    page2 = list_runs(api, project.id, per_page=15, page=2)
    assert (page2["page"], page2["prev_page"], page2["next_page"], page2["last_page"]) == (2, 1, None, 2)
    page3 = list_runs(api, project.id, per_page=15, page=3)
    assert (page3["page"], page3["prev_page"], page3["next_page"], page3["last_page"]) == (3, 2, None, 2)
    assert page3["result"] == [] and page3["total"] == 30
    assert page1["expands"] == page2["expands"] == page3["expands"] == {}

    seen = [r["id"] for r in page1["result"] + page2["result"]]
    assert seen == sorted(ids, reverse=True)
    for run in page1["result"]:
        assert set(run) == RUN_FIELDS
        assert_run_shape(run)

    whole = list_runs(api, project.id)
    assert whole["per_page"] == 100 and whole["total"] == 30 and whole["last_page"] == 1
    assert [r["id"] for r in whole["result"]] == seen


def test_empty_project_list(project: Project) -> None:
    body = list_runs(project.api, project.id)
    assert body == {"page": None, "prev_page": None, "next_page": None, "last_page": None, "per_page": 100,
                    "total": 0, "result": [], "expands": {}}


@pytest.mark.parametrize(("params", "field"), [
    ({"per_page": "10"}, "per_page"),
    ({"per_page": "20"}, "per_page"),
    ({"per_page": "0"}, "per_page"),
    ({"per_page": "1000"}, "per_page"),
    ({"per_page": "abc"}, "per_page"),
    ({"page": "0"}, "page"),
    ({"page": "-1"}, "page"),
    ({"page": "abc"}, "page"),
    ({"page": "1.5"}, "page"),
    ({"sort": "automation_runs:name"}, "sort"),
    ({"sort": "created_at"}, "sort"),
    ({"order": "sideways"}, "order"),
])
def test_invalid_paging_is_422(project: Project, params: dict[str, str], field: str) -> None:
    assert_422(project.api.get(f"/projects/{project.id}/automation/runs", params=params), field)


def test_order_by_created_at(project: Project, engine: Engine) -> None:
    api = project.api
    middle, newest, oldest = (api.create_run(project.id) for _ in range(3))
    set_created_at(engine, oldest, "2021-01-01T00:00:00+00:00")
    set_created_at(engine, middle, "2022-01-01T00:00:00+00:00")
    set_created_at(engine, newest, "2023-01-01T00:00:00+00:00")

    assert listed_ids(api, project.id) == [newest, middle, oldest]
    assert listed_ids(api, project.id, order="desc") == [newest, middle, oldest]
    ascending = listed_ids(api, project.id, sort="automation_runs:created_at", order="asc")
    assert ascending == [oldest, middle, newest]
    assert list_runs(api, project.id, order="asc")["result"][0]["created_at"] == "2021-01-01T00:00:00.000000Z"


def test_filters_by_reference_user_and_tags(project: Project, second_user: Api, admin: Admin) -> None:
    api = project.api
    c1, c2 = (admin.create_named("configs", project.id, n) for n in ("c1", "c2"))
    m1, m2 = (admin.create_named("milestones", project.id, n) for n in ("m1", "m2"))
    a = api.create_run(project.id, source="src-a", config_id=c1, milestone_id=m1, tags=["x"])
    b = second_user.create_run(project.id, source="src-b", config_id=c2, milestone_id=m2, tags=["y", "z"])
    c = api.create_run(project.id, source="src-a")
    source_a = api.run(a)["source_id"]
    source_b = api.run(b)["source_id"]

    def ids(**params: Any) -> set[int]:
        return set(listed_ids(api, project.id, **params))

    assert ids() == {a, b, c}
    assert ids(config_id=c1) == {a}
    assert ids(config_id=f"{c1},{c2}") == {a, b}
    assert ids(milestone_id=m2) == {b}
    assert ids(milestone_id=f"{m1}, {m2}") == {a, b}
    assert ids(source_id=source_a) == {a, c}
    assert ids(source_id=f"{source_a},{source_b}") == {a, b, c}
    assert ids(created_by=user_id(api)) == {a, c}
    assert ids(created_by=user_id(second_user)) == {b}
    assert ids(tags="x") == {a}
    assert ids(tags="z") == {b}
    assert ids(tags="x,z") == {a, b}
    assert ids(tags="nothing") == set()
    assert ids(config_id=c1, tags="y") == set()
    assert ids(config_id=c2, tags="y", source_id=source_b) == {b}
    filtered = list_runs(api, project.id, config_id=c1)
    assert filtered["total"] == 1 and filtered["last_page"] == 1


def test_status_filter_and_its_state_alias(project: Project) -> None:
    api = project.api
    running = api.create_run(project.id, name="running")
    passed = api.create_run(project.id, name="passed")
    api.append(api.create_thread(passed), make_tests(2, ["passed", "skipped"]))
    failed = api.create_run(project.id, name="failed")
    api.append(api.create_thread(failed), make_tests(2, ["passed", "failed"]))
    for run_id in (passed, failed):
        api.complete_run(run_id)
    assert api.wait_completed(passed)["status"] == 2
    assert api.wait_completed(failed)["status"] == 3

    def ids(**params: Any) -> set[int]:
        return set(listed_ids(api, project.id, **params))

    assert ids(status=4) == ids(state=4) == {running}
    assert ids(status=2) == ids(state=2) == {passed}
    assert ids(status=3) == ids(state=3) == {failed}
    assert ids(status="2,3") == ids(state="2,3") == {passed, failed}
    assert ids(status="1") == set()


def test_created_after_and_before(project: Project, engine: Engine) -> None:
    api = project.api
    early, middle, late = (api.create_run(project.id) for _ in range(3))
    set_created_at(engine, early, "2020-01-01T00:00:00+00:00")
    set_created_at(engine, middle, "2021-01-01T00:00:00+00:00")
    set_created_at(engine, late, "2022-01-01T00:00:00+00:00")

    def ids(**params: Any) -> set[int]:
        return set(listed_ids(api, project.id, **params))

    assert ids(created_after="2020-06-01T00:00:00.000Z") == {middle, late}
    assert ids(created_before="2021-06-01T00:00:00Z") == {early, middle}
    assert ids(created_after="2020-06-01T00:00:00Z", created_before="2021-06-01T00:00:00Z") == {middle}
    # 2021-01-01T01:00:00+02:00 is 2020-12-31T23:00:00Z: the offset counts.
    assert ids(created_after="2021-01-01T01:00:00+02:00") == {middle, late}
    assert ids(created_after="2021-01-01T00:00:00.000001Z") == {late}
    assert ids(created_after="2021-01-01T00:00:00Z") == {late}
    assert ids(created_before="2021-01-01T00:00:00Z") == {early}
    assert ids(created_after=datetime(2030, 1, 1, tzinfo=UTC).isoformat()) == set()


@pytest.mark.parametrize(("params", "field"), [
    ({"config_id": "abc"}, "config_id"),
    ({"config_id": "1,x"}, "config_id"),
    ({"created_by": "-1"}, "created_by"),
    ({"milestone_id": "1.5"}, "milestone_id"),
    ({"source_id": "99999999999999999999"}, "source_id"),
    ({"status": "passed"}, "status"),
    ({"state": "failed"}, "state"),
    ({"tags": "bad tag"}, "tags"),
    ({"tags": "ok,b@d"}, "tags"),
    ({"created_after": "yesterday"}, "created_after"),
    ({"created_after": "2021-13-01T00:00:00Z"}, "created_after"),
    ({"created_before": "2021-01-01T00:00:00"}, "created_before"),
])
def test_invalid_filter_values_are_422(project: Project, params: dict[str, str], field: str) -> None:
    assert_422(project.api.get(f"/projects/{project.id}/automation/runs", params=params), field)


def test_several_invalid_parameters_are_all_reported(project: Project) -> None:
    response = project.api.get(f"/projects/{project.id}/automation/runs",
                               params={"per_page": "7", "config_id": "x", "expands": "runs"})
    assert_422(response, "per_page", "config_id", "expands")


# --- expands ----------------------------------------------------------------------------------------------

@pytest.fixture
def referenced(project: Project, second_user: Api, admin: Admin) -> dict[str, Any]:
    """Two runs referencing different sources, configs, milestones and users, and one unreferenced config."""
    api = project.api
    config = admin.create_named("configs", project.id, "Linux")
    milestone = admin.create_named("milestones", project.id, "Release 1")
    admin.create_named("configs", project.id, "unused")
    first = api.create_run(project.id, source="frontend", config_id=config)
    second = second_user.create_run(project.id, source="backend", milestone_id=milestone)
    return {
        "first": first, "second": second,
        "sources": {"frontend": api.run(first)["source_id"], "backend": api.run(second)["source_id"]},
        "config": config, "milestone": milestone,
        "users": {user_id(api), user_id(second_user)},
    }


def test_list_expands_each_kind(project: Project, referenced: dict[str, Any]) -> None:
    api = project.api
    sources = referenced["sources"]

    expands = list_runs(api, project.id, expands="automation_sources")["expands"]
    assert expands == {"automation_sources": sorted(
        [{"id": sources["frontend"], "name": "frontend"}, {"id": sources["backend"], "name": "backend"}],
        key=lambda o: o["id"])}
    assert list_runs(api, project.id, expands="configs")["expands"] == {
        "configs": [{"id": referenced["config"], "name": "Linux"}]}
    assert list_runs(api, project.id, expands="milestones")["expands"] == {
        "milestones": [{"id": referenced["milestone"], "name": "Release 1"}]}

    users = list_runs(api, project.id, expands="users")["expands"]["users"]
    assert {u["id"] for u in users} == referenced["users"]
    assert all(set(u) == {"id", "name"} and isinstance(u["name"], str) for u in users)

    statuses = list_runs(api, project.id, expands="statuses")["expands"]["statuses"]
    assert [s["id"] for s in statuses][:6] == [1, 2, 3, 4, 5, 6]
    assert all(set(s) == STATUS_FIELDS for s in statuses)
    passed = statuses[1]
    assert passed["name"] == "Passed" and passed["system_name"] == "passed"
    assert passed["is_passed"] is True and passed["is_final"] is True and passed["is_failed"] is False
    assert "ok" in passed["aliases"] and isinstance(passed["color"], str)
    assert statuses[0]["is_untested"] is True and statuses[2]["is_failed"] is True


def test_list_expands_only_what_the_page_references(project: Project, referenced: dict[str, Any]) -> None:
    body = list_runs(project.api, project.id, expands="automation_sources,configs,milestones,users",
                     source_id=referenced["sources"]["backend"])
    assert [r["id"] for r in body["result"]] == [referenced["second"]]
    expands = body["expands"]
    assert set(expands) == {"automation_sources", "configs", "milestones", "users"}
    assert expands["automation_sources"] == [{"id": referenced["sources"]["backend"], "name": "backend"}]
    assert expands["configs"] == []
    assert expands["milestones"] == [{"id": referenced["milestone"], "name": "Release 1"}]
    assert len(expands["users"]) == 1

    empty = list_runs(project.api, project.id, expands="configs,statuses", tags="none")
    assert empty["result"] == [] and empty["expands"]["configs"] == []
    assert len(empty["expands"]["statuses"]) >= 6


def test_get_run_expands(project: Project, second_user: Api, admin: Admin) -> None:
    api = project.api
    config = admin.create_named("configs", project.id, "Linux")
    run_id = api.create_run(project.id, source="frontend", config_id=config)

    response = api.get(f"/automation/runs/{run_id}",
                       params={"expands": "automation_sources,configs,milestones,statuses,users"})
    assert response.status_code == 200
    body = response.json()
    expands = body["expands"]
    assert set(expands) == {"automation_sources", "configs", "milestones", "statuses", "users"}
    assert expands["automation_sources"] == [{"id": body["result"]["source_id"], "name": "frontend"}]
    assert expands["configs"] == [{"id": config, "name": "Linux"}]
    assert expands["milestones"] == []
    assert expands["users"] == [{"id": user_id(api), "name": api.get("/user").json()["name"]}]
    assert all(set(s) == STATUS_FIELDS for s in expands["statuses"])

    just_configs = api.get(f"/automation/runs/{run_id}", params={"expands": "configs"}).json()["expands"]
    assert just_configs == {"configs": [{"id": config, "name": "Linux"}]}


def test_get_run_users_expand_includes_who_completed_and_who_created_threads(project: Project,
                                                                            second_user: Api) -> None:
    api = project.api
    completed_by_other = api.create_run(project.id)
    api.create_thread(completed_by_other)
    second_user.complete_run(completed_by_other)
    thread_by_other = api.create_run(project.id)
    second_user.create_thread(thread_by_other)
    api.complete_run(thread_by_other)
    both = {user_id(api), user_id(second_user)}

    for run_id in (completed_by_other, thread_by_other):
        api.wait_completed(run_id)
        users = api.get(f"/automation/runs/{run_id}", params={"expands": "users"}).json()["expands"]["users"]
        assert {u["id"] for u in users} == both, run_id


@pytest.mark.parametrize("expands", ["runs", "configs,projects", "Configs"])
def test_unknown_expand_is_422(project: Project, expands: str) -> None:
    run_id = project.api.create_run(project.id)
    for path in (f"/projects/{project.id}/automation/runs", f"/automation/runs/{run_id}"):
        assert_422(project.api.get(path, params={"expands": expands}), "expands")


# --- the token's user -------------------------------------------------------------------------------------

def test_get_user_returns_the_tokens_user(admin: Admin, pipeline: Pipeline, project: Project) -> None:
    name = unique("alice")
    api = Api(pipeline.url, admin.create_token(name, [project.id]))
    try:
        response = api.get("/user")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        user = response.json()
        assert user["name"] == name and is_int(user["id"])
        assert api.run(api.create_run(project.id))["created_by"] == user["id"]
        assert user["id"] != user_id(project.api)
    finally:
        api.close()
