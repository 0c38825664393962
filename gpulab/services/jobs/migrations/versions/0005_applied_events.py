"""applied_events: the user events gpulab-jobs has applied, under this history (earlier releases made the table
with create_all, so it is made only where it is missing)

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "applied_events" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "applied_events",
        sa.Column("event_id", sa.String(36), primary_key=True),
        sa.Column("applied_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("applied_events")
