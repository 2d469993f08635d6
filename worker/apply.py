"""Applying a batch of queued operations to PostgreSQL, in the caller's transaction.

The order of work in `apply_ops` is what keeps parallel workers correct and free of deadlocks:

1. claim the operation ids (sorted), so that a redelivered operation is skipped (and one that arrives after
   its dedupe window is dead-lettered);
2. lock the threads concerned (sorted by id), compute their new state in Python from the locked rows,
   write the results by COPY and each thread's new state with one UPDATE;
3. lock the runs concerned (sorted by id), add the threads' changes, and finalise any run whose
   completion barrier is met.

Every transaction takes its locks in that order: claims, threads, runs. Finalising a run then locks the
run's remaining open threads after the run itself. That is safe: a run is finalised only once every
operation accepted for it has been applied, so no other transaction holds or waits for those threads.
"""

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import msgspec
import orjson
from psycopg.adapt import Dumper
from psycopg.pq import Format
from sqlalchemy import Connection

from schema.escapes import storable_escapes
from schema.messages import RESULT_FIELDS, JsonObject, Op, ThreadAppendOp, ThreadCompleteOp
from schema.requests import saturating_add
from schema.settings import get_settings
from schema.statuses import COUNT_COLUMNS, RUN_STATUS_FAILED, RUN_STATUS_PASSED

N_STATUSES = len(COUNT_COLUMNS)
_COUNTS = ", ".join(COUNT_COLUMNS)
_SET_COUNTS = ", ".join(f"{c} = %s" for c in COUNT_COLUMNS)

RESULT_COLUMNS = ("run_id", "thread_id", *RESULT_FIELDS, "created_at")
# Binary COPY: the values need no escaping on the way out nor parsing on the way in, which on this machine
# cuts what a row costs the worker by two thirds (text: 1.4 µs a row, binary 0.5) and what it costs PostgreSQL.
COPY_RESULTS = f"COPY automation_results ({', '.join(RESULT_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
RESULT_TYPES = ["int8", "int8", "int2", "text", "text", "text", "int8", "text", "int4", "int4", "jsonb", "jsonb",
                "timestamptz"]


class JsonbText(Dumper):
    """A jsonb value for binary COPY from JSON text as it is (str, or UTF-8 bytes): the format's version byte,
    then the text. (The stock jsonb dumper would encode a str as a JSON string.)"""

    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + (obj if isinstance(obj, bytes) else str(obj).encode())


class StoredTest(msgspec.Struct, gc=False):
    """A test of a thread append the shim validated (schema.requests.ResultIn), read as its result row needs
    it: its fields and artifacts stay the JSON they came as, straight into their jsonb columns, instead of
    being decoded into objects only to be encoded again."""

    key: str
    name: str
    status: str
    folder: str | None = None
    elapsed: int | None = None
    file: str | None = None
    line: int | None = None
    assertions: int | None = None
    # Raw as a union member is not supported: an absent one is empty, a null one the JSON null.
    fields: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    artifacts: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class StoredAppend(msgspec.Struct, gc=False):
    """A validated thread append (schema.requests.ThreadAppend) as the worker applies it."""

    tests: list[StoredTest] = msgspec.field(default_factory=list)
    elapsed_observed: int | None = None
    elapsed_computed: int | None = None
    fields: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    artifacts: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


_APPEND = msgspec.json.Decoder(StoredAppend)
_NONE = (b"", b"[]", b"null")


def _jsonb(raw: msgspec.Raw) -> bytes | None:
    """A test's fields or artifacts for their column: none (left out, null or empty) is NULL."""
    text = bytes(raw)
    return None if text in _NONE else text


@dataclass
class ThreadState:
    id: int
    run_id: int
    is_completed: bool
    counts: list[int]
    appends_applied: int
    appends_expected: int | None
    elapsed_observed: int | None
    elapsed_computed: int | None
    results_elapsed: int | None
    complete_requested_at: datetime | None
    complete_requested_by: int | None
    # Set when this batch finalises the thread.
    status: int | None = None
    # What this batch adds, kept apart so the run can add the same.
    delta: list[int] = field(default_factory=lambda: [0] * N_STATUSES)
    new_fields: list[JsonObject] = field(default_factory=list)
    new_artifacts: list[JsonObject] = field(default_factory=list)
    changed: bool = False
    finalised: bool = False


