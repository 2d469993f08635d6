"""Every problem of a refused body, each under its field path, in bounded time and size.

The fast path (schema.requests.decode) stops at a body's first problem. A client deserves the list, so a
refused body is walked again along the same declarations: each object as its keys, each list as its items,
each value decoded on its own. The walk stops after MAX_PROBLEMS (the 422 says there were more), and it never
builds the body's objects: values are located by msgspec's raw scan and only those walked are decoded.

That scan still reads the whole body (about 1.5 ms a megabyte), and it holds the interpreter while it does:
a large refused body is therefore walked in a process of its own (`find`), so that one client sending 10 MB
of wrong values never holds up another client's append.
"""

import asyncio
import multiprocessing
import os
import re
import types
import typing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import msgspec
from msgspec import Raw, Struct

from api_shim.repair import too_large
from schema.requests import SATURATED

MAX_PROBLEMS = 50
# Refused bodies at least this large are walked in the helper process; below it, walking costs less than
# sending the body there.
OFFLOAD_BYTES = 256 * 1024
MAX_BYTES = 32 * 1024  # of field paths and messages: the whole 422 stays well under 64 KiB
_AT = re.compile(r" - at `\$[^`]*`$")
_OBJECT = msgspec.json.Decoder(dict[str, Raw])
# A body's members in one scan, its lists already split into their items: most of a large body is one list.
_LENIENT = msgspec.json.Decoder(dict[str, list[Raw] | dict[str, Raw] | str | int | float | bool | None])
_encode = msgspec.json.encode
_ARRAY = msgspec.json.Decoder(list[Raw])
_ANY = msgspec.json.Decoder()

Path = tuple[int | str, ...]


class NotAnObject(Exception):
    """The body is JSON, but not an object."""


@dataclass
class Problems:
    errors: dict[str, list[str]] = field(default_factory=dict)
    more: bool = False  # problems were left out
    too_large: list[Path] = field(default_factory=list)  # integers to saturate (api_shim/repair.py)
    _bytes: int = 0

    @property
    def full(self) -> bool:
        return self.more

    def add(self, path: Path, message: str) -> None:
        key = ".".join(map(str, path)) or "body"
        if (key not in self.errors and len(self.errors) >= MAX_PROBLEMS) or self._bytes > MAX_BYTES:
            self.more = True
            return
        self.errors.setdefault(key, []).append(message)
        self._bytes += len(key) + len(message)


_pool: ProcessPoolExecutor | None = None


async def find(body_type: type[Struct], body: bytes) -> Problems:
    """`problems`, off the event loop for a large body (in the helper process; inline if it cannot run)."""
    global _pool
    if len(body) < OFFLOAD_BYTES:
        return problems(body_type, body)
    if _pool is None:
        start()
    assert _pool is not None
    try:
        verdict, found = await asyncio.get_running_loop().run_in_executor(
            _pool, _problems_elsewhere, body_type.__name__, body)
    except BrokenProcessPool:  # the helper died (killed, out of memory): a new one next time
        _pool = None
        return problems(body_type, body)
    if verdict == "not an object":
        raise NotAnObject
    if verdict == "not JSON":
        raise msgspec.DecodeError("not valid JSON")
    assert found is not None
    return found


def start() -> None:
    """Start the helper process now, so that the first large refusal does not wait for it to start."""
    global _pool
    # spawn, not fork: the shim's event loop, sockets and threads must not be copied into the helper.
    _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_lowest_priority)
    _pool.submit(_problems_elsewhere, "RunComplete", b"{}")


def _lowest_priority() -> None:
    # A body wrong everywhere is the sender's problem: on a machine it shares, the helper walks it only with
    # the CPU that accepting other clients' requests leaves over.
    os.nice(19)


