"""The SQL of applying operations (worker/apply.py holds what they do): claims, the rows of runs and threads
locked and written, results copied in, dead letters. Every statement names its parameters.

Each function runs in the caller's transaction and takes its locks in the order worker/apply.py sets out:
claims, threads, runs, each sorted by id.
"""

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import msgspec
import orjson
import psycopg
from psycopg._copy_base import format_row_binary
from psycopg.adapt import Dumper
from psycopg.pq import Format
from sqlalchemy import Connection

from schema.messages import RESULT_FIELDS, JsonObject, Op
from schema.settings import get_settings
from schema.statuses import COUNT_COLUMNS, RUN_STATUS_FAILED, RUN_STATUS_PASSED

N_STATUSES = len(COUNT_COLUMNS)
_COUNTS = ", ".join(COUNT_COLUMNS)
_encode = msgspec.json.Encoder().encode


def encode_op(op: Op) -> bytes:
    """An operation as JSON again (for a dead letter), its raw body included as it came."""
    return _encode(op)


# --- what the rows hold ------------------------------------------------------------------------------------

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


# --- claims -----------------------------------------------------------------------------------------------

OUTSIDE_WINDOW = "outside the dedupe window"
# A replay whose operation was accepted less than this beyond the window is claimed under its accept time
# still: its partition is kept this much longer than the window (worker/lifecycle.py), and a delivery of the
# original that was inside the window when it was claimed may still be in flight.
WINDOW_MARGIN = timedelta(days=1)


def _cursor(conn: Connection) -> "psycopg.Cursor[Any]":
    """A cursor on the transaction's own psycopg connection, for the worker's hot statements."""
    raw = conn.connection.driver_connection
    assert raw is not None
    cursor: psycopg.Cursor[Any] = raw.cursor()
    return cursor