@dataclass
class RunState:
    id: int
    is_completed: bool
    counts: list[int]
    created_at: datetime
    ops_applied: int
    ops_expected: int | None
    measure_elapsed: bool | None
    complete_requested_at: datetime | None
    complete_requested_by: int | None
    updated_at: datetime | None
    updated_by: int | None
    completed_reason: str = "client"
    # Set when this batch finalises the run.
    status: int | None = None
    elapsed: int | None = None
    new_fields: list[JsonObject] = field(default_factory=list)
    new_links: list[JsonObject] = field(default_factory=list)
    new_artifacts: list[JsonObject] = field(default_factory=list)
    changed: bool = False


@dataclass
class Outcome:
    applied: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # operations applied, by kind
    duplicates: int = 0
    results: int = 0
    dead: list[tuple[Op, str]] = field(default_factory=list)
    threads_completed: list[int] = field(default_factory=list)
    runs_completed: list[int] = field(default_factory=list)
    runs_created: list[tuple[int, int]] = field(default_factory=list)  # (run, project)


_OPS = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
_VALUE = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode


def decode_batch(payload: bytes) -> list[Op]:
    """A stored batch's operations. A thread append's `body` (the request as the shim accepted it) stays raw
    JSON until `_thread_append` decodes it with its request declaration; the rest is small."""
    if b"\\u0000" in payload:  # the shim leaves escaped NULs in thread appends to here (api_shim/http.py)
        payload = storable_escapes(payload) or payload
    return [cast(Op, {key: raw if key == "body" else _VALUE.decode(raw) for key, raw in op.items()})
            for op in _OPS.decode(payload)]


def encode_op(op: Op) -> bytes:
    """An operation as JSON again (for a dead letter), its raw body included as it came."""
    return _encode(op)


_aliases: tuple[float, dict[str, int]] = (0.0, {})
ALIASES_SECONDS = 30.0


def status_aliases(conn: Connection) -> dict[str, int]:
    """Accepted status strings (lower case) to status ids, read again every ALIASES_SECONDS."""
    global _aliases
    read_at, aliases = _aliases
    if time.monotonic() - read_at > ALIASES_SECONDS or not aliases:
        aliases = {alias.lower(): status_id for status_id, alias in conn.exec_driver_sql(
            "SELECT id, unnest(aliases) FROM statuses")}
        _aliases = (time.monotonic(), aliases)
    return aliases


def apply_ops(conn: Connection, ops: list[Op]) -> Outcome:
    outcome = Outcome()
    fresh, late = claim(conn, ops)
    outcome.duplicates = len(ops) - len(fresh) - len(late)
    outcome.dead.extend(late)
    if not fresh:
        if late:
            dead_letter(conn, late)
        return outcome
    failed_ids = failed_status_ids(conn)
    aliases = status_aliases(conn) if any("body" in op for op in fresh) else {}

    # New runs and threads first: the operations after them in this transaction may be theirs. (Rows nobody
    # else can hold yet, so they add nothing to the order in which locks are taken.)
    create_runs(conn, [op for op in fresh if op["kind"] == "run.create"])
    create_threads(conn, [op for op in fresh if op["kind"] == "thread.create"])
    outcome.runs_created = [(op["run_id"], op["project_id"]) for op in fresh if op["kind"] == "run.create"]

    # Threads.
    threads = lock_threads(conn, sorted({t for op in fresh if (t := thread_of(op)) is not None}))
    rows: list[tuple[Any, ...]] = []
    survivors: list[Op] = []
    for op in fresh:
        error = None
        if op["kind"] == "thread.append":
            error = _thread_append(threads.get(op["thread_id"]), op, rows, aliases)
        elif op["kind"] == "thread.complete":
            error = _thread_complete(threads.get(op["thread_id"]), op)
        if error:
            outcome.dead.append((op, error))
        else:
            survivors.append(op)
    copy_results(conn, rows)
    outcome.results = len(rows)
    for thread in threads.values():
        if _thread_ready(thread):
            _finalise_thread(thread, failed_ids)
            outcome.threads_completed.append(thread.id)
    write_threads(conn, [t for t in threads.values() if t.changed])

    # Then runs. A thread's run comes from its locked row, not from the message.
    def run_id(op: Op) -> int:
        thread = threads.get(thread_of(op) or 0)
        return thread.run_id if thread else op["run_id"]

    survivors = [op for op in survivors if op["kind"] != "run.create"]  # a run's creation is not one of its ops
    runs = lock_runs(conn, sorted({run_id(op) for op in survivors}))
    for op in survivors:
        error = _run_op(runs.get(run_id(op)), op)
        if error:
            outcome.dead.append((op, error))
    for thread in threads.values():
        if thread.changed:
            run = runs[thread.run_id]
            run.counts = [a + b for a, b in zip(run.counts, thread.delta, strict=True)]
            run.changed = True
    for run in runs.values():
        if _run_ready(run):
            finalise_run(conn, run, failed_ids)
            outcome.runs_completed.append(run.id)
        if run.changed:
            write_run(conn, run)

    if outcome.dead:
        dead_letter(conn, outcome.dead)
    refused = outcome.dead[len(late):]  # of the claimed ones
    outcome.applied = len(fresh) - len(refused)
    outcome.kinds = Counter(str(op["kind"]) for op in fresh) - Counter(str(op["kind"]) for op, _ in refused)
    return outcome


