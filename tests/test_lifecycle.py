"""The store's lifecycle on a real PostgreSQL: day partitions, retention, the dedupe window, deleting a run, and
the in-place migration of a database the previous schema filled.

Retention drops partitions, so those tests run on a database of their own, copied from a migrated template
(the session's database is shared with the running shim and workers).
"""

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest
import redis
from alembic import command
from sqlalchemy import Connection, Engine, create_engine, make_url, text
from support import ROOT, TEST_DATABASE_URL, TEST_REDIS_URL, service_env, unique
from test_apply import Seed

from schema.db import alembic_config, drop_database, upgrade
from schema.messages import run_key, thread_key
from schema.partitions import AHEAD_DAYS, ensure_ahead, ensure_days, partitions
from schema.settings import Settings
from schema.statuses import COUNT_COLUMNS
from worker import store as store_module
from worker.lifecycle import DAILY_KEY, apply_retention, check_dedupe_window, delete_run, tend
from worker.store import copy_results

PASSED, FAILED = 2, 3


def database(suffix: str) -> str:
    url = make_url(TEST_DATABASE_URL)
    return url.set(database=f"{url.database}_{suffix}").render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def template() -> Iterator[str]:
    url = database("lifecycle_template")
    drop_database(url)
    upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture
def store(template: str) -> Iterator[Engine]:
    """A database of this test's own, migrated (a copy of the template)."""
    url = database("lifecycle")
    drop_database(url)
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{make_url(url).database}" TEMPLATE "{make_url(template).database}"')
    admin.dispose()
    engine = create_engine(url)
    yield engine
    engine.dispose()
    drop_database(url)


def today() -> date:
    return datetime.now(UTC).date()


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def partition_of(conn: Connection, table: str, where: str, **params: Any) -> list[str]:
    return list(conn.execute(text(f"SELECT DISTINCT tableoid::regclass::text FROM {table} WHERE {where}"),
                             params).scalars())


# --- partitions ----------------------------------------------------------------------------------------------

def test_partitions_exist_ahead_and_a_copy_at_a_boundary_lands_in_its_day(store: Engine) -> None:
    first, last = today() - timedelta(days=8), today() + timedelta(days=AHEAD_DAYS)
    with store.connect() as conn:
        for table in ("automation_results", "applied_ops"):
            days = [p.lower.date() for p in partitions(conn, table) if p.lower is not None]
            assert days == [first + timedelta(days=n) for n in range((last - first).days + 1)], table

    boundary = midnight(today() + timedelta(days=1))
    rows = [(1, 10, PASSED, f"k{n}", f"t{n}", None, None, None, None, None, None, None, at)
            for n, at in enumerate([boundary - timedelta(microseconds=1), boundary, boundary + timedelta(hours=23)])]
    with store.begin() as conn:
        copy_results(conn, rows)
    with store.connect() as conn:
        before = partition_of(conn, "automation_results", "created_at < :b", b=boundary)
        after = partition_of(conn, "automation_results", "created_at >= :b", b=boundary)
    assert before == [f"automation_results_p{today():%Y%m%d}"]
    assert after == [f"automation_results_p{today() + timedelta(days=1):%Y%m%d}"]


def test_making_partitions_ahead_neither_waits_for_ingestion_nor_repeats(store: Engine) -> None:
    later = today() + timedelta(days=10)
    with store.connect() as busy, store.connect() as conn:
        # A worker's transaction in the middle of its COPY: attaching a new day must not wait for it.
        busy.begin()
        copy_results(busy, [(1, 10, PASSED, "k", "t", None, None, None, None, None, None, None, midnight(today()))])
        with conn.begin():
            conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            created = ensure_ahead(conn, dedupe_days=7, today=later)
        busy.rollback()
        with conn.begin():
            again = ensure_ahead(conn, dedupe_days=7, today=later)
    new_days = [today() + timedelta(days=n) for n in range(AHEAD_DAYS + 1, 10 + AHEAD_DAYS + 1)]
    assert created == [f"{table}_p{day:%Y%m%d}" for table in ("automation_results", "applied_ops") for day in new_days]
    assert again == []


# --- retention -----------------------------------------------------------------------------------------------

@dataclass
class Run:
    id: int
    threads: list[int]
    results: int


