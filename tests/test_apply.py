"""The worker's apply logic, called directly on a real PostgreSQL: idempotence, barrier, counters."""

import random
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from conftest import count_results
from sqlalchemy import Connection, Engine, text
from support import unique

from schema.messages import Op
from schema.requests import ThreadAppend, validate
from schema.statuses import COUNT_COLUMNS, DEFAULT_STATUSES, alias_map
from worker import apply as apply_module
from worker import tasks
from worker.apply import Outcome, apply_ops, decode_batch


class Seed:
    """A project, a user and a run with threads, inserted straight into the database."""

    def __init__(self, engine: Engine, threads: int = 2, created_at: datetime | None = None) -> None:
        self.engine = engine
        with engine.begin() as conn:
            self.project = conn.execute(text("INSERT INTO projects (name) VALUES (:n) RETURNING id"),
                                        {"n": unique("p")}).scalar_one()
            self.user = conn.execute(text("INSERT INTO users (name) VALUES (:n) RETURNING id"),
                                     {"n": unique("u")}).scalar_one()
            source = conn.execute(text("INSERT INTO automation_sources (project_id, name) VALUES (:p, 's') "
                                       "RETURNING id"), {"p": self.project}).scalar_one()
            self.run = conn.execute(text(
                "INSERT INTO automation_runs (project_id, source_id, name, created_by, created_at) "
                "VALUES (:p, :s, 'run', :u, coalesce(:at, now())) RETURNING id"),
                {"p": self.project, "s": source, "u": self.user, "at": created_at}).scalar_one()
            self.threads = [conn.execute(text(
                "INSERT INTO automation_run_threads (run_id, project_id, created_by) "
                "VALUES (:r, :p, :u) RETURNING id"),
                {"r": self.run, "p": self.project, "u": self.user}).scalar_one()
                for _ in range(threads)]

    def op(self, kind: str, at: datetime | None = None, **fields: Any) -> Any:
        moment = (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"kind": kind, "id": str(uuid.uuid4()), "run_id": self.run, "user_id": self.user, "at": moment,
                **fields}

    def append(self, thread: int, statuses: list[int], **fields: Any) -> Any:
        tests = [{"key": f"k{i}", "name": f"test {i}", "status": STATUS_NAMES[s], "elapsed": 10}
                 for i, s in enumerate(statuses)]
        return self.append_tests(thread, tests, **fields)

    def append_tests(self, thread: int, tests: list[dict[str, Any]], **fields: Any) -> Any:
        """A thread append as the shim enqueues it: the request body, validated, passed on as it came."""
        raw = orjson.dumps({"tests": tests, **fields})
        validate(ThreadAppend, raw, alias_map(DEFAULT_STATUSES))
        [op] = decode_batch(b"[[" + orjson.dumps(self.op("thread.append", thread_id=self.threads[thread])) + b","
                            + raw + b"]]")
        return op

    def complete_thread(self, thread: int, expected: int, **fields: Any) -> Any:
        return self.op("thread.complete", thread_id=self.threads[thread], expected=expected, **fields)

    def complete_run(self, expected: int, measure_elapsed: bool = False, at: datetime | None = None) -> Any:
        return self.op("run.complete", at=at, expected=expected, measure_elapsed=measure_elapsed)

    def apply(self, *ops: Op) -> Outcome:
        with self.engine.begin() as conn:
            return apply_ops(conn, list(ops))

    def run_row(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return dict(conn.execute(text("SELECT * FROM automation_runs WHERE id = :id"),
                                     {"id": self.run}).mappings().one())

    def thread_row(self, thread: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return dict(conn.execute(text("SELECT * FROM automation_run_threads WHERE id = :id"),
                                     {"id": self.threads[thread]}).mappings().one())


def counts(row: dict[str, Any]) -> dict[int, int]:
    """Non-zero counters of a run or thread row, by status id."""
    return {i + 1: row[c] for i, c in enumerate(COUNT_COLUMNS) if row[c]}


PASSED, FAILED, RETEST, SKIPPED = 2, 3, 4, 6
STATUS_NAMES = {PASSED: "passed", FAILED: "failed", RETEST: "retest", SKIPPED: "skipped"}


def test_a_redelivered_operation_changes_nothing(engine: Engine) -> None:
    seed = Seed(engine)
    append = seed.append(0, [PASSED, FAILED, SKIPPED])
    first = seed.apply(append)
    before = seed.run_row(), seed.thread_row(0), count_results(engine, seed.run)

    second = seed.apply(append)
    assert (first.applied, first.results) == (1, 3)
    assert (second.applied, second.duplicates, second.results) == (0, 1, 0)
    assert (seed.run_row(), seed.thread_row(0), count_results(engine, seed.run)) == before


def test_the_same_operation_twice_in_one_batch_is_applied_once(engine: Engine) -> None:
    seed = Seed(engine)
    append = seed.append(0, [PASSED, PASSED])
    outcome = seed.apply(append, append)
    assert outcome.results == 2
    assert counts(seed.run_row()) == {PASSED: 2} == count_results(engine, seed.run)


def test_a_thread_complete_that_overtakes_its_appends_waits_for_them(engine: Engine) -> None:
    seed = Seed(engine)
    first, second = seed.append(0, [PASSED]), seed.append(0, [FAILED, FAILED])

    seed.apply(seed.complete_thread(0, expected=2))
    assert not seed.thread_row(0)["is_completed"]
    seed.apply(second)
    assert not seed.thread_row(0)["is_completed"]
    outcome = seed.apply(first)

    thread = seed.thread_row(0)
    assert outcome.threads_completed == [seed.threads[0]]
    assert thread["is_completed"] and thread["status"] == 3
    assert counts(thread) == {PASSED: 1, FAILED: 2}


def test_a_run_complete_that_overtakes_everything_waits_then_completes_open_threads(engine: Engine) -> None:
    created = datetime.now(UTC) - timedelta(seconds=90)
    seed = Seed(engine, threads=3, created_at=created)
    ops = [seed.append(0, [PASSED], elapsed_observed=5_000_000), seed.append(1, [PASSED, SKIPPED]),
           seed.append(1, [RETEST], elapsed_computed=7_000_000), seed.complete_thread(1, expected=2)]
    seed.apply(seed.complete_run(expected=len(ops)))
    for op in ops[:-1]:
        seed.apply(op)
        assert not seed.run_row()["is_completed"]
    outcome = seed.apply(ops[-1])

    run = seed.run_row()
    assert outcome.runs_completed == [seed.run]
    assert run["is_completed"] and run["status"] == 2  # nothing failed
    assert counts(run) == {PASSED: 2, SKIPPED: 1, RETEST: 1} == count_results(engine, seed.run)
    # Thread 2 never got a result or a complete: completing the run completed it.
    assert all(seed.thread_row(i)["is_completed"] for i in range(3))
    # measure_elapsed false: the run takes its longest thread's elapsed.
    assert run["elapsed"] == 7_000_000


def test_measure_elapsed_takes_the_time_from_create_to_complete(engine: Engine) -> None:
    created = datetime.now(UTC) - timedelta(seconds=60)
    seed = Seed(engine, threads=1, created_at=created)
    seed.apply(seed.complete_run(expected=0, measure_elapsed=True, at=created + timedelta(seconds=42)))
    run = seed.run_row()
    assert run["is_completed"] and run["elapsed"] == 42_000_000
    assert run["completed_at"] == created + timedelta(seconds=42)


def test_thread_elapsed_adds_up_observed_parts(engine: Engine) -> None:
    seed = Seed(engine, threads=1)
    seed.apply(seed.append(0, [PASSED], elapsed_observed=100, elapsed_computed=1))
    seed.apply(seed.append(0, [PASSED], elapsed_observed=50))
    seed.apply(seed.complete_thread(0, expected=2, elapsed_observed=25))
    thread = seed.thread_row(0)
    assert thread["is_completed"]
    assert (thread["elapsed_observed"], thread["elapsed_computed"], thread["results_elapsed"]) == (175, 1, 20)


def test_appends_after_completion_are_dead_lettered_not_counted(engine: Engine) -> None:
    seed = Seed(engine, threads=1)
    seed.apply(seed.complete_run(expected=0))
    before = seed.run_row()
    late = seed.append(0, [FAILED])
    outcome = seed.apply(late)

    assert outcome.applied == 0 and [error for _, error in outcome.dead] == ["thread already completed"]
    assert seed.run_row() == before
    assert count_results(engine, seed.run) == {}
    with engine.connect() as conn:
        letter = conn.execute(text("SELECT kind, payload FROM dead_letters WHERE op_id = :id"),
                              {"id": late["id"]}).one()
        claimed = conn.execute(text("SELECT count(*) FROM applied_ops WHERE id = :id"), {"id": late["id"]})
        assert claimed.scalar_one() == 0  # released, so that a replay can apply it
    assert letter.kind == "thread.append" and letter.payload["body"]["tests"][0]["status"] == STATUS_NAMES[FAILED]


def test_a_completed_run_never_moves(engine: Engine) -> None:
    seed = Seed(engine, threads=1)
    append = seed.append(0, [PASSED])
    seed.apply(append, seed.complete_thread(0, expected=1), seed.complete_run(expected=2))
    final = seed.run_row()
    assert final["is_completed"]
    seed.apply(append, seed.complete_run(expected=5), seed.complete_thread(0, expected=9))
    assert seed.run_row() == final


def test_run_appends_add_fields_links_and_artifacts(engine: Engine) -> None:
    seed = Seed(engine, threads=0)
    field = {"type": 1, "name": "Branch", "value": "main"}
    link = {"name": "CI", "url": "https://ci.example/1"}
    seed.apply(seed.op("run.append", fields=[field], links=[link]))
    seed.apply(seed.op("run.append", artifacts=[{"name": "log", "url": "https://ci.example/log"}]))
    run = seed.run_row()
    assert run["fields"] == [field] and run["links"] == [link] and len(run["artifacts"]) == 1
    assert run["updated_by"] == seed.user and run["ops_applied"] == 2


def test_results_keep_their_details(engine: Engine) -> None:
    seed = Seed(engine, threads=1)
    test = {"key": "abc", "name": "It works", "folder": "Suite A", "status": "failed", "elapsed": 1234,
            "file": "a_test.py", "line": 7, "assertions": 3,
            "fields": [{"type": 4, "name": "Error", "value": "boom", "meta": {"type": "E"}, "is_highlight": True}],
            "artifacts": [{"name": "shot.png", "url": "https://x/shot.png", "mime_type": "image/png", "size": 9}]}
    seed.apply(seed.append_tests(0, [test]))
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM automation_results WHERE run_id = :r"), {"r": seed.run}).mappings().one()
    assert {k: row[k] for k in test if k != "status"} == {k: v for k, v in test.items() if k != "status"}
    assert row["status_id"] == FAILED and row["thread_id"] == seed.threads[0]


def test_a_batch_of_many_chunks_of_copy_stores_every_result_as_sent(engine: Engine) -> None:
    """More rows than one COPY chunk (store.COPY_CHUNK) holds, over several appends, each with its details."""
    from worker.store import COPY_CHUNK
    seed = Seed(engine, threads=2)
    sent = []
    for append in range(6):
        tests = [{"key": f"k{append}.{i}", "name": f"test {append}.{i} " + "n" * (i % 50), "status": "passed",
                  "folder": None if i % 3 else f"suite {i % 7}", "elapsed": i if i % 5 else None, "line": i,
                  "fields": [{"type": 1, "name": "Output", "value": "x" * (i % 300)}] if i % 4 == 0 else []}
                 for i in range(1000)]
        sent.append(seed.append_tests(append % 2, tests))
    seed.apply(*sent)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT key, name, folder, elapsed, line, fields FROM automation_results "
                                 "WHERE run_id = :r"), {"r": seed.run}).all()
        stored_bytes = conn.execute(text("SELECT sum(pg_column_size(r.*)) FROM automation_results r "
                                         "WHERE run_id = :r"), {"r": seed.run}).scalar_one()
    assert stored_bytes > 3 * COPY_CHUNK  # else this tests one chunk

    def sort(value: Any) -> bytes:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)

    expected = {(f"k{a}.{i}", f"test {a}.{i} " + "n" * (i % 50), None if i % 3 else f"suite {i % 7}",
                 i if i % 5 else None, i,
                 sort([{"type": 1, "name": "Output", "value": "x" * (i % 300)}]) if i % 4 == 0 else None)
                for a in range(6) for i in range(1000)}
    assert {(*row[:5], sort(row[5]) if row[5] is not None else None) for row in rows} == expected
    assert len(rows) == 6000


