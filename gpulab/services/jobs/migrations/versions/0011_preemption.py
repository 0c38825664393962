"""jobs.preemptible, preemptions, preempted: jobs that may be preempted, how often they were, and whether the
latest attempt was

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # not batch mode: on SQLite it copies the table, and dropping the old one cascades to job_events
    op.add_column("jobs", sa.Column("preemptible", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("preemptions", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("preempted", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("jobs", "preempted")
    op.drop_column("jobs", "preemptions")
    op.drop_column("jobs", "preemptible")
