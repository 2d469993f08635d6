"""automation cases, webhooks, and the index that reads a run's results back (reads.md)

The results' key, (id, created_at), becomes (run_id, status_id, id, created_at), and their index by thread
goes: one index, by run, serves everything (made again on every partition, with the table locked against
writes meanwhile: workers wait and retry, the shims go on accepting; on a large store, about as long as one
pass over the results).

Revision ID: 0004
Revises: 0003
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# A case's flaky percentage from its latest outcomes, oldest first (worker/cases.py): 1 neutral, 2 success,
# 3 failure, 4 both passed and failed in that run.
FLAKY_PERCENT = """
CREATE FUNCTION ingest_flaky_percent(outcomes smallint[]) RETURNS numeric(4, 1)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    flaky int := 0;
    previous smallint;
    outcome smallint;
BEGIN
    IF cardinality(outcomes) = 0 THEN
        RETURN 0;
    END IF;
    FOREACH outcome IN ARRAY outcomes LOOP
        IF outcome = 4 THEN
            flaky := flaky + 1;
            previous := 3;
        ELSIF outcome IN (2, 3) THEN
            IF previous IS NOT NULL AND previous <> outcome THEN
                flaky := flaky + 1;
            END IF;
            previous := outcome;
        END IF;
    END LOOP;
    RETURN round(100.0 * flaky / cardinality(outcomes), 1);
END
$$
"""


def upgrade() -> None:
    op.execute(FLAKY_PERCENT)
    op.create_table('webhooks',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('project_id', sa.BigInteger(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('secret', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_webhooks_project_id_projects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhooks'))
    )
    op.create_index(op.f('ix_webhooks_project_id'), 'webhooks', ['project_id'], unique=False)
    op.create_table('automation_cases',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('project_id', sa.BigInteger(), nullable=False),
    sa.Column('source_id', sa.BigInteger(), nullable=False),
    sa.Column('key', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('folder', sa.Text(), nullable=True),
    sa.Column('status', sa.SmallInteger(), nullable=False),
    sa.Column('run_count', sa.Integer(), nullable=False),
    sa.Column('result_count', sa.BigInteger(), nullable=False),
    sa.Column('success_count', sa.BigInteger(), nullable=False),
    sa.Column('failure_count', sa.BigInteger(), nullable=False),
    sa.Column('elapsed_total', sa.BigInteger(), nullable=False),
    sa.Column('elapsed_results', sa.BigInteger(), nullable=False),
    sa.Column('elapsed_average', sa.BigInteger(), nullable=True),
    sa.Column('outcomes', postgresql.ARRAY(sa.SmallInteger()), nullable=False),
    sa.Column('flaky_percent', sa.Numeric(precision=4, scale=1), nullable=False),
    sa.Column('last_run_id', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_automation_cases_project_id_projects')),
    sa.ForeignKeyConstraint(['source_id'], ['automation_sources.id'], name=op.f('fk_automation_cases_source_id_automation_sources')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_automation_cases')),
    sa.UniqueConstraint('project_id', 'source_id', 'key', name=op.f('uq_automation_cases_project_id_source_id_key')),
    postgresql_with={'fillfactor': '70'},
    )
    op.create_index(op.f('ix_automation_cases_project_id_created_at_id'), 'automation_cases', ['project_id', 'created_at', 'id'], unique=False)
    op.create_index(op.f('ix_automation_cases_project_id_flaky_percent_id'), 'automation_cases', ['project_id', 'flaky_percent', 'id'], unique=False)
    op.create_table('automation_case_totals',
    sa.Column('project_id', sa.BigInteger(), nullable=False),
    sa.Column('source_id', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.SmallInteger(), autoincrement=False, nullable=False),
    sa.Column('cases', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_automation_case_totals_project_id_projects')),
    sa.ForeignKeyConstraint(['source_id'], ['automation_sources.id'], name=op.f('fk_automation_case_totals_source_id_automation_sources')),
    sa.PrimaryKeyConstraint('project_id', 'source_id', 'status', name=op.f('pk_automation_case_totals'))
    )
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.UUID(as_uuid=False), nullable=False),
    sa.Column('webhook_id', sa.BigInteger(), nullable=False),
    sa.Column('run_id', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.Text(), server_default=sa.text("'pending'"), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('leased_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('body', sa.Text(), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['webhook_id'], ['webhooks.id'], name=op.f('fk_webhook_deliveries_webhook_id_webhooks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries'))
    )
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['next_attempt_at'], unique=False, postgresql_where=sa.text("state = 'pending'"))
    op.create_index(op.f('ix_webhook_deliveries_webhook_id'), 'webhook_deliveries', ['webhook_id'], unique=False)
    op.create_table('case_folds',
    sa.Column('run_id', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['automation_runs.id'], name=op.f('fk_case_folds_run_id_automation_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_case_folds'))
    )
    op.drop_index('ix_automation_results_thread_id', table_name='automation_results')
    op.execute("ALTER TABLE automation_results DROP CONSTRAINT pk_automation_results, "
               "ADD CONSTRAINT pk_automation_results PRIMARY KEY (run_id, status_id, id, created_at)")


def downgrade() -> None:
    op.execute("ALTER TABLE automation_results DROP CONSTRAINT pk_automation_results, "
               "ADD CONSTRAINT pk_automation_results PRIMARY KEY (id, created_at)")
    op.create_index('ix_automation_results_thread_id', 'automation_results', ['thread_id'], unique=False)
    op.drop_table('case_folds')
    op.drop_index(op.f('ix_webhook_deliveries_webhook_id'), table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries', postgresql_where=sa.text("state = 'pending'"))
    op.drop_table('webhook_deliveries')
    op.drop_index(op.f('ix_automation_cases_project_id_flaky_percent_id'), table_name='automation_cases')
    op.drop_index(op.f('ix_automation_cases_project_id_created_at_id'), table_name='automation_cases')
    op.drop_table('automation_case_totals')
    op.drop_table('automation_cases')
    op.drop_index(op.f('ix_webhooks_project_id'), table_name='webhooks')
    op.drop_table('webhooks')
    op.execute("DROP FUNCTION ingest_flaky_percent(smallint[])")
