"""A CHECK constraint on ``tasks.status``: only the lifecycle's statuses (``easel.store.status.TaskStatus``).

The values are written out here, not imported: a migration describes the schema as it was at
this revision. SQLite cannot add a constraint to a table, so batch mode copies the table; on
PostgreSQL it is one ``ALTER TABLE ... ADD CONSTRAINT``. A database holding another status (none
was ever written) fails the upgrade, naming the constraint.

Revision ID: 0009_status_check
Revises: 0008_sealed_secrets
"""
from __future__ import annotations

from alembic import op

revision = "0009_status_check"
down_revision = "0008_sealed_secrets"
branch_labels = None
depends_on = None

STATUSES = ("task_queue", "task_accept", "task_preprocess_start", "task_preprocess_end", "task_assign",
            "task_start", "task_output", "task_output_full", "task_error_full", "task_end",
            "task_postprocess_start", "task_postprocess_end", "task_cancel")
CONDITION = "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")"


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.create_check_constraint("ck_tasks_status", CONDITION)


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint("ck_tasks_status", type_="check")
