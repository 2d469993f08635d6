"""Request bodies of the automation-runs API, with the server's own limits (compat.md section 1).

Models are strict (a number is not a string, a string is not a number) and forbid unknown keys, so a
typo in a client surfaces as a 422 naming the field instead of data silently dropped.
"""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

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
Tag = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")]
SourceName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9-]+$")]
MetaValue = Annotated[str, StringConstraints(max_length=STRING_MAX)] | int | float | bool | None

FIELD_STRING, FIELD_TEXT, FIELD_HTML, FIELD_CONSOLE, FIELD_URL = 1, 2, 3, 4, 5
_VALUE_MAX = {FIELD_STRING: STRING_MAX, FIELD_TEXT: TEXT_MAX, FIELD_HTML: TEXT_MAX, FIELD_CONSOLE: TEXT_MAX,
              FIELD_URL: URL_MAX}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class CustomField(Strict):
    type: Annotated[int, Field(ge=FIELD_STRING, le=FIELD_URL)]
    name: Name
    value: Annotated[str, StringConstraints(max_length=TEXT_MAX)]
    meta: Annotated[dict[Annotated[str, StringConstraints(max_length=STRING_MAX)], MetaValue],
                    Field(max_length=META_KEYS_MAX)] | None = None
    is_highlight: bool | None = None

    @field_validator("value")
    @classmethod
    def _value_fits_type(cls, value: str, info: ValidationInfo) -> str:
        limit = _VALUE_MAX.get(info.data.get("type", FIELD_TEXT), TEXT_MAX)
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters for a field of this type")
        return value


class Artifact(Strict):
    name: Name
    url: Url
    mime_type: Annotated[str, StringConstraints(max_length=255)] | None = None
    size: Annotated[int, Field(ge=0, le=BIGINT_MAX)] | None = None
    note: Note | None = None


class Link(Strict):
    name: Name
    url: Url
    note: Note | None = None


Fields = Annotated[list[CustomField], Field(max_length=ITEMS_MAX)]
Artifacts = Annotated[list[Artifact], Field(max_length=ITEMS_MAX)]
Links = Annotated[list[Link], Field(max_length=ITEMS_MAX)]


class ResultIn(Strict):

    key: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    name: Name
    folder: ShortText | None = None
    # The client sends a status string; validation maps it to a status id through the alias table passed
    # in the validation context.
    status: int
    elapsed: Micros | None = None
    file: ShortText | None = None
    line: Count | None = None
    assertions: Count | None = None
    fields: Fields = []
    artifacts: Artifacts = []

    @field_validator("status", mode="before", json_schema_input_type=str)
    @classmethod
    def _known_status(cls, value: object, info: ValidationInfo) -> int:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        aliases: dict[str, int] = (info.context or {}).get("statuses") or {}
        status_id = aliases.get(value.lower())
        if status_id is not None:
            return status_id
        raise ValueError("unknown status; accepted: " + ", ".join(sorted(aliases)))


class RunCreate(Strict):
    name: Name
    source: SourceName
    tags: Annotated[list[Tag], Field(max_length=ITEMS_MAX)] = []
    config: Name | None = None
    config_id: Id | None = None
    milestone: Name | None = None
    milestone_id: Id | None = None
    fields: Fields = []
    links: Links = []
    artifacts: Artifacts = []


class RunAppend(Strict):
    fields: Fields = []
    links: Links = []
    artifacts: Artifacts = []


class RunComplete(Strict):
    measure_elapsed: bool = True


class ThreadCreate(Strict):
    name: Name | None = None
    elapsed_observed: Micros | None = None
    elapsed_computed: Micros | None = None
    fields: Fields = []
    artifacts: Artifacts = []


class ThreadAppend(Strict):
    elapsed_observed: Micros | None = None
    elapsed_computed: Micros | None = None
    fields: Fields = []
    artifacts: Artifacts = []
    tests: Annotated[list[ResultIn], Field(max_length=TESTS_MAX)] = []


class ThreadComplete(Strict):
    elapsed_observed: Micros | None = None
    elapsed_computed: Micros | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    """The JSON-ready form of a validated request, without the keys the client left out."""
    return model.model_dump(mode="json", exclude_none=True)
