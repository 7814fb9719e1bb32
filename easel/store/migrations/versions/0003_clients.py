"""Official-client compatibility: a per-project nonce policy (``lenient`` or ``strict``).

Revision ID: 0003_clients
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_clients"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("nonce_policy", sa.String(16), nullable=False, server_default="lenient"))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("nonce_policy")
