"""Files API: a project's folders and uploaded files (``/v1/File/FolderCreate``, ``/v1/File/Upload``).

Revision ID: 0005_files
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_files"
down_revision = "0004_engine"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_files",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id"), nullable=False, index=True),
        sa.Column("parent_id", sa.String(32), nullable=False),
        sa.Column("is_folder", sa.Boolean(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("contenttype", sa.String(100), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("accesskey", sa.String(64), nullable=False, index=True),
        sa.Column("addedtime", sa.Float(), nullable=False),
    )
    op.create_index("ix_user_files_project_name", "user_files", ["project_id", "name"])


def downgrade() -> None:
    op.drop_index("ix_user_files_project_name", "user_files")
    op.drop_table("user_files")
