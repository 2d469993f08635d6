"""Request bodies of the automation-runs API, with the server's own limits (compat.md section 1).

Each body is one msgspec Struct, declared once: it validates the JSON as it is parsed (in C, stopping at the
first problem), `api_shim/problems.py` walks the same declarations to list every problem of a refused body,
and `api_shim/openapi.py` describes them. Bodies are strict (a number is not a string, a string is not a
number, `1.0` is not an integer) and forbid unknown keys, so a typo in a client surfaces as a 422 naming the
field instead of data silently dropped. A field left out stays out (UNSET), so what is stored is what was
sent. The rules a declaration cannot express (a field value's limit by field type, meta integers within 64
bits, the status table) are checked after decoding.
"""

from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

STRING_MAX = 750
URL_MAX = 2048
TEXT_MAX = 64 * 1024
NOTE_MAX = 255
ITEMS_MAX = 100
TESTS_MAX = 1000
META_KEYS_MAX = 25
BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
# What one run, and one thread, holds at most over all its appends: fields, links, artifacts (each), and their
# JSON bytes together. A run's GET and a worker's update of it stay small, whatever its clients send.
OBJECT_ITEMS_MAX = 500
OBJECT_BYTES_MAX = 1024 * 1024

# Integers the official CLI can send beyond what their columns hold (JavaScript prints a JUnit time of 10^20
# seconds as 1e+26): saturated at the column's largest value rather than refused (api_shim/repair.py).
SATURATED = {"elapsed": BIGINT_MAX, "elapsed_observed": BIGINT_MAX, "elapsed_computed": BIGINT_MAX,
             "line": INT_MAX, "assertions": INT_MAX, "size": BIGINT_MAX}

Name = Annotated[str, Meta(min_length=1, max_length=STRING_MAX)]
ShortText = Annotated[str, Meta(max_length=STRING_MAX)]
# A JUnit property named `string:` or ` ` reaches the server as a field with an empty name.
FieldName = ShortText
Url = Annotated[str, Meta(min_length=1, max_length=URL_MAX)]
Note = Annotated[str, Meta(max_length=NOTE_MAX)]
Micros = Annotated[int, Meta(ge=0, le=BIGINT_MAX)]
Count = Annotated[int, Meta(ge=0, le=INT_MAX)]
Id = Annotated[int, Meta(ge=1, le=BIGINT_MAX)]
# The CLI checks the patterns of tags and sources, then cuts both at STRING_MAX.
Tag = Annotated[str, Meta(min_length=1, max_length=STRING_MAX, pattern=r"^[A-Za-z0-9_-]+$")]
SourceName = Annotated[str, Meta(min_length=1, max_length=STRING_MAX, pattern=r"^[A-Za-z0-9-]+$")]
# Integers of 64 bits, signed, and floats small enough that jsonb does not print them back as integers wider
# than that: so that a stored run can always be read back.
MetaValue = (ShortText | Annotated[int, Meta(ge=-(2**63), le=BIGINT_MAX)]
             | Annotated[float, Meta(ge=-1e15, le=1e15)] | bool | None)

FIELD_STRING, FIELD_TEXT, FIELD_HTML, FIELD_CONSOLE, FIELD_URL = 1, 2, 3, 4, 5


class Body(Struct, forbid_unknown_fields=True, gc=False):
    """Strict: unknown keys are refused."""


class Field(Body, tag_field="type"):
    """A custom field; its `type` says which of the kinds below, each with its own limit on the value."""

    name: FieldName
    meta: Annotated[dict[ShortText, MetaValue], Meta(max_length=META_KEYS_MAX)] | UnsetType | None = UNSET
    is_highlight: bool | UnsetType | None = UNSET


class StringField(Field, tag=FIELD_STRING, kw_only=True):
    value: ShortText


class TextField(Field, tag=FIELD_TEXT, kw_only=True):
    value: Annotated[str, Meta(max_length=TEXT_MAX)]


class HtmlField(Field, tag=FIELD_HTML, kw_only=True):
    value: Annotated[str, Meta(max_length=TEXT_MAX)]


class ConsoleField(Field, tag=FIELD_CONSOLE, kw_only=True):
    value: Annotated[str, Meta(max_length=TEXT_MAX)]


class UrlField(Field, tag=FIELD_URL, kw_only=True):
    value: Annotated[str, Meta(max_length=URL_MAX)]


CustomField = StringField | TextField | HtmlField | ConsoleField | UrlField


class Artifact(Body):
    name: Name
    url: Url
    mime_type: ShortText | UnsetType | None = UNSET
    size: Annotated[int, Meta(ge=0, le=BIGINT_MAX)] | UnsetType | None = UNSET
    note: Note | UnsetType | None = UNSET


