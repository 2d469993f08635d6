"""Applying a batch of queued operations to PostgreSQL, in the caller's transaction: what each operation does
to its thread and run. The SQL it takes is in worker/store.py.

The order of work in `apply_ops` is what keeps parallel workers correct and free of deadlocks:

1. claim the operation ids (sorted), so that a redelivered operation is skipped (and one that arrives after
   its dedupe window is dead-lettered);
2. write the appends' results by COPY, their threads read without a lock; then lock the threads concerned
   (sorted by id), add what the appends added to the locked rows in Python, apply the completes, and write
   each thread's new state with one UPDATE. (A thread found completed under the lock that was open when read
   rolls the batch back, to be applied again from the start: `Raced`.)
3. lock the runs concerned (sorted by id), add the threads' changes, and finalise any run whose
   completion barrier is met.

Every transaction takes its locks in that order: claims, threads, runs; copying results takes none that
another waits on. Finalising a run then locks the run's remaining open threads after the run itself. That
is safe: a run is finalised only once every operation accepted for it has been applied, so no other
transaction holds or waits for those threads.
"""

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
from sqlalchemy import Connection

from schema.escapes import storable_escapes
from schema.messages import Op, ThreadAppendOp, ThreadCompleteOp
from schema.requests import saturating_add
from schema.statuses import RUN_STATUS_FAILED, RUN_STATUS_PASSED
from worker.outbox import record_completion
from worker.store import (
    N_STATUSES,
    RunState,
    ThreadState,
    claim,
    complete_open_threads,
    copy_results,
    dead_letter,
    failed_status_ids,
    insert_runs,
    insert_threads,
    lock_run_threads,
    lock_runs,
    lock_threads,
    longest_thread_elapsed,
    present,
    status_aliases,
    thread_additions,
    write_run,
    write_threads,
)

_EMPTY = msgspec.Raw()


class StoredTest(msgspec.Struct, gc=False, omit_defaults=True):
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
    # Raw as a union member is not supported: an absent one is empty, a null one the JSON null. (One empty Raw
    # shared by every test, not one made per test by a factory: most tests have neither.)
    fields: msgspec.Raw = _EMPTY
    artifacts: msgspec.Raw = _EMPTY


class StoredAppend(msgspec.Struct, gc=False, omit_defaults=True):
    """A validated thread append (schema.requests.ThreadAppend) as the worker applies it. (Encoded again only
    for a dead letter or a repair, without its defaults: an empty Raw would encode as nothing.)"""

    tests: list[StoredTest] = msgspec.field(default_factory=list)
    elapsed_observed: int | None = None
    elapsed_computed: int | None = None
    fields: msgspec.Raw = _EMPTY
    artifacts: msgspec.Raw = _EMPTY


_APPEND = msgspec.json.Decoder(StoredAppend)
_NONE = (b"", b"[]", b"null")


def _jsonb(raw: msgspec.Raw) -> bytes | None:
    """A test's fields or artifacts for their column: none (left out, null or empty) is NULL."""
    text = bytes(raw)
    return None if text in _NONE else text


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
    runs_with_deliveries: list[int] = field(default_factory=list)  # of runs_completed: webhook POSTs owed


# A batch is a JSON list of operations. A thread append is the pair [head, body]: the shim's head (kind, ids,
# time) and the request body as the shim accepted it, decoded here in the same pass with the body's declaration
# (a second pass over the body, to find where it ends and then to decode it, cost the worker 13 % of its
# instructions). Every other operation is one object, as is a thread append in a dead letter replayed or in a
# batch an earlier version queued: its body is decoded when it is applied (`stored_append`).
_BATCH = msgspec.json.Decoder(list[dict[str, Any] | tuple[dict[str, Any], StoredAppend]])
# When a body is refused by the declaration above (one a shim of another version wrote?), the batch is decoded
# leaving every body raw: each is decoded when its operation is applied, so that only the one refused fails
# there, and is dead-lettered.
_BATCH_RAW_BODIES = msgspec.json.Decoder(list[dict[str, Any] | tuple[dict[str, Any], msgspec.Raw]])
_VALUE = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode


def decode_batch(payload: bytes) -> list[Op]:
    """A stored batch's operations, a thread append's `body` in it (see `_BATCH`)."""
    items: list[Any]
    try:
        items = _BATCH.decode(payload)
    except msgspec.ValidationError:
        items = _BATCH_RAW_BODIES.decode(payload)
    ops = []
    for item in items:
        if isinstance(item, tuple):
            head, body = item
            head["body"] = body
            item = head
        ops.append(cast(Op, item))
    return ops


def stored_append(body: Any) -> StoredAppend:
    """A thread append's body as decode_batch left it, decoded if it is not yet."""
    if isinstance(body, StoredAppend):
        return body
    return _APPEND.decode(body if isinstance(body, msgspec.Raw) else _encode(body))


