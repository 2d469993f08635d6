"""Query strings of the read endpoints (compat.md section 4), one msgspec Struct per endpoint.

A field is a query parameter: its type, with its constraints, is what `parse` checks the value against and what
`api_shim/openapi.py` describes; its `Text` says how the parameter's text becomes the value (comma lists,
numbers) and what the 422 says when it cannot. A client gets every wrong parameter in one 422, each under its
own name, with the messages clients have always had.
"""

import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args

import msgspec
from msgspec import UNSET, Meta, Struct
from starlette.datastructures import QueryParams

from schema.requests import Tag
from schema.responses import CaseExpands, CaseStatus, PerPage, RunExpands, ThreadExpands, expand_names


class Refused(ValueError):
    """The parameter's text is not a value of its kind: its 422 messages."""

    def __init__(self, *messages: str) -> None:
        super().__init__(messages[0])
        self.messages = list(messages)


class QueryError(Exception):
    """Parameter name -> its problems, as in the 422 body."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("invalid query")
        self.errors = errors


@dataclass(frozen=True)
class Text:
    """How a parameter's text becomes its value: `parse` returns it (UNSET: as if the parameter were absent) or
    raises Refused; a value that then breaks the field's type gets `problem`."""

    parse: Callable[[str], Any]
    problem: str = ""
    # Read only when this other parameter is absent: an alias.
    unless: str | None = None


def _is_number(text: str) -> bool:
    # str.isdigit() also accepts digits int() refuses, such as '²'.
    return text.isascii() and text.isdecimal()


def positive(digits: int, message: str) -> Callable[[str], int]:
    """A whole number of at most `digits` digits, 1 or more."""
    def parse(text: str) -> int:
        if not _is_number(text) or len(text) > digits or int(text) < 1:
            raise Refused(message)
        return int(text)
    return parse


