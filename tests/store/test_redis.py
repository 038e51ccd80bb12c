"""The Redis record store: the store contract, plus its key layout."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from overnight.errors import StoreError
from overnight.store import connect_store
from tests.store.contract import StoreContract, ids, make_batch, make_file, make_shard

redis_store = pytest.importorskip("overnight.store.redis")
RedisStore = redis_store.RedisStore


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    s = connect_store(redis_url)
    assert isinstance(s, RedisStore)
    await s.open()
    yield s
    await s.aclose()


@pytest.mark.redis
class TestRedisStore(StoreContract):
    pass


async def _keys(store: RedisStore, pattern: str = "*") -> set[str]:
    return {k.decode() async for k in store.client.scan_iter(match=pattern, count=500)}


@pytest.mark.redis
async def test_every_key_lives_under_the_prefix(store: RedisStore) -> None:
    tenant = "tenant-" + store.prefix.strip(":")  # unique to this test
    f = make_file(tenant=tenant, expires_at=1)
    b = make_batch(tenant=tenant, input_file_id=f.id)
    await store.insert_file(f)
    await store.insert_batch(b)
    await store.update_batch(b, checkpoint=b"cp")
    touched = await _keys(store, f"*{tenant}*") | await _keys(store, f"*{b.id}*") | await _keys(store, f"*{f.id}*")
    assert touched
    assert all(k.startswith(store.prefix) for k in touched), touched


@pytest.mark.redis
async def test_indexes_empty_out_when_records_leave_them(store: RedisStore) -> None:
    f = make_file(expires_at=5)
    b = make_batch(status="in_progress", input_file_id=f.id)
    await store.insert_file(f)
    await store.insert_batch(b)
    await store.delete_file(f.id)
    await store.update_batch(dataclasses.replace(b, status="completed"))
    remaining = await _keys(store, store.prefix + "*")
    # Only the batch record and its tenant list stay; no empty or stale index keys.
    assert remaining == {f"{store.prefix}batch:{b.id}", f"{store.prefix}batches:acme"}


@pytest.mark.redis
async def test_shard_keys_live_under_the_prefix_and_go_with_delete_shards(store: RedisStore) -> None:
    b = make_batch()
    await store.insert_batch(b)
    await store.update_batch(b, checkpoint=b"batch cp")
    for index in range(3):
        shard = make_shard(batch_id=b.id, index=index, count=3)
        await store.insert_shard(shard)
        await store.update_shard(shard, checkpoint=b"cp")
    shard_keys = await _keys(store, f"{store.prefix}shard*")
    assert shard_keys == {
        *(f"{store.prefix}shard:{b.id}:{i}" for i in range(3)),
        *(f"{store.prefix}shard-checkpoint:{b.id}:{i}" for i in range(3)),
        f"{store.prefix}shards:{b.id}",
    }
    assert await store.delete_shards(b.id) == 3
    # No shard key is left behind, not even an empty index; the batch's own keys stay.
    assert await _keys(store, f"{store.prefix}shard*") == set()
    assert await store.get_checkpoint(b.id) == b"batch cp"


@pytest.mark.redis
async def test_delete_shards_deletes_nothing_when_the_index_changed_under_it(store: RedisStore) -> None:
    for index in range(2):
        await store.insert_shard(make_shard(batch_id="batch_d", index=index, count=3))
    # What a caller that read the index before shard 2 was inserted would send.
    keys = [store._key("shards:{}", "batch_d")]
    for index in ("0", "1"):
        keys += [store._key("shard:{}:{}", "batch_d", index), store._key("shard-checkpoint:{}:{}", "batch_d", index)]
    await store.insert_shard(make_shard(batch_id="batch_d", index=2, count=3))
    assert await store._script("delete_shards")(keys=keys, args=["0", "1"]) == -1
    assert [s.index for s in await store.list_shards("batch_d")] == [0, 1, 2]
    # The method reads the index again and gets them all.
    assert await store.delete_shards("batch_d") == 3
    assert await store.list_shards("batch_d") == []


@pytest.mark.redis
async def test_stores_with_different_prefixes_do_not_see_each_other(redis_url: str) -> None:
    other_url = redis_url.replace("?prefix=", "?prefix=other-")
    a, b = RedisStore(redis_url), RedisStore(other_url)
    await a.open()
    await b.open()
    try:
        rec = make_file()
        await a.insert_file(rec)
        assert await b.get_file(rec.id) is None
        assert await b.list_files(tenant="acme") == []
    finally:
        for key in await _keys(b, b.prefix + "*"):
            await b.client.delete(key)
        await a.aclose()
        await b.aclose()


def test_prefix_comes_from_the_url_and_is_not_passed_to_redis() -> None:
    s = RedisStore("redis://h:6379/2?prefix=svc-a:&socket_timeout=5")
    assert s.prefix == "svc-a:"
    assert s._client_url == "redis://h:6379/2?socket_timeout=5"
    assert RedisStore("redis://h:6379/0").prefix == "overnight:"


@pytest.mark.redis
async def test_inserting_an_existing_id_raises_store_error(store: RedisStore) -> None:
    f = make_file()
    await store.insert_file(f)
    with pytest.raises(StoreError, match="already exists"):
        await store.insert_file(dataclasses.replace(f, tenant="globex"))
    assert await store.list_files(tenant="globex") == []


async def test_unreachable_server_raises_store_error() -> None:
    s = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(StoreError, match="connecting failed"):
        await s.open()


@pytest.mark.redis
async def test_losing_the_server_after_open_raises_store_error(store: RedisStore) -> None:
    import redis.asyncio as aioredis

    live, store._client = store._client, aioredis.from_url("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(StoreError):
            await store.get_file("file-x")
        with pytest.raises(StoreError):
            await store.list_active_batches()
        with pytest.raises(StoreError):
            await store.list_shards("batch_x")
        with pytest.raises(StoreError):
            await store.delete_shards("batch_x")
    finally:
        await store.client.aclose()
        store._client = live


@pytest.mark.redis
async def test_doc_keys_live_under_the_prefix_and_only_the_cursor_mark_outlives_a_delete(store: RedisStore) -> None:
    from tests.store.contract import make_doc

    rec = make_doc(kind="model", tenant="a:b", status="ready", key="llama 3")
    await store.insert_doc(rec)
    p = store.prefix
    assert await _keys(store, p + "doc*") == {
        f"{p}doc:model:{rec.id}",
        f"{p}docs:model",
        f"{p}docs-of-tenant:model:a%3Ab",
        f"{p}docs-in-status:model:ready",
        f"{p}docs-of-tenant-in-status:model:a%3Ab:ready",
        f"{p}doc-key:model:a%3Ab:llama%203",
    }
    moved = await store.update_doc(dataclasses.replace(rec, status="retired", key=None))
    assert await _keys(store, p + "doc*-in-status*") == {
        f"{p}docs-in-status:model:retired",
        f"{p}docs-of-tenant-in-status:model:a%3Ab:retired",
    }
    assert await _keys(store, p + "doc-key*") == set()
    assert await store.delete_doc("model", moved.id) is True
    # No empty index is left; the deleted doc's list position stays for cursors.
    assert await _keys(store, p + "doc*") == {f"{p}doc-gone:model:{rec.id}"}


@pytest.mark.redis
async def test_doc_scripts_refuse_a_stale_read_and_write_nothing(store: RedisStore) -> None:
    from overnight.store.redis import _doc_pos
    from tests.store.contract import make_doc

    rec = make_doc(status="queued", key="k")
    await store.insert_doc(rec)
    doc_key = store._key("doc:{}:{}", "job", rec.id)
    idx = store._doc_index_keys("job", "acme", "queued")
    # What update_doc and delete_doc send after reading status "running" (stale).
    key_k = store._doc_key_key("job", "acme", "k")
    stale_update = await store._script("update_doc")(
        keys=[doc_key, *idx[2:], *idx[2:], key_k, key_k],
        args=["0", "1", "done", b"{}", "running", "k", "k", "acme", _doc_pos(rec), rec.id],
    )
    assert int(stale_update[0]) == -2
    stale_delete = await store._script("delete_doc")(
        keys=[doc_key, *idx, key_k, store._key("doc-gone:{}:{}", "job", rec.id)],
        args=["running", "k", _doc_pos(rec), "acme"],
    )
    assert int(stale_delete) == -1
    assert await store.get_doc("job", rec.id) == rec
    assert await store.list_docs("job", statuses=["queued"]) == [rec]


@pytest.mark.redis
async def test_a_page_is_filled_past_index_entries_whose_doc_is_gone(store: RedisStore) -> None:
    from tests.store.contract import NOW, make_doc

    recs = [make_doc(created_at=NOW + i) for i in range(6)]
    for rec in recs:
        await store.insert_doc(rec)
    # Index entries left behind by a doc that vanished between the two reads of a list.
    for rec in recs[3:5]:
        await store.client.delete(store._key("doc:{}:{}", "job", rec.id))
    page = await store.list_docs("job", limit=3)
    assert ids(page) == [recs[5].id, recs[2].id, recs[1].id]
    assert ids(await store.list_docs("job", after=recs[1].id)) == [recs[0].id]


@pytest.mark.redis
async def test_created_at_orders_the_index_like_the_number(store: RedisStore) -> None:
    from overnight.store.redis import _doc_pos
    from tests.store.contract import make_doc

    increasing = [-1e300, -2.5, -1.0, -1e-300, 0.0, 1e-300, 0.5, 1.0, 1_800_000_000.25, 1_800_000_000.5, 1e300]
    pos = [_doc_pos(make_doc(id="x", created_at=v)) for v in increasing]
    assert sorted(pos) == pos and len(set(pos)) == len(pos)
    assert _doc_pos(make_doc(id="x", created_at=0.0)) == _doc_pos(make_doc(id="x", created_at=-0.0))
