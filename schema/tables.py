"""PostgreSQL tables. The Alembic migrations in `schema/migrations` must match these (`alembic check`)."""

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from schema.statuses import COUNT_COLUMNS

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

NOW = text("now()")
EMPTY_JSON_LIST = text("'[]'::jsonb")


def _id() -> Column[int]:
    return Column("id", BigInteger, Identity(), primary_key=True)


def _created_at() -> Column[object]:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW)


def _counters() -> list[Column[int]]:
    # One column per status id; success/failure/completed/total are derived from the status flags on read,
    # so an administrator editing a status never leaves a stale aggregate behind.
    return [Column(name, Integer, nullable=False, server_default=text("0")) for name in COUNT_COLUMNS]


projects = Table(
    "projects", metadata,
    _id(),
    Column("name", Text, nullable=False, unique=True),
    _created_at(),
    # Days completed runs are kept after their completion, overriding INGEST_RETENTION_DAYS (0: forever).
    Column("retention_days", Integer, CheckConstraint("retention_days >= 0", name="ck_projects_retention_days")),
)

users = Table(
    "users", metadata,
    _id(),
    Column("name", Text, nullable=False, unique=True),
    Column("email", Text),
    _created_at(),
)

api_tokens = Table(
    "api_tokens", metadata,
    _id(),
    Column("user_id", BigInteger, ForeignKey("users.id"), nullable=False, index=True),
    # SHA-256 of the token, hex: the token itself is shown once and never stored.
    Column("token_hash", Text, nullable=False, unique=True),
    _created_at(),
    Column("revoked_at", DateTime(timezone=True)),
)

project_members = Table(
    "project_members", metadata,
    Column("project_id", BigInteger, ForeignKey("projects.id"), primary_key=True),
    Column("user_id", BigInteger, ForeignKey("users.id"), primary_key=True),
)

statuses = Table(
    "statuses", metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("system_name", Text, nullable=False, unique=True),
    Column("color", Text, nullable=False),
    Column("is_final", Boolean, nullable=False),
    Column("is_untested", Boolean, nullable=False),
    Column("is_passed", Boolean, nullable=False),
    Column("is_failed", Boolean, nullable=False),
    Column("aliases", ARRAY(Text), nullable=False),
)


def _named_in_project(name: str) -> Table:
    return Table(
        name, metadata,
        _id(),
        Column("project_id", BigInteger, ForeignKey("projects.id"), nullable=False),
        Column("name", Text, nullable=False),
        _created_at(),
        UniqueConstraint("project_id", "name"),
    )


automation_sources = _named_in_project("automation_sources")
configs = _named_in_project("configs")
milestones = _named_in_project("milestones")

