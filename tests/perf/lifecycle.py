"""Load months of results, then measure one retention pass over them.

    .venv/bin/python tests/perf/lifecycle.py --results 20000000 --days 60 --retention 30

It drops and makes again its own database (`ingest_lifecycle`; `--database-url` chooses another), then loads
`--results` results spread over the last `--days` days by COPY, dated as the pipeline dates them (each append's
results share its accept time, between its run's creation and completion), with their runs and threads and
counters that equal them, and the claims of the last days' appends. A few runs stay open, one of them from
long ago. Then it makes one retention pass keeping `--retention` days, and prints the database's size before
and after, the part freed at once, the seconds the pass took per expired day, and the bytes each stored result
takes (table and indexes); it checks that every run left, open or recent, is whole (counters equal stored
results) and that no expired run is. It exits 1 if any check fails. Not collected by pytest.

`load()` is what `tests/perf/bench.py --preload N` uses to run its fleet on a database that already holds N
older results.
"""

import argparse
import hashlib
import random
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg
from sqlalchemy import create_engine, make_url

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from schema.db import drop_database, upgrade  # noqa: E402
from schema.partitions import ensure_days  # noqa: E402
from schema.settings import Settings  # noqa: E402
from schema.statuses import COUNT_COLUMNS  # noqa: E402
from worker.lifecycle import apply_retention  # noqa: E402

DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/ingest_lifecycle"
STATUSES = [2] * 7 + [3, 6, 3]  # as the benchmark's fleet: mostly passed, some failed, some skipped
CONSOLE = orjson.dumps([{"type": 4, "name": "Output", "value": "Traceback (most recent call last):\n"
                         + "  File \"suite.py\", line 12, in test\n" * 8 + "AssertionError\n"}]).decode()
TESTS_PER_APPEND = 100


