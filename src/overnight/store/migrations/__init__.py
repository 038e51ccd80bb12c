"""Alembic migrations for the SQL record store (PostgreSQL).

Run them with ``overnight db upgrade --store URL`` or
:func:`overnight.store.postgres.upgrade`; there is no ``alembic.ini``, the
configuration is built in code by :mod:`overnight.store.postgres`.
"""
