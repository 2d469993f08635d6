"""Folding a completed run's results into the project's automation cases (reads.md), once per run.

A case is one test of one source across runs, keyed by (project, source, key). A run is folded when its
counters are final: its completion records that it owes a fold (worker/outbox.py), and the transaction that
folds it deletes that record, so a redelivered fold, or one whose worker was killed midway (its transaction
rolled back), changes nothing twice. Folding takes no lock ingestion waits on: it reads results, and locks
only case rows, which no append touches. Two folds of one source meet on the same case rows; each upserts in
key order, so they queue rather than deadlock.

A case's outcome in a run: failure if any of its results there failed, else success if any passed, else
neutral. `outcomes` keeps the latest RECENT_RUNS of them, oldest first, 4 standing for a run where it both
passed and failed (a rerun); `ingest_flaky_percent` (migration 0004) counts a run flaky when it is a 4, or when
its outcome (success or failure) differs from the previous such run's in the window; neutral runs are
counted as considered and never compared. The percentage is kept on the row, to be sorted on.
"""

from sqlalchemy import Connection

RECENT_RUNS = 30
NEUTRAL, SUCCESS, FAILURE, BOTH = 1, 2, 3, 4

_FOLD = f"""
WITH run AS (
    SELECT id, project_id, source_id, created_at FROM automation_runs WHERE id = %(run)s
), tests AS (
    SELECT r.key,
           (array_agg(r.name ORDER BY r.id DESC))[1] AS name,
           (array_agg(r.folder ORDER BY r.id DESC))[1] AS folder,
           count(*) AS results,
           count(*) FILTER (WHERE r.status_id = ANY(%(passed)s)) AS successes,
           count(*) FILTER (WHERE r.status_id = ANY(%(failed)s)) AS failures,
           coalesce(sum(r.elapsed), 0) AS elapsed_total,
           count(r.elapsed) AS elapsed_results
    FROM automation_results r, run
    -- Results are stored no earlier than their run was created: older partitions are not looked at. (A day of
    -- margin for clocks of several shims that disagree.)
    WHERE r.run_id = run.id AND r.created_at >= run.created_at - interval '1 day'
    GROUP BY r.key
), outcomes AS (
    SELECT *, CASE WHEN failures > 0 AND successes > 0 THEN {BOTH} WHEN failures > 0 THEN {FAILURE}
                   WHEN successes > 0 THEN {SUCCESS} ELSE {NEUTRAL} END::smallint AS outcome
    FROM tests
)
INSERT INTO automation_cases AS c (
    project_id, source_id, key, name, folder, status, run_count, result_count, success_count, failure_count,
    elapsed_total, elapsed_results, elapsed_average, outcomes, flaky_percent, last_run_id, created_at, updated_at)
SELECT run.project_id, run.source_id, o.key, o.name, o.folder, least(o.outcome, {FAILURE}), 1, o.results,
       o.successes, o.failures, o.elapsed_total, o.elapsed_results,
       CASE WHEN o.elapsed_results > 0 THEN round(o.elapsed_total::numeric / o.elapsed_results) END,
       ARRAY[o.outcome], ingest_flaky_percent(ARRAY[o.outcome]), run.id, run.created_at, now()
FROM outcomes o, run
ORDER BY o.key
ON CONFLICT (project_id, source_id, key) DO UPDATE SET
    name = excluded.name,
    folder = excluded.folder,
    status = excluded.status,
    run_count = c.run_count + 1,
    result_count = c.result_count + excluded.result_count,
    success_count = c.success_count + excluded.success_count,
    failure_count = c.failure_count + excluded.failure_count,
    elapsed_total = c.elapsed_total + excluded.elapsed_total,
    elapsed_results = c.elapsed_results + excluded.elapsed_results,
    elapsed_average = CASE WHEN c.elapsed_results + excluded.elapsed_results > 0
        THEN round((c.elapsed_total + excluded.elapsed_total)::numeric
                   / (c.elapsed_results + excluded.elapsed_results)) END,
    outcomes = (c.outcomes || excluded.outcomes)[greatest(1, cardinality(c.outcomes) + 2 - {RECENT_RUNS}):],
    flaky_percent = ingest_flaky_percent(
        (c.outcomes || excluded.outcomes)[greatest(1, cardinality(c.outcomes) + 2 - {RECENT_RUNS}):]),
    last_run_id = excluded.last_run_id,
    updated_at = now()
"""


def fold_run(conn: Connection, run_id: int) -> int | None:
    """Fold the run's results into its cases, if it is owed and not folded yet; the cases touched, or None."""
    owed = conn.exec_driver_sql("DELETE FROM case_folds WHERE run_id = %(run)s RETURNING run_id", {"run": run_id})
    if owed.first() is None:
        return None
    passed, failed = ([row[0] for row in conn.exec_driver_sql(f"SELECT id FROM statuses WHERE {flag} ORDER BY id")]
                      for flag in ("is_passed", "is_failed"))
    return conn.exec_driver_sql(_FOLD, {"run": run_id, "passed": passed, "failed": failed}).rowcount


def overdue_folds(conn: Connection, older_than_seconds: float) -> list[int]:
    """Runs owed a fold for longer than a fold task takes: their task was lost (a worker killed between the
    completion's commit and sending it, say)."""
    return [row[0] for row in conn.exec_driver_sql(
        "SELECT run_id FROM case_folds WHERE created_at < now() - make_interval(secs => %(s)s) "
        "ORDER BY run_id LIMIT 1000", {"s": older_than_seconds})]
