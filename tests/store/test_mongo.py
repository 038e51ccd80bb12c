"""The MongoDB record store: the store contract, plus its collections and indexes.

Runs the real ``MongoStore`` over the real ``pymongo.AsyncMongoClient`` against the
server from ``conftest.mongo_server_url`` (SecantusDB unless
``OVERNIGHT_TEST_MONGO_URL`` names a real one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from overnight.errors import StoreError, VersionConflict
from overnight.store import connect_store
from tests.store.contract import StoreContract, make_batch, make_doc, make_file, make_shard

mongo_store = pytest.importorskip("overnight.store.mongo")
MongoStore = mongo_store.MongoStore


@pytest.fixture
async def store(mongo_url: str) -> AsyncIterator[MongoStore]:
    s = connect_store(mongo_url)
    assert isinstance(s, MongoStore)
    await s.open()
    yield s
    await s.aclose()


class TestMongoStore(StoreContract):
    pass


async def test_database_comes_from_the_url_path(store: MongoStore, mongo_url: str) -> None:
    assert store.database_name == mongo_url.split("?")[0].rsplit("/", 1)[1]


async def test_open_creates_the_list_indexes(store: MongoStore) -> None:
    db = store._require()
    files = {ix["name"] async for ix in await db["files"].list_indexes()}
    batches = {ix["name"] async for ix in await db["batches"].list_indexes()}
    assert {"tenant_id", "tenant_purpose_id", "expires_at"} <= files
    assert {"tenant_id", "status_id", "input_file_id_status", "webhook_due_at"} <= batches
    shards = {ix["name"] async for ix in await db["shards"].list_indexes()}
    assert "batch_id_index" in shards
    docs = {ix["name"]: ix async for ix in await db["docs"].list_indexes()}
    assert {"kind_created_id", "kind_tenant_created_id", "kind_status_created_id",
            "kind_tenant_status_created_id", "kind_tenant_key"} <= set(docs)
    assert docs["kind_tenant_key"]["unique"] is True
    assert docs["kind_tenant_key"]["partialFilterExpression"] == {"key": {"$type": "string"}}


async def test_open_twice_on_one_database_is_fine(store: MongoStore, mongo_url: str) -> None:
    again = MongoStore(mongo_url)
    await again.open()
    try:
        rec = make_file()
        await store.insert_file(rec)
        assert await again.get_file(rec.id) == rec
    finally:
        await again.aclose()


async def test_records_are_json_documents_beside_their_indexed_fields(store: MongoStore) -> None:
    rec = make_batch(metadata={"a.b": "1", "$where": "2"})
    await store.insert_batch(rec)
    raw = await store._require()["batches"].find_one({"_id": rec.id})
    assert raw["tenant"] == "acme" and raw["status"] == "validating" and raw["version"] == 0
    assert isinstance(raw["doc"], str)


async def test_an_older_writers_late_checkpoint_never_replaces_a_newer_one(store: MongoStore) -> None:
    rec = make_batch()
    await store.insert_batch(rec)
    v1 = await store.update_batch(rec, checkpoint=b"from v1")
    await store.update_batch(v1, checkpoint=b"from v2")
    # The v1 writer's checkpoint write arriving late (after the v2 writer's) is dropped.
    await store._store_checkpoint(rec.id, v1.version, b"from v1, late")
    assert await store.get_checkpoint(rec.id) == b"from v2"
    with pytest.raises(VersionConflict):
        await store.update_batch(v1, checkpoint=b"loser")
    assert await store.get_checkpoint(rec.id) == b"from v2"


async def test_a_shard_checkpoint_lives_in_its_document_and_is_not_read_with_the_record(store: MongoStore) -> None:
    shard = make_shard(batch_id="batch_m:1", index=12, count=13)
    await store.insert_shard(shard)
    written = await store.update_shard(shard, checkpoint=b"\x00cp")
    raw = await store._require()["shards"].find_one({"_id": "batch_m:1:12"})
    assert raw["batch_id"] == "batch_m:1" and raw["index"] == 12 and raw["version"] == 1
    assert bytes(raw["checkpoint"]) == b"\x00cp" and isinstance(raw["doc"], str)
    assert await store.get_shard("batch_m:1", 12) == written
    assert await store.get_shard("batch_m", 1) is None  # "batch_m" + ":1:12" is not this shard


async def test_a_shard_checkpoint_over_the_document_limit_is_refused(store: MongoStore) -> None:
    shard = make_shard()
    await store.insert_shard(shard)
    v1 = await store.update_shard(shard, checkpoint=b"small")
    with pytest.raises(StoreError, match="document limit"):
        await store.update_shard(v1, checkpoint=b"\x00" * (17 * 1024 * 1024))
    assert await store.get_shard(shard.batch_id, shard.index) == v1
    assert await store.get_shard_checkpoint(shard.batch_id, shard.index) == b"small"


async def test_inserting_an_existing_id_raises_store_error(store: MongoStore) -> None:
    f = make_file()
    await store.insert_file(f)
    with pytest.raises(StoreError, match="already exists"):
        await store.insert_file(dataclasses.replace(f, tenant="globex"))
    assert await store.list_files(tenant="globex") == []


async def test_unreachable_server_raises_store_error() -> None:
    s = MongoStore("mongodb://127.0.0.1:1/overnight?serverSelectionTimeoutMS=200")
    with pytest.raises(StoreError, match="connecting failed"):
        await s.open()


async def test_bad_url_raises_store_error() -> None:
    with pytest.raises(StoreError):
        await MongoStore("mongodb://host:notaport/x").open()


async def test_doc_lists_read_index_ranges_that_use_every_filter(mongo_url: str) -> None:
    """Each find list_docs sends is planned as an index scan whose index holds
    every field it filters on (tenant, status), never as a collection scan."""
    from pymongo import monitoring

    from tests.store.contract import NOW

    class Finds(monitoring.CommandListener):
        def __init__(self) -> None:
            self.sent: list[dict] = []

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            if event.command_name == "find" and event.command.get("find") == "docs":
                self.sent.append({"filter": event.command.get("filter", {}), "sort": event.command.get("sort")})

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None: ...

        def failed(self, event: monitoring.CommandFailedEvent) -> None: ...

    listener = Finds()
    store = MongoStore(mongo_url, event_listeners=[listener])
    await store.open()
    try:
        for i in range(5):
            await store.insert_doc(make_doc(created_at=NOW + i, status=("queued", "done")[i % 2]))
        first = (await store.list_docs("job"))[2]
        listener.sent.clear()
        for order in ("newest", "oldest"):
            await store.list_docs("job", order=order, after=first.id, limit=2)
            await store.list_docs("job", tenant="acme", order=order, after=first.id)
            await store.list_docs("job", statuses=["queued", "done"], order=order)
            await store.list_docs("job", tenant="acme", statuses=["queued", "done"], order=order, after=first.id)
        finds = [f for f in listener.sent if "kind" in f["filter"]]
        assert len(finds) >= 16
        for find in finds:
            explained = await store._doc_coll.find(find["filter"]).sort(list(find["sort"].items())).explain()
            plan = str(explained["queryPlanner"]["winningPlan"])
            assert "IXSCAN" in plan and "COLLSCAN" not in plan, (find, plan)
            for field in ("tenant", "status"):
                if field in find["filter"]:
                    assert f"'{field}': 1" in plan, (field, find, plan)
    finally:
        await store.aclose()