class Store:
    """Projects and runs inserted straight into a database, their results dated as the pipeline dates them
    (between the run's creation and its completion), their counters equal to their results."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with engine.begin() as conn:
            self.user = conn.execute(text("INSERT INTO users (name) VALUES (:n) RETURNING id"),
                                     {"n": unique("u")}).scalar_one()

    def project(self, retention_days: int | None) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(text("INSERT INTO projects (name, retention_days) VALUES (:n, :d) RETURNING id"),
                                    {"n": unique("p"), "d": retention_days}).scalar_one())

    def run(self, project: int, created: datetime, completed: datetime | None, threads: int = 2,
            per_thread: int = 6) -> Run:
        end = completed or created + timedelta(minutes=30)
        with self.engine.begin() as conn:
            ensure_days(conn, "automation_results", created.date(), end.date())
            source = conn.execute(text(
                "INSERT INTO automation_sources (project_id, name) VALUES (:p, 'ci') "
                "ON CONFLICT (project_id, name) DO UPDATE SET name = excluded.name RETURNING id"),
                {"p": project}).scalar_one()
            counts = {PASSED: per_thread * threads // 2, FAILED: per_thread * threads - per_thread * threads // 2}
            run_id = conn.execute(text(
                f"INSERT INTO automation_runs (project_id, source_id, name, created_by, created_at, is_completed, "
                f"completed_at, status, {COUNT_COLUMNS[PASSED - 1]}, {COUNT_COLUMNS[FAILED - 1]}) "
                f"VALUES (:p, :s, 'run', :u, :c, :done, :end, :status, :passed, :failed) RETURNING id"),
                {"p": project, "s": source, "u": self.user, "c": created, "done": completed is not None,
                 "end": completed, "status": 3 if completed else 4, "passed": counts[PASSED],
                 "failed": counts[FAILED]}).scalar_one()
            thread_ids = []
            for _ in range(threads):
                thread_id = conn.execute(text(
                    f"INSERT INTO automation_run_threads (run_id, project_id, created_by, created_at, is_completed, "
                    f"{COUNT_COLUMNS[PASSED - 1]}, {COUNT_COLUMNS[FAILED - 1]}) "
                    f"VALUES (:r, :p, :u, :c, :done, :passed, :failed) RETURNING id"),
                    {"r": run_id, "p": project, "u": self.user, "c": created, "done": completed is not None,
                     "passed": per_thread // 2, "failed": per_thread - per_thread // 2}).scalar_one()
                thread_ids.append(thread_id)
                conn.execute(text(
                    "INSERT INTO automation_results (run_id, thread_id, status_id, key, name, created_at) "
                    "SELECT :r, :t, CASE WHEN n % 2 = 0 THEN 2 ELSE 3 END, 'k' || n, 'test ' || n, "
                    "  :c + (:e - :c) * n / :n FROM generate_series(0, :n - 1) n"),
                    {"r": run_id, "t": thread_id, "c": created, "e": end, "n": per_thread})
        return Run(run_id, thread_ids, threads * per_thread)

    def dead_letter(self, run: Run, op_id: str | None = None) -> str:
        op_id = op_id or str(uuid.uuid4())
        with self.engine.begin() as conn:
            conn.execute(text("INSERT INTO dead_letters (op_id, kind, run_id, thread_id, payload, error) "
                              "VALUES (:o, 'thread.append', :r, :t, '{}', 'unknown status')"),
                         {"o": op_id, "r": run.id, "t": run.threads[0]})
        return op_id

    def intact(self, run: Run) -> bool:
        """The run, its threads and results are all there, and its counters equal its stored results."""
        with self.engine.connect() as conn:
            counters = conn.execute(text(f"SELECT {' + '.join(COUNT_COLUMNS)} FROM automation_runs WHERE id = :r"),
                                    {"r": run.id}).scalar()
            threads = conn.execute(text("SELECT count(*) FROM automation_run_threads WHERE run_id = :r"),
                                   {"r": run.id}).scalar_one()
            stored = conn.execute(text("SELECT count(*) FROM automation_results WHERE run_id = :r"),
                                  {"r": run.id}).scalar_one()
        return bool(counters == stored == run.results and threads == len(run.threads))

    def gone(self, run: Run) -> bool:
        with self.engine.connect() as conn:
            return bool(conn.execute(text(
                "SELECT NOT EXISTS (SELECT 1 FROM automation_runs WHERE id = :r) "
                "AND NOT EXISTS (SELECT 1 FROM automation_run_threads WHERE run_id = :r) "
                "AND NOT EXISTS (SELECT 1 FROM automation_results WHERE run_id = :r) "
                "AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE run_id = :r)"), {"r": run.id}).scalar_one())

    def days(self) -> set[str]:
        with self.engine.connect() as conn:
            return {p.name for p in partitions(conn, "automation_results")}


def settings(engine: Engine, **overrides: Any) -> Settings:
    # Nothing expires by default here: each test says which of its projects' runs may.
    return Settings(database_url=engine.url.render_as_string(hide_password=False),
                    **{"retention_days": 0, "dedupe_days": 7} | overrides)


def day(ago: int) -> str:
    return f"automation_results_p{today() - timedelta(days=ago):%Y%m%d}"


def ago(days: float, hour: int = 10) -> datetime:
    return midnight(today() - timedelta(days=int(days))) + timedelta(hours=hour)


def test_retention_removes_exactly_the_expired_completed_runs(store: Engine) -> None:
    db = Store(store)
    short, forever, default = db.project(30), db.project(0), db.project(None)
    expired_alone = db.run(short, ago(40), ago(40, hour=11))  # its day holds nothing else: dropped whole
    expired_shared = db.run(short, ago(45), ago(45, hour=11))
    open_old = db.run(short, ago(45, hour=12), None)  # shares that day, still open: the day stays, thinned
    recent = db.run(short, ago(10), ago(10, hour=11))
    # Completed 29 days ago, created 31 days ago: inside its window, so kept, with the days it spans.
    straddling = db.run(short, ago(31), ago(29))
    kept_forever = db.run(forever, ago(60), ago(60, hour=11))
    by_default = db.run(default, ago(50), ago(50, hour=11))  # INGEST_RETENTION_DAYS: 0 here, keep
    letter = db.dead_letter(expired_alone)
    kept = [open_old, recent, straddling, kept_forever, by_default]
    before = db.days()

    preview = subprocess.run([sys.executable, "-m", "ingest.cli", "admin", "retention", "apply", "--dry-run"],
                             env=service_env(database_url=store.url.render_as_string(hide_password=False),
                                             retention_days=0),
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert preview.returncode == 0, preview.stderr
    assert "would remove 2 completed runs, 4 threads, 24 results, 1 dead letters" in preview.stdout
    assert "would drop 1 day partitions" in preview.stdout and day(40) in preview.stdout
    assert db.days() == before and not db.gone(expired_alone) and db.intact(expired_shared)

    report = apply_retention(store, settings(store))

    assert report.runs == sorted([expired_alone.id, expired_shared.id]) and report.results == 24
    assert [d.partition.name for d in report.dropped] == [day(40)]
    assert [d.partition.name for d in report.thinned] == [day(45)] and report.thinned[0].rows == 12
    assert db.gone(expired_alone) and db.gone(expired_shared)
    assert all(db.intact(run) for run in kept)
    assert db.days() == before - {day(40)}
    with store.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM dead_letters WHERE op_id = :o"), {"o": letter}).scalar() == 0
        # The day kept for the open run holds its rows and nothing else.
        assert conn.execute(text(f"SELECT DISTINCT run_id FROM {day(45)}")).scalars().all() == [open_old.id]
    # A second pass finds nothing more to do.
    again = apply_retention(store, settings(store))
    assert again.runs == [] and again.dropped == [] and again.thinned == []


def test_an_open_run_is_kept_whatever_its_age(store: Engine) -> None:
    db = Store(store)
    project = db.project(1)
    ancient = db.run(project, ago(200), None)
    done = db.run(project, ago(200, hour=14), ago(200, hour=15))
    report = apply_retention(store, settings(store))
    assert report.runs == [done.id]
    assert db.intact(ancient) and db.gone(done) and day(200) in db.days()


def test_retention_shorter_than_the_dedupe_window_thins_recent_days(store: Engine) -> None:
    """Days inside the dedupe window may still receive rows, so they are never dropped: an expired run's rows
    are deleted from them instead."""
    db = Store(store)
    project = db.project(1)
    expired = db.run(project, ago(3), ago(3, hour=11))
    report = apply_retention(store, settings(store))
    assert db.gone(expired) and day(3) in db.days()
    assert report.dropped == [] and [d.partition.name for d in report.thinned] == [day(3)]


def test_the_dedupe_window_drops_old_claims_with_the_dead_letters_they_applied(store: Engine) -> None:
    db = Store(store)
    run = db.run(db.project(None), ago(1), ago(1, hour=11))
    applied, dead = db.dead_letter(run), db.dead_letter(run)
    old_day = today() - timedelta(days=6)
    with store.begin() as conn:
        conn.execute(text("INSERT INTO applied_ops (id, accepted_at) VALUES (:o, :at), (:n, now())"),
                     {"o": applied, "at": midnight(old_day) + timedelta(hours=1), "n": str(uuid.uuid4())})
    report = apply_retention(store, settings(store, dedupe_days=3))
    # Days whose every operation is more than 3 days and the margin's day old: today-8 .. today-5.
    assert report.claim_partitions == [f"applied_ops_p{today() - timedelta(days=n):%Y%m%d}" for n in (8, 7, 6, 5)]
    assert report.applied_letters == 1
    with store.connect() as conn:
        letters = set(conn.execute(text("SELECT op_id::text FROM dead_letters")).scalars())
        claims = conn.execute(text("SELECT count(*) FROM applied_ops")).scalar_one()
        left = {p.name for p in partitions(conn, "applied_ops")}
    assert letters == {dead} and claims == 1
    assert f"applied_ops_p{old_day:%Y%m%d}" not in left and f"applied_ops_p{today():%Y%m%d}" in left


def test_the_workers_make_one_pass_a_day(store: Engine) -> None:
    client: redis.Redis[bytes] = redis.Redis.from_url(TEST_REDIS_URL)
    key = f"{DAILY_KEY}{store.url.database}"
    client.delete(key)
    try:
        db = Store(store)
        expired = db.run(db.project(5), ago(9), ago(9, hour=11))
        first = tend(store, client, settings(store))
        later = db.run(db.project(5), ago(9), ago(9, hour=11))
        second = tend(store, client, settings(store))
        assert first is not None and first.runs == [expired.id] and second is None and db.intact(later)
    finally:
        client.delete(key)
        client.close()


# --- the dedupe window ---------------------------------------------------------------------------------------

def test_a_redelivery_inside_the_window_is_skipped_outside_it_is_dead_lettered(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = Seed(engine, threads=1)
    now = datetime.now(UTC)
    # Accepted just before a midnight: every delivery is claimed under that time, in that day, whatever the
    # clock says when it arrives.
    inside = seed.append(0, [PASSED])
    inside["at"] = (midnight(today() - timedelta(days=5)) - timedelta(microseconds=1)).isoformat()
    late = seed.append(0, [FAILED])
    late["at"] = (now - timedelta(days=8)).isoformat()

    first = seed.apply(inside, late)
    assert (first.applied, [error for _, error in first.dead]) == (1, ["outside the dedupe window"])
    again = seed.apply(inside, late)
    assert again.applied == 0 and again.duplicates == 1 and [e for _, e in again.dead] == ["outside the dedupe window"]
    with engine.connect() as conn:
        assert partition_of(conn, "applied_ops", "id = :i", i=inside["id"]) == [
            f"applied_ops_p{today() - timedelta(days=6):%Y%m%d}"]
        assert conn.execute(text("SELECT failures FROM dead_letters WHERE op_id = :o"), {"o": late["id"]}).scalar() == 2
    assert seed.thread_row(0)["appends_applied"] == 1 and count(engine, seed.run) == {PASSED: 1}

    # Once its window has passed too, the applied one is still known while its claim is kept: a duplicate,
    # not a dead letter.
    monkeypatch.setattr(store_module, "get_settings", lambda: Settings(dedupe_days=2))
    kept = seed.apply(inside)
    assert (kept.applied, kept.duplicates, kept.dead) == (0, 1, [])

    # The late one is applied only when an operator replays it, and then once.
    with engine.begin() as conn:
        conn.execute(text("UPDATE dead_letters SET replayed_at = now() WHERE op_id = :o"), {"o": late["id"]})
    replayed = [seed.apply(late) for _ in range(2)]
    assert [(r.applied, r.duplicates) for r in replayed] == [(1, 0), (0, 1)]
    assert count(engine, seed.run) == {PASSED: 1, FAILED: 1} and seed.thread_row(0)["appends_applied"] == 2


def count(engine: Engine, run_id: int) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status_id, count(*) FROM automation_results WHERE run_id = :r "
                                 "GROUP BY 1"), {"r": run_id}).all()
    return {int(s): int(n) for s, n in rows}


def test_a_dedupe_window_a_redelivery_could_outlast_is_refused_at_start_up() -> None:
    check_dedupe_window(Settings(dedupe_days=1, visibility_timeout=300))
    worker = subprocess.run([sys.executable, "-m", "ingest.cli", "worker"],
                            env=service_env(dedupe_days=1, visibility_timeout=86_400), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert worker.returncode == 1
    assert "INGEST_DEDUPE_DAYS=1 is shorter than a redelivery can take" in worker.stderr


# --- deleting a run ------------------------------------------------------------------------------------------

def test_run_delete_leaves_no_row_of_the_run_behind(engine: Engine, redis_client: "redis.Redis[bytes]") -> None:
    db = Store(engine)
    project = db.project(None)
    doomed = db.run(project, ago(2), None, threads=3)
    neighbour = db.run(project, ago(2), ago(1))
    db.dead_letter(doomed)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO dead_letters (op_id, kind, run_id, payload, error) "
                          "VALUES (:o, 'run.append', :r, '{}', 'x')"), {"o": str(uuid.uuid4()), "r": doomed.id})
    deleted = subprocess.run([sys.executable, "-m", "ingest.cli", "admin", "run", "delete", str(doomed.id)],
                             env=service_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert deleted.returncode == 0, deleted.stderr
    assert f"run {doomed.id} deleted, with its threads and 18 results" in deleted.stdout
    assert db.gone(doomed) and db.intact(neighbour)
    # Closed for the shims, which refuse what comes after rather than queue it.
    assert redis_client.hget(run_key(doomed.id), "closed") == b"1"
    assert all(redis_client.hget(thread_key(t), "closed") == b"1" for t in doomed.threads)
    assert delete_run(engine, redis_client, doomed.id) is None


def test_a_project_keeps_its_runs_as_long_as_it_says(engine: Engine) -> None:
    project = Store(engine).project(None)

    def retention(*days: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ingest.cli", "admin", "project", "retention", *days],
                              env=service_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)

    def stored() -> int | None:
        with engine.connect() as conn:
            days: int | None = conn.execute(text("SELECT retention_days FROM projects WHERE id = :p"),
                                            {"p": project}).scalar_one()
        return days

    assert "kept 12 days" in retention("--project", str(project), "12").stdout and stored() == 12
    assert "kept forever" in retention("--project", str(project), "0").stdout and stored() == 0
    assert "INGEST_RETENTION_DAYS" in retention("--project", str(project), "default").stdout and stored() is None
    assert retention("--project", str(project), "-3").returncode == 2
    missing = retention("--project", "999999999", "5")
    assert missing.returncode == 1 and "no project with id 999999999" in missing.stderr


# --- the in-place migration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["0001", "run_id first"])
def test_the_in_place_migration_keeps_every_row_and_counter(key: str) -> None:
    """A database the previous schema filled (results over several days, claims, identity well advanced),
    then migrated: every row is there, in its day, counters equal results, ids go on, a claim made before
    still makes its operation a duplicate. `run_id first` is the results key a concurrent migration gives."""
    url = database("lifecycle_migration")
    drop_database(url)
    engine = create_engine(url)
    try:
        upgrade_to(url, "0001")
        runs = fill_previous_schema(engine, run_id_first=key == "run_id first")
        with engine.connect() as conn:
            results = conn.execute(text("SELECT * FROM automation_results ORDER BY id")).all()
            claims = conn.execute(text("SELECT id::text, applied_at FROM applied_ops ORDER BY id")).all()
        engine.dispose()

        upgrade(url)

        with engine.connect() as conn:
            assert conn.execute(text("SELECT * FROM automation_results ORDER BY id")).all() == results
            assert conn.execute(text("SELECT id::text, applied_at FROM applied_ops ORDER BY id")).all() == claims
            for run_id, total in runs.items():
                stored = conn.execute(text("SELECT count(*) FROM automation_results WHERE run_id = :r"),
                                      {"r": run_id}).scalar_one()
                assert stored == total
            misplaced = conn.execute(text(
                "SELECT count(*) FROM automation_results "
                "WHERE tableoid::regclass::text <> 'automation_results_p' || to_char(created_at AT TIME ZONE 'UTC', "
                "'YYYYMMDD')")).scalar_one()
            assert misplaced == 0
            key_columns = conn.execute(text(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = 'automation_results'::regclass "
                "AND indisprimary")).scalar_one()
        # Whatever the key was, 0003 kept it (with the partition key added), and 0004 makes it the one that
        # reads a run's results back.
        assert key_columns.endswith("(run_id, status_id, id, created_at)"), (key, key_columns)
        with engine.begin() as conn:
            new_id = conn.execute(text(
                "INSERT INTO automation_results (run_id, thread_id, status_id, key, name) "
                "VALUES (1, 1, 2, 'k', 'n') RETURNING id")).scalar_one()
            assert new_id > max(row.id for row in results)
            # An operation applied before the migration, delivered again after it (its accept time, not known
            # to the old claim, a little before it was applied): a duplicate.
            op_id, applied_at = claims[0]
            again = conn.execute(text(
                "INSERT INTO applied_ops (id, accepted_at) VALUES (:i, :at) ON CONFLICT DO NOTHING RETURNING id"),
                {"i": op_id, "at": applied_at - timedelta(minutes=3)}).all()
            assert again == []
        if key == "0001":
            command.check(alembic_config(url))
    finally:
        engine.dispose()
        drop_database(url)


def upgrade_to(url: str, revision: str) -> None:
    from schema.db import create_database_if_missing

    create_database_if_missing(url)
    command.upgrade(alembic_config(url), revision)


def fill_previous_schema(engine: Engine, run_id_first: bool) -> dict[int, int]:
    """Runs with results over the last 20 days and claims, as the 0001 schema holds them; run id -> results."""
    runs = {}
    with engine.begin() as conn:
        if run_id_first:
            conn.exec_driver_sql("ALTER TABLE automation_results DROP CONSTRAINT pk_automation_results, "
                                 "ADD CONSTRAINT pk_automation_results PRIMARY KEY (run_id, id) INCLUDE (status_id)")
        conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('automation_results', 'id'), 5000)")
        project = conn.execute(text("INSERT INTO projects (name) VALUES ('p') RETURNING id")).scalar_one()
        user = conn.execute(text("INSERT INTO users (name) VALUES ('u') RETURNING id")).scalar_one()
        source = conn.execute(text("INSERT INTO automation_sources (project_id, name) VALUES (:p, 's') RETURNING id"),
                              {"p": project}).scalar_one()
        for days_ago in (20, 5, 0):
            created = datetime.now(UTC) - timedelta(days=days_ago, minutes=30)
            run_id = conn.execute(text(
                "INSERT INTO automation_runs (project_id, source_id, name, created_by, created_at, status1_count) "
                "VALUES (:p, :s, 'r', :u, :c, 40) RETURNING id"), {"p": project, "s": source, "u": user,
                                                                   "c": created}).scalar_one()
            thread = conn.execute(text(
                "INSERT INTO automation_run_threads (run_id, project_id, created_by, status1_count) "
                "VALUES (:r, :p, :u, 40) RETURNING id"), {"r": run_id, "p": project, "u": user}).scalar_one()
            conn.execute(text(
                "INSERT INTO automation_results (run_id, thread_id, status_id, key, name, fields, created_at) "
                "SELECT :r, :t, 2, 'k' || n, 'n' || n, '[{\"type\": 1, \"name\": \"f\", \"value\": \"v\"}]', "
                "  :c + n * interval '1 minute' FROM generate_series(1, 40) n"),
                {"r": run_id, "t": thread, "c": created})
            runs[run_id] = 40
        conn.execute(text("INSERT INTO applied_ops (id, applied_at) "
                          "SELECT gen_random_uuid(), now() - n * interval '1 hour' FROM generate_series(1, 30) n"))
    return runs
