"""Initial schema: file records, batch records and batch checkpoints.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Mirrors ``overnight.store.sql.metadata`` as it was at this revision. Later changes
get their own revision; this file is never edited once released.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "overnight_files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=True),
        sa.Column("doc", sa.Text, nullable=False),
    )
    op.create_index("ix_overnight_files_tenant_id", "overnight_files", ["tenant", "id"])
    op.create_index("ix_overnight_files_expires_at", "overnight_files", ["expires_at"])

    op.create_table(
        "overnight_batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
    )
    op.create_index("ix_overnight_batches_tenant_id", "overnight_batches", ["tenant", "id"])
    op.create_index("ix_overnight_batches_status", "overnight_batches", ["status"])
    op.create_index("ix_overnight_batches_input_file_id", "overnight_batches", ["input_file_id"])

    op.create_table(
        "overnight_checkpoints",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("overnight_checkpoints")
    op.drop_index("ix_overnight_batches_input_file_id", table_name="overnight_batches")
    op.drop_index("ix_overnight_batches_status", table_name="overnight_batches")
    op.drop_index("ix_overnight_batches_tenant_id", table_name="overnight_batches")
    op.drop_table("overnight_batches")
    op.drop_index("ix_overnight_files_expires_at", table_name="overnight_files")
    op.drop_index("ix_overnight_files_tenant_id", table_name="overnight_files")
    op.drop_table("overnight_files")
