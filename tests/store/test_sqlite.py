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


async def test_a_database_made_before_shards_gains_their_tables_on_open(tmp_path: Path) -> None:
    import sqlite3

    from tests.store.contract import make_batch, make_shard

    url = f"sqlite:///{tmp_path / 'overnight.db'}"
    first = connect_store(url)
    await first.open()
    rec = make_batch()
    await first.insert_batch(rec)
    await first.aclose()
    with sqlite3.connect(tmp_path / "overnight.db") as db:  # as an older overnight left it
        db.execute("DROP TABLE overnight_shard_checkpoints")
        db.execute("DROP TABLE overnight_shards")
    second = connect_store(url)
    await second.open()
    try:
        assert await second.get_batch(rec.id) == rec
        shard = make_shard(batch_id=rec.id)
        await second.insert_shard(shard)
        await second.update_shard(shard, checkpoint=b"cp")
        assert await second.get_shard_checkpoint(rec.id, 0) == b"cp"
    finally:
        await second.aclose()


async def test_a_database_made_before_webhooks_gains_the_due_index_on_open(tmp_path: Path) -> None:
    import dataclasses
    import sqlite3

    from tests.store.contract import NOW, make_batch, owing

    url = f"sqlite:///{tmp_path / 'overnight.db'}"
    first = connect_store(url)
    await first.open()
    rec = make_batch(status="in_progress")
    await first.insert_batch(rec)
    await first.aclose()
    with sqlite3.connect(tmp_path / "overnight.db") as db:  # as an overnight before webhooks left it
        db.execute("DROP TABLE overnight_webhook_due")
    second = connect_store(url)
    await second.open()
    try:
        assert await second.list_webhooks_due(now=NOW + 10**6) == []
        done = await second.update_batch(dataclasses.replace(rec, status="completed", webhook=owing(NOW)))
        assert await second.list_webhooks_due(now=NOW) == [done]
    finally:
        await second.aclose()
