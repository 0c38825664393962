"""fair_share_usage: each user's and cohort group's decayed use of the cluster (fair share from history);
jobs.max_runtime: a scheduling column, for backfill

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fair_share_usage",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    # not batch mode: on SQLite it copies the table, and dropping the old one cascades to job_events
    op.add_column("jobs", sa.Column("max_runtime", sa.Integer(), nullable=True))
    jobs = sa.table("jobs", sa.column("spec", sa.JSON()), sa.column("max_runtime", sa.Integer()))
    op.execute(jobs.update().values(max_runtime=jobs.c.spec["max_runtime"].as_integer()))


def downgrade() -> None:
    op.drop_column("jobs", "max_runtime")
    op.drop_table("fair_share_usage")
