"""The store's lifecycle: partitions made ahead, retention, the dedupe window, deleting a run.

Retention removes completed runs whose completion is older than their project's window
(`projects.retention_days`, else `INGEST_RETENTION_DAYS`; 0 keeps them), with their threads, results and dead
letters; open runs are never removed. Results go by whole days where possible: a daily partition of results is
dropped when none of its rows belongs to a run that is kept, which frees its disk at once, without VACUUM.
Where kept and expired runs share a day, the expired runs' rows are deleted from it instead.

Which days to look at comes from the runs' time ranges (a run's results carry the accept times of its appends,
all between its creation and its completion); whether a day may be dropped comes from the day itself: the
threads its rows belong to, read from its thread index (one probe per thread, not a scan of its rows).

The dedupe window: a partition of claims (`applied_ops`) goes once every operation accepted on its day is past
`INGEST_DEDUPE_DAYS` and a day's margin, with the dead letters whose replays it had claimed (their state,
applied, would otherwise be lost with it, and `ingest dlq replay --all` would queue them again).

Nothing here holds a lock that ingestion waits on for long: partitions are made apart and attached, and
detached `CONCURRENTLY` before being dropped (schema/partitions.py); rows are deleted in bounded transactions
that lock threads before runs, as the workers do.
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from redis import Redis
from sqlalchemy import Connection, Engine

from schema.messages import CLOSED_TTL_SECONDS, run_key, thread_key
from schema.partitions import CLOCK_SKEW, Partition, detach_and_drop, ensure_ahead, finish_interrupted, partitions
from schema.settings import Settings
from schema.statuses import COUNT_COLUMNS
from worker.store import WINDOW_MARGIN
from worker.tasks import BACKOFF_CAP_SECONDS, MAX_RETRIES

log = logging.getLogger(__name__)

DAILY_KEY = "ingest:lifecycle:daily:"  # and the database's name: the pass is the database's
# Runs removed per transaction, and runs whose rows one DELETE takes from a day that stays.
RUNS_PER_CHUNK = 500
RUNS_PER_DELETE = 50
_TOTAL = " + ".join(COUNT_COLUMNS)


class LifecycleError(Exception):
    pass


def longest_retry_seconds() -> float:
    """How long a batch that keeps failing on a reachable database is tried again before its operations are
    dead-lettered (worker/tasks.py): the sum of its backoffs at their longest."""
    return sum(min(BACKOFF_CAP_SECONDS, 0.5 * 2.0**retry) for retry in range(MAX_RETRIES))


def check_dedupe_window(settings: Settings) -> None:
    """Refuse a dedupe window that a redelivery could outlast: a message is handed out again after the
    visibility timeout, and retried for up to the longest retry."""
    needed = settings.visibility_timeout + longest_retry_seconds()
    if settings.dedupe_days * 86400 <= needed:
        raise LifecycleError(
            f"INGEST_DEDUPE_DAYS={settings.dedupe_days} is shorter than a redelivery can take "
            f"(INGEST_VISIBILITY_TIMEOUT {settings.visibility_timeout} s plus the longest retry "
            f"{longest_retry_seconds():.0f} s): an operation could be applied twice")


# --- retention -------------------------------------------------------------------------------------------------

@dataclass
class Day:
    """A partition of results the pass looks into."""

    partition: Partition
    droppable: bool = False  # every row is of an expired run (or of none)
    removable: list[int] = field(default_factory=list)  # runs whose rows go, when the day is kept
    rows: int = 0  # rows deleted from it
    bytes: int = 0  # its size, when dropped


@dataclass
class RetentionReport:
    dry_run: bool
    default_days: int
    dedupe_days: int
    runs: list[int] = field(default_factory=list)
    threads: int = 0
    results: int = 0  # of the runs removed, by their counters (which equal their stored results)
    dropped: list[Day] = field(default_factory=list)
    thinned: list[Day] = field(default_factory=list)  # days kept for newer runs, expired rows deleted from them
    dead_letters: int = 0
    claim_partitions: list[str] = field(default_factory=list)
    claim_bytes: int = 0
    applied_letters: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        drop = "would drop" if self.dry_run else "dropped"
        out = [f"retention ({self.default_days} days unless a project says otherwise): {verb} "
               f"{len(self.runs):,} completed runs, {self.threads:,} threads, {self.results:,} results, "
               f"{self.dead_letters:,} dead letters"]
        if self.dropped:
            names = [d.partition.name for d in self.dropped]
            out.append(f"  results: {drop} {len(names)} day partitions ({_mb(sum(d.bytes for d in self.dropped))}): "
                       f"{_span(names)}")
        if self.thinned:
            rows = "" if self.dry_run else f"{sum(d.rows for d in self.thinned):,} rows "
            out.append(f"  results: {verb} {rows}from {len(self.thinned)} day partitions kept for newer or open runs: "
                       f"{_span([d.partition.name for d in self.thinned])}")
        out.append(f"dedupe window ({self.dedupe_days} days): {drop} {len(self.claim_partitions)} partitions of "
                   f"claims ({_mb(self.claim_bytes)})" + (f": {_span(self.claim_partitions)}" if self.claim_partitions
                                                          else "")
                   + (f", and {self.applied_letters:,} applied dead letters with them" if self.applied_letters else ""))
        out.append(f"took {self.seconds:.2f} s")
        return out


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


@contextmanager
def _exclusive_pass(engine: Engine) -> Iterator[Connection]:
    """An autocommit connection holding the lock that keeps one retention pass at a time (the sweeper's daily
    one, an operator's), released when the block ends."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if not conn.exec_driver_sql("SELECT pg_try_advisory_lock(hashtext('ingest:retention'))").scalar_one():
            raise LifecycleError("another retention pass is running")
        try:
            yield conn
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(hashtext('ingest:retention'))")


def apply_retention(engine: Engine, settings: Settings, dry_run: bool = False,
                    now: datetime | None = None) -> RetentionReport:
    """One retention pass, and one of the dedupe window (see the module's docstring); what it removed, or with
    `dry_run` what it would."""
    started = time.monotonic()
    now = now or datetime.now(UTC)
    report = RetentionReport(dry_run, settings.retention_days, settings.dedupe_days)
    with _exclusive_pass(engine) as autocommit:
        if not dry_run:
            finish_interrupted(autocommit)
        with engine.begin() as conn:
            expired = expired_runs(conn, settings.retention_days, now)
            report.runs = sorted(expired)
            report.results = sum(expired.values())
            report.threads, report.dead_letters = conn.exec_driver_sql(
                "SELECT (SELECT count(*) FROM automation_run_threads WHERE run_id = ANY(%(r)s::bigint[])), "
                "(SELECT count(*) FROM dead_letters WHERE run_id = ANY(%(r)s::bigint[]))", {"r": report.runs}).one()
            days = plan_days(conn, report.runs, now - timedelta(days=settings.dedupe_days) - WINDOW_MARGIN)
        report.dropped = [d for d in days if d.droppable]
        report.thinned = [d for d in days if not d.droppable and d.removable]
        claims = [p for p in partitions(autocommit, "applied_ops")
                  if p.upper is not None and p.upper <= now - timedelta(days=settings.dedupe_days) - WINDOW_MARGIN]
        report.claim_partitions = [p.name for p in claims]
        report.claim_bytes = sum(_size(autocommit, p.name) for p in claims)
        for day in report.dropped:
            day.bytes = _size(autocommit, day.partition.name)
        if dry_run:
            report.applied_letters = sum(_applied_letters(autocommit, p, delete=False) for p in claims)
        else:
            for day in report.thinned:
                day.rows = _delete_rows(engine, day)
            for chunk in range(0, len(report.runs), RUNS_PER_CHUNK):
                with engine.begin() as conn:
                    remove_runs(conn, report.runs[chunk:chunk + RUNS_PER_CHUNK])
            for day in report.dropped:
                detach_and_drop(autocommit, day.partition)
            for partition in claims:
                with engine.begin() as conn:
                    report.applied_letters += _applied_letters(conn, partition, delete=True)
                detach_and_drop(autocommit, partition)
    report.seconds = time.monotonic() - started
    return report


def expired_runs(conn: Connection, default_days: int, now: datetime) -> dict[int, int]:
    """Completed runs past their project's retention: run id -> its results (by its counters)."""
    rows = conn.exec_driver_sql(
        f"SELECT r.id, {_TOTAL} FROM automation_runs r JOIN projects p ON p.id = r.project_id "
        f"WHERE r.is_completed AND coalesce(p.retention_days, %(days)s) > 0 "
        f"AND r.completed_at < %(now)s - make_interval(days => coalesce(p.retention_days, %(days)s))",
        {"days": default_days, "now": now}).all()
    return {int(run_id): int(total) for run_id, total in rows}


def plan_days(conn: Connection, expired: list[int], closed_before: datetime) -> list[Day]:
    """The days of results to drop or thin. A day ending before `closed_before` receives no more rows (any
    operation dated then is past its dedupe window) and may be dropped; a later one is only thinned.

    Looked into: days that the time range of an expired run overlaps, and old days that no kept run's does
    (they may hold rows of runs removed earlier whose results strayed out of their range). Days that only kept
    runs overlap are left alone unopened."""
    days = []
    every = partitions(conn, "automation_results")
    overlaps = _overlaps(conn, every, expired)
    for partition in every:
        expired_near, kept_near = overlaps.get(partition.name, (False, False))
        old = partition.upper is not None and partition.upper <= closed_before
        if not (expired_near or (old and not kept_near)):
            continue
        runs = _runs_in(conn, partition.name)
        kept = _kept_runs(conn, runs, expired)
        day = Day(partition, droppable=old and not kept, removable=sorted(set(runs) - kept))
        if day.droppable or day.removable:
            days.append(day)
    return days


def _overlaps(conn: Connection, days: list[Partition], expired: list[int]) -> dict[str, tuple[bool, bool]]:
    """Partition name -> (an expired run's time range overlaps it, a kept run's does). An open run's range runs
    on to the end of time: its appends may still be arriving."""
    rows = conn.exec_driver_sql(
        "SELECT p.name, coalesce(bool_or(r.id = ANY(%(expired)s::bigint[])), false), "
        "  coalesce(bool_or(NOT (r.id = ANY(%(expired)s::bigint[]))), false) "
        "FROM unnest(%(names)s::text[], %(lo)s::timestamptz[], %(hi)s::timestamptz[]) p(name, lo, hi) "
        "LEFT JOIN automation_runs r ON r.created_at - %(skew)s < coalesce(p.hi, 'infinity') "
        "  AND coalesce(r.completed_at, 'infinity') + %(skew)s > coalesce(p.lo, '-infinity') "
        "GROUP BY p.name",
        {"expired": expired, "skew": CLOCK_SKEW, "names": [d.name for d in days], "lo": [d.lower for d in days],
         "hi": [d.upper for d in days]}).all()
    return {name: (bool(e), bool(k)) for name, e, k in rows}


def _runs_in(conn: Connection, partition: str) -> list[int]:
    """The runs a partition holds rows of, from its index led by the run: a loose index scan, one probe per
    run, however many rows each has."""
    return [int(row[0]) for row in conn.exec_driver_sql(
        f"WITH RECURSIVE t(id) AS ("
        f"  (SELECT run_id FROM {partition} ORDER BY run_id LIMIT 1) "
        f"  UNION ALL "
        f"  SELECT (SELECT run_id FROM {partition} WHERE run_id > t.id ORDER BY run_id LIMIT 1) "
        f"  FROM t WHERE t.id IS NOT NULL) "
        f"SELECT id FROM t WHERE id IS NOT NULL")]


def _kept_runs(conn: Connection, runs: list[int], expired: list[int]) -> set[int]:
    """Of these runs, those that are kept. The others are expired, or exist no more."""
    if not runs:
        return set()
    return {int(row[0]) for row in conn.exec_driver_sql(
        "SELECT id FROM automation_runs WHERE id = ANY(%(runs)s::bigint[]) AND NOT (id = ANY(%(r)s::bigint[]))",
        {"runs": runs, "r": expired})}


def _delete_rows(engine: Engine, day: Day) -> int:
    """Delete the rows of removable runs from a day that stays, a bounded transaction at a time."""
    deleted = 0
    for i in range(0, len(day.removable), RUNS_PER_DELETE):
        with engine.begin() as conn:
            deleted += conn.exec_driver_sql(
                f"DELETE FROM {day.partition.name} WHERE run_id = ANY(%(r)s::bigint[])",
                {"r": day.removable[i:i + RUNS_PER_DELETE]}).rowcount
    return deleted


def _size(conn: Connection, table: str) -> int:
    return int(conn.exec_driver_sql("SELECT pg_total_relation_size(%(t)s::regclass)", {"t": table}).scalar_one())


def _applied_letters(conn: Connection, partition: Partition, delete: bool) -> int:
    """Dead letters whose operation a claim in this partition of applied_ops says was applied."""
    verb = "DELETE FROM dead_letters d USING" if delete else "SELECT 1 FROM dead_letters d,"
    result = conn.exec_driver_sql(f"{verb} {partition.name} a WHERE a.id = d.op_id")
    return int(result.rowcount) if delete else len(result.all())


def remove_runs(conn: Connection, run_ids: list[int]) -> None:
    """Remove runs' rows but their results: what refers to them, their dead letters, threads, and the runs.

    Rows that refer to a run by a foreign key without a rule of their own (cascade, set null) are rows of the
    run, and go with it, whatever table they are in. Threads are locked before their runs, as the workers do.
    """
    if not run_ids:
        return
    for table, column in (("automation_run_threads", "run_id"), ("automation_runs", "id")):
        conn.exec_driver_sql(f"SELECT 1 FROM {table} WHERE {column} = ANY(%(r)s::bigint[]) ORDER BY id FOR UPDATE",
                             {"r": run_ids})
    for table, column in _referring(conn, "automation_runs") - {("automation_run_threads", "run_id")}:
        conn.exec_driver_sql(f'DELETE FROM "{table}" WHERE "{column}" = ANY(%(r)s::bigint[])', {"r": run_ids})
    conn.exec_driver_sql("DELETE FROM dead_letters WHERE run_id = ANY(%(r)s::bigint[])", {"r": run_ids})
    threads = [int(row[0]) for row in conn.exec_driver_sql(
        "SELECT id FROM automation_run_threads WHERE run_id = ANY(%(r)s::bigint[])", {"r": run_ids})]
    for table, column in _referring(conn, "automation_run_threads"):
        conn.exec_driver_sql(f'DELETE FROM "{table}" WHERE "{column}" = ANY(%(t)s::bigint[])', {"t": threads})
    conn.exec_driver_sql("DELETE FROM automation_run_threads WHERE run_id = ANY(%(r)s::bigint[])", {"r": run_ids})
    conn.exec_driver_sql("DELETE FROM automation_runs WHERE id = ANY(%(r)s::bigint[])", {"r": run_ids})


def _referring(conn: Connection, table: str) -> set[tuple[str, str]]:
    """(table, column) of single-column foreign keys to `table` whose rows PostgreSQL would not remove or
    unlink itself (ON DELETE NO ACTION or RESTRICT)."""
    return {(str(t), str(c)) for t, c in conn.exec_driver_sql(
        "SELECT cl.relname, a.attname FROM pg_constraint k JOIN pg_class cl ON cl.oid = k.conrelid "
        "JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1] "
        "WHERE k.contype = 'f' AND k.confrelid = %(t)s::regclass AND k.confdeltype IN ('a', 'r') "
        "AND array_length(k.conkey, 1) = 1",
        {"t": table})}


# --- one run -----------------------------------------------------------------------------------------------------

def delete_run(engine: Engine, store: Redis, run_id: int) -> int | None:
    """Remove a run and everything of it, open or not; the results it had, or None if there is no such run.

    The run and its threads are closed in Redis first, so that the shims refuse what comes after; operations
    already queued for it are dead-lettered when they arrive (unknown thread or run)."""
    with engine.connect() as conn:
        if conn.exec_driver_sql("SELECT 1 FROM automation_runs WHERE id = %(r)s", {"r": run_id}).first() is None:
            return None
        threads = [int(row[0]) for row in conn.exec_driver_sql(
            "SELECT id FROM automation_run_threads WHERE run_id = %(r)s ORDER BY id", {"r": run_id})]
    pipe = store.pipeline()
    for key in [run_key(run_id), *(thread_key(t) for t in threads)]:
        pipe.hset(key, "closed", "1")
        pipe.expire(key, CLOSED_TTL_SECONDS)
    pipe.execute()
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "SELECT id FROM automation_run_threads WHERE run_id = %(r)s ORDER BY id FOR UPDATE", {"r": run_id})
        results = conn.exec_driver_sql(
            "DELETE FROM automation_results WHERE run_id = %(r)s", {"r": run_id}).rowcount
        remove_runs(conn, [run_id])
    return results


# --- the daily pass, in every worker -----------------------------------------------------------------------------

def tend(engine: Engine, store: Redis, settings: Settings) -> RetentionReport | None:
    """Make partitions ahead; once a day (for the whole installation), a retention pass."""
    with engine.begin() as conn:
        created = ensure_ahead(conn, settings.dedupe_days)
    if created:
        log.info("partitions created: %s", ", ".join(created))
    key = f"{DAILY_KEY}{engine.url.database}"
    if not store.set(key, datetime.now(UTC).isoformat(), nx=True, ex=86400):
        return None
    try:
        report = apply_retention(engine, settings)
    except Exception:
        store.delete(key)  # tried again at the next interval, not tomorrow
        raise
    for line in report.lines():
        log.info("%s", line)
    return report


def start(engine: Engine, store: Redis, settings: Settings) -> threading.Thread:
    def loop() -> None:
        stop = threading.Event()
        while True:
            try:
                tend(engine, store, settings)
            except Exception as exc:  # tried again at the next interval
                log.warning("lifecycle pass failed: %s: %s", type(exc).__name__, exc)
            stop.wait(settings.sweep_interval_seconds)

    thread = threading.Thread(target=loop, name="ingest-lifecycle", daemon=True)
    thread.start()
    return thread

