"""notification_prefs.lab (tell the user's JupyterLab) and the index the feed reads by

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notification_prefs") as batch:
        batch.add_column(sa.Column("lab", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.create_index("ix_notifications_feed", "notifications", ["owner", "channel", "id"])


def downgrade() -> None:
    op.drop_index("ix_notifications_feed", "notifications")
    with op.batch_alter_table("notification_prefs") as batch:
        batch.drop_column("lab")
