"""jobs.attestation_node: the node whose attestation let the latest attempt start

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("attestation_node", sa.String(255), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "attestation_node")
