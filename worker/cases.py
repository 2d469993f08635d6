"""Folding a completed run's results into the project's automation cases (reads.md), once per run.

A case is one test of one source across runs, keyed by (project, source, key). A run is folded when its
counters are final: its completion records that it owes a fold (worker/outbox.py), and the transaction that
folds it deletes that record, so a redelivered fold, or one whose worker was killed midway (its transaction
rolled back), changes nothing twice. A fold task takes every owed fold no other transaction holds (up to
FOLD_BATCH), so that runs completing together are folded in one pass. Folding takes no lock ingestion waits
on: it reads results, and locks only case rows, which no append touches. Two folds of one source meet on the
same case rows; each upserts in key order (sources in order too), so they queue rather than deadlock.

A case's outcome in a run: failure if any of its results there failed, else success if any passed, else
neutral. `outcomes` keeps the latest RECENT_RUNS of them, oldest first, 4 standing for a run where it both
passed and failed (a rerun); `ingest_flaky_percent` (migration 0004) counts a run flaky when it is a 4, or when
its outcome (success or failure) differs from the previous such run's in the window; neutral runs are
counted as considered and never compared. The percentage is kept on the row, to be sorted on.
"""

from sqlalchemy import Connection

from schema.partitions import CLOCK_SKEW
from schema.statuses import COUNT_COLUMNS
from worker.store import failed_status_ids, passed_status_ids

RECENT_RUNS = 30
# Owed folds one transaction takes at most, and results: runs completing together are folded in one pass, but
# a pass stays short enough (a few seconds) not to hold a worker child from applying for long.
FOLD_BATCH = 50
FOLD_RESULTS = 200_000
NEUTRAL, SUCCESS, FAILURE, BOTH = 1, 2, 3, 4

_FOLD = f"""
WITH runs AS (
    SELECT id, created_at FROM automation_runs WHERE id = ANY(%(runs)s)
), per_run AS (
    SELECT r.run_id, r.key,
           (array_agg(r.name ORDER BY r.id DESC))[1] AS name,
           (array_agg(r.folder ORDER BY r.id DESC))[1] AS folder,
           count(*) AS results,
           count(*) FILTER (WHERE r.status_id = ANY(%(passed)s)) AS successes,
           count(*) FILTER (WHERE r.status_id = ANY(%(failed)s)) AS failures,
           coalesce(sum(r.elapsed), 0) AS elapsed_total,
           count(r.elapsed) AS elapsed_results
    FROM automation_results r
    -- Results are stored no earlier than their run was created (less the clock skew allowed): older
    -- partitions are not looked at.
    WHERE r.run_id = ANY(%(runs)s) AND r.created_at >= %(since)s::timestamptz - %(skew)s::interval
    GROUP BY r.run_id, r.key
), per_key AS (
    SELECT o.key,
           (array_agg(o.name ORDER BY o.run_id DESC))[1] AS name,
           (array_agg(o.folder ORDER BY o.run_id DESC))[1] AS folder,
           count(*) AS runs, sum(o.results) AS results, sum(o.successes) AS successes,
           sum(o.failures) AS failures, sum(o.elapsed_total) AS elapsed_total,
           sum(o.elapsed_results) AS elapsed_results,
           -- Runs folded together are taken in the order they were created.
           array_agg(o.outcome ORDER BY o.run_id) AS outcomes,
           max(o.run_id) AS last_run_id, min(runs.created_at) AS first_seen
    FROM (SELECT *, CASE WHEN failures > 0 AND successes > 0 THEN {BOTH} WHEN failures > 0 THEN {FAILURE}
                         WHEN successes > 0 THEN {SUCCESS} ELSE {NEUTRAL} END::smallint AS outcome
          FROM per_run) o JOIN runs ON runs.id = o.run_id
    GROUP BY o.key
)
INSERT INTO automation_cases AS c (
    project_id, source_id, key, name, folder, status, run_count, result_count, success_count, failure_count,
    elapsed_total, elapsed_results, elapsed_average, outcomes, flaky_percent, last_run_id, created_at, updated_at)
SELECT %(project)s, %(source)s, k.key, k.name, k.folder, least(k.outcomes[cardinality(k.outcomes)], {FAILURE}),
       k.runs, k.results, k.successes, k.failures, k.elapsed_total, k.elapsed_results,
       CASE WHEN k.elapsed_results > 0 THEN round(k.elapsed_total::numeric / k.elapsed_results) END,
       k.outcomes[greatest(1, cardinality(k.outcomes) + 1 - {RECENT_RUNS}):],
       ingest_flaky_percent(k.outcomes[greatest(1, cardinality(k.outcomes) + 1 - {RECENT_RUNS}):]),
       k.last_run_id, k.first_seen, now()
FROM per_key k
-- Key order: two folds of one source lock the same case rows in the same order, so one waits, never deadlocks.
ORDER BY k.key
ON CONFLICT (project_id, source_id, key) DO UPDATE SET
    name = excluded.name,
    folder = excluded.folder,
    status = excluded.status,
    run_count = c.run_count + excluded.run_count,
    result_count = c.result_count + excluded.result_count,
    success_count = c.success_count + excluded.success_count,
    failure_count = c.failure_count + excluded.failure_count,
    elapsed_total = c.elapsed_total + excluded.elapsed_total,
    elapsed_results = c.elapsed_results + excluded.elapsed_results,
    elapsed_average = CASE WHEN c.elapsed_results + excluded.elapsed_results > 0
        THEN round((c.elapsed_total + excluded.elapsed_total)::numeric
                   / (c.elapsed_results + excluded.elapsed_results)) END,
    outcomes = (c.outcomes || excluded.outcomes)[
        greatest(1, cardinality(c.outcomes) + cardinality(excluded.outcomes) + 1 - {RECENT_RUNS}):],
    flaky_percent = ingest_flaky_percent((c.outcomes || excluded.outcomes)[
        greatest(1, cardinality(c.outcomes) + cardinality(excluded.outcomes) + 1 - {RECENT_RUNS}):]),
    last_run_id = excluded.last_run_id,
    updated_at = now()
"""