# --- creating runs and threads -------------------------------------------------------------------------------

def create_runs(conn: Connection, ops: list[Op]) -> None:
    """Write the rows of runs the shim created, with their sources where those are new."""
    if not ops:
        return
    creates = [cast(dict[str, Any], op) for op in ops]
    # A new source's id was drawn by the shim that saw its name first; if the database already holds the
    # name (under another id: Redis lost the name's claim), the run goes to that one.
    conn.exec_driver_sql(
        "INSERT INTO automation_sources (id, project_id, name) "
        "SELECT * FROM unnest(%(ids)s::bigint[], %(projects)s::bigint[], %(names)s::text[]) ORDER BY 1 "
        "ON CONFLICT DO NOTHING",
        {"ids": [c["source_id"] for c in creates], "projects": [c["project_id"] for c in creates],
         "names": [c["source"] for c in creates]})
    sources = {(project, name): source_id for project, name, source_id in conn.exec_driver_sql(
        "SELECT project_id, name, id FROM automation_sources WHERE (project_id, name) IN "
        "(SELECT * FROM unnest(%(projects)s::bigint[], %(names)s::text[]))",
        {"projects": [c["project_id"] for c in creates], "names": [c["source"] for c in creates]})}
    conn.exec_driver_sql(
        "INSERT INTO automation_runs (id, project_id, source_id, name, config_id, milestone_id, tags, "
        "  artifacts, fields, links, created_by, created_at) "
        "SELECT id, project, source, name, config, milestone, "
        "  ARRAY(SELECT jsonb_array_elements_text(tags)), artifacts, fields, links, creator, at "
        "FROM unnest(%(ids)s::bigint[], %(projects)s::bigint[], %(sources)s::bigint[], %(names)s::text[], "
        "  %(configs)s::bigint[], %(milestones)s::bigint[], %(tags)s::jsonb[], %(artifacts)s::jsonb[], "
        "  %(fields)s::jsonb[], %(links)s::jsonb[], %(creators)s::bigint[], %(ats)s::timestamptz[]) "
        "  AS n(id, project, source, name, config, milestone, tags, artifacts, fields, links, creator, at) "
        "ORDER BY id ON CONFLICT (id) DO NOTHING",
        {"ids": [c["run_id"] for c in creates], "projects": [c["project_id"] for c in creates],
         "sources": [sources[(c["project_id"], c["source"])] for c in creates],
         "names": [c["name"] for c in creates], "configs": [c["config_id"] for c in creates],
         "milestones": [c["milestone_id"] for c in creates], "tags": [_json(c["tags"]) for c in creates],
         "artifacts": [_json(c["artifacts"]) for c in creates], "fields": [_json(c["fields"]) for c in creates],
         "links": [_json(c["links"]) for c in creates], "creators": [c["user_id"] for c in creates],
         "ats": [c["at"] for c in creates]})


def create_threads(conn: Connection, ops: list[Op]) -> None:
    """Write the rows of threads the shim created (their runs are written: see `waiting`)."""
    if not ops:
        return
    creates = [cast(dict[str, Any], op) for op in ops]
    conn.exec_driver_sql(
        "INSERT INTO automation_run_threads (id, run_id, project_id, name, elapsed_observed, elapsed_computed, "
        "  artifacts, fields, created_by, created_at) "
        "SELECT n.id, n.run, r.project_id, n.name, n.observed, n.computed, n.artifacts, n.fields, n.creator, n.at "
        "FROM unnest(%(ids)s::bigint[], %(runs)s::bigint[], %(names)s::text[], %(observed)s::bigint[], "
        "  %(computed)s::bigint[], %(artifacts)s::jsonb[], %(fields)s::jsonb[], %(creators)s::bigint[], "
        "  %(ats)s::timestamptz[]) AS n(id, run, name, observed, computed, artifacts, fields, creator, at) "
        "JOIN automation_runs r ON r.id = n.run ORDER BY n.id ON CONFLICT (id) DO NOTHING",
        {"ids": [c["thread_id"] for c in creates], "runs": [c["run_id"] for c in creates],
         "names": [c["name"] for c in creates], "observed": [c["elapsed_observed"] for c in creates],
         "computed": [c["elapsed_computed"] for c in creates],
         "artifacts": [_json(c["artifacts"]) for c in creates], "fields": [_json(c["fields"]) for c in creates],
         "creators": [c["user_id"] for c in creates], "ats": [c["at"] for c in creates]})


