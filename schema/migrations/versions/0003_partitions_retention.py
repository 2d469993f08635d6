"""daily partitions of results and claims; per-project retention

`automation_results` and `applied_ops` become range-partitioned by day, in place: each table is renamed away,
made again partitioned with the same columns, its rows copied into daily partitions, its indexes made again
(a key gains the partition key), and the old table dropped. Every row is kept, ids and all; the identity goes
on where it was. The tables are locked meanwhile: the workers' transactions wait (and retry), the shims go on
accepting. Copying takes about as long as a COPY of as many rows, and the disk holds both copies until the end.

Only these two tables and the new `projects.retention_days` are touched, whatever migrations ran before: the
indexes are made again from what the table has, not from what this file expects.

Revision ID: 0003
Revises: 0001
"""
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import cast

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Connection

revision: str = '0003'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here as they were when this migration was written (schema/partitions.py has the live ones): days of
# partitions made behind today (the default dedupe window and its margin) and ahead of it.
BEHIND_DAYS = 8
AHEAD_DAYS = 7

# (name, definition, is primary, is unique, key columns, included columns) of an index.
IndexRow = tuple[str, str, bool, bool, list[str], list[str]]


def _midnight(day: date) -> str:
    return datetime.combine(day, time(), UTC).isoformat()


def _day_partition(conn: Connection, table: str, day: date) -> None:
    conn.exec_driver_sql(
        f"CREATE TABLE {table}_p{day:%Y%m%d} PARTITION OF {table} "
        f"FOR VALUES FROM ('{_midnight(day)}') TO ('{_midnight(day + timedelta(days=1))}')")


def _days_around_today(today: date) -> set[date]:
    return {today + timedelta(days=n) for n in range(-BEHIND_DAYS, AHEAD_DAYS + 1)}


def _indexes(conn: Connection, table: str) -> list[IndexRow]:
    """(name, definition, is primary, is unique, key columns, included columns) of each index of `table`."""
    return [cast(IndexRow, tuple(row)) for row in conn.exec_driver_sql(
        "SELECT i.relname, pg_get_indexdef(i.oid), x.indisprimary, x.indisunique, "
        "  array(SELECT a.attname FROM generate_series(0, x.indnkeyatts - 1) n "
        "        JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[n] ORDER BY n), "
        "  array(SELECT a.attname FROM generate_series(x.indnkeyatts, x.indnatts - 1) n "
        "        JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[n] ORDER BY n) "
        "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = %(t)s::regclass ORDER BY 1",
        {"t": table})]


def _keyed(columns: list[str], key: str) -> str:
    return ", ".join([*columns, *([key] if key not in columns else [])])


def _recreate_indexes(conn: Connection, table: str, key: str,
                      indexes: list[IndexRow]) -> None:
    """The indexes the table had, on the partitioned table: a unique one must hold the partition key."""
    for name, definition, primary, unique, columns, included in indexes:
        include = f" INCLUDE ({', '.join(included)})" if included else ""
        if primary:
            conn.exec_driver_sql(
                f"ALTER TABLE {table} ADD CONSTRAINT {name} PRIMARY KEY ({_keyed(columns, key)}){include}")
        elif unique:
            conn.exec_driver_sql(f"CREATE UNIQUE INDEX {name} ON {table} ({_keyed(columns, key)}){include}")
        else:
            conn.exec_driver_sql(definition)  # as it was: it names the table, which is again this one


