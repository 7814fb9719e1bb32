"""API secrets at rest: ``projects.apisecret`` holds ``fernet:<token>`` (easel.store.secretbox).

The column is widened to 512 characters (a sealed 48-character secret is 171) and every secret
stored in clear is sealed with the migrating process's key, which ``Store.migrate`` passes as
``config.attributes["secret_box"]`` (``EASEL_SECRET_KEY``, or ``<data_dir>/secret.key``, created
at first start on SQLite). A process that has no key (an ``easel worker`` on PostgreSQL without
``EASEL_SECRET_KEY``: it never reads secrets) leaves them in clear; the next ``Store.migrate`` with
a key (every ``easel serve`` start) seals them. Downgrade opens them again (with the key).

Revision ID: 0008_sealed_secrets
Revises: 0007_queue_seq_previews
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0008_sealed_secrets"
down_revision = "0007_queue_seq_previews"
branch_labels = None
depends_on = None

_projects = sa.table("projects", sa.column("id", sa.Integer), sa.column("apisecret", sa.String))


def _rewrite(change) -> None:
    conn = op.get_bind()
    for pid, stored in conn.execute(sa.select(_projects.c.id, _projects.c.apisecret)).all():
        new = change(stored)
        if new != stored:
            conn.execute(sa.update(_projects).where(_projects.c.id == pid).values(apisecret=new))


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":  # SQLite does not enforce a VARCHAR's length
        op.alter_column("projects", "apisecret", type_=sa.String(512), existing_type=sa.String(128),
                        existing_nullable=False)
    box = context.config.attributes.get("secret_box")
    if box is not None:
        _rewrite(lambda stored: stored if box.sealed(stored) else box.seal(stored))


def downgrade() -> None:
    box = context.config.attributes.get("secret_box")
    if box is None:
        raise RuntimeError("opening the API secrets needs the key: set EASEL_SECRET_KEY")
    _rewrite(box.open)
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("projects", "apisecret", type_=sa.String(128), existing_type=sa.String(512),
                        existing_nullable=False)
