"""The webhook due index (batches that owe a webhook delivery, by when it is due).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Mirrors ``overnight_webhook_due`` in ``overnight.store.sql.metadata`` as it is at
this revision. It only adds a table: batch records of an older database carry no
webhook state, so none of them owes a delivery and the new table starts empty.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "overnight_webhook_due",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("due_at", sa.Float, nullable=False),
    )
    op.create_index("ix_overnight_webhook_due_due_at", "overnight_webhook_due", ["due_at"])


def downgrade() -> None:
    op.drop_index("ix_overnight_webhook_due_due_at", table_name="overnight_webhook_due")
    op.drop_table("overnight_webhook_due")
