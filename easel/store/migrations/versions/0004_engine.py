"""Task engine: worker leases, per-task event sequence numbers, hashed API keys.

Revision ID: 0004_engine
Revises: 0002
"""
from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0004_engine"
down_revision = "0003_clients"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("event_seq", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("projects") as batch:
        batch.alter_column("apikey", type_=sa.String(80), existing_type=sa.String(64))
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=False, server_default="0"))
    # existing events keep their order: seq = id (increasing per task), and each task continues
    # after its highest; tasks left running by an older server have no lease (= expired)
    op.execute("UPDATE events SET seq = id")
    op.execute("UPDATE tasks SET event_seq = COALESCE((SELECT MAX(e.seq) FROM events e WHERE e.task_id = tasks.id), 0)")
    op.create_index("ix_events_task_seq", "events", ["task_id", "seq"])
    # API keys are stored as "sha256:<hex>" from now on
    conn = op.get_bind()
    for pid, key in conn.execute(sa.text("SELECT id, apikey FROM projects")).fetchall():
        if not key.startswith("sha256:"):
            conn.execute(sa.text("UPDATE projects SET apikey = :h WHERE id = :i"),
                         {"h": "sha256:" + hashlib.sha256(key.encode()).hexdigest(), "i": pid})


def downgrade() -> None:
    # (hashed API keys cannot be restored: projects keep their hashes)
    op.drop_index("ix_events_task_seq", "events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("seq")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("event_seq")
        batch.drop_column("lease_expires_at")
