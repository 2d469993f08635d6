"""Request bodies of the automation-runs API, with the server's own limits (compat.md section 1).

Bodies are validated by pydantic into plain dicts (TypedDicts): an append of a thousand tests is validated
and re-serialised in a fraction of the time model instances would take, and that is the hot path. They are
strict (a number is not a string, a string is not a number) and forbid unknown keys, so a typo in a client
surfaces as a 422 naming the field instead of data silently dropped. Two rules pydantic cannot express
declaratively, a field value's limit by field type and the status table, are checked after it (`finish_*`).
"""

from typing import Annotated, Any, NotRequired

import orjson
from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, with_config
from typing_extensions import TypedDict

STRING_MAX = 750
URL_MAX = 2048
TEXT_MAX = 64 * 1024
NOTE_MAX = 255
ITEMS_MAX = 100
TESTS_MAX = 1000
META_KEYS_MAX = 25
BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1

Name = Annotated[str, StringConstraints(min_length=1, max_length=STRING_MAX)]
ShortText = Annotated[str, StringConstraints(max_length=STRING_MAX)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=URL_MAX)]
Note = Annotated[str, StringConstraints(max_length=NOTE_MAX)]
Micros = Annotated[int, Field(ge=0, le=BIGINT_MAX)]
Count = Annotated[int, Field(ge=0, le=INT_MAX)]
Id = Annotated[int, Field(ge=1, le=BIGINT_MAX)]
# The CLI checks the patterns of tags and sources, then cuts both at STRING_MAX.
Tag = Annotated[str, StringConstraints(min_length=1, max_length=STRING_MAX, pattern=r"^[A-Za-z0-9_-]+$")]
SourceName = Annotated[str, StringConstraints(min_length=1, max_length=STRING_MAX, pattern=r"^[A-Za-z0-9-]+$")]
# A JUnit property named `string:` or ` ` reaches the server as a field with an empty name.
FieldName = ShortText
# Meta numbers must survive a round trip through PostgreSQL's jsonb and back out as JSON: 64-bit integers
# (signed or not),
# and floats small enough that jsonb does not print them back as integers wider than that.
MetaValue = (ShortText | Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
             | Annotated[float, Field(ge=-1e15, le=1e15)] | bool | None)

# Integers the official CLI can send beyond what their columns hold (JavaScript prints a JUnit time of 10^20
# seconds as 1e+26): saturated at the column's largest value rather than refused (api_shim/repair.py).
SATURATED = {"elapsed": BIGINT_MAX, "elapsed_observed": BIGINT_MAX, "elapsed_computed": BIGINT_MAX,
             "line": INT_MAX, "assertions": INT_MAX, "size": BIGINT_MAX}

FIELD_STRING, FIELD_TEXT, FIELD_HTML, FIELD_CONSOLE, FIELD_URL = 1, 2, 3, 4, 5
VALUE_MAX = {FIELD_STRING: STRING_MAX, FIELD_TEXT: TEXT_MAX, FIELD_HTML: TEXT_MAX, FIELD_CONSOLE: TEXT_MAX,
             FIELD_URL: URL_MAX}

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


@with_config(STRICT)
class CustomField(TypedDict):
    type: Annotated[int, Field(ge=FIELD_STRING, le=FIELD_URL)]
    name: FieldName
    value: Annotated[str, StringConstraints(max_length=TEXT_MAX)]  # and VALUE_MAX by type
    meta: NotRequired[Annotated[dict[ShortText, MetaValue], Field(max_length=META_KEYS_MAX)] | None]
    is_highlight: NotRequired[bool | None]


@with_config(STRICT)
class Artifact(TypedDict):
    name: Name
    url: Url
    mime_type: NotRequired[ShortText | None]
    size: NotRequired[Annotated[int, Field(ge=0, le=BIGINT_MAX)] | None]
    note: NotRequired[Note | None]


@with_config(STRICT)
class Link(TypedDict):
    name: Name
    url: Url
    note: NotRequired[Note | None]


Fields = Annotated[list[CustomField], Field(max_length=ITEMS_MAX)]
Artifacts = Annotated[list[Artifact], Field(max_length=ITEMS_MAX)]
Links = Annotated[list[Link], Field(max_length=ITEMS_MAX)]


@with_config(STRICT)
class ResultIn(TypedDict):
    key: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    name: Name
    # One of the accepted strings of the status table; `finish_thread_append` turns it into a status id.
    status: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    folder: NotRequired[ShortText | None]
    elapsed: NotRequired[Micros | None]
    file: NotRequired[ShortText | None]
    line: NotRequired[Count | None]
    assertions: NotRequired[Count | None]
    fields: NotRequired[Fields]
    artifacts: NotRequired[Artifacts]


