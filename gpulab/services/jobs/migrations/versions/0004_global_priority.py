"""jobs.global_priority: the priority among all users' jobs (an admin's), apart from the owner's own order

Jobs stored before it get 0: their priority goes on ordering their owner's own jobs only.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("global_priority", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("jobs", "global_priority")
