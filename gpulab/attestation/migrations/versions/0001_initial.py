"""The attestation database: nonces, node states, enrolments (releases before this history made them with
create_all, so each is made only where it is missing)

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    if "gpulab_attestation_nonces" not in present:
        op.create_table(
            "gpulab_attestation_nonces",
            sa.Column("digest", sa.String(64), primary_key=True),
            sa.Column("user", sa.String(255), nullable=False),
            sa.Column("node", sa.String(255), nullable=False),
            sa.Column("purpose", sa.String(64), nullable=False),
            sa.Column("expires_at", sa.Float(), nullable=False),
        )
        op.create_index("ix_gpulab_attestation_nonces_expires_at", "gpulab_attestation_nonces", ["expires_at"])
    if "gpulab_attestation_nodes" not in present:
        op.create_table(
            "gpulab_attestation_nodes",
            sa.Column("node", sa.String(255), primary_key=True),
            sa.Column("user", sa.String(255), nullable=True),
            sa.Column("verified_at", sa.Float(), nullable=True),
            sa.Column("expires_at", sa.Float(), nullable=True),
            sa.Column("fingerprint", sa.String(64), nullable=True),
            sa.Column("summary", sa.JSON(), nullable=True),
            sa.Column("revoked", sa.Boolean(), nullable=False),
            sa.Column("last_checked_at", sa.Float(), nullable=False),
            sa.Column("last_reason", sa.String(64), nullable=False),
        )
    if "gpulab_attestation_enrolments" not in present:
        op.create_table(
            "gpulab_attestation_enrolments",
            sa.Column("node", sa.String(255), primary_key=True),
            sa.Column("digest", sa.String(64), nullable=False),
            sa.Column("gpus", sa.Integer(), nullable=False),
            sa.Column("ueids", sa.JSON(), nullable=True),
            sa.Column("enrolled_at", sa.Float(), nullable=False),
            sa.Column("enrolled_by", sa.String(255), nullable=False),
        )


def downgrade() -> None:
    for table in ("gpulab_attestation_enrolments", "gpulab_attestation_nodes", "gpulab_attestation_nonces"):
        op.drop_table(table)