def waiting(conn: Connection, ops: list[Op]) -> set[int]:
    """The positions of operations whose run or thread is neither written nor created among `ops`: the shim
    accepted their create first, but a worker may not have written it yet (Celery keeps no order). They must
    wait for it; they are never applied without it."""
    runs_created = {op["run_id"] for op in ops if op["kind"] == "run.create"}
    threads_created = {op["thread_id"] for op in ops if op["kind"] == "thread.create"}
    runs = {op["run_id"] for op in ops} - runs_created
    threads = {t for op in ops if op["kind"] in ("thread.append", "thread.complete")
               and (t := thread_of(op)) is not None} - threads_created
    if not runs and not threads:
        return set()
    present = conn.exec_driver_sql(
        "SELECT false, id FROM automation_runs WHERE id = ANY(%(runs)s) UNION ALL "
        "SELECT true, id FROM automation_run_threads WHERE id = ANY(%(threads)s)",
        {"runs": sorted(runs), "threads": sorted(threads)}).all()
    missing_runs = runs - {row_id for is_thread, row_id in present if not is_thread}
    missing_threads = threads - {row_id for is_thread, row_id in present if is_thread}
    return {i for i, op in enumerate(ops) if op["run_id"] in missing_runs or thread_of(op) in missing_threads}


def thread_of(op: Op) -> int | None:
    thread_id: int | None = cast(dict[str, Any], op).get("thread_id")
    return thread_id


# --- operations on threads ---------------------------------------------------------------------------------

def _thread_append(thread: ThreadState | None, op: ThreadAppendOp, rows: list[tuple[Any, ...]],
                   aliases: dict[str, int]) -> str | None:
    if thread is None:
        return "unknown thread"
    if thread.is_completed:
        return "thread already completed"
    raw = op.get("body")
    if raw is not None:
        error = _append_body(thread, _APPEND.decode(cast(msgspec.Raw, raw)), datetime.fromisoformat(op["at"]),
                             rows, aliases)
        if error:
            return error
    else:  # enqueued by an earlier version, which sent the tests as rows
        run_id, thread_id, at = thread.run_id, thread.id, datetime.fromisoformat(op["at"])
        rows.extend((run_id, thread_id, *row, at) for row in op.get("results", ()))
        for status_id, n in op.get("counts", ()):
            thread.counts[status_id - 1] += n
            thread.delta[status_id - 1] += n
        elapsed = op.get("results_elapsed")
        if elapsed is not None:
            thread.results_elapsed = saturating_add(thread.results_elapsed, elapsed)
        _add_elapsed(thread, op)
        thread.new_fields.extend(op.get("fields", ()))
        thread.new_artifacts.extend(op.get("artifacts", ()))
    thread.appends_applied += 1
    thread.changed = True
    return None


