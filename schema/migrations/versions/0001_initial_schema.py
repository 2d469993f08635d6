"""initial schema

Revision ID: 0001
Revises:
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('applied_ops',
    sa.Column('id', sa.UUID(as_uuid=False), nullable=False),
    sa.Column('applied_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_applied_ops'))
    )
    op.create_table('automation_results',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('run_id', sa.BigInteger(), nullable=False),
    sa.Column('thread_id', sa.BigInteger(), nullable=False),
    sa.Column('status_id', sa.SmallInteger(), nullable=False),
    sa.Column('key', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('folder', sa.Text(), nullable=True),
    sa.Column('elapsed', sa.BigInteger(), nullable=True),
    sa.Column('file', sa.Text(), nullable=True),
    sa.Column('line', sa.Integer(), nullable=True),
    sa.Column('assertions', sa.Integer(), nullable=True),
    sa.Column('fields', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('artifacts', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_automation_results'))
    )
    op.create_index(op.f('ix_automation_results_thread_id'), 'automation_results', ['thread_id'], unique=False)
    op.create_table('dead_letters',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('op_id', sa.UUID(as_uuid=False), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('run_id', sa.BigInteger(), nullable=True),
    sa.Column('thread_id', sa.BigInteger(), nullable=True),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('failures', sa.Integer(), server_default=sa.text('1'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('replayed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dead_letters')),
    sa.UniqueConstraint('op_id', name=op.f('uq_dead_letters_op_id'))
    )
    op.create_table('projects',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_projects')),
    sa.UniqueConstraint('name', name=op.f('uq_projects_name'))
    )
    op.create_table('statuses',
    sa.Column('id', sa.SmallInteger(), autoincrement=False, nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('system_name', sa.Text(), nullable=False),
    sa.Column('color', sa.Text(), nullable=False),
    sa.Column('is_final', sa.Boolean(), nullable=False),
    sa.Column('is_untested', sa.Boolean(), nullable=False),
    sa.Column('is_passed', sa.Boolean(), nullable=False),
    sa.Column('is_failed', sa.Boolean(), nullable=False),
    sa.Column('aliases', postgresql.ARRAY(sa.Text()), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_statuses')),
    sa.UniqueConstraint('system_name', name=op.f('uq_statuses_system_name'))
    )
    op.create_table('users',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('email', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('token_hash', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    op.create_index(op.f('ix_api_tokens_user_id'), 'api_tokens', ['user_id'], unique=False)
    op.create_table('automation_sources',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('project_id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_automation_sources_project_id_projects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_automation_sources')),
    sa.UniqueConstraint('project_id', 'name', name=op.f('uq_automation_sources_project_id_name'))
    )
    op.create_table('configs',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('project_id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_configs_project_id_projects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_configs')),
    sa.UniqueConstraint('project_id', 'name', name=op.f('uq_configs_project_id_name'))
    )
    op.create_table('milestones',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('project_id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_milestones_project_id_projects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_milestones')),
    sa.UniqueConstraint('project_id', 'name', name=op.f('uq_milestones_project_id_name'))
    )
    op.create_table('project_members',
    sa.Column('project_id', sa.BigInteger(), nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_project_members_project_id_projects')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_project_members_user_id_users')),
    sa.PrimaryKeyConstraint('project_id', 'user_id', name=op.f('pk_project_members'))
    )
    op.create_table('automation_runs',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('project_id', sa.BigInteger(), nullable=False),
    sa.Column('source_id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('config_id', sa.BigInteger(), nullable=True),
    sa.Column('milestone_id', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.SmallInteger(), server_default=sa.text('4'), nullable=False),
    sa.Column('is_completed', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('elapsed', sa.BigInteger(), nullable=True),
    sa.Column('tags', postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('artifacts', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('fields', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('links', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('untested_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status1_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status2_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status3_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status4_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status5_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status6_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status7_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status8_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status9_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status10_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status11_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status12_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status13_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status14_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status15_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status16_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status17_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status18_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status19_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status20_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status21_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status22_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status23_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status24_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('ops_applied', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('ops_expected', sa.Integer(), nullable=True),
    sa.Column('measure_elapsed', sa.Boolean(), nullable=True),
    sa.Column('complete_requested_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('complete_requested_by', sa.BigInteger(), nullable=True),
    sa.Column('activity_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('completed_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('created_by', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_by', sa.BigInteger(), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_by', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['config_id'], ['configs.id'], name=op.f('fk_automation_runs_config_id_configs')),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_automation_runs_created_by_users')),
    sa.ForeignKeyConstraint(['milestone_id'], ['milestones.id'], name=op.f('fk_automation_runs_milestone_id_milestones')),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_automation_runs_project_id_projects')),
    sa.ForeignKeyConstraint(['source_id'], ['automation_sources.id'], name=op.f('fk_automation_runs_source_id_automation_sources')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_automation_runs'))
    )
    op.create_index(op.f('ix_automation_runs_project_id_created_at'), 'automation_runs', ['project_id', 'created_at'], unique=False)
    op.create_table('automation_run_threads',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('run_id', sa.BigInteger(), nullable=False),
    sa.Column('project_id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.Text(), nullable=True),
    sa.Column('status', sa.SmallInteger(), server_default=sa.text('4'), nullable=False),
    sa.Column('is_completed', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('elapsed_observed', sa.BigInteger(), nullable=True),
    sa.Column('elapsed_computed', sa.BigInteger(), nullable=True),
    sa.Column('results_elapsed', sa.BigInteger(), nullable=True),
    sa.Column('artifacts', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('fields', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('untested_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status1_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status2_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status3_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status4_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status5_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status6_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status7_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status8_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status9_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status10_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status11_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status12_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status13_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status14_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status15_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status16_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status17_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status18_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status19_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status20_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status21_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status22_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status23_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('status24_count', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('appends_applied', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('appends_expected', sa.Integer(), nullable=True),
    sa.Column('complete_requested_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('complete_requested_by', sa.BigInteger(), nullable=True),
    sa.Column('activity_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('completed_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('created_by', sa.BigInteger(), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_by', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['automation_runs.id'], name=op.f('fk_automation_run_threads_run_id_automation_runs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_automation_run_threads'))
    )
    op.create_index(op.f('ix_automation_run_threads_run_id'), 'automation_run_threads', ['run_id'], unique=False)

    statuses = sa.table(
        "statuses",
        sa.column("id", sa.SmallInteger), sa.column("name", sa.Text), sa.column("system_name", sa.Text),
        sa.column("color", sa.Text), sa.column("is_final", sa.Boolean), sa.column("is_untested", sa.Boolean),
        sa.column("is_passed", sa.Boolean), sa.column("is_failed", sa.Boolean),
        sa.column("aliases", postgresql.ARRAY(sa.Text)),
    )
    # The status table of compat.md section 3, frozen here as it was when this migration was written.
    op.bulk_insert(statuses, [
        dict(id=1, name="Untested", system_name="untested", color="#a3a3a3", is_final=False,
             is_untested=True, is_passed=False, is_failed=False, aliases=["untested"]),
        dict(id=2, name="Passed", system_name="passed", color="#22c55e", is_final=True,
             is_untested=False, is_passed=True, is_failed=False, aliases=["passed", "pass", "success", "ok"]),
        dict(id=3, name="Failed", system_name="failed", color="#ef4444", is_final=True,
             is_untested=False, is_passed=False, is_failed=True,
             aliases=["failed", "fail", "failure", "error", "broken"]),
        dict(id=4, name="Retest", system_name="retest", color="#f59e0b", is_final=False,
             is_untested=False, is_passed=False, is_failed=False, aliases=["retest"]),
        dict(id=5, name="Blocked", system_name="blocked", color="#6b7280", is_final=True,
             is_untested=False, is_passed=False, is_failed=False, aliases=["blocked"]),
        dict(id=6, name="Skipped", system_name="skipped", color="#3b82f6", is_final=True,
             is_untested=False, is_passed=False, is_failed=False,
             aliases=["skipped", "skip", "ignored", "disabled", "pending"]),
    ])


def downgrade() -> None:
    op.drop_index(op.f('ix_automation_run_threads_run_id'), table_name='automation_run_threads')
    op.drop_table('automation_run_threads')
    op.drop_index(op.f('ix_automation_runs_project_id_created_at'), table_name='automation_runs')
    op.drop_table('automation_runs')
    op.drop_table('project_members')
    op.drop_table('milestones')
    op.drop_table('configs')
    op.drop_table('automation_sources')
    op.drop_index(op.f('ix_api_tokens_user_id'), table_name='api_tokens')
    op.drop_table('api_tokens')
    op.drop_table('users')
    op.drop_table('statuses')
    op.drop_table('projects')
    op.drop_table('dead_letters')
    op.drop_index(op.f('ix_automation_results_thread_id'), table_name='automation_results')
    op.drop_table('automation_results')
    op.drop_table('applied_ops')
