"""Server cost: queue sequence numbers, previews out of the events table, fewer and better indexes.

- ``tasks.queue_seq`` (1, 2, 3, ... in submission order, from the ``counters`` row
  ``task_queue_seq``) with the index ``(status, queue_seq)``: claims in that order, and a queued
  task's position without counting the queue ahead of it. It replaces ``(status, id)`` and the
  plain ``status`` index (a prefix of it).
- ``projects.task_count``: Task/List's unfiltered total without counting rows.
- ``(project_id, tool, id)``: Task/List filtered by tool, newest first.
- ``previews``: the latent previews, moved out of ``events.preview`` (base64 text) as JPEG bytes.
- ``ix_events_task_id`` is dropped: ``ix_events_task_seq`` (task_id, seq) serves every query it did.

Revision ID: 0007_queue_seq_previews
Revises: 0006_dispatch
"""
from __future__ import annotations

import base64

import sqlalchemy as sa
from alembic import op

revision = "0007_queue_seq_previews"
down_revision = "0006_dispatch"
branch_labels = None
depends_on = None

BATCH = 5000


def upgrade() -> None:
    conn = op.get_bind()
    op.create_table(
        "counters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Integer(), nullable=False),
    )
    op.create_table(
        "previews",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("task_id", sa.Integer(), sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_previews_task_seq", "previews", ["task_id", "seq"], unique=True)
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("task_count", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("queue_seq", sa.Integer(), nullable=True))

    # every existing task gets its place in submission (id) order, with no gaps
    ids = [row[0] for row in conn.execute(sa.text("SELECT id FROM tasks ORDER BY id"))]
    update = sa.text("UPDATE tasks SET queue_seq = :seq WHERE id = :id")
    for start in range(0, len(ids), BATCH):
        conn.execute(update, [{"seq": start + i + 1, "id": tid} for i, tid in enumerate(ids[start:start + BATCH])])
    conn.execute(sa.text("INSERT INTO counters (name, value) VALUES ('task_queue_seq', :n)"), {"n": len(ids)})
    conn.execute(sa.text("UPDATE projects SET task_count = (SELECT COUNT(*) FROM tasks WHERE tasks.project_id = projects.id)"))

    op.drop_index("ix_tasks_status_id", "tasks")
    op.drop_index("ix_tasks_status", "tasks")
    op.create_index("ix_tasks_status_queue_seq", "tasks", ["status", "queue_seq"])
    op.create_index("ix_tasks_project_tool_id", "tasks", ["project_id", "tool", "id"])

    # previews: base64 text in events -> JPEG bytes in their own table
    insert = sa.text("INSERT INTO previews (task_id, seq, data) VALUES (:t, :s, :d)")
    last = 0
    while True:
        rows = conn.execute(sa.text("SELECT id, task_id, seq, preview FROM events WHERE preview IS NOT NULL AND id > :last "
                                    "ORDER BY id LIMIT :n"), {"last": last, "n": BATCH}).fetchall()
        if not rows:
            break
        last = rows[-1][0]
        good = []
        for _, task_id, seq, text in rows:
            try:
                good.append({"t": task_id, "s": seq, "d": base64.b64decode(text, validate=True)})
            except ValueError:
                continue  # not a preview anyone could have shown: dropped
        if good:
            conn.execute(insert, good)
    op.drop_index("ix_events_task_id", "events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("preview")


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("preview", sa.Text(), nullable=True))
    op.create_index("ix_events_task_id", "events", ["task_id"])
    conn = op.get_bind()
    for task_id, seq, data in conn.execute(sa.text("SELECT task_id, seq, data FROM previews")).fetchall():
        conn.execute(sa.text("UPDATE events SET preview = :p WHERE task_id = :t AND seq = :s"),
                     {"p": base64.b64encode(data).decode(), "t": task_id, "s": seq})
    op.drop_index("ix_tasks_project_tool_id", "tasks")
    op.drop_index("ix_tasks_status_queue_seq", "tasks")
    op.create_index("ix_tasks_status", "tasks", ["status"])
    op.create_index("ix_tasks_status_id", "tasks", ["status", "id"])
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("queue_seq")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("task_count")
    op.drop_index("ix_previews_task_seq", "previews")
    op.drop_table("previews")
    op.drop_table("counters")