def _rename_away(conn: Connection, table: str, old: str) -> list[IndexRow]:
    """Rename `table` and its indexes out of the way; its indexes as they were."""
    conn.exec_driver_sql(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    indexes = _indexes(conn, table)
    conn.exec_driver_sql(f"ALTER TABLE {table} RENAME TO {old}")
    for name, *_ in indexes:
        conn.exec_driver_sql(f"ALTER INDEX {name} RENAME TO {name}_old")  # a constraint's index: renames both
    return indexes


def _partition_results(conn: Connection, today: date) -> None:
    old = "automation_results_unpartitioned"
    indexes = _rename_away(conn, "automation_results", old)
    sequence = conn.exec_driver_sql(f"SELECT pg_get_serial_sequence('{old}', 'id')").scalar_one()
    conn.exec_driver_sql(f"ALTER SEQUENCE {sequence} RENAME TO {old}_id_seq")
    conn.exec_driver_sql(
        f"CREATE TABLE automation_results (LIKE {old} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING STORAGE "
        f"INCLUDING COMPRESSION INCLUDING STATISTICS INCLUDING COMMENTS) PARTITION BY RANGE (created_at)")
    # A day of its own for every day that has results, and the days ingestion will write into next.
    days = {row[0] for row in conn.exec_driver_sql(
        f"SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date FROM {old}")} | _days_around_today(today)
    for day in sorted(days):
        _day_partition(conn, "automation_results", day)
    # Indexes after the rows: one sorted build per partition beats maintaining them row by row.
    conn.exec_driver_sql(f"INSERT INTO automation_results OVERRIDING SYSTEM VALUE SELECT * FROM {old}")
    _recreate_indexes(conn, "automation_results", "created_at", indexes)
    conn.exec_driver_sql(
        f"SELECT setval(pg_get_serial_sequence('automation_results', 'id'), last_value, is_called) "
        f"FROM {old}_id_seq")
    conn.exec_driver_sql(f"DROP TABLE {old}")
    conn.exec_driver_sql("ANALYZE automation_results")


def _partition_claims(conn: Connection, today: date) -> None:
    old = "applied_ops_unpartitioned"
    _rename_away(conn, "applied_ops", old)
    conn.exec_driver_sql(
        "CREATE TABLE applied_ops (id uuid NOT NULL, accepted_at timestamptz NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now(), CONSTRAINT pk_applied_ops PRIMARY KEY (id, accepted_at)) "
        "PARTITION BY RANGE (accepted_at)")
    days = _days_around_today(today)
    if conn.exec_driver_sql(f"SELECT EXISTS (SELECT 1 FROM {old})").scalar_one():
        # A claim made before this migration does not know its operation's accept time, only when it was
        # applied: it is kept under that, in a partition of its own that reaches past every operation accepted
        # so far (so past any still queued), where a unique id alone meets any later claim of the same
        # operation. It goes once the dedupe window has passed it, as any day does.
        end = today + timedelta(days=2)
        conn.exec_driver_sql(
            f"CREATE TABLE applied_ops_legacy PARTITION OF applied_ops FOR VALUES FROM (MINVALUE) TO ('{_midnight(end)}')")
        conn.exec_driver_sql("CREATE UNIQUE INDEX applied_ops_legacy_id ON applied_ops_legacy (id)")
        conn.exec_driver_sql(
            f"INSERT INTO applied_ops (id, accepted_at, applied_at) SELECT id, applied_at, applied_at FROM {old}")
        days = {day for day in days if day >= end}
    for day in sorted(days):
        _day_partition(conn, "applied_ops", day)
    conn.exec_driver_sql(f"DROP TABLE {old}")


def upgrade() -> None:
    conn = op.get_bind()
    # Copying every result takes as long as the table is large: no statement limit for this step (the lock
    # limit of env.py still keeps it from queueing behind live traffic for long).
    conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
    conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
    today = conn.exec_driver_sql("SELECT (now() AT TIME ZONE 'UTC')::date").scalar_one()
    op.add_column('projects', sa.Column('retention_days', sa.Integer(), nullable=True))
    op.create_check_constraint('ck_projects_retention_days', 'projects', 'retention_days >= 0')
    _partition_claims(conn, today)
    _partition_results(conn, today)


def downgrade() -> None:
    conn = op.get_bind()
    conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
    for table in ("automation_results", "applied_ops"):
        conn.exec_driver_sql(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        conn.exec_driver_sql(f"ALTER TABLE {table} RENAME TO {table}_partitioned")
    sequence = conn.exec_driver_sql("SELECT pg_get_serial_sequence('automation_results_partitioned', 'id')").scalar_one()
    conn.exec_driver_sql(f"ALTER SEQUENCE {sequence} RENAME TO automation_results_partitioned_id_seq")
    conn.exec_driver_sql(
        "CREATE TABLE automation_results (LIKE automation_results_partitioned INCLUDING DEFAULTS "
        "INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMPRESSION)")
    conn.exec_driver_sql(
        "INSERT INTO automation_results OVERRIDING SYSTEM VALUE SELECT * FROM automation_results_partitioned")
    conn.exec_driver_sql(
        "SELECT setval(pg_get_serial_sequence('automation_results', 'id'), last_value, is_called) "
        "FROM automation_results_partitioned_id_seq")
    conn.exec_driver_sql("CREATE TABLE applied_ops (id uuid NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
    conn.exec_driver_sql(
        "INSERT INTO applied_ops (id, applied_at) SELECT id, min(applied_at) FROM applied_ops_partitioned GROUP BY id")
    conn.exec_driver_sql("DROP TABLE automation_results_partitioned, applied_ops_partitioned")
    conn.exec_driver_sql("ALTER TABLE automation_results ADD CONSTRAINT pk_automation_results PRIMARY KEY (id)")
    conn.exec_driver_sql("CREATE INDEX ix_automation_results_thread_id ON automation_results (thread_id)")
    conn.exec_driver_sql("ALTER TABLE applied_ops ADD CONSTRAINT pk_applied_ops PRIMARY KEY (id)")
    op.drop_constraint('ck_projects_retention_days', 'projects', type_='check')
    op.drop_column('projects', 'retention_days')
