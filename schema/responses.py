"""Response bodies of the read endpoints (compat.md sections 2 and 4), one msgspec Struct per shape.

`api_shim/reads.py` builds its answers as these Structs and encodes them, and `api_shim/openapi.py` describes
them with their own JSON schemas (which `tests/test_fuzz.py` checks real answers against): a field added here is
both served and documented. The Structs are built from rows that are already valid, so they are never decoded
or validated when built; their constraints are there to be described. `forbid_unknown_fields` is what makes the
described objects closed (`additionalProperties: false`).

A run and a thread carry one counter per status id, generated from `schema.statuses.COUNT_COLUMNS`: their
Structs are made in three parts (the fields before the counters, the counters, the fields after) so that the
keys keep the order clients have always seen.
"""

from typing import TYPE_CHECKING, Annotated, Generic, Literal, TypeVar, cast, get_args

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from schema.requests import BIGINT_MAX, Artifact, CustomField, Link
from schema.statuses import COUNT_COLUMNS, RUN_STATUS_FAILED, RUN_STATUS_PASSED, RUN_STATUS_RUNNING

Id = Annotated[int, Meta(ge=1, le=BIGINT_MAX, extra_json_schema={"format": "int64"})]
Count = Annotated[int, Meta(ge=0)]
Micros = Annotated[int, Meta(ge=0, description="Microseconds.", extra_json_schema={"format": "int64"})]
# compat.md section 2: UTC ISO 8601 with microseconds and Z (`api_shim.http.iso` writes them).
Timestamp = Annotated[str, Meta(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$",
                                extra_json_schema={"format": "date-time"})]
RunStatus = Annotated[Literal[2, 3, 4], Meta(description="4 running; once completed 3 if any result failed, else 2.",
                                             extra_json_schema={"type": "integer"})]
assert set(get_args(get_args(RunStatus)[0])) == {RUN_STATUS_PASSED, RUN_STATUS_FAILED, RUN_STATUS_RUNNING}
PageNumber = Annotated[int, Meta(ge=1)]
PerPage = Literal[15, 25, 50, 100]

# After the status ids' counters, the four derived from the status flags (`api_shim.reads.Tally`).
DERIVED_COUNTS = ("success_count", "failure_count", "completed_count", "total_count")
COUNTERS: tuple[str, ...] = (*COUNT_COLUMNS, *DERIVED_COUNTS)


class Closed(Struct, forbid_unknown_fields=True):
    pass


class User(Closed):
    id: Id
    name: str
    email: str | None
    created_at: Timestamp


class NamedObject(Closed):
    """A source, config, milestone or user in `expands`."""

    id: Id
    name: str


class Status(Closed):
    id: Annotated[int, Meta(ge=1, le=len(COUNT_COLUMNS))]
    name: str
    system_name: str
    color: str
    is_final: bool
    is_untested: bool
    is_passed: bool
    is_failed: bool
    aliases: list[str]


class _RunHead(Closed):
    id: Id
    project_id: Id
    source_id: Id
    name: str
    status: RunStatus
    config_id: Id | None
    milestone_id: Id | None
    elapsed: Micros | None
    is_completed: bool
    tags: list[str]
    # Stored artifacts, fields and links are the validated request objects, as the client sent them.
    artifacts: list[Artifact]
    fields: list[CustomField]
    links: list[Link]


class _ThreadHead(Closed):
    id: Id
    index: Annotated[int, Meta(ge=1, description="1, 2, ... in creation order.")]
    name: str | None
    status: RunStatus
    elapsed: Micros | None
    is_completed: bool
    artifacts: list[Artifact]
    fields: list[CustomField]


def _counted(name: str, head: type[Closed]) -> type[Closed]:
    return cast(type[Closed], msgspec.defstruct(name, [(c, Count) for c in COUNTERS], bases=(head,)))


if TYPE_CHECKING:  # the counter fields are unknown to the type checker; the Structs are built positionally
    _RunCounted = _RunHead
    _ThreadCounted = _ThreadHead
else:
    _RunCounted = _counted("_RunCounted", _RunHead)
    _ThreadCounted = _counted("_ThreadCounted", _ThreadHead)


class Run(_RunCounted):
    thread_count: Count
    thread_active_count: Count
    thread_completed_count: Count
    created_at: Timestamp
    created_by: Id
    updated_at: Timestamp | None
    updated_by: Id | None
    completed_at: Timestamp | None
    completed_by: Id | None


