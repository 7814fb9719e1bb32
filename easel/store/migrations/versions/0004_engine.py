"""Task engine: worker leases and per-task event sequence numbers.

Revision ID: 0004_engine
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_engine"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("event_seq", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=False, server_default="0"))
    # existing events keep their order: seq = id (increasing per task), and each task continues
    # after its highest; tasks left running by an older server have no lease (= expired)
    op.execute("UPDATE events SET seq = id")
    op.execute("UPDATE tasks SET event_seq = COALESCE((SELECT MAX(e.seq) FROM events e WHERE e.task_id = tasks.id), 0)")
    op.create_index("ix_events_task_seq", "events", ["task_id", "seq"])


def downgrade() -> None:
    op.drop_index("ix_events_task_seq", "events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("seq")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("event_seq")
        batch.drop_column("lease_expires_at")