def _parts(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def ids(text: str) -> list[int] | Any:
    if text == "":
        return UNSET
    parts = _parts(text)
    if not parts or not all(_is_number(p) and len(p) <= 18 for p in parts):
        raise Refused(IDS)
    return [int(p) for p in parts]


def words(text: str) -> list[str] | Any:
    # Blank items are left out; no item at all is no filter.
    return _parts(text) or UNSET


def moment(text: str) -> datetime | Any:
    if not text:
        return UNSET
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise Refused("must be an ISO 8601 date and time, e.g. 2026-02-15T00:00:00.000Z") from None


@dataclass(frozen=True)
class ExpandNames:
    """The names of `expands`, each once, in the order first given (a name repeated ten thousand times is one
    query, not 10,000); one message per unknown name, up to 10."""

    accepted: tuple[str, ...]

    def __call__(self, text: str) -> list[str]:
        names = list(dict.fromkeys(_parts(text)))
        unknown = [n for n in names if n not in self.accepted]
        if unknown:
            raise Refused(*(f"Unknown expand '{n[:100]}'; accepted: {', '.join(self.accepted)}."
                            for n in unknown[:10]))
        return names


def expand_of(expands: type[Struct]) -> Meta:
    """Describes an item of `expands` as one of the names of an answer's expands object (its fields)."""
    return Meta(extra_json_schema={"enum": list(expand_names(expands))})


EXPANDS = Meta(description="Comma-separated expands.")


def one_of(choices: Any) -> str:
    return f"must be one of {', '.join(map(str, get_args(choices)))}"


POSITIVE = "must be a positive whole number"
IDS = "must be a comma-separated list of ids"
TAGS = "must be a comma-separated list of tags (letters, digits, underscore and dash)"
# Ids as a filter takes them: any of up to 18 digits (an id that cannot exist matches nothing).
QueryId = Annotated[int, Meta(ge=0, le=10**18 - 1)]
IdList = Annotated[list[QueryId] | None, Meta(description="Comma-separated ids."), Text(ids, IDS)]
Moment = Annotated[Annotated[datetime, Meta(tz=True)] | None, Meta(description="ISO 8601 with a time zone."),
                   Text(moment, "must carry a time zone, e.g. a trailing Z for UTC")]
Sort = Literal["automation_runs:created_at"]
Order = Literal["asc", "desc"]
STRING = Meta(extra_json_schema={"type": "string"})


def _expands(expands: type[Struct]) -> Any:
    return Annotated[list[Annotated[str, expand_of(expands)]], EXPANDS, Text(ExpandNames(expand_names(expands)))]


# An endpoint's `expands`: the names of the expands object it answers with.
if TYPE_CHECKING:
    RunExpandList = list[str]
    ThreadExpandList = list[str]
    CaseExpandList = list[str]
else:
    RunExpandList = _expands(RunExpands)
    ThreadExpandList = _expands(ThreadExpands)
    CaseExpandList = _expands(CaseExpands)


class Query(Struct, kw_only=True):
    """Parameters not declared are ignored, as they always were."""


class Paging(Query):
    page: Annotated[int, Meta(ge=1, le=999_999_999), Text(positive(9, POSITIVE))] = 1
    per_page: Annotated[PerPage, Meta(extra_json_schema={"type": "integer"}),
                        Text(positive(9, POSITIVE), one_of(PerPage))] = 100


class RunsQuery(Paging):
    """GET /projects/{project_id}/automation/runs."""

    sort: Annotated[Sort, STRING, Text(str, one_of(Sort))] = "automation_runs:created_at"
    order: Annotated[Order, STRING, Text(str.lower, "must be asc or desc")] = "desc"
    config_id: IdList = None
    created_by: IdList = None
    milestone_id: IdList = None
    source_id: IdList = None
    status: Annotated[list[QueryId] | None, Meta(description="Run status ids (2 passed, 3 failed, 4 running)."),
                      Text(ids, IDS)] = None
    state: Annotated[list[QueryId] | None, Meta(description="Alias of `status`, used when `status` is absent."),
                     Text(ids, IDS, unless="status")] = None
    tags: Annotated[list[Tag] | None, Meta(description="Comma-separated tags; runs with any of them."),
                    Text(words, TAGS)] = None
    created_after: Moment = None
    created_before: Moment = None
    expands: RunExpandList = []


class RunQuery(Query):
    """GET /automation/runs/{run_id}."""

    expands: RunExpandList = []


class ThreadsQuery(Paging):
    """GET /automation/runs/{run_id}/threads."""

    expands: ThreadExpandList = []


TestSort = Literal["automation_run_tests:id", "automation_run_tests:name", "automation_run_tests:status",
                   "automation_run_tests:elapsed", "automation_run_tests:created_at"]


class TestsQuery(Paging):
    """GET /automation/runs/{run_id}/tests (reads.md)."""

    # A field redeclared in a subclass takes the subclass's type (msgspec); mypy sees only a narrower base.
    per_page: Annotated[int, Meta(ge=100, le=1000),
                        Text(positive(9, POSITIVE), "must be a whole number from 100 to 1000")] = 100  # type: ignore[assignment]
    sort: Annotated[TestSort, STRING, Text(str, one_of(TestSort))] = "automation_run_tests:id"
    order: Annotated[Order, STRING, Text(str.lower, "must be asc or desc")] = "desc"
    thread_id: Annotated[QueryId | None, Meta(description="Only this thread's results (a thread of this run)."),
                         Text(positive(18, "must be one thread id"))] = None
    status_id: Annotated[list[QueryId] | None, Meta(description="Comma-separated status ids."),
                         Text(ids, IDS)] = None
    expands: ThreadExpandList = []



CaseSort = Literal["automation_sources:created_at", "automation_cases:name", "automation_cases:elapsed_average",
                   "automation_cases:failure_count", "automation_cases:flaky_percent"]


def _text(text: str) -> str | Any:
    return text or UNSET


class CasesQuery(Paging):
    """GET /projects/{project_id}/automation/cases (reads.md)."""

    sort: Annotated[CaseSort, STRING, Text(str, one_of(CaseSort))] = "automation_sources:created_at"
    order: Annotated[Order, STRING, Text(str.lower, "must be asc or desc")] = "asc"
    source_id: IdList = None
    status: Annotated[list[CaseStatus] | None, Meta(description="Comma-separated outcomes."),
                      Text(ids, "must be a comma-separated list of 1 (neutral), 2 (success) and 3 (failure)")] = None
    name: Annotated[str | None, Meta(description="Case-insensitive substring of the name."), Text(_text)] = None
    folder: Annotated[str | None, Meta(description="The folder, exactly."), Text(_text)] = None
    expands: CaseExpandList = []


Q = TypeVar("Q", bound=Query)


@cache
def fields(model: type[Query]) -> dict[str, tuple[Text, Any]]:
    """Each parameter's Text and the type its value must have, by name."""
    hints = typing.get_type_hints(model, include_extras=True)
    return {name: (next(m for m in get_args(hints[name]) if isinstance(m, Text)), hints[name])
            for name in model.__struct_fields__}


def parse(model: type[Q], params: QueryParams) -> Q:
    """The query string as `model`, or QueryError with every wrong parameter's problems."""
    values: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for name, (text, annotation) in fields(model).items():
        raw = params.get(name)
        if raw is None or (text.unless is not None and text.unless in params):
            continue
        try:
            value = text.parse(raw)
        except Refused as refused:
            errors[name] = refused.messages
            continue
        if value is UNSET:
            continue
        try:
            msgspec.convert(value, annotation)
        except msgspec.ValidationError as exc:
            errors[name] = [text.problem or str(exc)]
            continue
        values[name] = value
    if errors:
        raise QueryError(errors)
    return model(**values)
