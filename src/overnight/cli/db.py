"""``overnight db``: schema migrations for the record store.

Only stores whose class offers ``upgrade_schema`` / ``schema_revision`` /
``schema_head`` (PostgreSQL) have migrations; SQLite creates its tables on open,
and Redis and MongoDB need no schema at all.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Optional

import typer

from overnight.errors import OvernightError

__all__ = ["db_app"]

db_app = typer.Typer(no_args_is_help=True, add_completion=False)

StoreOption = Annotated[
    Optional[str],
    typer.Option(
        "--store",
        envvar="OVERNIGHT_STORE_URL",
        show_envvar=True,
        help="Record store URL.",
        show_default="sqlite:///<data-dir>/overnight.db, data dir from OVERNIGHT_DATA_DIR",
    ),
]


def _resolve(store: str | None) -> tuple[str, type]:
    """The store URL and its class; an unknown scheme or missing extra exits with code 1."""
    from overnight.config import Settings
    from overnight.store import store_class

    url = store or Settings().resolved_store_url()
    try:
        return url, store_class(url)
    except OvernightError as exc:
        raise _fail(exc) from exc


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def _no_migrations(url: str) -> str:
    scheme = _scheme(url)
    if scheme.startswith("sqlite"):
        return "SQLite stores need no migrations: tables are created automatically when the store opens."
    return f"{scheme} stores need no migrations: they create what they need when they open."


def _fail(exc: OvernightError) -> typer.Exit:
    typer.secho(f"error: {exc.message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except OvernightError as exc:
        raise _fail(exc) from exc


@db_app.command()
def upgrade(store: StoreOption = None) -> None:
    """Apply pending schema migrations to the store."""
    url, cls = _resolve(store)
    migrate = getattr(cls, "upgrade_schema", None)
    if migrate is None:
        typer.echo(_no_migrations(url))
        return
    revision = _run(migrate(url))
    typer.echo(f"schema is at revision {revision} (up to date)")


@db_app.command()
def current(store: StoreOption = None) -> None:
    """Print the schema revision the store is at."""
    url, cls = _resolve(store)
    read = getattr(cls, "schema_revision", None)
    if read is None:
        typer.echo(_no_migrations(url))
        return
    revision = _run(read(url))
    head = cls.schema_head()
    if revision == head:
        typer.echo(f"{revision} (up to date)")
    else:
        typer.echo(f"{revision or 'none'} (this version needs {head}: run `overnight db upgrade`)")
