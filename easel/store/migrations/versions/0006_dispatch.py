"""Fleet: when a queued task's id was last published to the broker (``tasks.dispatched_at``).

Revision ID: 0006_dispatch
Revises: 0005_files
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_dispatch"
down_revision = "0005_files"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("dispatched_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("dispatched_at")
