"""jobs.array_id, array_index, array_max: job arrays (``array: {count, max_concurrent}``); jobs.on_hold: a
queued job its owner holds (PATCH /jobs/{id} ``held``); pool_settings: pools an admin drains

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("array_id", sa.String(32), nullable=True))
    op.add_column("jobs", sa.Column("array_index", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("array_max", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_array", "jobs", ["array_id", "array_index"])
    # not batch mode: on SQLite it copies the table, and dropping the old one cascades to job_events
    op.add_column("jobs", sa.Column("on_hold", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "pool_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("draining", sa.Boolean(), nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pool_settings")
    op.drop_column("jobs", "on_hold")
    op.drop_index("ix_jobs_array", "jobs")
    op.drop_column("jobs", "array_max")
    op.drop_column("jobs", "array_index")
    op.drop_column("jobs", "array_id")
