"""Repairs for what the official CLI sends that is legal JSON but cannot be stored as it stands.

The CLI cuts long values by UTF-16 length, so a cut inside an emoji sends half of its surrogate pair as a
`\\ud83d`-style escape; JSON allows it, but neither our parsers nor PostgreSQL text take a lone surrogate. A
JUnit file may hold a literal NUL, which the CLI sends as `\\u0000`; PostgreSQL text cannot hold that either.
And JavaScript prints a huge number (a JUnit `time` of 10^20 seconds, say) as `1e+26`. Refusing any of these
would lose the whole batch of 250 tests beside it, so the shim stores U+FFFD for each such character and the
largest value a column holds for each such number (compat.md section 1).

Both repairs run only after the fast path has refused a body (or, for NUL, seen its escape): the hot path pays
nothing for them.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from schema.escapes import has_unstorable_escape, storable_escapes
from schema.requests import SATURATED

__all__ = ["has_unstorable_escape", "saturated", "storable_escapes", "too_large"]

def saturated(body: bytes, locations: Iterable[Sequence[int | str]]) -> bytes | None:
    """The body with the integers at `locations` (each one of schema.requests.SATURATED, found too large by
    the validator) set to the largest value its column holds; None if that cannot be done."""
    try:
        document = json.loads(body, parse_constant=_refuse_constant)
        changed = False
        for loc in locations:
            found = _container(document, loc)
            if found is None:
                continue
            container, key = found
            value = container[key]
            largest = SATURATED[str(key)]
            if _integral(value) and value > largest:
                container[key] = largest
                changed = True
        if not changed:
            return None
        return json.dumps(document, allow_nan=False, separators=(",", ":")).encode()
    except (ValueError, TypeError, RecursionError):
        return None


def too_large(loc: Sequence[int | str], value: Any) -> bool:
    """Whether a validation error at `loc` on `value` is a number that `saturated` would repair."""
    # Field meta takes any JSON number within 64 bits: a key there named like one of these is not one of them.
    return (bool(loc) and str(loc[-1]) in SATURATED and "meta" not in loc and _integral(value)
            and value > SATURATED[str(loc[-1])])


def _integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and value.is_integer()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _container(document: Any, loc: Sequence[int | str]) -> tuple[Any, int | str] | None:
    # The validator's location may name parts that are not in the body (a union member); skip those.
    value, parent, key = document, None, None
    for part in loc:
        in_mapping = isinstance(value, Mapping) and isinstance(part, str) and part in value
        in_list = isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
        if in_mapping or in_list:
            parent, key, value = value, part, value[part]
    if parent is None or key is None or str(key) != str(loc[-1]):
        return None
    return parent, key