class Link(Body):
    name: Name
    url: Url
    note: Note | UnsetType | None = UNSET


Fields = Annotated[list[CustomField], Meta(max_length=ITEMS_MAX)]
Artifacts = Annotated[list[Artifact], Meta(max_length=ITEMS_MAX)]
Links = Annotated[list[Link], Meta(max_length=ITEMS_MAX)]


class Resources(Body):
    """What every append and create may carry, and each test."""

    fields: Fields | UnsetType = UNSET
    artifacts: Artifacts | UnsetType = UNSET


# A part of a thread's elapsed time: create, appends and complete may each add one.
ElapsedPart = Micros | UnsetType | None


class ThreadResources(Resources):
    elapsed_observed: ElapsedPart = UNSET
    elapsed_computed: ElapsedPart = UNSET


class RunResources(Resources):
    links: Links | UnsetType = UNSET


class ResultIn(Resources, kw_only=True):
    key: Annotated[str, Meta(min_length=1, max_length=255)]
    name: Name
    # One of the accepted strings of the status table; the worker turns it into a status id.
    status: Annotated[str, Meta(min_length=1, max_length=100)]
    # Columns of a result, where left out and null are the same: None (cheaper to read than UNSET).
    folder: ShortText | None = None
    elapsed: Micros | None = None
    file: ShortText | None = None
    line: Count | None = None
    assertions: Count | None = None


class RunCreate(RunResources, kw_only=True):
    name: Name
    source: SourceName
    tags: Annotated[list[Tag], Meta(max_length=ITEMS_MAX)] | UnsetType = UNSET
    config: Name | UnsetType | None = UNSET
    config_id: Id | UnsetType | None = UNSET
    milestone: Name | UnsetType | None = UNSET
    milestone_id: Id | UnsetType | None = UNSET


class RunAppend(RunResources):
    pass


class RunComplete(Body):
    # Defaults to true when left out: the run's elapsed is then the time from its creation to this call.
    measure_elapsed: bool | UnsetType = UNSET


class ThreadCreate(ThreadResources):
    name: Name | UnsetType | None = UNSET


class ThreadAppend(ThreadResources):
    tests: Annotated[list[ResultIn], Meta(max_length=TESTS_MAX)] | UnsetType = UNSET


class ThreadComplete(Body):
    # The elapsed parts of ThreadResources, without its resources: a complete carries none.
    elapsed_observed: ElapsedPart = UNSET
    elapsed_computed: ElapsedPart = UNSET


BODIES: tuple[type[Body], ...] = (RunCreate, RunAppend, RunComplete, ThreadCreate, ThreadAppend, ThreadComplete)
B = TypeVar("B", bound=Body)
_DECODERS: dict[type[Body], msgspec.json.Decoder[Any]] = {body: msgspec.json.Decoder(body) for body in BODIES}


def saturating_add(total: int | None, part: int) -> int:
    """A sum of elapsed times that stops at the largest bigint instead of failing to store (292,000 years:
    past that, precision is not the problem)."""
    return min(BIGINT_MAX, (total or 0) + part)


class BodyError(Exception):
    """Rules broken after decoding: field path -> problems, as in the 422 body."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("invalid body")
        self.errors = errors


def decode(body_type: type[B], raw: bytes) -> B:
    """The body decoded and validated; raises msgspec.DecodeError (not JSON) or msgspec.ValidationError."""
    body: B = _DECODERS[body_type].decode(raw)
    return body


def validate(body_type: type[B], raw: bytes, statuses: dict[str, int] | None = None) -> B:
    """The body decoded and validated; with `statuses` (lower-case accepted strings to status ids), a thread
    append's status strings checked against them. Raises what `decode` raises, or BodyError."""
    body = decode(body_type, raw)
    if statuses is not None and isinstance(body, ThreadAppend) and body.tests:
        check_statuses(body.tests, statuses)
    return body


def check_statuses(tests: list[ResultIn], statuses: dict[str, int]) -> None:
    # The distinct strings only: a thousand tests of a handful of statuses cost a handful of lookups.
    unknown = {status for status in {test.status for test in tests} if status.lower() not in statuses}
    if unknown:
        message = "unknown status; accepted: " + ", ".join(sorted(statuses))
        raise BodyError({f"tests.{i}.status": [message] for i, test in enumerate(tests) if test.status in unknown})


def given(body: Body) -> dict[str, Any]:
    """The keys the client gave, with their values, as plain JSON-ready objects."""
    out: dict[str, Any] = msgspec.to_builtins(body)
    return out
