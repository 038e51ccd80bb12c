"""PostgreSQL record store: the shared SQL store on asyncpg, schema managed by Alembic.

Unlike SQLite, opening a PostgreSQL store never creates or alters tables: several
replicas of different versions may share one database, so schema changes are an
explicit, one-time step (``overnight db upgrade --store URL``, or :func:`upgrade`).
``open()`` only checks that the database is at the revision this code needs.

URLs: ``postgresql://``, ``postgres://`` or ``postgresql+asyncpg://`` (all run on
asyncpg). ``?schema=NAME`` keeps the tables (and Alembic's version table) in that
PostgreSQL schema instead of ``public``, so several deployments or test runs can
share one database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Both packages of the ``postgres`` extra are imported here, not where they are
# first used, so a missing one fails the registry's load with the install hint
# instead of a traceback at connect or migration time.
import alembic  # noqa: F401
import asyncpg  # noqa: F401
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from overnight.errors import StoreError
from overnight.store.sql import SQLStore

__all__ = ["PostgresStore", "current_revision", "head_revision", "upgrade"]

_DRIVER = "postgresql+asyncpg"
_ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
_MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def _parse(url: str) -> tuple[URL, str | None]:
    """Normalize ``url`` to the asyncpg driver; split off overnight's ``schema`` option."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"bad PostgreSQL URL: {exc}") from exc
    if parsed.drivername not in _ACCEPTED_SCHEMES:
        raise StoreError(
            f"bad PostgreSQL URL scheme {parsed.drivername!r}: use postgresql://, postgres:// "
            "or postgresql+asyncpg://"
        )
    schema = parsed.query.get("schema")
    if isinstance(schema, tuple):
        schema = schema[-1]
    parsed = parsed.set(drivername=_DRIVER).difference_update_query(["schema"])
    return parsed, schema or None


def _quoted_ident(name: str) -> str:
    return name.replace('"', '""')


def _engine_kwargs(schema: str | None) -> dict[str, Any]:
    # pre_ping: a replica outlives database restarts and failovers without serving
    # one failed request per pooled connection.
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if schema:
        kwargs["connect_args"] = {"server_settings": {"search_path": f'"{_quoted_ident(schema)}"'}}
    return kwargs


def _alembic_config() -> Any:
    """Alembic's configuration, in code: the scripts ship inside the package, so no
    ``alembic.ini`` is needed (or read)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The schema revision this version of overnight needs."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise StoreError("overnight's migration scripts are missing from the installation")
    return head


def _is_known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def _current_revision_sync(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


#: Session-level advisory lock held while migrating, so two ``overnight db upgrade``
#: runs (say, one per replica at deploy time) apply each revision once, in turn.
_MIGRATION_LOCK_KEY = 0x6F76_6E69_6768_74  # "ovnight"


def _upgrade_sync(conn: Connection, schema: str | None) -> None:
    from alembic import command

    conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    conn.commit()
    try:
        if schema:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{_quoted_ident(schema)}"'))
            conn.commit()
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()
    finally:
        try:
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            conn.commit()
        except SQLAlchemyError:
            pass  # the connection is gone, and the session-level lock went with it


async def _with_connection(url: str, fn: Any, *args: Any) -> Any:
    from alembic.util import CommandError

    parsed, schema = _parse(url)
    engine = create_async_engine(parsed, **_engine_kwargs(schema))
    try:
        async with engine.connect() as conn:
            result = await conn.run_sync(fn, *args)
            await conn.commit()
            return result
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"PostgreSQL at {parsed.render_as_string()} failed: {exc}") from exc
    except CommandError as exc:  # e.g. the database is at a revision these scripts do not know
        raise StoreError(f"migrating PostgreSQL at {parsed.render_as_string()} failed: {exc}") from exc
    finally:
        await engine.dispose()


async def current_revision(url: str) -> str | None:
    """The schema revision the database at ``url`` is at (None: never migrated)."""
    return await _with_connection(url, _current_revision_sync)


async def upgrade(url: str) -> str:
    """Apply every pending migration to the database at ``url``; return the revision
    it is at afterwards. Safe to run repeatedly and from several places at once
    (an advisory lock makes concurrent runs take turns)."""
    _, schema = _parse(url)
    await _with_connection(url, _upgrade_sync, schema)
    revision = await current_revision(url)
    assert revision is not None
    return revision


class PostgresStore(SQLStore):
    """Records in PostgreSQL. The schema must have been migrated beforehand."""

    #: ``overnight db`` commands look for these to manage the schema.
    upgrade_schema = staticmethod(upgrade)
    schema_revision = staticmethod(current_revision)
    schema_head = staticmethod(head_revision)

    def __init__(self, url: str) -> None:
        parsed, self.schema = _parse(url)
        super().__init__(parsed.render_as_string(hide_password=False), **_engine_kwargs(self.schema))

    async def open(self) -> None:
        try:
            await super().open()
        except BaseException:
            await self.aclose()
            raise

    async def _prepare_schema(self) -> None:
        try:
            async with self.engine.connect() as conn:
                current = await conn.run_sync(_current_revision_sync)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot reach PostgreSQL at {self._safe_url()}: {exc}") from exc
        needed = head_revision()
        if current is not None and current != needed and not _is_known_revision(current):
            raise StoreError(
                f"the PostgreSQL store at {self._safe_url()}: schema is at revision {current}, "
                f"which this version of overnight does not know (it needs {needed}): the database was "
                "migrated by a newer overnight; run that version or a later one"
            )
        if current != needed:
            raise StoreError(
                f"the PostgreSQL store at {self._safe_url()}: schema is at revision "
                f"{current or 'none (never migrated)'}, this version needs {needed}: "
                f"run `overnight db upgrade --store URL`"
            )

    def _safe_url(self) -> str:
        where = make_url(self.url).render_as_string(hide_password=True)
        return f"{where} (schema {self.schema})" if self.schema else where