@pytest.mark.parametrize("workers", [4])
def test_parallel_workers_with_duplicates_neither_deadlock_nor_miscount(engine: Engine, workers: int) -> None:
    """Batches over the same threads, each op delivered twice in shuffled batches, applied concurrently."""
    rng = random.Random(7)
    seed = Seed(engine, threads=6)
    statuses = [[rng.choice([PASSED, FAILED, SKIPPED]) for _ in range(5)] for _ in range(120)]
    appends = [seed.append(rng.randrange(6), these) for these in statuses]
    expected: dict[int, int] = {}
    for status_id in (s for these in statuses for s in these):
        expected[status_id] = expected.get(status_id, 0) + 1
    deliveries = appends * 2
    rng.shuffle(deliveries)
    batches = [deliveries[i:i + 8] for i in range(0, len(deliveries), 8)]
    errors: list[BaseException] = []

    def work(mine: list[list[Any]]) -> None:
        try:
            for batch in mine:
                seed.apply(*batch)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(batches[i::workers],)) for i in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    run = seed.run_row()
    assert counts(run) == expected == count_results(engine, seed.run)
    assert run["ops_applied"] == len(appends)
    assert sum(seed.thread_row(i)["appends_applied"] for i in range(6)) == len(appends)


def test_an_append_whose_thread_is_completed_while_its_results_are_copied_is_applied_again_and_refused(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The results go in before the thread's row is locked: a run completed by the sweeper in between (it
    locks the thread first) must not get them. The batch is rolled back and applied again, which refuses the
    append as it would have from the start."""
    seed = Seed(engine, threads=1)
    seed.apply(seed.append(0, [PASSED]))
    before = seed.thread_row(0)
    late = seed.append(0, [FAILED, FAILED])
    real_lock = apply_module.lock_threads
    raced: list[int] = []

    def lock_after_a_completion(conn: Connection, ids: list[int]) -> Any:
        if not raced:
            with engine.begin() as other:
                raced.append(apply_module.force_complete_run(other, seed.run, "timeout") or 0)
        return real_lock(conn, ids)

    monkeypatch.setattr(apply_module, "lock_threads", lock_after_a_completion)
    monkeypatch.setattr(tasks, "unit_of_work", engine.begin)
    outcome = tasks.apply_batch([late])

    assert raced and outcome.applied == 0 and outcome.results == 0
    assert count_results(engine, seed.run) == {PASSED: 1}
    thread = seed.thread_row(0)
    assert thread["is_completed"] and thread["appends_applied"] == before["appends_applied"] == 1
    assert [thread[c] for c in COUNT_COLUMNS] == [before[c] for c in COUNT_COLUMNS]
    with engine.connect() as conn:
        error = conn.execute(text("SELECT error FROM dead_letters WHERE op_id = :id"), {"id": late["id"]})
        assert error.scalar_one() == "thread already completed"


def test_a_batch_checked_in_its_own_transaction_applies_nothing_while_a_thread_is_not_written(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker checks that a batch's threads are written in the transaction that applies it: if one is not
    yet, nothing is claimed nor stored, and the task settles which batches can go (`tasks.ready`)."""
    seed = Seed(engine, threads=1)
    written = seed.append(0, [PASSED, FAILED])
    unwritten = {**seed.append(0, [PASSED]), "thread_id": seed.threads[0] + 1_000_000}
    monkeypatch.setattr(tasks, "unit_of_work", engine.begin)

    with pytest.raises(tasks.NotReady):
        tasks.apply_batch([written, unwritten], check_ready=True)
    assert count_results(engine, seed.run) == {}
    with engine.connect() as conn:
        claimed = conn.execute(text("SELECT count(*) FROM applied_ops WHERE id = ANY(CAST(:ids AS uuid[]))"),
                               {"ids": [written["id"], unwritten["id"]]}).scalar_one()
    assert claimed == 0 and seed.thread_row(0)["appends_applied"] == 0

    outcome = tasks.apply_batch([written], check_ready=True)
    assert outcome.applied == 1 and count_results(engine, seed.run) == {PASSED: 1, FAILED: 1}


