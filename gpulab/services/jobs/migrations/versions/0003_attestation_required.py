"""jobs.attestation_required: the spec's `attestation: required` as a column the scheduler filters on

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("attestation_required", sa.Boolean(), nullable=False, server_default=sa.false()))
    jobs = sa.table("jobs", sa.column("spec", sa.JSON()), sa.column("attestation_required", sa.Boolean()))
    op.execute(
        jobs.update().where(jobs.c.spec["attestation"].as_string() == "required").values(attestation_required=True)
    )


def downgrade() -> None:
    op.drop_column("jobs", "attestation_required")
