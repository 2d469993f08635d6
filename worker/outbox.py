"""What a run's completion owes once its transaction commits, written in that same transaction (an outbox): the
fold of its results into the project's automation cases (worker/cases.py), and one POST to each of the project's
webhooks (worker/webhooks.py). Tasks carry them out after the commit; the sweeper takes over any whose task was
lost, so a worker killed at any moment loses neither."""

from datetime import datetime

from sqlalchemy import Connection


def record_completion(conn: Connection, run_id: int, occurred_at: datetime) -> int:
    """Owe the run's fold and its webhook deliveries; how many deliveries."""
    conn.exec_driver_sql("INSERT INTO case_folds (run_id) VALUES (%(run)s) ON CONFLICT DO NOTHING", {"run": run_id})
    return conn.exec_driver_sql(
        "INSERT INTO webhook_deliveries (id, webhook_id, run_id, occurred_at) "
        "SELECT gen_random_uuid(), w.id, r.id, %(at)s FROM automation_runs r JOIN webhooks w ON w.project_id = "
        "r.project_id WHERE r.id = %(run)s", {"run": run_id, "at": occurred_at}).rowcount