class Thread(_ThreadCounted):
    created_at: Timestamp
    created_by: Id
    completed_at: Timestamp | None
    completed_by: Id | None


class RunWithThreads(Run):
    """A run's GET: the run with its first threads (`api_shim.reads.EMBEDDED_THREADS`)."""

    threads: list[Thread]


# The expands of an answer: only those the request asked for are there (UNSET ones are left out). The names a
# request may ask for are the fields (`expand_names`).
class RunExpands(Closed):
    automation_sources: list[NamedObject] | UnsetType = UNSET
    configs: list[NamedObject] | UnsetType = UNSET
    milestones: list[NamedObject] | UnsetType = UNSET
    statuses: list[Status] | UnsetType = UNSET
    users: list[NamedObject] | UnsetType = UNSET


class ThreadExpands(Closed):
    statuses: list[Status] | UnsetType = UNSET
    users: list[NamedObject] | UnsetType = UNSET


def expand_names(expands: type[Struct]) -> tuple[str, ...]:
    return expands.__struct_fields__


class RunResponse(Closed):
    result: RunWithThreads
    expands: RunExpands


T = TypeVar("T")
E = TypeVar("E")


class Page(Closed, Generic[T, E]):
    """The list envelope (compat.md section 4): `page` and its neighbours are null when there is nothing."""

    page: PageNumber | None
    prev_page: PageNumber | None
    next_page: PageNumber | None
    last_page: PageNumber | None
    per_page: Annotated[PerPage, Meta(extra_json_schema={"type": "integer"})]
    total: Count
    result: list[T]
    expands: E


# Named, so that the document's components keep readable names (a bare `Page[Run, RunExpands]` is named
# `Page_Run_RunExpands_`).
class RunPage(Page[Run, RunExpands]):
    pass


class ThreadPage(Page[Thread, ThreadExpands]):
    pass


# --- a run's tests and the project's automation cases (reads.md) ------------------------------------------------

class RunTest(Closed):
    """One stored result, as GET /automation/runs/{run_id}/tests lists it."""

    id: Id
    project_id: Id
    run_id: Id
    thread_id: Id
    case_id: Annotated[Id | None, Meta(description="Its automation case; null until the run is complete.")]
    repository_case_id: Annotated[None, Meta(description="Always null: this server keeps no manual test cases.")]
    status_id: Annotated[int, Meta(ge=1, le=len(COUNT_COLUMNS))]
    key: str
    name: str
    folder: str | None
    elapsed: Micros | None
    file: str | None
    line: int | None
    assertions: int | None
    # As the client sent them, passed through as stored (`api_shim.results`).
    fields: list[CustomField]
    artifacts: list[Artifact]
    created_at: Timestamp


class TestPage(Page[RunTest, ThreadExpands]):
    # Any page size in Testmo's range for this endpoint, not only the runs list's four. (A field redeclared in a
    # subclass takes the subclass's type in msgspec; mypy sees only a narrower base.)
    per_page: Annotated[int, Meta(ge=100, le=1000)]  # type: ignore[assignment]



CaseStatus = Annotated[Literal[1, 2, 3], Meta(description="Outcome in its latest completed run: 1 neutral, "
                                              "2 success, 3 failure.", extra_json_schema={"type": "integer"})]


class Case(Closed):
    """An automation case: one test of one source, across its completed runs."""

    id: Id
    project_id: Id
    source_id: Id
    key: str
    name: str
    folder: str | None
    status: CaseStatus
    run_count: Count
    result_count: Count
    success_count: Count
    failure_count: Count
    elapsed_average: Micros | None
    flaky_percent: Annotated[float, Meta(ge=0, le=100)]
    last_run_id: Id
    created_at: Timestamp
    updated_at: Timestamp


class CaseExpands(Closed):
    automation_sources: list[NamedObject] | UnsetType = UNSET
    statuses: list[Status] | UnsetType = UNSET


class CasePage(Page[Case, CaseExpands]):
    pass


class Created(Closed):
    """A create's 201 (built by `api_shim.writes`)."""

    id: Id


class Error(Closed):
    """compat.md section 6 (built by `api_shim.errors`)."""

    message: Annotated[str, Meta(min_length=1)]
    errors: Annotated[dict[str, Annotated[list[str], Meta(min_length=1)]],
                      Meta(description="Field path (e.g. `tests.0.status`) to its problems.")] | UnsetType = UNSET