def with_storable_escapes(ops: list[Op]) -> list[Op] | None:
    """The operations with each escaped NUL in a thread append's body replaced (schema/escapes.py); None if
    there is none.

    PostgreSQL text cannot hold a NUL; the shim leaves them in appends for the worker (api_shim/http.py), and
    the worker looks for them only once a batch has failed (`tasks.apply_batch`): looking in every batch
    cost it 5 % of its time, for what a few test reports hold."""
    repaired: list[Op] = []
    for op in ops:
        body = op.get("body")
        if body is not None and (text := storable_escapes(_encode(body))) is not None:
            op = cast(Op, {**op, "body": msgspec.Raw(text)})
        repaired.append(op)
    return None if all(a is b for a, b in zip(repaired, ops, strict=True)) else repaired


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
    insert_runs(conn, [op for op in fresh if op["kind"] == "run.create"])
    insert_threads(conn, [op for op in fresh if op["kind"] == "thread.create"])
    outcome.runs_created = [(op["run_id"], op["project_id"]) for op in fresh if op["kind"] == "run.create"]

    # Threads. The appends' results are copied in before the threads' rows are locked: a fleet's busy threads
    # are in every batch, and batches on the same threads then copy at the same time, queueing only for the
    # short rest of their transactions. Until the lock, what the appends add is kept apart from the counts:
    # their rows depend on no count, only on the thread being open, which the lock then confirms.
    thread_ids = sorted({t for op in fresh if (t := thread_of(op)) is not None})
    added = thread_additions(conn, thread_ids)
    rows: list[tuple[Any, ...]] = []
    errors: dict[int, str] = {}
    for i, op in enumerate(fresh):
        if op["kind"] == "thread.append" and (error := _thread_append(added.get(op["thread_id"]), op, rows,
                                                                      aliases)):
            errors[i] = error
    copy_results(conn, rows)
    outcome.results = len(rows)
    threads = lock_threads(conn, thread_ids)
    for thread_id, addition in added.items():
        if addition.changed:
            thread = threads.get(thread_id)
            if thread is None or thread.is_completed:
                raise Raced(thread_id)
            _add(thread, addition)
    survivors: list[Op] = []
    for i, op in enumerate(fresh):
        if op["kind"] == "thread.complete":
            error = _thread_complete(threads.get(op["thread_id"]), op)
            if error:
                errors[i] = error
        if i in errors:
            outcome.dead.append((op, errors[i]))
        else:
            survivors.append(op)
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
            if finalise_run(conn, run, failed_ids):
                outcome.runs_with_deliveries.append(run.id)
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
    written_runs, written_threads = present(conn, runs, threads)
    missing_runs, missing_threads = runs - written_runs, threads - written_threads
    return {i for i, op in enumerate(ops) if op["run_id"] in missing_runs or thread_of(op) in missing_threads}


class Raced(Exception):
    """A thread an append was copied for was completed (or deleted) by another transaction before this one
    locked it: the batch is applied again from the start, and the append then dead-lettered."""


def _add(thread: ThreadState, addition: ThreadState) -> None:
    """What a batch's appends added (`thread_additions`) onto the locked thread."""
    thread.counts = [a + b for a, b in zip(thread.counts, addition.counts, strict=True)]
    thread.delta = [a + b for a, b in zip(thread.delta, addition.delta, strict=True)]
    thread.appends_applied += addition.appends_applied
    for name in ("results_elapsed", "elapsed_observed", "elapsed_computed"):
        part = getattr(addition, name)
        if part is not None:
            setattr(thread, name, saturating_add(getattr(thread, name), part))
    thread.new_fields.extend(addition.new_fields)
    thread.new_artifacts.extend(addition.new_artifacts)
    thread.changed = True


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
    body = op.get("body")
    if body is not None:
        error = _append_body(thread, stored_append(body), datetime.fromisoformat(op["at"]), rows, aliases)
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
    seen: dict[str, int] = {}  # status as sent -> id: a suite sends a few, each thousands of times
    for test in body.tests or ():
        status_id = seen.get(test.status)
        if status_id is None:
            status_id = aliases.get(test.status.lower())
            if status_id is None:  # the status table changed since the shim accepted it
                return f"unknown status {test.status[:100]!r}"
            seen[test.status] = status_id
        elapsed = test.elapsed
        if elapsed is not None:
            elapsed_sum += elapsed
            timed = True
        # Most tests carry neither fields nor artifacts: their Raw is empty, and false.
        fields, artifacts = test.fields, test.artifacts
        add((run_id, thread_id, status_id, test.key, test.name, test.folder, elapsed, test.file, test.line,
             test.assertions, _jsonb(fields) if fields else None, _jsonb(artifacts) if artifacts else None, at))
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


def finalise_run(conn: Connection, run: RunState, failed_ids: list[int]) -> int:
    """Complete the run and its open threads; its counters are final from here on. What the completion owes
    is recorded with it (worker/outbox.py): how many webhook deliveries."""
    complete_open_threads(conn, run, failed_ids)
    assert run.complete_requested_at is not None
    if run.measure_elapsed:
        run.elapsed = int((run.complete_requested_at - run.created_at).total_seconds() * 1_000_000)
    else:
        run.elapsed = longest_thread_elapsed(conn, run.id)
    run.status = RUN_STATUS_FAILED if sum(run.counts[i - 1] for i in failed_ids) else RUN_STATUS_PASSED
    run.is_completed = True
    run.changed = True
    return record_completion(conn, run.id, run.complete_requested_at)


# --- completing without the client ---------------------------------------------------------------------------

def force_complete_run(conn: Connection, run_id: int, reason: str) -> int | None:
    """Complete a run now with what has been applied: its counters are final as they stand, and operations
    still queued for it are dead-lettered when they arrive. None if there is no such open run, else how many
    webhook deliveries its completion owes."""
    # Threads first, then the run: the order every transaction takes its locks in.
    lock_run_threads(conn, run_id)
    run = lock_runs(conn, [run_id]).get(run_id)
    if run is None or run.is_completed:
        return None
    if run.complete_requested_at is None:
        run.complete_requested_at = datetime.now(UTC)
        run.measure_elapsed = False
    run.completed_reason = reason
    deliveries = finalise_run(conn, run, failed_status_ids(conn))
    write_run(conn, run)
    return deliveries
