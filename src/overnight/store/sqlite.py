"""SQLite record store (the default): one file under the data directory."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from overnight.errors import StoreError
from overnight.store.sql import SQLStore

__all__ = ["SQLiteStore"]


class SQLiteStore(SQLStore):
    """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy's
    convention). WAL mode, so API reads never wait behind the executor's writes;
    this process's writes queue in order (``SQLStore._begin``)."""

    serialize_writes = True

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
        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
