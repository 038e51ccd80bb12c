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


async def test_a_database_made_before_docs_gains_their_tables_on_open(tmp_path: Path) -> None:
    import sqlite3

    from tests.store.contract import make_batch, make_doc

    url = f"sqlite:///{tmp_path / 'overnight.db'}"
    first = connect_store(url)
    await first.open()
    rec = make_batch()
    await first.insert_batch(rec)
    await first.aclose()
    with sqlite3.connect(tmp_path / "overnight.db") as db:  # as an overnight before docs left it
        db.execute("DROP TABLE overnight_docs")
        db.execute("DROP TABLE overnight_docs_gone")
    second = connect_store(url)
    await second.open()
    try:
        assert await second.get_batch(rec.id) == rec
        doc = make_doc(key="k")
        await second.insert_doc(doc)
        assert await second.get_doc_by_key("job", "acme", "k") == doc
        assert await second.delete_doc("job", doc.id) is True
        assert await second.list_docs("job", after=doc.id) == []
    finally:
        await second.aclose()


async def test_doc_lists_are_served_by_indexes(store: SQLiteStore) -> None:
    """SQLite plans every statement list_docs sends as index searches that use
    each of its filters (tenant, status), never as a scan of the table or of a
    whole kind."""
    import re
    import sqlite3

    from sqlalchemy import event

    from tests.store.contract import NOW, make_doc

    for i in range(5):
        await store.insert_doc(make_doc(created_at=NOW + i, key=f"k{i}", status=("queued", "done")[i % 2]))
    first = (await store.list_docs("job"))[2]
    sent: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "overnight_docs" in statement:
            sent.append((statement, tuple(parameters or ())))

    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        for order in ("newest", "oldest"):
            await store.list_docs("job", order=order, after=first.id, limit=2)
            await store.list_docs("job", tenant="acme", order=order, after=first.id)
            await store.list_docs("job", statuses=["queued"], order=order)
            await store.list_docs("job", statuses=["queued", "done"], order=order, after=first.id)
            await store.list_docs("job", tenant="acme", statuses=["queued", "done"], order=order, after=first.id)
        await store.get_doc_by_key("job", "acme", "k1")
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    assert len(sent) >= 11
    with sqlite3.connect(store.path) as db:
        for statement, params in sent:
            plan = [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + statement, params)]
            searches = [p for p in plan if re.match(r"SEARCH overnight_docs(_gone)? USING", p)]
            assert searches and not any(re.match(r"SCAN overnight_docs\b", p) for p in plan), (statement, plan)
            for column in ("tenant", "status", "doc_key"):
                if f"overnight_docs.{column} " in statement:
                    assert all(f"{column}=?" in p for p in searches if "_gone" not in p), (column, statement, plan)