@with_config(STRICT)
class RunCreate(TypedDict):
    name: Name
    source: SourceName
    tags: NotRequired[Annotated[list[Tag], Field(max_length=ITEMS_MAX)]]
    config: NotRequired[Name | None]
    config_id: NotRequired[Id | None]
    milestone: NotRequired[Name | None]
    milestone_id: NotRequired[Id | None]
    fields: NotRequired[Fields]
    links: NotRequired[Links]
    artifacts: NotRequired[Artifacts]


@with_config(STRICT)
class RunAppend(TypedDict):
    fields: NotRequired[Fields]
    links: NotRequired[Links]
    artifacts: NotRequired[Artifacts]


@with_config(STRICT)
class RunComplete(TypedDict):
    # Defaults to true when left out: the run's elapsed is then the time from its creation to this call.
    measure_elapsed: NotRequired[bool]


@with_config(STRICT)
class ThreadCreate(TypedDict):
    name: NotRequired[Name | None]
    elapsed_observed: NotRequired[Micros | None]
    elapsed_computed: NotRequired[Micros | None]
    fields: NotRequired[Fields]
    artifacts: NotRequired[Artifacts]


@with_config(STRICT)
class ThreadAppend(TypedDict):
    elapsed_observed: NotRequired[Micros | None]
    elapsed_computed: NotRequired[Micros | None]
    fields: NotRequired[Fields]
    artifacts: NotRequired[Artifacts]
    tests: NotRequired[Annotated[list[ResultIn], Field(max_length=TESTS_MAX)]]


@with_config(STRICT)
class ThreadComplete(TypedDict):
    elapsed_observed: NotRequired[Micros | None]
    elapsed_computed: NotRequired[Micros | None]


ADAPTERS: dict[type, TypeAdapter[Any]] = {
    body: TypeAdapter(body)
    for body in (RunCreate, RunAppend, RunComplete, ThreadCreate, ThreadAppend, ThreadComplete)
}


def saturating_add(total: int | None, part: int) -> int:
    """A sum of elapsed times that stops at the largest bigint instead of failing to store (292,000 years:
    past that, precision is not the problem)."""
    return min(BIGINT_MAX, (total or 0) + part)


class BodyError(Exception):
    """Rules broken after schema validation: field path -> problems, as in the 422 body."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("invalid body")
        self.errors = errors


def validate(body_type: type, raw: bytes) -> dict[str, Any]:
    """Validate a JSON body; raises pydantic's ValidationError or BodyError."""
    data: dict[str, Any] = ADAPTERS[body_type].validate_json(raw)
    errors: dict[str, list[str]] = {}
    _check_field_values(data.get("fields"), "fields", errors)
    if errors:
        raise BodyError(errors)
    return data


def finish_thread_append(data: dict[str, Any], statuses: dict[str, int]) -> None:
    """Turn a validated append's `tests` into `results` rows (schema.messages.RESULT_FIELDS), in place.

    One pass over the tests maps each status string to its status id, checks field values, and counts the
    results by status, so that the worker only has to hand the rows to COPY.
    """
    errors: dict[str, list[str]] = {}
    rows = []
    counts: dict[int, int] = {}
    elapsed_sum = None
    for i, test in enumerate(data.pop("tests", ())):
        status_id = statuses.get(test["status"].lower())
        if status_id is None:
            errors[f"tests.{i}.status"] = ["unknown status; accepted: " + ", ".join(sorted(statuses))]
            continue
        counts[status_id] = counts.get(status_id, 0) + 1
        elapsed = test.get("elapsed")
        if elapsed is not None:
            elapsed_sum = saturating_add(elapsed_sum, elapsed)
        fields = test.get("fields")
        if fields:
            _check_field_values(fields, f"tests.{i}.fields", errors)
        artifacts = test.get("artifacts")
        rows.append([status_id, test["key"], test["name"], test.get("folder"), elapsed, test.get("file"),
                     test.get("line"), test.get("assertions"), orjson.dumps(fields).decode() if fields else None,
                     orjson.dumps(artifacts).decode() if artifacts else None])
    if errors:
        raise BodyError(errors)
    if rows:
        data["results"] = rows
        data["counts"] = sorted([status_id, n] for status_id, n in counts.items())
    if elapsed_sum is not None:
        data["results_elapsed"] = elapsed_sum


def _check_field_values(fields: list[CustomField] | None, path: str, errors: dict[str, list[str]]) -> None:
    for i, field in enumerate(fields or ()):
        limit = VALUE_MAX[field["type"]]
        if len(field["value"]) > limit:
            errors[f"{path}.{i}.value"] = [f"must be at most {limit} characters for a field of type {field['type']}"]