def test_statuses_are_read_in_any_case_and_one_the_worker_does_not_know_dead_letters_its_append(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = Seed(engine, threads=1)
    tests = [{"key": f"k{i}", "name": f"t{i}", "status": status}
             for i, status in enumerate(["Passed", "passed", "PASSED", "failed", "Passed"])]
    seed.apply(seed.append_tests(0, tests))
    assert count_results(engine, seed.run) == {PASSED: 4, FAILED: 1}

    # The status table changed after the shim accepted an append: the worker no longer knows "failed".
    known = {alias: status_id for alias, status_id in alias_map(DEFAULT_STATUSES).items() if status_id != FAILED}
    monkeypatch.setattr(apply_module, "status_aliases", lambda conn: known)
    late = seed.append_tests(0, [{"key": "a", "name": "a", "status": "Passed"},
                                 {"key": "b", "name": "b", "status": "Failed"}])
    outcome = seed.apply(late)
    assert [error for _, error in outcome.dead] == ["unknown status 'Failed'"] and outcome.results == 0
    assert count_results(engine, seed.run) == {PASSED: 4, FAILED: 1}
    assert seed.thread_row(0)["appends_applied"] == 1


def test_a_thread_append_is_applied_alike_in_each_form_a_batch_holds_and_a_body_refused_is_its_own_dead_letter(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shim's pair [head, body]; one object with the body in it, as a dead letter replayed or a batch of an
    earlier version holds it; and, beside them, a body the worker's declaration refuses: the others apply."""
    seed = Seed(engine, threads=1)
    body = {"tests": [{"key": "k", "name": "n", "status": "passed"}]}
    pair = [seed.op("thread.append", thread_id=seed.threads[0]), body]
    one_object = seed.op("thread.append", thread_id=seed.threads[0], body=body)
    refused = [seed.op("thread.append", thread_id=seed.threads[0]),
               {"tests": [{"key": "k", "name": "n", "status": "passed", "line": "seven"}]}]
    monkeypatch.setattr(tasks, "unit_of_work", engine.begin)

    outcome = tasks.apply_batch(decode_batch(orjson.dumps([pair, one_object, refused])))

    assert outcome.applied == 2 and outcome.results == 2
    assert count_results(engine, seed.run) == {PASSED: 2}
    assert seed.thread_row(0)["appends_applied"] == 2
    with engine.connect() as conn:
        letter = conn.execute(text("SELECT error, payload FROM dead_letters WHERE op_id = :id"),
                              {"id": refused[0]["id"]}).one()
    assert letter.error.startswith("ValidationError") and letter.payload["body"] == refused[1]


def test_escaped_nuls_in_an_append_are_stored_as_replacement_characters(engine: Engine,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaced only once PostgreSQL has refused them (`with_storable_escapes`), in the test's text and fields
    and in the append's own fields, with the other appends of the batch applied as they came."""
    seed = Seed(engine, threads=2)
    clean = seed.append(1, [PASSED])
    # JSON escapes: a NUL in the key, name and fields, and an escaped backslash before "u0000" in the folder.
    raw = (rb'{"tests": [{"key": "k\u0000", "name": "a\u0000b", "status": "failed", "folder": "\\u0000 kept", '
           rb'"fields": [{"type": 1, "name": "Output", "value": "x\u0000y"}]}], '
           rb'"fields": [{"type": 1, "name": "f", "value": "\u0000"}]}')
    nul = decode_batch(b"[[" + orjson.dumps(seed.op("thread.append", thread_id=seed.threads[0])) + b"," + raw + b"]]")
    monkeypatch.setattr(tasks, "unit_of_work", engine.begin)

    outcome = tasks.apply_batch([clean, *nul])

    assert outcome.applied == 2 and not outcome.dead
    with engine.connect() as conn:
        row = conn.execute(text("SELECT key, name, folder, fields FROM automation_results WHERE thread_id = :t"),
                           {"t": seed.threads[0]}).one()
    assert (row.key, row.name, row.folder) == ("k\ufffd", "a\ufffdb", "\\u0000 kept")
    assert row.fields[0]["value"] == "x\ufffdy"
    assert seed.thread_row(0)["fields"] == [{"type": 1, "name": "f", "value": "\ufffd"}]
    assert count_results(engine, seed.run) == {PASSED: 1, FAILED: 1}
