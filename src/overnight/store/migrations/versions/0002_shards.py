"""Shard records and shard checkpoints (a batch sharded over several pods).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Mirrors ``overnight_shards`` and ``overnight_shard_checkpoints`` in
``overnight.store.sql.metadata`` as they are at this revision. It only adds
tables, so the batch and file records of a 0001 database are untouched.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "overnight_shards",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("shard_index", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
    )
    op.create_table(
        "overnight_shard_checkpoints",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("shard_index", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("overnight_shard_checkpoints")
    op.drop_table("overnight_shards")
