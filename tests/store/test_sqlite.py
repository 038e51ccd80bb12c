"""The SQLite record store against the store contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from overnight.store import connect_store
from overnight.store.sqlite import SQLiteStore
from tests.store.contract import StoreContract


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = connect_store(f"sqlite:///{tmp_path / 'records' / 'overnight.db'}")
    assert isinstance(s, SQLiteStore)
    await s.open()
    yield s
    await s.aclose()


class TestSQLiteStore(StoreContract):
    pass


async def test_reopening_keeps_records(tmp_path: Path) -> None:
    from tests.store.contract import make_batch

    url = f"sqlite:///{tmp_path / 'overnight.db'}"
    first = connect_store(url)
    await first.open()
    rec = make_batch()
    await first.insert_batch(rec)
    written = await first.update_batch(rec, checkpoint=b"\x00cp")
    await first.aclose()
    second = connect_store(url)
    await second.open()
    try:
        assert await second.get_batch(rec.id) == written
        assert await second.get_checkpoint(rec.id) == b"\x00cp"
    finally:
        await second.aclose()
