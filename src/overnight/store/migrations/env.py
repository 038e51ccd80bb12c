"""Alembic environment for overnight's record tables.

overnight drives Alembic from code (:func:`overnight.store.postgres.upgrade`) and
hands over an open synchronous connection in ``config.attributes["connection"]``
(the async engine's ``run_sync`` bridge), so this file never builds an engine of
its own and never reads a URL from an ini file.
"""

from __future__ import annotations

from alembic import context

from overnight.store.sql import metadata

config = context.config


def _run() -> None:
    if context.is_offline_mode():
        raise RuntimeError("overnight's migrations run against a live database only (no --sql mode)")
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "overnight's migrations run through overnight.store.postgres.upgrade() "
            "(or `overnight db upgrade`), which supplies the connection"
        )
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


_run()