def _rows(conn: Connection, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Rows of a query, read on a `_cursor`. SQLAlchemy sets up a result for every call (a cursor description,
    its metadata), which cost a worker more than the query's own round trip: most for the 35 columns of a
    locked row, 28 % of the instructions per result on batches of two appends."""
    with _cursor(conn) as cur:
        rows: list[tuple[Any, ...]] = cur.execute(sql, params).fetchall()
    return rows


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
    oldest = now - window
    inside = sorted(i for i, at in accepted.items() if at >= oldest)
    claimed = {
        str(row[0]) for row in _rows(
            conn,
            # The arrays in binary: psycopg writes each element of a text one through a regular expression.
            "INSERT INTO applied_ops (id, accepted_at) "
            "SELECT * FROM unnest(%(ids)b::text[]::uuid[], %(ats)b::timestamptz[]) ORDER BY 1 "
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


# --- statuses ---------------------------------------------------------------------------------------------

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


def failed_status_ids(conn: Connection) -> list[int]:
    return [row[0] for row in _rows(conn, "SELECT id FROM statuses WHERE is_failed ORDER BY id", {})]


def passed_status_ids(conn: Connection) -> list[int]:
    return [row[0] for row in _rows(conn, "SELECT id FROM statuses WHERE is_passed ORDER BY id", {})]


# --- runs, threads and results -----------------------------------------------------------------------------

def insert_runs(conn: Connection, ops: list[Op]) -> None:
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


def insert_threads(conn: Connection, ops: list[Op]) -> None:
    """Write the rows of threads the shim created (their runs are written: see worker/apply.py `waiting`)."""
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


# The locked rows' fields, then their counts (COUNT_COLUMNS), read by position: a lookup by name of each of
# the 35 columns of 50 rows cost the worker 5 % of its time.
_THREAD_FIELDS = ("id", "run_id", "is_completed", "appends_applied", "appends_expected", "elapsed_observed",
                  "elapsed_computed", "results_elapsed", "complete_requested_at", "complete_requested_by")
_RUN_FIELDS = ("id", "is_completed", "created_at", "ops_applied", "ops_expected", "measure_elapsed",
               "complete_requested_at", "complete_requested_by", "updated_at", "updated_by")


def lock_threads(conn: Connection, ids: list[int]) -> dict[int, ThreadState]:
    if not ids:
        return {}
    rows = _rows(conn, f"SELECT {', '.join(_THREAD_FIELDS)}, {_COUNTS} "
                       f"FROM automation_run_threads WHERE id = ANY(%(ids)s) ORDER BY id FOR NO KEY UPDATE",
                 {"ids": ids})
    n = len(_THREAD_FIELDS)
    return {row[0]: ThreadState(**dict(zip(_THREAD_FIELDS, row[:n], strict=True)),
                                counts=list(row[n:])) for row in rows}


def thread_additions(conn: Connection, ids: list[int]) -> dict[int, ThreadState]:
    """The threads as empty states for what a batch adds to them: their runs and whether they are completed,
    read without a lock, and every count zero."""
    if not ids:
        return {}
    rows = _rows(conn, "SELECT id, run_id, is_completed FROM automation_run_threads WHERE id = ANY(%(ids)s)",
                 {"ids": ids})
    return {row_id: ThreadState(id=row_id, run_id=run_id, is_completed=is_completed, counts=[0] * N_STATUSES,
                                appends_applied=0, appends_expected=None, elapsed_observed=None,
                                elapsed_computed=None, results_elapsed=None, complete_requested_at=None,
                                complete_requested_by=None)
            for row_id, run_id, is_completed in rows}


def lock_runs(conn: Connection, ids: list[int]) -> dict[int, RunState]:
    if not ids:
        return {}
    rows = _rows(conn, f"SELECT {', '.join(_RUN_FIELDS)}, {_COUNTS} "
                       f"FROM automation_runs WHERE id = ANY(%(ids)s) ORDER BY id FOR NO KEY UPDATE",
                 {"ids": ids})
    n = len(_RUN_FIELDS)
    return {row[0]: RunState(**dict(zip(_RUN_FIELDS, row[:n], strict=True)), counts=list(row[n:])) for row in rows}


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


# psycopg's own encoder of a row (C, in psycopg_binary), called straight into one buffer: through
# Copy.write_row, which adds two Python calls per row and grows its buffer in small steps, the worker spent
# 7 % more instructions. The header and trailer are PostgreSQL's binary COPY format's: no flags, no extension.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\0" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
# Half of psycopg's MAX_BUFFER_SIZE (128 KB): a write above it is sliced, each slice a copy, and a chunk is sent
# only once it has passed this size, by up to a row.
COPY_CHUNK = 1 << 16


def copy_results(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    if not rows:
        return
    with _cursor(conn) as cur:
        JsonbText.oid = cur.adapters.types["jsonb"].oid
        # Registered for str on this cursor only: set_types below picks dumpers by column type, so it is the
        # one jsonb columns get, and text columns keep theirs.
        cur.adapters.register_dumper(str, JsonbText)
        with cur.copy(COPY_RESULTS) as copy:
            copy.set_types(RESULT_TYPES)
            transformer = copy.formatter.transformer
            data = bytearray(_COPY_HEADER)
            for row in rows:
                format_row_binary(row, transformer, data)
                if len(data) >= COPY_CHUNK:  # sent as it fills: PostgreSQL stores rows while the rest are encoded
                    copy.write(data)
                    data = bytearray()
            data += _COPY_TRAILER
            copy.write(data)


def _json(items: list[JsonObject]) -> str:
    return orjson.dumps(items).decode()


_SET_COUNTS = ", ".join(f"{c} = %({c})s" for c in COUNT_COLUMNS)


def _counts(counts: list[int]) -> dict[str, int]:
    return dict(zip(COUNT_COLUMNS, counts, strict=True))


def write_threads(conn: Connection, threads: list[ThreadState]) -> None:
    if not threads:
        return
    conn.exec_driver_sql(
        f"UPDATE automation_run_threads SET {_SET_COUNTS}, appends_applied = %(appends_applied)s, "
        f"appends_expected = %(appends_expected)s, elapsed_observed = %(elapsed_observed)s, "
        f"elapsed_computed = %(elapsed_computed)s, results_elapsed = %(results_elapsed)s, "
        f"fields = fields || %(new_fields)s::jsonb, artifacts = artifacts || %(new_artifacts)s::jsonb, "
        f"complete_requested_at = %(complete_requested_at)s, complete_requested_by = %(complete_requested_by)s, "
        f"is_completed = %(is_completed)s, status = coalesce(%(status)s, status), "
        f"completed_at = coalesce(%(completed_at)s, completed_at), "
        f"completed_by = coalesce(%(completed_by)s, completed_by), "
        f"completed_reason = coalesce(%(completed_reason)s, completed_reason), activity_at = now() "
        f"WHERE id = %(id)s",
        [{**_counts(t.counts), "appends_applied": t.appends_applied, "appends_expected": t.appends_expected,
          "elapsed_observed": t.elapsed_observed, "elapsed_computed": t.elapsed_computed,
          "results_elapsed": t.results_elapsed, "new_fields": _json(t.new_fields),
          "new_artifacts": _json(t.new_artifacts), "complete_requested_at": t.complete_requested_at,
          "complete_requested_by": t.complete_requested_by, "is_completed": t.is_completed, "status": t.status,
          "completed_at": t.complete_requested_at if t.finalised else None,
          "completed_by": t.complete_requested_by if t.finalised else None,
          "completed_reason": "client" if t.finalised else None, "id": t.id}
         for t in threads],
    )


def write_run(conn: Connection, run: RunState) -> None:
    final = run.status is not None
    conn.exec_driver_sql(
        f"UPDATE automation_runs SET {_SET_COUNTS}, ops_applied = %(ops_applied)s, "
        f"ops_expected = %(ops_expected)s, measure_elapsed = %(measure_elapsed)s, "
        f"complete_requested_at = %(complete_requested_at)s, complete_requested_by = %(complete_requested_by)s, "
        f"fields = fields || %(new_fields)s::jsonb, links = links || %(new_links)s::jsonb, "
        f"artifacts = artifacts || %(new_artifacts)s::jsonb, updated_at = %(updated_at)s, "
        f"updated_by = %(updated_by)s, is_completed = %(is_completed)s, status = coalesce(%(status)s, status), "
        f"elapsed = coalesce(%(elapsed)s, elapsed), completed_at = coalesce(%(completed_at)s, completed_at), "
        f"completed_by = coalesce(%(completed_by)s, completed_by), "
        f"completed_reason = coalesce(%(completed_reason)s, completed_reason), activity_at = now() "
        f"WHERE id = %(id)s",
        {**_counts(run.counts), "ops_applied": run.ops_applied, "ops_expected": run.ops_expected,
         "measure_elapsed": run.measure_elapsed, "complete_requested_at": run.complete_requested_at,
         "complete_requested_by": run.complete_requested_by, "new_fields": _json(run.new_fields),
         "new_links": _json(run.new_links), "new_artifacts": _json(run.new_artifacts),
         "updated_at": run.updated_at, "updated_by": run.updated_by, "is_completed": run.is_completed,
         "status": run.status, "elapsed": run.elapsed,
         "completed_at": run.complete_requested_at if final else None,
         "completed_by": run.complete_requested_by if final else None,
         "completed_reason": run.completed_reason if final else None, "id": run.id},
    )


def dead_letter(conn: Connection, dead: list[tuple[Op, str]]) -> None:
    """Record operations that cannot be applied, and release their claims so a replay can apply them."""
    conn.exec_driver_sql(
        "DELETE FROM applied_ops WHERE id = ANY(%(ids)s::uuid[])", {"ids": [op["id"] for op, _ in dead]}
    )
    conn.exec_driver_sql(
        "INSERT INTO dead_letters (op_id, kind, run_id, thread_id, payload, error) "
        "VALUES (%(op_id)s, %(kind)s, %(run_id)s, %(thread_id)s, %(payload)s::jsonb, %(error)s) "
        # A replay that fails again: the letter is dead again, with its latest error.
        "ON CONFLICT (op_id) DO UPDATE SET error = excluded.error, failures = dead_letters.failures + 1, "
        "  replayed_at = NULL",
        [{"op_id": op["id"], "kind": op["kind"], "run_id": op["run_id"], "thread_id": op.get("thread_id"),
          "payload": encode_op(op).decode(), "error": error}
         for op, error in dead],
    )


def present(conn: Connection, runs: set[int], threads: set[int]) -> tuple[set[int], set[int]]:
    """Which of these runs and threads have their rows written."""
    rows = _rows(conn, "SELECT false, id FROM automation_runs WHERE id = ANY(%(runs)s) UNION ALL "
                       "SELECT true, id FROM automation_run_threads WHERE id = ANY(%(threads)s)",
                 {"runs": sorted(runs), "threads": sorted(threads)})
    return ({row_id for is_thread, row_id in rows if not is_thread},
            {row_id for is_thread, row_id in rows if is_thread})


def thread_status_sql(failed_ids: list[int]) -> str:
    """SQL for a thread's final status from its counters."""
    failures = " + ".join(COUNT_COLUMNS[i - 1] for i in failed_ids) or "0"
    return f"CASE WHEN {failures} > 0 THEN {RUN_STATUS_FAILED} ELSE {RUN_STATUS_PASSED} END"


def complete_open_threads(conn: Connection, run: RunState, failed_ids: list[int]) -> None:
    """Complete the run's threads still open, as the run completes."""
    # A thread being created holds KEY SHARE on the run; FOR UPDATE waits for it, so that the new thread is
    # either seen and completed here, or refused because the run is completed.
    conn.exec_driver_sql("SELECT 1 FROM automation_runs WHERE id = %(run)s FOR UPDATE", {"run": run.id})
    conn.exec_driver_sql(
        f"UPDATE automation_run_threads SET is_completed = true, status = {thread_status_sql(failed_ids)}, "
        f"completed_at = %(at)s, completed_by = %(by)s, completed_reason = 'run' "
        f"WHERE run_id = %(run)s AND NOT is_completed",
        {"at": run.complete_requested_at, "by": run.complete_requested_by, "run": run.id},
    )


def longest_thread_elapsed(conn: Connection, run_id: int) -> int | None:
    elapsed: int | None = conn.exec_driver_sql(
        "SELECT max(coalesce(elapsed_observed, elapsed_computed, results_elapsed)) "
        "FROM automation_run_threads WHERE run_id = %(run)s",
        {"run": run_id},
    ).scalar()
    return elapsed


def lock_run_threads(conn: Connection, run_id: int) -> None:
    conn.exec_driver_sql(
        "SELECT id FROM automation_run_threads WHERE run_id = %(run)s ORDER BY id FOR NO KEY UPDATE", {"run": run_id})
