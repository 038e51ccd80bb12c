"""SQLite record store (the default): one file under the data directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from overnight.errors import StoreError
from overnight.store.sql import SQLStore

__all__ = ["SQLiteStore"]


class SQLiteStore(SQLStore):
    """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy's
    convention). WAL mode, so API reads never wait behind the executor's writes;
    this process's write transactions run on one thread, in order (``SQLStore._tx``)."""

    def __init__(self, url: str) -> None:
        if ":///" not in url:
            raise StoreError(f"bad SQLite URL {url!r}: expected sqlite:///path/to/file.db")
        self.path = Path(url.split(":///", 1)[1])
        # A busy timeout instead of "database is locked" when two writers meet.
        super().__init__(f"sqlite+aiosqlite:///{self.path}", connect_args={"timeout": 30})

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await super().open()

    def _configure_engine(self, engine: AsyncEngine) -> None:
        _pragmas_on(engine.sync_engine)

    def _sync_engine(self) -> Any:
        # The writer thread's engine: one connection, the same file and settings.
        engine = sa.create_engine(f"sqlite:///{self.path}", connect_args={"timeout": 30, "check_same_thread": False},
                                  pool_size=1, max_overflow=0)
        _pragmas_on(engine)
        return engine


def _pragmas_on(engine: Any) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()