automation_runs = Table(
    "automation_runs", metadata,
    _id(),
    Column("project_id", BigInteger, ForeignKey("projects.id"), nullable=False),
    Column("source_id", BigInteger, ForeignKey("automation_sources.id"), nullable=False),
    Column("name", Text, nullable=False),
    Column("config_id", BigInteger, ForeignKey("configs.id")),
    Column("milestone_id", BigInteger, ForeignKey("milestones.id")),
    Column("status", SmallInteger, nullable=False, server_default=text("4")),
    Column("is_completed", Boolean, nullable=False, server_default=text("false")),
    Column("elapsed", BigInteger),
    Column("tags", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("artifacts", JSONB, nullable=False, server_default=EMPTY_JSON_LIST),
    Column("fields", JSONB, nullable=False, server_default=EMPTY_JSON_LIST),
    Column("links", JSONB, nullable=False, server_default=EMPTY_JSON_LIST),
    *_counters(),
    # Completion barrier: queued operations on this run (run appends, thread appends and thread completes)
    # applied so far, and how many the shim had accepted when the run's complete was accepted.
    Column("ops_applied", Integer, nullable=False, server_default=text("0")),
    Column("ops_expected", Integer),
    Column("measure_elapsed", Boolean),
    Column("complete_requested_at", DateTime(timezone=True)),
    Column("complete_requested_by", BigInteger),
    # When an operation on the run or its threads was last applied: runs idle too long are completed.
    Column("activity_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # Why it was completed: "client" (its complete), "timeout" (idle too long) or "forced" (an operator).
    Column("completed_reason", Text),
    _created_at(),
    Column("created_by", BigInteger, ForeignKey("users.id"), nullable=False),
    Column("updated_at", DateTime(timezone=True)),
    Column("updated_by", BigInteger),
    Column("completed_at", DateTime(timezone=True)),
    Column("completed_by", BigInteger),
    Index(None, "project_id", "created_at"),
)

automation_run_threads = Table(
    "automation_run_threads", metadata,
    _id(),
    Column("run_id", BigInteger, ForeignKey("automation_runs.id"), nullable=False, index=True),
    Column("project_id", BigInteger, nullable=False),
    Column("name", Text),
    Column("status", SmallInteger, nullable=False, server_default=text("4")),
    Column("is_completed", Boolean, nullable=False, server_default=text("false")),
    Column("elapsed_observed", BigInteger),
    Column("elapsed_computed", BigInteger),
    # Sum of the results' own elapsed: the thread's elapsed when the client reported neither of the above.
    Column("results_elapsed", BigInteger),
    Column("artifacts", JSONB, nullable=False, server_default=EMPTY_JSON_LIST),
    Column("fields", JSONB, nullable=False, server_default=EMPTY_JSON_LIST),
    *_counters(),
    # Completion barrier: appends applied, and appends accepted when the thread's complete was accepted.
    Column("appends_applied", Integer, nullable=False, server_default=text("0")),
    Column("appends_expected", Integer),
    Column("complete_requested_at", DateTime(timezone=True)),
    Column("complete_requested_by", BigInteger),
    Column("activity_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # "client", "run" (completed with its run), "timeout" or "forced".
    Column("completed_reason", Text),
    _created_at(),
    Column("created_by", BigInteger, nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    Column("completed_by", BigInteger),
)

# One row per test result. No foreign keys: the worker writes results only for threads it holds locked,
# and a per-row key check would double the cost of the COPY that carries them.
#
# Partitioned by day of `created_at` (the accept time of the append that carried the result), so that
# retention drops whole days instead of deleting rows (schema/partitions.py, worker/lifecycle.py). A key of a
# partitioned table must hold the partition key; ids alone stay unique, drawn from the identity.
automation_results = Table(
    "automation_results", metadata,
    Column("id", BigInteger, Identity(), nullable=False),
    Column("run_id", BigInteger, nullable=False),
    Column("thread_id", BigInteger, nullable=False),
    Column("status_id", SmallInteger, nullable=False),
    Column("key", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("folder", Text),
    Column("elapsed", BigInteger),
    Column("file", Text),
    Column("line", Integer),
    Column("assertions", Integer),
    Column("fields", JSONB),
    Column("artifacts", JSONB),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # The table's one index, since each costs every COPY about a quarter of its speed: the key, led by the run,
    # holds a run's results in id order within each status. It serves GET /automation/runs/{id}/tests
    # (reads.md) in id order (merged across the statuses the run has) and by status, folds, run deletes and
    # retention.
    PrimaryKeyConstraint("run_id", "status_id", "id", "created_at"),
    postgresql_partition_by="RANGE (created_at)",
)

# The idempotency inbox: a queued operation's id is claimed in the same transaction as its effect.
#
# Partitioned by day of `accepted_at`, the operation's own accept time (`at`), which every delivery of it carries
# unchanged: all its claims meet in one partition, where the key sees them. Partitions older than the dedupe
# window (INGEST_DEDUPE_DAYS) are dropped; an operation arriving after its window is dead-lettered before any
# claim (worker/apply.py `claim`).
applied_ops = Table(
    "applied_ops", metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("accepted_at", DateTime(timezone=True), primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    postgresql_partition_by="RANGE (accepted_at)",
)

# Operations that could not be applied: kept with their payload and error, replayable.
dead_letters = Table(
    "dead_letters", metadata,
    _id(),
    Column("op_id", UUID(as_uuid=False), nullable=False, unique=True),
    Column("kind", Text, nullable=False),
    Column("run_id", BigInteger),
    Column("thread_id", BigInteger),
    Column("payload", JSONB, nullable=False),
    Column("error", Text, nullable=False),
    # Times the operation failed: a replay that fails again records its new error here.
    Column("failures", Integer, nullable=False, server_default=text("1")),
    _created_at(),
    Column("replayed_at", DateTime(timezone=True)),
)


# --- read back: automation cases and webhooks (reads.md) ------------------------------------------------------

# One test of one source tracked across runs. A completed run's results are folded in once (worker/cases.py),
# never by ingestion, so appends never contend on these rows. No foreign keys: a case's project and source are
# its runs' (whose rows have the keys), and a trigger per new case cost a quarter of a large fold.
automation_cases = Table(
    "automation_cases", metadata,
    _id(),
    Column("project_id", BigInteger, nullable=False),
    Column("source_id", BigInteger, nullable=False),
    Column("key", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("folder", Text),
    # The outcome in its latest folded run: 1 neutral, 2 success, 3 failure.
    Column("status", SmallInteger, nullable=False),
    Column("run_count", Integer, nullable=False),
    Column("result_count", BigInteger, nullable=False),
    Column("success_count", BigInteger, nullable=False),
    Column("failure_count", BigInteger, nullable=False),
    Column("elapsed_total", BigInteger, nullable=False),
    Column("elapsed_results", BigInteger, nullable=False),
    Column("elapsed_average", BigInteger),
    # Its outcomes in the latest 30 folded runs, oldest first, as above and 4 where it both passed and failed
    # in one run; flaky_percent is worked out from them at each fold, and kept to be sorted on.
    Column("outcomes", ARRAY(SmallInteger), nullable=False),
    Column("flaky_percent", Numeric(4, 1), nullable=False),
    Column("last_run_id", BigInteger, nullable=False),
    _created_at(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    UniqueConstraint("project_id", "source_id", "key"),
    Index(None, "project_id", "created_at", "id"),
    Index(None, "project_id", "flaky_percent", "id"),
    # Room on each page, so that a fold's update of a case whose indexed columns stay the same (most are) is
    # made in place (HOT), without new entries in the four indexes.
    postgresql_with={"fillfactor": "70"},
)

# How many cases each source of a project has in each status, counted again by each fold of the source, so that a
# page of a project's cases needs no count over all of them.
automation_case_totals = Table(
    "automation_case_totals", metadata,
    Column("project_id", BigInteger, ForeignKey("projects.id"), primary_key=True),
    Column("source_id", BigInteger, ForeignKey("automation_sources.id"), primary_key=True),
    Column("status", SmallInteger, primary_key=True, autoincrement=False),
    Column("cases", Integer, nullable=False),
)

# The outbox of completions: a row written in the transaction that completes a run, deleted by the one that
# folds the run's results into its cases. What is still here after a while is folded by the sweeper.
case_folds = Table(
    "case_folds", metadata,
    Column("run_id", BigInteger, ForeignKey("automation_runs.id", ondelete="CASCADE"), primary_key=True),
    _created_at(),
)

webhooks = Table(
    "webhooks", metadata,
    _id(),
    Column("project_id", BigInteger, ForeignKey("projects.id"), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("secret", Text, nullable=False),
    _created_at(),
)

# One POST owed to one webhook: written in the transaction that completes the run (an outbox), so that a worker
# killed at any moment loses none; retried with backoff until delivered, or failed after a day of tries.
webhook_deliveries = Table(
    "webhook_deliveries", metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("webhook_id", BigInteger, ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False, index=True),
    # No foreign key: a delivery outlives its run's removal by retention, as a record.
    Column("run_id", BigInteger, nullable=False),
    # "pending", "delivered" or "failed".
    Column("state", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # Taken by a delivery task until then; past it, another may take it (its worker died mid-POST).
    Column("leased_until", DateTime(timezone=True)),
    # The body of the first attempt, sent again unchanged by every retry.
    Column("body", Text),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    _created_at(),
    Column("delivered_at", DateTime(timezone=True)),
    Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where=text("state = 'pending'")),
)