def _copy_text(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


@dataclass
class Suite:
    """The tests every run of the project runs (their keys and names are the same from run to run)."""

    static: list[str]  # per test: key, name, folder, then its file and line, as COPY text

    @classmethod
    def make(cls, tests: int) -> "Suite":
        static = []
        for i in range(tests):
            name, folder = f"test_case_{i}", f"tests/suite_{i % 40}"
            key = hashlib.sha256(f"{folder}.{name}".encode()).hexdigest()
            static.append(f"{key}\t{name}\t{folder}")
        return cls(static)


@dataclass
class LoadedRun:
    id: int
    created: datetime
    completed: datetime | None
    results: int


def psycopg_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def load(database_url: str, results: int, days: int, runs_per_day: int = 6, threads: int = 50,
         open_runs_ago: tuple[int, ...] = (), open_last: int = 0, claims_days: int = 8, seed: int = 1,
         end: datetime | None = None) -> list[LoadedRun]:
    """Load `results` results over the `days` days before `end` (default now), `runs_per_day` runs a day of
    `threads` threads each. The first run of each day in `open_runs_ago` (days ago), and the last `open_last`
    runs, stay open. Claims of appends of the last `claims_days` days are loaded too (the dedupe window keeps
    no more)."""
    rng = random.Random(seed)
    end = end or datetime.now(UTC)
    total_runs = days * runs_per_day
    per_run = results // total_runs
    suite = Suite.make(per_run // threads + 1)
    loaded: list[LoadedRun] = []
    engine = create_engine(database_url)
    with engine.begin() as conn:
        ensure_days(conn, "automation_results", (end - timedelta(days=days + 1)).date(), end.date())
    engine.dispose()
    with psycopg.connect(psycopg_url(database_url), autocommit=True) as conn:
        project = conn.execute("INSERT INTO projects (name) VALUES (%s) ON CONFLICT (name) DO UPDATE "
                               "SET name = excluded.name RETURNING id", ("history",)).fetchone()
        user = conn.execute("INSERT INTO users (name) VALUES ('loader') ON CONFLICT (name) DO UPDATE "
                            "SET name = excluded.name RETURNING id").fetchone()
        source = conn.execute("INSERT INTO automation_sources (project_id, name) VALUES (%s, 'ci') "
                              "ON CONFLICT (project_id, name) DO UPDATE SET name = excluded.name RETURNING id",
                              (project[0],)).fetchone()
        assert project and user and source
        started = time.monotonic()
        for number in range(total_runs):
            day_ago = days - number // runs_per_day
            slot = number % runs_per_day
            created = (end - timedelta(days=day_ago)).replace(hour=0, minute=0, second=0, microsecond=0) \
                + timedelta(hours=slot * 24 / runs_per_day, minutes=rng.uniform(0, 60))
            duration = timedelta(minutes=rng.uniform(20, 90))
            is_open = (day_ago in open_runs_ago and slot == 0) or number >= total_runs - open_last
            completed = None if is_open else created + duration
            with conn.transaction():
                run_id = _load_run(conn, rng, suite, project[0], source[0], user[0], created, duration, completed,
                                   threads, per_run, claims=end - created < timedelta(days=claims_days))
            loaded.append(LoadedRun(run_id, created, completed, per_run))
            if number % 20 == 19 or number == total_runs - 1:
                done = (number + 1) * per_run
                print(f"\r  loaded {done:,} results ({done / (time.monotonic() - started):,.0f}/s)", end="",
                      file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return loaded


def _load_run(conn: psycopg.Connection, rng: random.Random, suite: Suite, project: int, source: int, user: int,
              created: datetime, duration: timedelta, completed: datetime | None, threads: int, per_run: int,
              claims: bool) -> int:
    counts = [0] * len(COUNT_COLUMNS)
    row = conn.execute(
        "INSERT INTO automation_runs (project_id, source_id, name, created_by, created_at, is_completed, "
        "completed_at, completed_by, completed_reason, status, activity_at) "
        "VALUES (%s, %s, 'nightly', %s, %s, %s, %s, %s, %s, 4, %s) RETURNING id",
        (project, source, user, created, completed is not None, completed, user if completed else None,
         "client" if completed else None, completed or created)).fetchone()
    assert row is not None
    run_id: int = row[0]
    thread_ids = [r[0] for r in conn.execute(
        "INSERT INTO automation_run_threads (run_id, project_id, created_by, created_at, is_completed, "
        "completed_at, status) SELECT %s, %s, %s, %s, %s, %s, 4 FROM generate_series(1, %s) RETURNING id",
        (run_id, project, user, created, completed is not None, completed, threads)).fetchall()]
    per_thread = per_run // threads
    thread_counts = []
    claimed: list[tuple[str, datetime]] = []
    with conn.cursor().copy(
            "COPY automation_results (run_id, thread_id, status_id, key, name, folder, elapsed, file, line, "
            "fields, created_at) FROM STDIN") as copy:
        for t, thread_id in enumerate(thread_ids):
            mine = [0] * len(COUNT_COLUMNS)
            n = per_thread + (per_run % threads if t == 0 else 0)
            lines = []
            for start in range(0, n, TESTS_PER_APPEND):
                # One append: its tests share its accept time, somewhere in the run.
                at = created + duration * rng.random()
                stamp = at.isoformat()
                if claims:
                    claimed.append((str(uuid.uuid4()), at))
                for i in range(start, min(n, start + TESTS_PER_APPEND)):
                    status = rng.choice(STATUSES)
                    mine[status - 1] += 1
                    lines.append(f"{run_id}\t{thread_id}\t{status}\t{suite.static[i % len(suite.static)]}\t"
                                 f"{rng.randint(1_000, 5_000_000)}\ttests/suite_{i % 40}.py\t{i % 500 + 1}\t"
                                 f"{_copy_text(CONSOLE) if status == 3 else chr(92) + 'N'}\t{stamp}\n")
            copy.write("".join(lines))
            thread_counts.append((thread_id, mine))
            counts = [a + b for a, b in zip(counts, mine, strict=True)]
    failed = counts[3 - 1]
    status = 3 if failed else 2
    with conn.cursor() as cur:
        cur.executemany(
            f"UPDATE automation_run_threads SET {', '.join(f'{c} = %s' for c in COUNT_COLUMNS)}, "
            f"status = %s WHERE id = %s",
            [(*mine, (3 if mine[2] else 2) if completed else 4, thread_id) for thread_id, mine in thread_counts])
    conn.execute(
        f"UPDATE automation_runs SET {', '.join(f'{c} = %s' for c in COUNT_COLUMNS)}, status = %s WHERE id = %s",
        (*counts, status if completed else 4, run_id))
    if claimed:
        with conn.cursor().copy("COPY applied_ops (id, accepted_at, applied_at) FROM STDIN") as copy:
            for op_id, at in claimed:
                copy.write_row((op_id, at, at))
    return run_id


# --- measuring ---------------------------------------------------------------------------------------------------

def database_size(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])


def bytes_per_result(conn: psycopg.Connection) -> tuple[float, int]:
    """(table and indexes of the results, per result; results stored)."""
    row = conn.execute(
        "SELECT (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('automation_results') "
        "WHERE isleaf), (SELECT count(*) FROM automation_results)").fetchone()
    assert row is not None
    size, count = int(row[0] or 0), int(row[1])
    return (size / count if count else float("nan")), count


def whole(conn: psycopg.Connection) -> tuple[list[int], int]:
    """(runs whose counters differ from their stored results, runs checked)."""
    rows = conn.execute(
        f"SELECT r.id, {' + '.join(f'r.{c}' for c in COUNT_COLUMNS)}, coalesce(s.n, 0) FROM automation_runs r "
        f"LEFT JOIN (SELECT run_id, count(*) AS n FROM automation_results GROUP BY run_id) s ON s.run_id = r.id"
    ).fetchall()
    return [run_id for run_id, counters, stored in rows if counters != stored], len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=int, default=20_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--retention", type=int, default=30, help="days completed runs are kept")
    parser.add_argument("--runs-per-day", type=int, default=6)
    parser.add_argument("--threads", type=int, default=50, help="threads a run")
    parser.add_argument("--database-url", default=DATABASE_URL, help="dropped and made again")
    args = parser.parse_args()

    drop_database(args.database_url)
    upgrade(args.database_url)
    t0 = time.monotonic()
    # Open: a run started 45 days ago that nobody completed (kept whatever its age), and the two latest.
    runs = load(args.database_url, args.results, args.days, args.runs_per_day, args.threads,
                open_runs_ago=(45,), open_last=2)
    print(f"loaded {len(runs)} runs in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    with psycopg.connect(psycopg_url(args.database_url), autocommit=True) as conn:
        # As a database that has been running is: vacuumed, its statistics known, nothing dirty in memory.
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        before = database_size(conn)
        per_result, stored = bytes_per_result(conn)

    settings = Settings(database_url=args.database_url, retention_days=args.retention)
    now = datetime.now(UTC)
    expired = {r.id for r in runs if r.completed and r.completed < now - timedelta(days=args.retention)}
    expired_days = len({r.completed.date() for r in runs if r.id in expired and r.completed})
    engine = create_engine(args.database_url)
    try:
        report = apply_retention(engine, settings, now=now)
    finally:
        engine.dispose()

    with psycopg.connect(psycopg_url(args.database_url), autocommit=True) as conn:
        after = database_size(conn)
        wrong, checked = whole(conn)
        left = {row[0] for row in conn.execute("SELECT id FROM automation_runs")}
        open_left = {row[0] for row in conn.execute("SELECT id FROM automation_runs WHERE NOT is_completed")}
    kept = {r.id for r in runs} - expired
    print("\n".join(report.lines()))
    print(f"\nresults loaded: {stored:,} over {args.days} days ({len(runs)} runs, "
          f"{sum(1 for r in runs if r.completed is None)} open); retention {args.retention} days")
    print(f"bytes per stored result (table + indexes): {per_result:,.0f}")
    print(f"database size: {before / 1e9:,.2f} GB before, {after / 1e9:,.2f} GB after the pass: "
          f"{100 * (before - after) / before:.1f} % freed at once (no VACUUM FULL)")
    print(f"pass: {report.seconds:.2f} s for {expired_days} expired days: {report.seconds / max(1, expired_days):.3f} "
          f"s per expired day")
    problems = []
    if set(report.runs) != expired:
        problems.append(f"removed {len(report.runs)} runs, {len(expired)} expected")
    if left != kept:
        problems.append(f"{len(kept - left)} kept runs missing, {len(left - kept)} expired runs left")
    if wrong:
        problems.append(f"{len(wrong)} of {checked} runs left have counters unequal to their stored results")
    if not {r.id for r in runs if r.completed is None} <= open_left:
        problems.append("an open run was removed")
    print(f"runs left: {len(left)} ({len(open_left)} open), every one whole: {not wrong}")
    if problems:
        print("FAILED: " + "; ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