_TOTALS = f"""
INSERT INTO automation_case_totals (project_id, source_id, status, cases)
SELECT %(project)s, %(source)s, s.status, count(c.id)
FROM (VALUES ({NEUTRAL}), ({SUCCESS}), ({FAILURE})) s(status)
LEFT JOIN automation_cases c ON c.project_id = %(project)s AND c.source_id = %(source)s AND c.status = s.status
GROUP BY s.status
ON CONFLICT (project_id, source_id, status) DO UPDATE SET cases = excluded.cases
"""


def fold_owed(conn: Connection, runs_max: int = FOLD_BATCH, results_max: int = FOLD_RESULTS) -> list[int]:
    """Take folds owed that no other transaction holds (oldest first: up to `runs_max` runs, and beyond the
    first, up to `results_max` results), and fold those runs into their cases; the runs folded. Runs of one
    source that complete together (a fleet's nightly runs) are folded in one pass over their cases, rather than
    one after another."""
    total = " + ".join(f"r.{c}" for c in COUNT_COLUMNS)
    runs = sorted(row[0] for row in conn.exec_driver_sql(
        f"WITH owed AS (SELECT run_id FROM case_folds ORDER BY run_id LIMIT %(n)s FOR UPDATE SKIP LOCKED), "
        f"sized AS (SELECT o.run_id, sum({total}) OVER (ORDER BY o.run_id) - ({total}) AS before "
        f"  FROM owed o JOIN automation_runs r ON r.id = o.run_id) "
        f"DELETE FROM case_folds WHERE run_id IN (SELECT run_id FROM sized WHERE before = 0 OR before < %(results)s) "
        f"RETURNING run_id", {"n": runs_max, "results": results_max}))
    if not runs:
        return []
    # Its plan is compiled in ~80 ms for a statement that runs in a few hundred.
    conn.exec_driver_sql("SET LOCAL jit = off")
    passed, failed = passed_status_ids(conn), failed_status_ids(conn)
    # Sources in order, for the same reason as keys in order.
    for project, source, ids, since in conn.exec_driver_sql(
            "SELECT project_id, source_id, array_agg(id ORDER BY id), min(created_at) FROM automation_runs "
            "WHERE id = ANY(%(runs)s) GROUP BY project_id, source_id ORDER BY project_id, source_id",
            {"runs": runs}):
        conn.exec_driver_sql(_FOLD, {"runs": ids, "since": since, "skew": CLOCK_SKEW, "project": project,
                                     "source": source, "passed": passed, "failed": failed})
        # One fold of a source at a time counts: the second's count then sees the first's cases.
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('ingest:case-totals:' || %(source)s))",
                             {"source": source})
        conn.exec_driver_sql(_TOTALS, {"project": project, "source": source})
    return runs


def overdue(conn: Connection, older_than_seconds: float) -> bool:
    """Whether a fold has been owed for longer than a fold task takes: its task was lost (a worker killed
    between the completion's commit and sending it, say)."""
    return conn.exec_driver_sql(
        "SELECT EXISTS (SELECT 1 FROM case_folds WHERE created_at < now() - make_interval(secs => %(s)s))",
        {"s": older_than_seconds}).scalar() is True
