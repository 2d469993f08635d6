"""The daily partitions of `automation_results` and `applied_ops`: listed, created ahead, dropped.

Each is range-partitioned by day (UTC) of a time: results by their accept time (`created_at`), claims by their
operation's (`accepted_at`). There is no DEFAULT partition, on purpose: with one, PostgreSQL refuses
`DETACH PARTITION ... CONCURRENTLY`, so dropping a day would lock the whole table against ingestion, and every
new partition would have to be checked against the DEFAULT's rows under an exclusive lock. Instead the workers
keep `AHEAD_DAYS` of partitions ready (and every day of the dedupe window behind), which any operation that
may still be applied falls into: older ones are dead-lettered before they are claimed (worker/apply.py). A row
outside every partition is refused by PostgreSQL, and its operation dead-lettered with that error, not lost.

Locks: a partition is created apart and then attached (SHARE UPDATE EXCLUSIVE on the table: inserts, COPY and
reads go on), never with `CREATE TABLE ... PARTITION OF` (ACCESS EXCLUSIVE), and detached `CONCURRENTLY` before
it is dropped (dropping an attached partition would take ACCESS EXCLUSIVE on the table).
"""

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import Connection

# Partitioned table -> its partition key.
PARTITIONED = {"automation_results": "created_at", "applied_ops": "accepted_at"}
# Days of partitions kept ready ahead of today.
AHEAD_DAYS = 7
# A result is dated by its shim's clock, its run's creation and completion by the database's: a day of slack
# either side keeps clock skew from ever mattering, to retention and to the lookups of a run's results (which
# keep them off the older days).
CLOCK_SKEW = timedelta(days=1)
# A partition of the table's own: `<table>_p<YYYYMMDD>` for a day, `<table>_legacy` for claims an in-place
# migration brought over.
PARTITION_NAME = re.compile(r"^(automation_results|applied_ops)_(p\d{8}|legacy)$")


@dataclass(frozen=True)
class Partition:
    table: str
    name: str
    lower: datetime | None  # None: from the beginning of time (MINVALUE)
    upper: datetime | None  # None: to its end (MAXVALUE)

    def overlaps(self, lower: datetime, upper: datetime) -> bool:
        return (self.lower is None or self.lower < upper) and (self.upper is None or lower < self.upper)


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def day_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def partitions(conn: Connection, table: str) -> list[Partition]:
    """The table's attached partitions, oldest first (one being detached is left out)."""
    # The bounds are read back as timestamps by PostgreSQL itself, in the session's own time zone and date style.
    rows = conn.exec_driver_sql(
        "SELECT relname, CASE WHEN bound LIKE 'FOR VALUES FROM (MINVALUE)%%' THEN NULL "
        "  ELSE (regexp_match(bound, 'FROM \\(''([^'']*)''\\)'))[1]::timestamptz END, "
        "  CASE WHEN bound LIKE '%%TO (MAXVALUE)' THEN NULL "
        "  ELSE (regexp_match(bound, 'TO \\(''([^'']*)''\\)'))[1]::timestamptz END "
        "FROM (SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
        "      JOIN pg_class c ON c.oid = i.inhrelid "
        "      WHERE i.inhparent = %(table)s::regclass AND NOT i.inhdetachpending) p",
        {"table": table}).all()
    found = [Partition(table, name, lower, upper) for name, lower, upper in rows]
    return sorted(found, key=lambda p: (p.lower is not None, p.lower or datetime.min.replace(tzinfo=UTC)))


def ensure_days(conn: Connection, table: str, first: date, last: date) -> list[str]:
    """Create a partition for every day from `first` to `last` that no partition covers; the names created.

    Serialised by a transaction-level advisory lock, so that two workers (or a worker and an operator) never
    race to create the same day.
    """
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('ingest:partitions:' || %(t)s))", {"t": table})
    existing = partitions(conn, table)
    created = []
    day = first
    while day <= last:
        lower, upper = midnight(day), midnight(day + timedelta(days=1))
        if not any(p.overlaps(lower, upper) for p in existing):
            create(conn, table, day_name(table, day), lower, upper)
            created.append(day_name(table, day))
        day += timedelta(days=1)
    return created


def create(conn: Connection, table: str, name: str, lower: datetime, upper: datetime) -> None:
    """A new, empty partition: made apart, then attached, so that the table itself is never locked against
    the inserts and reads going on (ATTACH takes SHARE UPDATE EXCLUSIVE on it; PARTITION OF would take ACCESS
    EXCLUSIVE). The partition gets the table's indexes as it is attached."""
    conn.exec_driver_sql(
        f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING STORAGE INCLUDING COMPRESSION)")
    # DDL takes no parameters; the bounds are timestamps this module made.
    conn.exec_driver_sql(f"ALTER TABLE {table} ATTACH PARTITION {name} "
                         f"FOR VALUES FROM ('{lower.isoformat()}') TO ('{upper.isoformat()}')")


def detach_and_drop(autocommit: Connection, partition: Partition) -> None:
    """Drop a partition without locking its table against ingestion: `DETACH ... CONCURRENTLY` waits for the
    transactions using the table instead of blocking them. `autocommit` must be outside any transaction."""
    autocommit.exec_driver_sql(f"ALTER TABLE {partition.table} DETACH PARTITION {partition.name} CONCURRENTLY")
    autocommit.exec_driver_sql(f"DROP TABLE {partition.name}")


def finish_interrupted(autocommit: Connection) -> list[str]:
    """Drop what an interrupted drop left: partitions still being detached, and detached ones not yet dropped.
    The names dropped."""
    done = []
    pending = autocommit.exec_driver_sql(
        "SELECT p.relname, c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE i.inhdetachpending").all()
    for table, name in pending:
        if table in PARTITIONED and PARTITION_NAME.match(name):
            autocommit.exec_driver_sql(f"ALTER TABLE {table} DETACH PARTITION {name} FINALIZE")
    loose = autocommit.exec_driver_sql(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND NOT relispartition "
        "AND relnamespace = current_schema()::regnamespace").scalars().all()
    for name in loose:
        if PARTITION_NAME.match(name):
            autocommit.exec_driver_sql(f"DROP TABLE {name}")
            done.append(name)
    return done


def ensure_ahead(conn: Connection, dedupe_days: int, today: date | None = None) -> list[str]:
    """Every day an operation may still be applied into, for both tables: the dedupe window (and a day's margin)
    behind today, `AHEAD_DAYS` ahead. The names created."""
    today = today or datetime.now(UTC).date()
    first, last = today - timedelta(days=dedupe_days + 1), today + timedelta(days=AHEAD_DAYS)
    return [name for table in PARTITIONED for name in ensure_days(conn, table, first, last)]
