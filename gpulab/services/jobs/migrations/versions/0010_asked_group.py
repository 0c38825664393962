"""jobs.asked_group: the group whose cohort quota a job uses, as its spec asks (``group``)

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # not batch mode: on SQLite it copies the table, and dropping the old one cascades to job_events
    op.add_column("jobs", sa.Column("asked_group", sa.String(255), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "asked_group")