def close() -> None:
    """Stop the helper process, if it was started."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def _problems_elsewhere(body_type: str, body: bytes) -> tuple[str, Problems | None]:
    # In the helper process: exceptions become verdicts, which cross the process boundary more simply.
    from schema import requests

    try:
        return "ok", problems(getattr(requests, body_type), body)
    except NotAnObject:
        return "not an object", None
    except (msgspec.DecodeError, RecursionError):
        return "not JSON", None


def problems(body_type: type[Struct], body: bytes) -> Problems:
    """The problems of a body the fast path refused as invalid (not as malformed JSON). Raises NotAnObject,
    msgspec.DecodeError or RecursionError (nesting past the parser's limit) for a body that is not a JSON
    object."""
    try:
        members: dict[str, Any] = _LENIENT.decode(body)
    except msgspec.ValidationError:  # not an object, or a number no type takes (1e400): the slower way
        try:
            members = _OBJECT.decode(body)
        except msgspec.ValidationError:
            raise NotAnObject from None
    found = Problems()
    _check_object(members, body_type, (), found)
    return found


def _check_object(members: dict[str, Any], struct: type[Struct], path: Path, found: Problems) -> None:
    """`members` are Raw values, or (at the top) values the lenient scan decoded: lists as their Raw items."""
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    tag_field = struct.__struct_config__.tag_field  # checked already, by the union that chose this Struct
    for key, raw in members.items():
        if found.full:
            return
        info = fields.get(key)
        if key == tag_field:
            continue
        if info is None:
            found.add((*path, key), "is not a field of this object")
        elif isinstance(raw, list):
            _check_items(raw, info.type, (*path, key), found)
        else:
            _check(raw if isinstance(raw, Raw) else Raw(_encode(raw)), info.type, (*path, key), found)
    for name, info in fields.items():
        if info.required and name not in members:
            found.add((*path, name), "is required")


def _check(raw: Raw, annotation: Any, path: Path, found: Problems) -> None:
    if found.full:
        return
    try:
        _decoder(annotation).decode(raw)
        return
    except msgspec.ValidationError as exc:
        first = _AT.sub("", str(exc))
    container, limit = _container(annotation)
    tagged = _tagged(container)
    if tagged or (isinstance(container, type) and issubclass(container, Struct)):
        try:
            members = _OBJECT.decode(raw)
        except msgspec.ValidationError:
            found.add(path, first)
            return
        if tagged:  # a union of Structs told apart by a field (a custom field's `type`): the one it names
            tag_field, by_tag = tagged
            tag = _number(members[tag_field]) if tag_field in members else None
            container = by_tag.get(tag) if isinstance(tag, int) and not isinstance(tag, bool) else None
            if container is None:
                found.add((*path, tag_field), first if tag_field in members else "is required")
                return
        _check_object(members, container, path, found)
        return
    origin = typing.get_origin(container)
    if origin is list:
        try:
            items = _ARRAY.decode(raw)
        except msgspec.ValidationError:
            found.add(path, first)
            return
        _check_items(items, annotation, path, found)
        return
    if origin is dict:
        try:
            entries = _OBJECT.decode(raw)
        except msgspec.ValidationError:
            found.add(path, first)
            return
        if limit is not None and len(entries) > limit:
            found.add(path, f"must have at most {limit} keys, not {len(entries)}")
            return
        key_type, value_type = typing.get_args(container)
        for key, value in entries.items():
            try:
                msgspec.convert(key, key_type)
            except msgspec.ValidationError as exc:
                found.add((*path, key), "key: " + _AT.sub("", str(exc)))
                continue
            _check(value, value_type, (*path, key), found)
        return
    if path and str(path[-1]) in SATURATED and too_large(path, _number(raw)):
        found.too_large.append(path)  # stored as the column's largest value, not refused
        return
    found.add(path, first)


def _number(raw: Raw) -> Any:
    try:
        return _ANY.decode(raw)
    except msgspec.DecodeError:  # 1e400: out of any range, not repairable
        return None


def _check_items(items: list[Raw], annotation: Any, path: Path, found: Problems) -> None:
    """A JSON array's items against an annotation that should take a list."""
    container, limit = _container(annotation)
    if typing.get_origin(container) is not list:
        _check(Raw(_encode(items)), annotation, path, found)  # an array where something else goes
        return
    if limit is not None and len(items) > limit:
        found.add(path, f"must have at most {limit} items, not {len(items)}")
        return
    [item_type] = typing.get_args(container)
    for i, item in enumerate(items):
        if found.full:
            return
        _check(item, item_type, (*path, i), found)


def _container(annotation: Any) -> tuple[Any, int | None]:
    """The list, dict or Struct type inside an annotation (Annotated, `| None`, `| UnsetType`), with the
    `max_length` of its Meta; else the annotation itself."""
    limit = None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *metas = typing.get_args(annotation)
        limit = next((m.max_length for m in metas if isinstance(m, msgspec.Meta)), None)
    if _tagged(annotation):
        return annotation, limit
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for member in typing.get_args(annotation):
            inner, inner_limit = _container(member)
            if _is_container(inner):
                return inner, inner_limit
        return annotation, limit
    return annotation, limit


def _is_container(annotation: Any) -> bool:
    return (isinstance(annotation, type) and issubclass(annotation, Struct)) or \
        typing.get_origin(annotation) in (list, dict) or _tagged(annotation) is not None


@cache
def _tagged(annotation: Any) -> tuple[str, dict[Any, type[Struct]]] | None:
    """For a union of tagged Structs: the tag field, and each member by its tag."""
    if not (isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union):
        return None
    members = [m for m in typing.get_args(annotation) if isinstance(m, type) and issubclass(m, Struct)]
    configs = [m.__struct_config__ for m in members]
    if len(members) < 2 or any(c.tag is None for c in configs):
        return None
    return str(configs[0].tag_field), {c.tag: m for c, m in zip(configs, members, strict=True)}


@cache
def _decoder(annotation: Any) -> "msgspec.json.Decoder[Any]":
    return msgspec.json.Decoder(annotation)


def field_path(message: str) -> str:
    """A field path from msgspec's `- at `$.tests[0].name`` (the fallback when the walk found nothing)."""
    match = re.search(r" - at `\$([^`]*)`$", message)
    if match is None:
        return "body"
    parts = re.findall(r"\.([^.\[]+)|\[(\d+)\]", match.group(1))
    return ".".join(name or index for name, index in parts) or "body"
