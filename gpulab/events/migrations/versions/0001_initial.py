"""The hub's events database: outbox, deliveries, known_users (releases before this history made them with
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
    if "outbox" not in present:
        op.create_table(
            "outbox",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("event_id", sa.String(36), nullable=False, unique=True),
            sa.Column("type", sa.String(32), nullable=False),
            sa.Column("user", sa.String(255), nullable=False),
            sa.Column("payload", sa.Text(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
        )
    if "deliveries" not in present:
        op.create_table(
            "deliveries",
            sa.Column(
                "event_id", sa.String(36), sa.ForeignKey("outbox.event_id", ondelete="CASCADE"), primary_key=True
            ),
            sa.Column("subscriber", sa.String(255), primary_key=True),
            sa.Column("delivered_at", sa.DateTime(), nullable=True),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
            sa.Column("last_error", sa.Text(), nullable=True),
        )
        op.create_index("ix_deliveries_pending", "deliveries", ["subscriber", "delivered_at"])
    if "known_users" not in present:
        op.create_table(
            "known_users",
            sa.Column("name", sa.String(255), primary_key=True),
            sa.Column("state", sa.Text(), nullable=False),
        )


def downgrade() -> None:
    for table in ("known_users", "deliveries", "outbox"):
        op.drop_table(table)
