"""automation cases without foreign keys: a fold's project and source are those of the runs it folds

Each new case checked its project and source by a trigger of its own: a quarter of the time of folding a run of
a million new cases. Both come from the run's row, which keeps its foreign keys, and neither projects nor
sources are ever deleted.

Revision ID: 0005
Revises: 0004
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint('fk_automation_cases_project_id_projects', 'automation_cases', type_='foreignkey')
    op.drop_constraint('fk_automation_cases_source_id_automation_sources', 'automation_cases', type_='foreignkey')


def downgrade() -> None:
    op.create_foreign_key('fk_automation_cases_project_id_projects', 'automation_cases', 'projects',
                          ['project_id'], ['id'])
    op.create_foreign_key('fk_automation_cases_source_id_automation_sources', 'automation_cases',
                          'automation_sources', ['source_id'], ['id'])