def _append_body(thread: ThreadState, body: StoredAppend, at: datetime, rows: list[tuple[Any, ...]],
                 aliases: dict[str, int]) -> str | None:
    """An append's tests as result rows (RESULT_FIELDS, between the run and thread ids and the accept time),
    counted into the thread. The loop runs for every result the server stores: keep it lean."""
    run_id, thread_id = thread.run_id, thread.id
    tally = [0] * N_STATUSES  # added to the thread only once every test is known good
    new: list[tuple[Any, ...]] = []
    add = new.append
    elapsed_sum = 0
    timed = False
    for test in body.tests or ():
        status_id = aliases.get(test.status.lower())
        if status_id is None:  # the status table changed since the shim accepted it
            return f"unknown status {test.status[:100]!r}"
        elapsed = test.elapsed
        if elapsed is not None:
            elapsed_sum += elapsed
            timed = True
        add((run_id, thread_id, status_id, test.key, test.name, test.folder, elapsed, test.file, test.line,
             test.assertions, _jsonb(test.fields), _jsonb(test.artifacts), at))
        tally[status_id - 1] += 1
    rows.extend(new)
    thread.counts = [a + b for a, b in zip(thread.counts, tally, strict=True)]
    thread.delta = [a + b for a, b in zip(thread.delta, tally, strict=True)]
    if timed:
        thread.results_elapsed = saturating_add(thread.results_elapsed, elapsed_sum)
    if body.elapsed_observed is not None:
        thread.elapsed_observed = saturating_add(thread.elapsed_observed, body.elapsed_observed)
    if body.elapsed_computed is not None:
        thread.elapsed_computed = saturating_add(thread.elapsed_computed, body.elapsed_computed)
    if body.fields:
        thread.new_fields.extend(_VALUE.decode(body.fields) or ())
    if body.artifacts:
        thread.new_artifacts.extend(_VALUE.decode(body.artifacts) or ())
    return None


def _thread_complete(thread: ThreadState | None, op: ThreadCompleteOp) -> str | None:
    if thread is None:
        return "unknown thread"
    if thread.is_completed or thread.appends_expected is not None:
        return None  # completed already (by its run, say): completing again changes nothing
    _add_elapsed(thread, op)
    thread.appends_expected = op["expected"]
    thread.complete_requested_at = datetime.fromisoformat(op["at"])
    thread.complete_requested_by = op["user_id"]
    thread.changed = True
    return None


def _add_elapsed(thread: ThreadState, op: ThreadAppendOp | ThreadCompleteOp) -> None:
    # Clients report elapsed time in parts (on create, appends and complete); the thread's is their sum.
    observed = op.get("elapsed_observed")
    if observed is not None:
        thread.elapsed_observed = saturating_add(thread.elapsed_observed, observed)
    computed = op.get("elapsed_computed")
    if computed is not None:
        thread.elapsed_computed = saturating_add(thread.elapsed_computed, computed)


def _thread_ready(thread: ThreadState) -> bool:
    return (not thread.is_completed and thread.appends_expected is not None
            and thread.appends_applied >= thread.appends_expected)


def _finalise_thread(thread: ThreadState, failed_ids: list[int]) -> None:
    failures = sum(thread.counts[i - 1] for i in failed_ids)
    thread.status = RUN_STATUS_FAILED if failures else RUN_STATUS_PASSED
    thread.is_completed = True
    thread.finalised = True
    thread.changed = True


# --- operations on runs ------------------------------------------------------------------------------------

def _run_op(run: RunState | None, op: Op) -> str | None:
    if run is None:
        return "unknown run"
    if run.is_completed:
        # Its counters are final. Completing again is harmless; a late run append cannot be applied.
        return "run already completed" if op["kind"] == "run.append" else None
    run.changed = True
    if op["kind"] == "run.complete":
        if run.ops_expected is None:
            run.ops_expected = op["expected"]
            run.measure_elapsed = op["measure_elapsed"]
            run.complete_requested_at = datetime.fromisoformat(op["at"])
            run.complete_requested_by = op["user_id"]
        return None
    if op["kind"] == "run.append":
        run.new_fields.extend(op.get("fields", ()))
        run.new_links.extend(op.get("links", ()))
        run.new_artifacts.extend(op.get("artifacts", ()))
        run.updated_at = datetime.fromisoformat(op["at"])
        run.updated_by = op["user_id"]
    # Run appends and every thread operation count towards the run's completion barrier.
    run.ops_applied += 1
    return None


def _run_ready(run: RunState) -> bool:
    return not run.is_completed and run.ops_expected is not None and run.ops_applied >= run.ops_expected


def _thread_status(failed_ids: list[int]) -> str:
    """SQL for a thread's final status from its counters."""
    failures = " + ".join(COUNT_COLUMNS[i - 1] for i in failed_ids) or "0"
    return f"CASE WHEN {failures} > 0 THEN {RUN_STATUS_FAILED} ELSE {RUN_STATUS_PASSED} END"


