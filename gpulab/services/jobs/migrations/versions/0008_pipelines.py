"""pipelines (a DAG of steps submitted at once), jobs.pipeline_id, and schedules of pipelines (schedules.pipeline,
schedules.last_pipeline_id; schedules.job may then be null)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipelines",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("directory", sa.Text(), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("schedule_id", sa.String(32), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_pipelines_owner_idempotency_key"),
    )
    op.create_index("ix_pipelines_owner_created", "pipelines", ["owner", "created_at"])
    op.add_column("jobs", sa.Column("pipeline_id", sa.String(32), nullable=True))
    op.create_index("ix_jobs_pipeline", "jobs", ["pipeline_id"])
    with op.batch_alter_table("schedules") as batch:
        batch.alter_column("job", existing_type=sa.JSON(), nullable=True)
        batch.add_column(sa.Column("pipeline", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("last_pipeline_id", sa.String(32), nullable=True))


def downgrade() -> None:
    op.execute("DELETE FROM schedules WHERE job IS NULL")  # a pipeline's schedule has no job to keep
    with op.batch_alter_table("schedules") as batch:
        batch.drop_column("last_pipeline_id")
        batch.drop_column("pipeline")
        batch.alter_column("job", existing_type=sa.JSON(), nullable=False)
    op.drop_index("ix_jobs_pipeline", "jobs")
    op.drop_column("jobs", "pipeline_id")
    op.drop_index("ix_pipelines_owner_created", "pipelines")
    op.drop_table("pipelines")
