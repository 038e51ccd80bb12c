"""Document records (the console's jobs, provisions, models and templates) and
where deleted ones stood in the lists.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Mirrors ``overnight_docs`` and ``overnight_docs_gone`` in
``overnight.store.sql.metadata`` as they are at this revision. It only adds
tables, so the records of an older database are untouched.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Byte-wise ids, so ties in created_at break as on every other backend.
_ID = sa.String(128, collation="C")


def upgrade() -> None:
    op.create_table(
        "overnight_docs",
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("id", _ID, primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("status", sa.String(64), nullable=False),
        sa.Column("doc_key", sa.String(256), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
    )
    op.create_index("ix_overnight_docs_kind_created", "overnight_docs", ["kind", "created_at", "id"])
    op.create_index("ix_overnight_docs_tenant_created", "overnight_docs", ["kind", "tenant", "created_at", "id"])
    op.create_index("ix_overnight_docs_status_created", "overnight_docs", ["kind", "status", "created_at", "id"])
    op.create_index(
        "ix_overnight_docs_tenant_status_created", "overnight_docs", ["kind", "tenant", "status", "created_at", "id"]
    )
    op.create_index("ux_overnight_docs_key", "overnight_docs", ["kind", "tenant", "doc_key"], unique=True)

    op.create_table(
        "overnight_docs_gone",
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("id", _ID, primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("overnight_docs_gone")
    op.drop_index("ux_overnight_docs_key", table_name="overnight_docs")
    op.drop_index("ix_overnight_docs_tenant_status_created", table_name="overnight_docs")
    op.drop_index("ix_overnight_docs_status_created", table_name="overnight_docs")
    op.drop_index("ix_overnight_docs_tenant_created", table_name="overnight_docs")
    op.drop_index("ix_overnight_docs_kind_created", table_name="overnight_docs")
    op.drop_table("overnight_docs")
