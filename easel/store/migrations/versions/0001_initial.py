"""initial schema: projects, nonces, tasks, outputs, events

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
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("apikey", sa.String(64), nullable=False),
        sa.Column("apisecret", sa.String(128), nullable=False),
        sa.Column("auth_mode", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_projects_apikey", "projects", ["apikey"], unique=True)
    op.create_table(
        "nonces",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("nonce", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("project_id", "nonce", name="uq_nonce_project"),
    )
    op.create_index("ix_nonces_project_id", "nonces", ["project_id"])
    op.create_index("ix_nonces_created_at", "nonces", ["created_at"])
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("tool", sa.String(200), nullable=False),
        sa.Column("socketaccesstoken", sa.String(64), nullable=False),
        sa.Column("file_accesskey", sa.String(64), nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("parameters", sa.Text, nullable=False),
        sa.Column("inputs", sa.Text, nullable=False),
        sa.Column("callbackurl", sa.Text, nullable=False),
        sa.Column("debugoutput", sa.Text, nullable=False),
        sa.Column("debugerror", sa.Text, nullable=False),
        sa.Column("pexit", sa.String(16), nullable=True),
        sa.Column("progress", sa.Text, nullable=False),
        sa.Column("cost_per_second", sa.Float, nullable=False),
        sa.Column("kill_requested", sa.Boolean, nullable=False),
        sa.Column("worker_id", sa.String(64), nullable=False),
        *[sa.Column(c, sa.Float, nullable=(c != "createtime")) for c in (
            "createtime", "accepttime", "preprocessstarttime", "preprocessendtime", "assigntime",
            "starttime", "endtime", "postprocessstarttime", "postprocessendtime", "canceltime")],
    )
    op.create_index("ix_tasks_project_id", "tasks", ["project_id"])
    op.create_index("ix_tasks_socketaccesstoken", "tasks", ["socketaccesstoken"], unique=True)
    op.create_index("ix_tasks_file_accesskey", "tasks", ["file_accesskey"], unique=True)
    op.create_index("ix_tasks_status", "tasks", ["status"])
    op.create_index("ix_tasks_status_id", "tasks", ["status", "id"])
    op.create_table(
        "outputs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("contenttype", sa.String(100), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("addedtime", sa.Float, nullable=False),
    )
    op.create_index("ix_outputs_task_id", "outputs", ["task_id"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_events_task_id", "events", ["task_id"])


def downgrade() -> None:
    for t in ("events", "outputs", "tasks", "nonces", "projects"):
        op.drop_table(t)