def finalise_run(conn: Connection, run: RunState, failed_ids: list[int]) -> None:
    """Complete the run and its open threads; its counters are final from here on."""
    # A thread being created holds KEY SHARE on the run; FOR UPDATE waits for it, so that the new thread is
    # either seen and completed here, or (see `writes.create_thread`) refused because the run is completed.
    conn.exec_driver_sql("SELECT 1 FROM automation_runs WHERE id = %(run)s FOR UPDATE", {"run": run.id})
    conn.exec_driver_sql(
        f"UPDATE automation_run_threads SET is_completed = true, status = {_thread_status(failed_ids)}, "
        f"completed_at = %(at)s, completed_by = %(by)s, completed_reason = 'run' "
        f"WHERE run_id = %(run)s AND NOT is_completed",
        {"at": run.complete_requested_at, "by": run.complete_requested_by, "run": run.id},
    )
    assert run.complete_requested_at is not None
    if run.measure_elapsed:
        run.elapsed = int((run.complete_requested_at - run.created_at).total_seconds() * 1_000_000)
    else:
        run.elapsed = conn.exec_driver_sql(
            "SELECT max(coalesce(elapsed_observed, elapsed_computed, results_elapsed)) "
            "FROM automation_run_threads WHERE run_id = %(run)s",
            {"run": run.id},
        ).scalar()
    run.status = RUN_STATUS_FAILED if sum(run.counts[i - 1] for i in failed_ids) else RUN_STATUS_PASSED
    run.is_completed = True
    run.changed = True


# --- SQL -----------------------------------------------------------------------------------------------------

OUTSIDE_WINDOW = "outside the dedupe window"
# A replay whose operation was accepted less than this beyond the window is claimed under its accept time
# still: its partition is kept this much longer than the window (worker/lifecycle.py), and a delivery of the
# original that was inside the window when it was claimed may still be in flight.
WINDOW_MARGIN = timedelta(days=1)


def claim(conn: Connection, ops: list[Op], window: timedelta | None = None) -> tuple[list[Op], list[tuple[Op, str]]]:
    """Claim the ids of `ops`. Returns those not claimed before, in their original order, and those that
    arrived after their dedupe window (`INGEST_DEDUPE_DAYS`), to be dead-lettered unapplied.

    An id is claimed under its operation's accept time `at`, which every delivery of the operation carries
    unchanged: all its claims meet in one partition of applied_ops, whose key (id, accepted_at) sees them.
    Sorting makes concurrent claims of overlapping id sets queue up instead of deadlocking. A second
    transaction claiming an id the first has not committed yet waits for it, then skips the id.
    """
    window = window or timedelta(days=get_settings().dedupe_days)
    now = datetime.now(UTC)
    accepted = {op["id"]: datetime.fromisoformat(op["at"]) for op in ops}
    inside = sorted(i for i, at in accepted.items() if at >= now - window)
    claimed = {
        str(row[0]) for row in conn.exec_driver_sql(
            "INSERT INTO applied_ops (id, accepted_at) "
            "SELECT * FROM unnest(%(ids)s::uuid[], %(ats)s::timestamptz[]) ORDER BY 1 "
            "ON CONFLICT DO NOTHING RETURNING id",
            {"ids": inside, "ats": [accepted[i] for i in inside]},
        )
    } if inside else set()
    late = sorted(accepted.keys() - set(inside))
    outside: set[str] = set()
    if late:
        replayed, outside = _claim_late(conn, late, accepted, now, window)
        claimed |= replayed
    fresh = []
    refused = []
    for op in ops:
        if op["id"] in claimed:
            claimed.discard(op["id"])  # the same id twice in one batch is still one operation
            fresh.append(op)
        elif op["id"] in outside:
            outside.discard(op["id"])
            refused.append((op, OUTSIDE_WINDOW))
    return fresh, refused


def _claim_late(conn: Connection, ids: list[str], accepted: dict[str, datetime], now: datetime,
                window: timedelta) -> tuple[set[str], set[str]]:
    """Operations past their window: (claimed, refused). Whether one was applied before can no longer be told
    once its claim is gone, so it is applied only as a replay an operator asked for (`ingest dlq replay`, which
    marks its dead letter replayed): claimed through its dead letter, whose row lock lets one delivery at a
    time look for a claim of the id in every partition kept, and claim it once. The others are refused, unless
    a claim of theirs is still kept (then they are duplicates)."""
    lettered = {str(row[0]) for row in conn.exec_driver_sql(
        "SELECT op_id FROM dead_letters WHERE op_id = ANY(%(ids)s::uuid[]) AND replayed_at IS NOT NULL "
        "ORDER BY op_id FOR UPDATE", {"ids": ids})}
    seen = {str(row[0]) for row in conn.exec_driver_sql(
        "SELECT id FROM applied_ops WHERE id = ANY(%(ids)s::uuid[])", {"ids": ids})}
    replays = sorted(lettered - seen)
    claimed: set[str] = set()
    if replays:
        under = [accepted[i] if accepted[i] >= now - window - WINDOW_MARGIN else now for i in replays]
        claimed = {str(row[0]) for row in conn.exec_driver_sql(
            "INSERT INTO applied_ops (id, accepted_at) "
            "SELECT * FROM unnest(%(ids)s::uuid[], %(ats)s::timestamptz[]) ORDER BY 1 "
            "ON CONFLICT DO NOTHING RETURNING id",
            {"ids": replays, "ats": under})}
    return claimed, set(ids) - lettered - seen


def failed_status_ids(conn: Connection) -> list[int]:
    return [row[0] for row in conn.exec_driver_sql("SELECT id FROM statuses WHERE is_failed ORDER BY id")]


def lock_threads(conn: Connection, ids: list[int]) -> dict[int, ThreadState]:
    if not ids:
        return {}
    rows = conn.exec_driver_sql(
        f"SELECT id, run_id, is_completed, appends_applied, appends_expected, elapsed_observed, "
        f"elapsed_computed, results_elapsed, complete_requested_at, complete_requested_by, {_COUNTS} "
        f"FROM automation_run_threads WHERE id = ANY(%(ids)s) ORDER BY id FOR NO KEY UPDATE",
        {"ids": ids},
    ).mappings()
    return {row["id"]: ThreadState(counts=[row[c] for c in COUNT_COLUMNS],
                                   **{k: v for k, v in row.items() if k not in COUNT_COLUMNS})
            for row in rows}


def lock_runs(conn: Connection, ids: list[int]) -> dict[int, RunState]:
    if not ids:
        return {}
    rows = conn.exec_driver_sql(
        f"SELECT id, is_completed, created_at, ops_applied, ops_expected, "
        f"measure_elapsed, complete_requested_at, complete_requested_by, updated_at, updated_by, {_COUNTS} "
        f"FROM automation_runs WHERE id = ANY(%(ids)s) ORDER BY id FOR NO KEY UPDATE",
        {"ids": ids},
    ).mappings()
    return {row["id"]: RunState(counts=[row[c] for c in COUNT_COLUMNS],
                                **{k: v for k, v in row.items() if k not in COUNT_COLUMNS})
            for row in rows}


def copy_results(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    if not rows:
        return
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur:
        JsonbText.oid = cur.adapters.types["jsonb"].oid
        # Registered for str on this cursor only: set_types below picks dumpers by column type, so it is the
        # one jsonb columns get, and text columns keep theirs.
        cur.adapters.register_dumper(str, JsonbText)
        with cur.copy(COPY_RESULTS) as copy:
            copy.set_types(RESULT_TYPES)
            for row in rows:
                copy.write_row(row)


def _json(items: list[JsonObject]) -> str:
    return orjson.dumps(items).decode()


def write_threads(conn: Connection, threads: list[ThreadState]) -> None:
    if not threads:
        return
    conn.exec_driver_sql(
        f"UPDATE automation_run_threads SET {_SET_COUNTS}, appends_applied = %s, appends_expected = %s, "
        f"elapsed_observed = %s, elapsed_computed = %s, results_elapsed = %s, "
        f"fields = fields || %s::jsonb, artifacts = artifacts || %s::jsonb, "
        f"complete_requested_at = %s, complete_requested_by = %s, is_completed = %s, "
        f"status = coalesce(%s, status), completed_at = coalesce(%s, completed_at), "
        f"completed_by = coalesce(%s, completed_by), completed_reason = coalesce(%s, completed_reason), "
        f"activity_at = now() "
        f"WHERE id = %s",
        [
            (*t.counts, t.appends_applied, t.appends_expected, t.elapsed_observed, t.elapsed_computed,
             t.results_elapsed, _json(t.new_fields), _json(t.new_artifacts),
             t.complete_requested_at, t.complete_requested_by, t.is_completed, t.status,
             t.complete_requested_at if t.finalised else None, t.complete_requested_by if t.finalised else None,
             "client" if t.finalised else None, t.id)
            for t in threads
        ],
    )


def write_run(conn: Connection, run: RunState) -> None:
    conn.exec_driver_sql(
        f"UPDATE automation_runs SET {_SET_COUNTS}, ops_applied = %s, "
        f"ops_expected = %s, measure_elapsed = %s, complete_requested_at = %s, complete_requested_by = %s, "
        f"fields = fields || %s::jsonb, links = links || %s::jsonb, artifacts = artifacts || %s::jsonb, "
        f"updated_at = %s, updated_by = %s, is_completed = %s, status = coalesce(%s, status), "
        f"elapsed = coalesce(%s, elapsed), completed_at = coalesce(%s, completed_at), "
        f"completed_by = coalesce(%s, completed_by), completed_reason = coalesce(%s, completed_reason), "
        f"activity_at = now() "
        f"WHERE id = %s",
        (*run.counts, run.ops_applied, run.ops_expected, run.measure_elapsed,
         run.complete_requested_at, run.complete_requested_by,
         _json(run.new_fields), _json(run.new_links), _json(run.new_artifacts),
         run.updated_at, run.updated_by, run.is_completed, run.status, run.elapsed,
         run.complete_requested_at if run.status else None, run.complete_requested_by if run.status else None,
         run.completed_reason if run.status else None, run.id),
    )


def dead_letter(conn: Connection, dead: list[tuple[Op, str]]) -> None:
    """Record operations that cannot be applied, and release their claims so a replay can apply them."""
    conn.exec_driver_sql(
        "DELETE FROM applied_ops WHERE id = ANY(%(ids)s::uuid[])", {"ids": [op["id"] for op, _ in dead]}
    )
    conn.exec_driver_sql(
        "INSERT INTO dead_letters (op_id, kind, run_id, thread_id, payload, error) "
        "VALUES (%s, %s, %s, %s, %s::jsonb, %s) "
        # A replay that fails again: the letter is dead again, with its latest error.
        "ON CONFLICT (op_id) DO UPDATE SET error = excluded.error, failures = dead_letters.failures + 1, "
        "  replayed_at = NULL",
        [(op["id"], op["kind"], op["run_id"], op.get("thread_id"), encode_op(op).decode(), error)
         for op, error in dead],
    )


# --- completing without the client ---------------------------------------------------------------------------

def force_complete_run(conn: Connection, run_id: int, reason: str) -> bool:
    """Complete a run now with what has been applied: its counters are final as they stand, and operations
    still queued for it are dead-lettered when they arrive. False if there is no such open run."""
    # Threads first, then the run: the order every transaction takes its locks in.
    conn.exec_driver_sql(
        "SELECT id FROM automation_run_threads WHERE run_id = %(run)s ORDER BY id FOR NO KEY UPDATE", {"run": run_id})
    run = lock_runs(conn, [run_id]).get(run_id)
    if run is None or run.is_completed:
        return False
    if run.complete_requested_at is None:
        run.complete_requested_at = datetime.now(UTC)
        run.measure_elapsed = False
    run.completed_reason = reason
    finalise_run(conn, run, failed_status_ids(conn))
    write_run(conn, run)
    return True


def idle_runs(conn: Connection, idle_seconds: int) -> list[int]:
    return [row[0] for row in conn.exec_driver_sql(
        "SELECT id FROM automation_runs WHERE NOT is_completed "
        "AND activity_at < now() - make_interval(secs => %(idle)s) ORDER BY id LIMIT 1000",
        {"idle": idle_seconds})]


def idle_threads(conn: Connection, idle_seconds: int) -> list[int]:
    """Open threads of open runs with nothing applied for `idle_seconds` (a CI job that died, say)."""
    return [row[0] for row in conn.exec_driver_sql(
        "SELECT t.id FROM automation_run_threads t JOIN automation_runs r ON r.id = t.run_id "
        "WHERE NOT t.is_completed AND NOT r.is_completed "
        "AND t.activity_at < now() - make_interval(secs => %(idle)s) ORDER BY t.id LIMIT 1000",
        {"idle": idle_seconds})]


def complete_threads(conn: Connection, thread_ids: list[int], reason: str) -> list[int]:
    """Complete these threads as they stand; the ones that were still open."""
    if not thread_ids:
        return []
    # Lock in id order, as batches do.
    locked = [row[0] for row in conn.exec_driver_sql(
        "SELECT id FROM automation_run_threads WHERE id = ANY(%(ids)s) AND NOT is_completed "
        "ORDER BY id FOR NO KEY UPDATE", {"ids": thread_ids})]
    if locked:
        conn.exec_driver_sql(
            f"UPDATE automation_run_threads SET is_completed = true, status = "
            f"{_thread_status(failed_status_ids(conn))}, completed_at = now(), completed_reason = %(reason)s "
            f"WHERE id = ANY(%(ids)s)", {"ids": locked, "reason": reason})
    return locked
