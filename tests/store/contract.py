"""The behaviour every record store promises, run against each backend.

A backend's test module subclasses ``StoreContract`` and provides a ``store``
fixture yielding an opened, empty store. A backend is done when this passes.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
from typing import Any

import pytest

from overnight.errors import InvalidRequestError, NotFoundError, StoreError, VersionConflict
from overnight.ids import new_id
from overnight.store import ACTIVE_STATUSES, BatchRecord, DocRecord, FileRecord, ShardRecord, Store

NOW = 1_800_000_000


def make_file(*, tenant: str = "acme", purpose: str = "batch", expires_at: int | None = None, **kw: Any) -> FileRecord:
    fid = kw.pop("id", None) or new_id("file", "-")
    return FileRecord(
        id=fid,
        tenant=tenant,
        filename=kw.pop("filename", f"{fid}.jsonl"),
        purpose=purpose,
        bytes=kw.pop("bytes", 1234),
        created_at=kw.pop("created_at", NOW),
        storage_key=kw.pop("storage_key", f"files/{fid}"),
        expires_at=expires_at,
        **kw,
    )


def make_batch(
    *, tenant: str = "acme", status: str = "validating", input_file_id: str = "file-in", **kw: Any
) -> BatchRecord:
    return BatchRecord(
        id=kw.pop("id", None) or new_id("batch"),
        tenant=tenant,
        endpoint=kw.pop("endpoint", "/v1/chat/completions"),
        input_file_id=input_file_id,
        completion_window="24h",
        completion_window_s=86_400,
        status=status,
        created_at=kw.pop("created_at", NOW),
        expires_at=kw.pop("expires_at", NOW + 86_400),
        **kw,
    )


def make_shard(*, batch_id: str = "batch_shards", index: int = 0, count: int = 4, **kw: Any) -> ShardRecord:
    return ShardRecord(batch_id=batch_id, index=index, count=count, **kw)


def ids(recs: list[Any]) -> list[str]:
    return [r.id for r in recs]


async def set_status(store: Store, batch_id: str, status: str) -> BatchRecord:
    cur = await store.get_batch(batch_id)
    assert cur is not None
    return await store.update_batch(dataclasses.replace(cur, status=status))


class ShardContract:
    """Shard records and their checkpoints (``store.base.Store``'s shard methods);
    part of ``StoreContract``, so every backend runs it."""

    async def test_shard_round_trips_every_field(self, store: Store) -> None:
        rec = make_shard(
            batch_id="batch_rt",
            index=3,
            count=7,
            status="failed",
            holder="overnight-worker-3-x7k2p",
            token=5,
            lease_expires_at=1_800_000_030.25,
            attempts=4,
            completed=90,
            failed=2,
            usage={"input_tokens": 2**40, "input_tokens_details": {"cached_tokens": 1}},
            total=100,
            error={"code": "engine_error", "message": "gône"},
            updated_at=1_800_000_000.5,
            version=9,
        )
        await store.insert_shard(rec)
        assert await store.get_shard("batch_rt", 3) == rec
        fresh = make_shard(batch_id="batch_rt", index=0)
        await store.insert_shard(fresh)
        got = await store.get_shard("batch_rt", 0)
        assert got == fresh and got.status == "pending" and got.holder is None and got.error is None

    async def test_missing_shard_is_none(self, store: Store) -> None:
        await store.insert_shard(make_shard(batch_id="batch_one", index=0))
        assert await store.get_shard("batch_one", 1) is None
        assert await store.get_shard("batch_other", 0) is None
        assert await store.list_shards("batch_other") == []

    async def test_list_shards_is_ordered_by_index(self, store: Store) -> None:
        # Inserted out of order, and past 9 so a lexicographic order would show.
        for index in (10, 2, 0, 11, 1, 9):
            await store.insert_shard(make_shard(index=index, count=12))
        assert [s.index for s in await store.list_shards("batch_shards")] == [0, 1, 2, 9, 10, 11]

    async def test_inserting_an_existing_shard_raises_and_keeps_the_first(self, store: Store) -> None:
        first = make_shard(index=1, holder="pod-a", token=1)
        await store.insert_shard(first)
        with pytest.raises(StoreError):
            await store.insert_shard(make_shard(index=1, holder="pod-b", token=1))
        assert await store.get_shard("batch_shards", 1) == first
        assert len(await store.list_shards("batch_shards")) == 1

    async def test_update_shard_bumps_version_and_stores_the_record(self, store: Store) -> None:
        rec = make_shard(index=2)
        await store.insert_shard(rec)
        changed = dataclasses.replace(rec, status="running", holder="pod-2", token=1, attempts=1, completed=4)
        written = await store.update_shard(changed)
        assert written == dataclasses.replace(changed, version=rec.version + 1)
        assert await store.get_shard("batch_shards", 2) == written
        again = await store.update_shard(dataclasses.replace(written, completed=5))
        assert again.version == rec.version + 2

    async def test_stale_shard_version_never_overwrites(self, store: Store) -> None:
        rec = make_shard()
        await store.insert_shard(rec)
        current = await store.update_shard(dataclasses.replace(rec, holder="pod-new", token=2), checkpoint=b"new")
        with pytest.raises(VersionConflict):
            await store.update_shard(dataclasses.replace(rec, holder="pod-old", status="done"), checkpoint=b"old")
        assert await store.get_shard(rec.batch_id, rec.index) == current
        assert await store.get_shard_checkpoint(rec.batch_id, rec.index) == b"new"

    async def test_update_of_missing_shard_raises_not_found(self, store: Store) -> None:
        await store.insert_shard(make_shard(index=0))
        with pytest.raises(NotFoundError):
            await store.update_shard(make_shard(index=1), checkpoint=b"x")
        assert await store.get_shard_checkpoint("batch_shards", 1) is None
        assert await store.get_shard("batch_shards", 1) is None

    async def test_two_shard_writers_racing_exactly_one_wins(self, store: Store) -> None:
        rec = make_shard(status="running")
        await store.insert_shard(rec)
        writers = [dataclasses.replace(rec, holder=f"pod-{i}", token=i) for i in range(8)]
        results = await asyncio.gather(
            *(store.update_shard(w, checkpoint=f"cp-{w.holder}".encode()) for w in writers),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, ShardRecord)]
        losers = [r for r in results if not isinstance(r, ShardRecord)]
        assert len(winners) == 1, results
        assert all(isinstance(e, VersionConflict) for e in losers), losers
        stored = await store.get_shard(rec.batch_id, rec.index)
        assert stored == winners[0] and stored.version == rec.version + 1
        assert await store.get_shard_checkpoint(rec.batch_id, rec.index) == f"cp-{stored.holder}".encode()

    async def test_shard_checkpoint_is_written_with_its_update(self, store: Store) -> None:
        rec = make_shard(index=0)
        sibling = make_shard(index=1)
        await store.insert_shard(rec)
        await store.insert_shard(sibling)
        assert await store.get_shard_checkpoint(rec.batch_id, 0) is None
        v1 = await store.update_shard(dataclasses.replace(rec, completed=1), checkpoint=b"one")
        assert await store.get_shard_checkpoint(rec.batch_id, 0) == b"one"
        v2 = await store.update_shard(dataclasses.replace(v1, completed=2), checkpoint=b"two")
        assert await store.get_shard(rec.batch_id, 0) == v2
        assert await store.get_shard_checkpoint(rec.batch_id, 0) == b"two"
        # Without a checkpoint the last one stays; a loser's never lands.
        await store.update_shard(dataclasses.replace(v2, completed=3))
        assert await store.get_shard_checkpoint(rec.batch_id, 0) == b"two"
        with pytest.raises(VersionConflict):
            await store.update_shard(v1, checkpoint=b"loser")
        assert await store.get_shard_checkpoint(rec.batch_id, 0) == b"two"
        assert await store.get_shard_checkpoint(rec.batch_id, 1) is None

    @pytest.mark.parametrize(
        "blob",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"\x00\xff\x00{\"not\": json}\n\r\x00", id="binary"),
            pytest.param(os.urandom(200 * 1024), id="200KB-random"),
        ],
    )
    async def test_shard_checkpoint_round_trips_bytes(self, store: Store, blob: bytes) -> None:
        rec = make_shard()
        await store.insert_shard(rec)
        await store.update_shard(rec, checkpoint=blob)
        got = await store.get_shard_checkpoint(rec.batch_id, rec.index)
        assert isinstance(got, bytes) and got == blob

    async def test_shard_checkpoints_are_apart_from_the_batch_checkpoint(self, store: Store) -> None:
        batch = make_batch()
        await store.insert_batch(batch)
        shard = make_shard(batch_id=batch.id, index=0)
        await store.insert_shard(shard)
        await store.update_batch(batch, checkpoint=b"batch")
        await store.update_shard(shard, checkpoint=b"shard 0")
        assert await store.get_checkpoint(batch.id) == b"batch"
        assert await store.get_shard_checkpoint(batch.id, 0) == b"shard 0"
        assert await store.delete_shards(batch.id) == 1
        assert await store.get_checkpoint(batch.id) == b"batch"
        assert await store.get_batch(batch.id) is not None

    async def test_delete_shards_removes_records_and_checkpoints(self, store: Store) -> None:
        for index in range(3):
            rec = make_shard(batch_id="batch_gone", index=index, count=3)
            await store.insert_shard(rec)
            await store.update_shard(rec, checkpoint=f"cp{index}".encode())
        kept = make_shard(batch_id="batch_kept", index=0, count=1)
        await store.insert_shard(kept)
        kept = await store.update_shard(kept, checkpoint=b"kept")
        assert await store.delete_shards("batch_gone") == 3
        assert await store.list_shards("batch_gone") == []
        for index in range(3):
            assert await store.get_shard("batch_gone", index) is None
            assert await store.get_shard_checkpoint("batch_gone", index) is None
        assert await store.delete_shards("batch_gone") == 0
        assert await store.delete_shards("batch_never") == 0
        assert await store.list_shards("batch_kept") == [kept]
        assert await store.get_shard_checkpoint("batch_kept", 0) == b"kept"
        # The index can be used again once its shards are gone.
        again = make_shard(batch_id="batch_gone", index=1, count=3)
        await store.insert_shard(again)
        assert await store.list_shards("batch_gone") == [again]
        assert await store.get_shard_checkpoint("batch_gone", 1) is None

    async def test_shards_of_two_batches_never_mix(self, store: Store) -> None:
        # Ids that are prefixes of each other or hold separators must not collide.
        batches = ["batch_a", "batch_a1", "batch_a:1", "batch_a/1", "batch_a 1"]
        for n, batch_id in enumerate(batches):
            for index in range(n + 1):
                rec = make_shard(batch_id=batch_id, index=index, count=n + 1, holder=f"{batch_id}#{index}")
                await store.insert_shard(rec)
                await store.update_shard(rec, checkpoint=f"{batch_id}#{index}".encode())
        for n, batch_id in enumerate(batches):
            shards = await store.list_shards(batch_id)
            assert [(s.batch_id, s.index) for s in shards] == [(batch_id, i) for i in range(n + 1)]
            assert all(s.holder == f"{batch_id}#{s.index}" for s in shards)
            for index in range(n + 1):
                assert await store.get_shard_checkpoint(batch_id, index) == f"{batch_id}#{index}".encode()
        assert await store.delete_shards("batch_a") == 1
        assert [s.index for s in await store.list_shards("batch_a1")] == [0, 1]
        assert await store.get_shard_checkpoint("batch_a:1", 2) == b"batch_a:1#2"


def owing(*next_at: float, event: str = "evt_1") -> dict[str, Any]:
    """A ``BatchRecord.webhook`` with one pending delivery per ``next_at`` (each to
    its own target), as ``webhooks/state.py`` writes it."""
    return {
        "events": [{"id": event, "type": "batch.completed", "created_at": NOW}],
        "pending": [
            {"event": event, "target": f"t{i}", "attempts": 0, "next_at": at, "error": None}
            for i, at in enumerate(next_at)
        ],
        "done": [],
    }


class WebhookDueContract:
    """``list_webhooks_due``: the index of batches owing a webhook delivery, which
    every backend writes in the same atomic step as the record; part of
    ``StoreContract``."""

    async def test_nothing_is_due_in_an_empty_store_or_without_webhook_state(self, store: Store) -> None:
        assert await store.list_webhooks_due(now=NOW) == []
        await store.insert_batch(make_batch(status="completed"))
        assert await store.list_webhooks_due(now=NOW + 10**6) == []

    async def test_a_terminal_write_that_owes_a_delivery_is_listed_once_due(self, store: Store) -> None:
        rec = make_batch(status="in_progress")
        await store.insert_batch(rec)
        assert await store.list_webhooks_due(now=NOW) == []
        done = await store.update_batch(dataclasses.replace(rec, status="completed", webhook=owing(NOW + 5)))
        assert await store.list_webhooks_due(now=NOW + 4.999) == []
        assert await store.list_webhooks_due(now=NOW + 5) == [done]

    async def test_the_soonest_pending_delivery_sets_when_a_batch_is_due(self, store: Store) -> None:
        rec = make_batch(status="failed", webhook=owing(NOW + 30, NOW + 3))
        await store.insert_batch(rec)
        assert ids(await store.list_webhooks_due(now=NOW + 3)) == [rec.id]
        # A delivery queued behind another of the same target waits for it.
        queued = owing(NOW + 50)
        queued["pending"].append({**queued["pending"][0], "event": "evt_2", "next_at": NOW})
        behind = make_batch(status="expired", webhook=queued)
        await store.insert_batch(behind)
        assert ids(await store.list_webhooks_due(now=NOW + 49)) == [rec.id]
        assert ids(await store.list_webhooks_due(now=NOW + 50)) == [rec.id, behind.id]

    async def test_due_batches_come_soonest_first_and_limit_applies(self, store: Store) -> None:
        recs = [make_batch(status="completed", webhook=owing(NOW + d)) for d in (7.5, 1.25, 4.0, 0.5)]
        for r in recs:
            await store.insert_batch(r)
        order = [recs[3].id, recs[1].id, recs[2].id, recs[0].id]
        assert ids(await store.list_webhooks_due(now=NOW + 100)) == order
        assert ids(await store.list_webhooks_due(now=NOW + 100, limit=2)) == order[:2]
        assert ids(await store.list_webhooks_due(now=NOW + 4.0)) == order[:3]
        assert await store.list_webhooks_due(now=NOW + 100, limit=0) == []

    async def test_claiming_or_finishing_moves_a_batch_out_of_the_due_list(self, store: Store) -> None:
        rec = make_batch(status="cancelled", webhook=owing(NOW))
        await store.insert_batch(rec)
        (due,) = await store.list_webhooks_due(now=NOW)
        claimed = copy.deepcopy(due.webhook)
        claimed["pending"][0]["next_at"] = NOW + 60  # a claim: due again only if it lapses
        due = await store.update_batch(dataclasses.replace(due, webhook=claimed))
        assert await store.list_webhooks_due(now=NOW + 59) == []
        assert ids(await store.list_webhooks_due(now=NOW + 60)) == [rec.id]
        finished = copy.deepcopy(due.webhook)
        finished["done"].append({**finished["pending"].pop(0), "outcome": "delivered"})
        await store.update_batch(dataclasses.replace(due, webhook=finished))
        assert await store.list_webhooks_due(now=NOW + 10**6) == []
        # Later writes of the batch (no webhook change) keep it out.
        cur = await store.get_batch(rec.id)
        assert cur is not None
        await store.update_batch(dataclasses.replace(cur, metadata={"k": "v"}))
        assert await store.list_webhooks_due(now=NOW + 10**6) == []

    async def test_a_losing_writer_changes_nothing_in_the_due_list(self, store: Store) -> None:
        rec = make_batch(status="completed", webhook=owing(NOW))
        await store.insert_batch(rec)
        read = await store.get_batch(rec.id)
        assert read is not None
        # Two replicas claim the same delivery at once: exactly one claim lands.
        claims = []
        for i in range(6):
            w = copy.deepcopy(read.webhook)
            w["pending"][0].update(next_at=NOW + 10 + i, claimed_by=f"replica-{i}")
            claims.append(dataclasses.replace(read, webhook=w))
        results = await asyncio.gather(*(store.update_batch(c) for c in claims), return_exceptions=True)
        (winner,) = [r for r in results if isinstance(r, BatchRecord)]
        assert all(isinstance(r, VersionConflict) for r in results if r is not winner)
        at = winner.webhook["pending"][0]["next_at"]
        assert await store.list_webhooks_due(now=at - 0.5) == []
        assert await store.list_webhooks_due(now=at) == [winner]


def make_doc(
    *, kind: str = "job", tenant: str = "acme", created_at: float = NOW, status: str = "queued", **kw: Any
) -> DocRecord:
    return DocRecord(
        kind=kind,
        id=kw.pop("id", None) or new_id(kind),
        tenant=tenant,
        created_at=created_at,
        status=status,
        body=kw.pop("body", {"n": 1}),
        **kw,
    )


async def set_doc_status(store: Store, kind: str, doc_id: str, status: str) -> DocRecord:
    cur = await store.get_doc(kind, doc_id)
    assert cur is not None
    return await store.update_doc(dataclasses.replace(cur, status=status))


def newest_first(recs: list[DocRecord]) -> list[str]:
    return [r.id for r in sorted(recs, key=lambda r: (r.created_at, r.id), reverse=True)]


#: Every kind of JSON value, and keys MongoDB or Redis would treat specially.
ODD_BODY: dict[str, Any] = {
    "ünïcode": "日本語 🚀 nul:\u0000 \"quoted\" \\ back\nslash\ttab",
    "nested": {"list": [1, 2.5, None, True, False, "x", {"deep": [[[]]]}], "empty": {}, "none": None},
    "big": 2**53,
    "negative_big": -(2**53),
    "zero": 0,
    "small_float": 1e-300,
    "tenth": 0.1,
    "a.b": "dotted",
    "$set": "dollar",
    "": "empty key",
    "key:with:colons": ["x:y"],
}


class DocContract:
    """Document records (``store.base.Store``'s doc methods): compare-and-set, a
    unique key per (kind, tenant), lists by (created_at, id) with stable cursors;
    part of ``StoreContract``, so every backend runs it."""

    async def test_doc_round_trips_every_field_and_any_json_body(self, store: Store) -> None:
        rec = make_doc(
            kind="provision",
            status="provisioning",
            key="idem-1",
            created_at=NOW + 0.123456789,
            updated_at=NOW + 1.5,
            version=7,
            body=ODD_BODY,
        )
        await store.insert_doc(rec)
        got = await store.get_doc("provision", rec.id)
        assert got == rec
        assert got.body["big"] == 2**53 and isinstance(got.body["big"], int)
        assert got.created_at == NOW + 0.123456789
        assert await store.get_doc_by_key("provision", "acme", "idem-1") == rec
        assert await store.list_docs("provision") == [rec]
        plain = make_doc(status="", body={})
        await store.insert_doc(plain)
        assert await store.get_doc("job", plain.id) == plain

    async def test_missing_docs_are_none(self, store: Store) -> None:
        rec = make_doc(key="k")
        await store.insert_doc(rec)
        assert await store.get_doc("job", "job_nope") is None
        assert await store.get_doc("model", rec.id) is None
        assert await store.get_doc_by_key("job", "globex", "k") is None
        assert await store.get_doc_by_key("model", "acme", "k") is None
        assert await store.get_doc_by_key("job", "acme", "other") is None
        assert await store.list_docs("model") == []

    async def test_a_duplicate_id_is_refused_and_the_first_kept(self, store: Store) -> None:
        first = make_doc(key="first")
        await store.insert_doc(first)
        with pytest.raises(StoreError, match="already exists"):
            await store.insert_doc(dataclasses.replace(first, tenant="globex", key="second", status="running"))
        assert await store.get_doc("job", first.id) == first
        assert await store.get_doc_by_key("job", "globex", "second") is None
        assert await store.list_docs("job", tenant="globex") == []
        assert await store.list_docs("job", statuses=["running"]) == []

    async def test_a_duplicate_key_is_refused_within_kind_and_tenant_only(self, store: Store) -> None:
        first = make_doc(key="llama-3")
        await store.insert_doc(first)
        clash = make_doc(key="llama-3", status="running")
        with pytest.raises(StoreError, match="already exists"):
            await store.insert_doc(clash)
        assert await store.get_doc("job", clash.id) is None
        assert ids(await store.list_docs("job")) == [first.id]
        assert await store.list_docs("job", statuses=["running"]) == []
        assert await store.get_doc_by_key("job", "acme", "llama-3") == first
        # The same key in another tenant or kind, and any number of docs without one.
        other_tenant = make_doc(key="llama-3", tenant="globex")
        other_kind = make_doc(kind="model", key="llama-3")
        keyless = [make_doc(), make_doc()]
        for rec in (other_tenant, other_kind, *keyless):
            await store.insert_doc(rec)
        assert await store.get_doc_by_key("job", "globex", "llama-3") == other_tenant
        assert await store.get_doc_by_key("model", "acme", "llama-3") == other_kind
        assert len(await store.list_docs("job", tenant="acme")) == 3

    async def test_kinds_never_mix(self, store: Store) -> None:
        job = make_doc(kind="job", id="shared-id", key="k", status="ready")
        model = make_doc(kind="model", id="shared-id", key="k", status="ready", body={"m": True})
        await store.insert_doc(job)
        await store.insert_doc(model)
        assert await store.get_doc("job", "shared-id") == job
        assert await store.get_doc("model", "shared-id") == model
        assert await store.list_docs("job") == [job]
        assert await store.list_docs("model", tenant="acme", statuses=["ready"]) == [model]
        assert await store.delete_doc("job", "shared-id") is True
        assert await store.get_doc("model", "shared-id") == model
        assert await store.get_doc_by_key("model", "acme", "k") == model
        assert await store.list_docs("job") == []
        assert await store.list_docs("template") == []

    async def test_update_doc_bumps_version_and_writes_status_body_and_key(self, store: Store) -> None:
        rec = make_doc(key="old")
        await store.insert_doc(rec)
        changed = dataclasses.replace(rec, status="running", body={"step": 2}, key="new", updated_at=NOW + 9)
        written = await store.update_doc(changed)
        assert written == dataclasses.replace(changed, version=rec.version + 1)
        assert await store.get_doc("job", rec.id) == written
        assert await store.get_doc_by_key("job", "acme", "new") == written
        assert await store.get_doc_by_key("job", "acme", "old") is None
        # The old key is free again; dropping a key frees it too.
        taker = make_doc(key="old")
        await store.insert_doc(taker)
        dropped = await store.update_doc(dataclasses.replace(written, key=None))
        assert dropped.version == rec.version + 2 and dropped.key is None
        assert await store.get_doc_by_key("job", "acme", "new") is None
        await store.insert_doc(make_doc(key="new"))

    async def test_update_doc_to_a_taken_key_is_refused_and_writes_nothing(self, store: Store) -> None:
        a = make_doc(key="a")
        b = make_doc(key="b")
        await store.insert_doc(a)
        await store.insert_doc(b)
        with pytest.raises(StoreError, match="already exists"):
            await store.update_doc(dataclasses.replace(b, key="a", status="running"))
        assert await store.get_doc("job", b.id) == b
        assert await store.get_doc_by_key("job", "acme", "a") == a
        assert await store.get_doc_by_key("job", "acme", "b") == b
        assert await store.list_docs("job", statuses=["running"]) == []
        # Keeping one's own key is no clash.
        assert (await store.update_doc(dataclasses.replace(a, body={"x": 1}))).key == "a"

    async def test_a_stale_version_raises_version_conflict_and_writes_nothing(self, store: Store) -> None:
        rec = make_doc(key="k")
        await store.insert_doc(rec)
        current = await store.update_doc(dataclasses.replace(rec, body={"n": 2}))
        with pytest.raises(VersionConflict):
            await store.update_doc(dataclasses.replace(rec, status="failed", key="stale"))
        assert await store.get_doc("job", rec.id) == current
        assert await store.get_doc_by_key("job", "acme", "stale") is None
        assert await store.list_docs("job", statuses=["failed"]) == []
        with pytest.raises(NotFoundError):
            await store.update_doc(make_doc())
        with pytest.raises(NotFoundError):
            await store.update_doc(dataclasses.replace(rec, kind="model"))

    async def test_tenant_and_created_at_cannot_change(self, store: Store) -> None:
        rec = make_doc(key="k")
        await store.insert_doc(rec)
        for field_name, value in (("tenant", "globex"), ("created_at", NOW + 1)):
            with pytest.raises(InvalidRequestError) as err:
                await store.update_doc(dataclasses.replace(rec, status="running", **{field_name: value}))
            assert err.value.param == field_name
        assert await store.get_doc("job", rec.id) == rec
        assert await store.list_docs("job", tenant="globex") == []

    async def test_two_writers_racing_exactly_one_wins_and_indexes_agree(self, store: Store) -> None:
        rec = make_doc(status="queued", key="k0")
        await store.insert_doc(rec)
        writers = [dataclasses.replace(rec, status=f"s{i}", key=f"k{i + 1}") for i in range(8)]
        results = await asyncio.gather(*(store.update_doc(w) for w in writers), return_exceptions=True)
        (winner,) = [r for r in results if isinstance(r, DocRecord)]
        assert all(isinstance(r, VersionConflict) for r in results if r is not winner), results
        assert await store.get_doc("job", rec.id) == winner
        for i in range(8):
            listed = await store.list_docs("job", statuses=[f"s{i}"])
            assert listed == ([winner] if winner.status == f"s{i}" else [])
            by_key = await store.get_doc_by_key("job", "acme", f"k{i + 1}")
            assert by_key == (winner if winner.key == f"k{i + 1}" else None)
        assert await store.list_docs("job", statuses=["queued"]) == []
        assert await store.get_doc_by_key("job", "acme", "k0") is None

    async def test_status_lists_follow_updates(self, store: Store) -> None:
        a = make_doc(status="queued", created_at=NOW + 1)
        b = make_doc(status="running", created_at=NOW + 2)
        c = make_doc(status="queued", created_at=NOW + 3, tenant="globex")
        for rec in (a, b, c):
            await store.insert_doc(rec)
        assert ids(await store.list_docs("job", statuses=["queued"])) == [c.id, a.id]
        assert ids(await store.list_docs("job", statuses=["queued", "running"])) == [c.id, b.id, a.id]
        assert ids(await store.list_docs("job", tenant="acme", statuses=["queued"])) == [a.id]
        await set_doc_status(store, "job", a.id, "running")
        await set_doc_status(store, "job", c.id, "done")
        assert await store.list_docs("job", statuses=["queued"]) == []
        running = await store.list_docs("job", statuses=["running"], order="oldest")
        assert ids(running) == [a.id, b.id] and running[0].status == "running"
        assert ids(await store.list_docs("job", tenant="globex", statuses={"done"})) == [c.id]
        assert await store.list_docs("job", tenant="globex", statuses=["running"]) == []
        assert await store.list_docs("job", statuses=[]) == []

    async def test_tenant_and_status_filters(self, store: Store) -> None:
        recs = [
            make_doc(tenant=tenant, status=status, created_at=NOW + i)
            for i, (tenant, status) in enumerate(
                [("acme", "queued"), ("globex", "queued"), ("acme", "done"), ("acme", "running"),
                 ("globex", "done"), ("acme", "queued")]
            )
        ]
        for rec in recs:
            await store.insert_doc(rec)

        def expect(pred: Any) -> list[str]:
            return newest_first([r for r in recs if pred(r)])

        assert ids(await store.list_docs("job")) == expect(lambda r: True)
        assert ids(await store.list_docs("job", tenant="acme")) == expect(lambda r: r.tenant == "acme")
        assert ids(await store.list_docs("job", tenant="initech")) == []
        assert ids(await store.list_docs("job", statuses=("queued", "running"))) == expect(
            lambda r: r.status in ("queued", "running")
        )
        assert ids(await store.list_docs("job", tenant="acme", statuses=["queued", "done"])) == expect(
            lambda r: r.tenant == "acme" and r.status in ("queued", "done")
        )
        oldest = await store.list_docs("job", tenant="globex", order="oldest")
        assert ids(oldest) == expect(lambda r: r.tenant == "globex")[::-1]
        assert ids(await store.list_docs("job", limit=2)) == expect(lambda r: True)[:2]
        assert await store.list_docs("job", limit=0) == []

    async def test_separators_in_tenants_statuses_and_keys_do_not_collide(self, store: Store) -> None:
        a = make_doc(tenant="a:b", status="c", key="d")
        b = make_doc(tenant="a", status="b:c", key="b:d")
        await store.insert_doc(a)
        await store.insert_doc(b)
        assert await store.get_doc_by_key("job", "a:b", "d") == a
        assert await store.get_doc_by_key("job", "a", "b:d") == b
        assert await store.get_doc_by_key("job", "a", "b:d:") is None
        assert await store.list_docs("job", tenant="a:b") == [a]
        assert await store.list_docs("job", tenant="a", statuses=["b:c"]) == [b]
        assert await store.list_docs("job", tenant="a", statuses=["c"]) == []
        assert await store.list_docs("job", tenant="a:b", statuses=["c"]) == [a]

    async def test_ties_in_created_at_are_broken_by_id(self, store: Store) -> None:
        recs = [make_doc(id=i, created_at=NOW + 0.5) for i in ("job-b", "job-a", "job-c", "job-a1")]
        recs.append(make_doc(id="job-0", created_at=NOW + 1))
        for rec in recs:
            await store.insert_doc(rec)
        assert ids(await store.list_docs("job")) == ["job-0", "job-c", "job-b", "job-a1", "job-a"]
        assert ids(await store.list_docs("job", order="oldest")) == ["job-a", "job-a1", "job-b", "job-c", "job-0"]
        assert ids(await store.list_docs("job", after="job-b")) == ["job-a1", "job-a"]
        assert ids(await store.list_docs("job", after="job-a1", order="oldest")) == ["job-b", "job-c", "job-0"]
        assert ids(await store.list_docs("job", statuses=["queued"], after="job-c", limit=2)) == ["job-b", "job-a1"]

    @pytest.mark.parametrize("order", ["newest", "oldest"])
    @pytest.mark.parametrize("filtered", [False, True], ids=["tenant", "tenant+statuses"])
    async def test_paging_gives_every_doc_once_while_docs_change_and_arrive(
        self, store: Store, order: str, filtered: bool
    ) -> None:
        # Twelve docs, three of them sharing a created_at, with another tenant's
        # and another kind's docs in between that must never show.
        offsets = [0, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 9]
        recs = [
            make_doc(created_at=NOW + off, status=("queued", "running")[i % 2], id=f"job-{(i * 7) % 12:02d}")
            for i, off in enumerate(offsets)
        ]
        for i, rec in enumerate(recs):
            await store.insert_doc(rec)
            await store.insert_doc(make_doc(tenant="globex", created_at=NOW + offsets[i]))
            await store.insert_doc(make_doc(kind="model", created_at=NOW + offsets[i]))
        done = make_doc(created_at=NOW + 4, status="done")  # outside the status filter
        await store.insert_doc(done)
        statuses = ["queued", "running"] if filtered else None
        expected = newest_first(recs if filtered else [*recs, done])
        if order == "oldest":
            expected = expected[::-1]

        seen: list[str] = []
        arrived: list[DocRecord] = []
        after: str | None = None
        for page_no in range(30):
            page = await store.list_docs(
                "job", tenant="acme", statuses=statuses, after=after, limit=3, order=order  # type: ignore[arg-type]
            )
            if not page:
                break
            seen += ids(page)
            after = page[-1].id
            # Between pages: a seen doc and an unseen one change status (within
            # the filter), and, for the first pages, a new doc arrives (newer
            # than every other).
            unseen = [i for i in expected if i not in seen]
            for doc_id in [page[0].id, *unseen[:1]]:
                cur = await store.get_doc("job", doc_id)
                assert cur is not None
                flipped = "running" if cur.status == "queued" else "queued"
                await store.update_doc(dataclasses.replace(cur, status=flipped, body={"page": page_no}))
            if page_no < 3:
                new = make_doc(created_at=NOW + 100 + page_no, status="queued")
                await store.insert_doc(new)
                arrived.append(new)
        else:
            pytest.fail(f"paging never ended: {seen}")
        # Newest first, arrivals are before the cursor and never listed; oldest
        # first, they come after everything that was there, in order.
        assert seen == (expected if order == "newest" else expected + ids(arrived))
        assert len(seen) == len(set(seen))

    async def test_a_deleted_cursor_still_works_and_an_unknown_one_is_not_found(self, store: Store) -> None:
        recs = [make_doc(created_at=NOW + i, key=f"k{i}") for i in range(5)]
        for rec in recs:
            await store.insert_doc(rec)
        page = await store.list_docs("job", limit=2)
        assert ids(page) == [recs[4].id, recs[3].id]
        assert await store.delete_doc("job", recs[3].id) is True
        # As with list_batches, the list goes on from where the cursor stood.
        assert ids(await store.list_docs("job", after=recs[3].id)) == [recs[2].id, recs[1].id, recs[0].id]
        assert ids(await store.list_docs("job", after=recs[3].id, order="oldest")) == [recs[4].id]
        with pytest.raises(NotFoundError):
            await store.list_docs("job", after="job_never")
        with pytest.raises(NotFoundError):
            await store.list_docs("model", after=recs[0].id)  # a job is no cursor for models

    async def test_delete_doc_removes_it_everywhere(self, store: Store) -> None:
        gone = make_doc(key="k", status="running", created_at=NOW + 1)
        kept = make_doc(status="running", created_at=NOW)
        await store.insert_doc(gone)
        await store.insert_doc(kept)
        assert await store.delete_doc("job", gone.id) is True
        assert await store.get_doc("job", gone.id) is None
        assert await store.get_doc_by_key("job", "acme", "k") is None
        for filters in ({}, {"tenant": "acme"}, {"statuses": ["running"]}, {"tenant": "acme", "statuses": ["running"]}):
            assert ids(await store.list_docs("job", **filters)) == [kept.id], filters
        assert await store.delete_doc("job", gone.id) is False
        assert await store.delete_doc("job", "job_never") is False
        with pytest.raises(NotFoundError):
            await store.update_doc(gone)
        # Its key and its id are free again.
        await store.insert_doc(make_doc(key="k"))
        again = dataclasses.replace(gone, created_at=NOW + 2, key=None)
        await store.insert_doc(again)
        assert await store.get_doc("job", gone.id) == again
        assert ids(await store.list_docs("job", after=gone.id)) == [
            i for i in ids(await store.list_docs("job")) if i != gone.id
        ]

    async def test_bad_records_and_arguments_are_refused_naming_the_field(self, store: Store) -> None:
        with pytest.raises(InvalidRequestError) as err:
            make_doc(kind="Jobs")
        assert err.value.param == "kind"
        with pytest.raises(InvalidRequestError) as err:
            make_doc(kind="job:x")
        assert err.value.param == "kind"
        with pytest.raises(InvalidRequestError) as err:
            make_doc(key="")
        assert err.value.param == "key"
        with pytest.raises(InvalidRequestError) as err:
            make_doc(created_at=float("nan"))
        assert err.value.param == "created_at"
        for body in ({"s": {1, 2}}, {"huge": 2**64}, {1: "non-string key"}):
            rec = make_doc(body=body)
            with pytest.raises(InvalidRequestError) as err:
                await store.insert_doc(rec)
            assert err.value.param == "body"
            assert await store.get_doc("job", rec.id) is None
        ok = make_doc()
        await store.insert_doc(ok)
        with pytest.raises(InvalidRequestError) as err:
            await store.update_doc(dataclasses.replace(ok, body={"s": {1}}))
        assert err.value.param == "body"
        assert await store.get_doc("job", ok.id) == ok
        with pytest.raises(InvalidRequestError) as err:
            await store.list_docs("job", order="desc")  # type: ignore[arg-type]
        assert err.value.param == "order"
        with pytest.raises(InvalidRequestError) as err:
            await store.list_docs("job", statuses="queued")
        assert err.value.param == "statuses"
        with pytest.raises(InvalidRequestError) as err:
            await store.list_docs("Job")
        assert err.value.param == "kind"


class StoreContract(ShardContract, WebhookDueContract, DocContract):
    """Subclass as ``TestXStore`` with a ``store`` fixture (opened, empty)."""

    # -- files -------------------------------------------------------------
    async def test_file_round_trips_every_field(self, store: Store) -> None:
        rec = make_file(expires_at=NOW + 60, status="uploaded", batch_id="batch_x", version=3, filename="dé jà.jsonl")
        await store.insert_file(rec)
        assert await store.get_file(rec.id) == rec

    async def test_missing_file_is_none(self, store: Store) -> None:
        assert await store.get_file("file-nope") is None

    async def test_list_files_newest_first_pages_with_after_cursor(self, store: Store) -> None:
        recs = [make_file() for _ in range(5)]
        for rec in recs:
            await store.insert_file(rec)
        newest_first = ids(recs)[::-1]
        assert ids(await store.list_files(tenant="acme")) == newest_first
        page1 = await store.list_files(tenant="acme", limit=2)
        page2 = await store.list_files(tenant="acme", limit=2, after=page1[-1].id)
        page3 = await store.list_files(tenant="acme", limit=2, after=page2[-1].id)
        assert ids(page1 + page2 + page3) == newest_first
        assert len(page3) == 1

    async def test_list_files_oldest_first_pages_with_after_cursor(self, store: Store) -> None:
        recs = [make_file() for _ in range(5)]
        for rec in recs:
            await store.insert_file(rec)
        page1 = await store.list_files(tenant="acme", limit=3, order="asc")
        page2 = await store.list_files(tenant="acme", limit=3, order="asc", after=page1[-1].id)
        assert ids(page1) == ids(recs)[:3]
        assert ids(page2) == ids(recs)[3:]

    async def test_list_files_limit_plus_one_tells_whether_more_exist(self, store: Store) -> None:
        recs = [make_file() for _ in range(4)]
        for rec in recs:
            await store.insert_file(rec)
        # The service asks for limit + 1 and reports has_more when it gets them all.
        first = await store.list_files(tenant="acme", limit=2 + 1)
        assert len(first) == 3  # has_more for a page of 2
        last = await store.list_files(tenant="acme", limit=2 + 1, after=first[1].id)
        assert ids(last) == ids(recs)[:2][::-1]  # only 2: no more after this page
        assert await store.list_files(tenant="acme", limit=5, after=recs[0].id) == []

    async def test_list_files_filters_by_purpose(self, store: Store) -> None:
        inputs = [make_file(purpose="batch") for _ in range(3)]
        outputs = [make_file(purpose="batch_output") for _ in range(2)]
        for rec in [inputs[0], outputs[0], inputs[1], outputs[1], inputs[2]]:
            await store.insert_file(rec)
        assert ids(await store.list_files(tenant="acme", purpose="batch_output")) == ids(outputs)[::-1]
        batch_desc = ids(inputs)[::-1]
        page1 = await store.list_files(tenant="acme", purpose="batch", limit=2)
        page2 = await store.list_files(tenant="acme", purpose="batch", limit=2, after=page1[-1].id)
        assert ids(page1 + page2) == batch_desc
        asc = await store.list_files(tenant="acme", purpose="batch", order="asc", after=inputs[0].id)
        assert ids(asc) == ids(inputs)[1:]
        assert len(await store.list_files(tenant="acme")) == 5
        assert await store.list_files(tenant="acme", purpose="fine-tune") == []

    async def test_list_files_is_tenant_scoped(self, store: Store) -> None:
        mine = make_file(tenant="acme")
        theirs = make_file(tenant="globex")
        await store.insert_file(mine)
        await store.insert_file(theirs)
        assert ids(await store.list_files(tenant="acme")) == [mine.id]
        assert ids(await store.list_files(tenant="globex", order="asc")) == [theirs.id]
        assert await store.list_files(tenant="acme", purpose="batch", after=theirs.id + "~") == [mine]
        assert await store.list_files(tenant="initech") == []

    async def test_tenant_names_with_separators_do_not_collide(self, store: Store) -> None:
        a = make_file(tenant="a:b", purpose="batch")
        b = make_file(tenant="a", purpose="b:batch")
        await store.insert_file(a)
        await store.insert_file(b)
        assert ids(await store.list_files(tenant="a:b")) == [a.id]
        assert ids(await store.list_files(tenant="a", purpose="b:batch")) == [b.id]
        assert await store.list_files(tenant="a:b", purpose="batch") == [a]
        assert await store.list_files(tenant="a", purpose="b") == []

    async def test_delete_file_removes_it_everywhere(self, store: Store) -> None:
        gone = make_file(expires_at=NOW - 10)
        kept = make_file(expires_at=NOW - 5)
        await store.insert_file(gone)
        await store.insert_file(kept)
        assert await store.delete_file(gone.id) is True
        assert await store.get_file(gone.id) is None
        assert ids(await store.list_files(tenant="acme")) == [kept.id]
        assert ids(await store.list_files(tenant="acme", purpose="batch", order="asc")) == [kept.id]
        assert ids(await store.list_expired_files(now=NOW)) == [kept.id]
        assert await store.delete_file(gone.id) is False
        assert await store.delete_file("file-never-existed") is False

    async def test_list_expired_files_returns_due_files_only(self, store: Store) -> None:
        never = make_file(expires_at=None)
        past = make_file(expires_at=NOW - 100)
        due_now = make_file(expires_at=NOW)
        future = make_file(expires_at=NOW + 1)
        other_tenant = make_file(tenant="globex", expires_at=NOW - 1)
        for rec in (never, past, due_now, future, other_tenant):
            await store.insert_file(rec)
        expired = await store.list_expired_files(now=NOW)
        assert sorted(ids(expired)) == sorted([past.id, due_now.id, other_tenant.id])
        assert all(r.expires_at is not None and r.expires_at <= NOW for r in expired)
        assert len(await store.list_expired_files(now=NOW, limit=2)) == 2
        assert await store.list_expired_files(now=NOW - 1000) == []
        assert len(await store.list_expired_files(now=NOW + 10)) == 4

    # -- batches -----------------------------------------------------------
    async def test_batch_round_trips_every_field(self, store: Store) -> None:
        rec = make_batch(
            metadata={"a.b": "dotted", "$x": "dollar", "ключ": "значение"},
            model="llama-3",
            errors=[{"code": "invalid_json", "message": "line 3", "line": 3, "param": None}],
            total=10,
            completed=7,
            failed=1,
            usage={"prompt_tokens": 2**40, "nested": {"cached": 1}},
            options={"runtime": "endpoint", "max_concurrency": 8},
            output_expires_after_s=3600,
            lease_owner="replica-1",
            lease_expires_at=1_800_000_030.5,
            lease_token=4,
            version=2,
            webhook=owing(NOW + 0.125, event="evt_rt"),
        )
        await store.insert_batch(rec)
        assert await store.get_batch(rec.id) == rec

    async def test_missing_batch_is_none(self, store: Store) -> None:
        assert await store.get_batch("batch_nope") is None

    async def test_list_batches_newest_first_with_after_cursor(self, store: Store) -> None:
        recs = [make_batch() for _ in range(5)]
        for rec in recs:
            await store.insert_batch(rec)
        newest_first = ids(recs)[::-1]
        assert ids(await store.list_batches(tenant="acme")) == newest_first
        page1 = await store.list_batches(tenant="acme", limit=3)
        page2 = await store.list_batches(tenant="acme", limit=3, after=page1[-1].id)
        assert ids(page1) == newest_first[:3]
        assert ids(page2) == newest_first[3:]
        assert await store.list_batches(tenant="acme", after=recs[0].id) == []

    async def test_list_batches_is_tenant_scoped(self, store: Store) -> None:
        mine = make_batch(tenant="acme")
        theirs = make_batch(tenant="globex")
        await store.insert_batch(mine)
        await store.insert_batch(theirs)
        assert await store.list_batches(tenant="acme") == [mine]
        assert await store.list_batches(tenant="globex") == [theirs]
        assert await store.list_batches(tenant="initech") == []

    async def test_list_active_batches_oldest_first_across_tenants(self, store: Store) -> None:
        statuses = [
            "validating", "completed", "in_progress", "failed", "finalizing", "cancelled", "cancelling", "expired"
        ]
        recs = [make_batch(status=s, tenant=f"t{i % 2}") for i, s in enumerate(statuses)]
        for rec in recs:
            await store.insert_batch(rec)
        active = [r.id for r in recs if r.status in ACTIVE_STATUSES]
        assert len(active) == 4
        assert ids(await store.list_active_batches()) == active
        assert ids(await store.list_active_batches(limit=2)) == active[:2]

    async def test_list_active_batches_follows_status_changes(self, store: Store) -> None:
        a = make_batch(status="validating")
        b = make_batch(status="completed")
        c = make_batch(status="in_progress")
        for rec in (a, b, c):
            await store.insert_batch(rec)
        assert ids(await store.list_active_batches()) == [a.id, c.id]
        await set_status(store, a.id, "in_progress")
        assert ids(await store.list_active_batches()) == [a.id, c.id]
        await set_status(store, c.id, "completed")
        assert ids(await store.list_active_batches()) == [a.id]
        await set_status(store, a.id, "cancelling")
        await set_status(store, a.id, "cancelled")
        assert await store.list_active_batches() == []
        # The store reports what is stored; it does not police transitions.
        await set_status(store, b.id, "finalizing")
        active = await store.list_active_batches()
        assert ids(active) == [b.id]
        assert active[0].status == "finalizing"

    async def test_count_active_batches_by_status(self, store: Store) -> None:
        assert await store.count_active_batches() == dict.fromkeys(ACTIVE_STATUSES, 0)
        statuses = ["validating", "in_progress", "in_progress", "completed", "failed", "cancelling", "expired"]
        recs = [make_batch(status=s, tenant=f"t{i % 3}") for i, s in enumerate(statuses)]
        for rec in recs:
            await store.insert_batch(rec)
        assert await store.count_active_batches() == {
            "validating": 1, "in_progress": 2, "finalizing": 0, "cancelling": 1,
        }
        await set_status(store, recs[1].id, "finalizing")
        await set_status(store, recs[2].id, "completed")
        await set_status(store, recs[5].id, "cancelled")
        assert await store.count_active_batches() == {
            "validating": 1, "in_progress": 0, "finalizing": 1, "cancelling": 0,
        }

    async def test_batches_reading_file_lists_active_readers_only(self, store: Store) -> None:
        r1 = make_batch(input_file_id="file-a", status="validating")
        r2 = make_batch(input_file_id="file-a", status="in_progress")
        done = make_batch(input_file_id="file-a", status="completed")
        other = make_batch(input_file_id="file-b", status="in_progress")
        for rec in (r1, r2, done, other):
            await store.insert_batch(rec)
        assert sorted(ids(await store.batches_reading_file("file-a"))) == sorted([r1.id, r2.id])
        await set_status(store, r1.id, "failed")
        assert ids(await store.batches_reading_file("file-a")) == [r2.id]
        await set_status(store, r2.id, "cancelling")
        readers = await store.batches_reading_file("file-a")
        assert ids(readers) == [r2.id]
        assert readers[0].status == "cancelling"
        await set_status(store, r2.id, "cancelled")
        assert await store.batches_reading_file("file-a") == []
        assert ids(await store.batches_reading_file("file-b")) == [other.id]
        assert await store.batches_reading_file("file-none") == []

    # -- compare-and-set ---------------------------------------------------
    async def test_update_batch_bumps_version_and_stores_the_record(self, store: Store) -> None:
        rec = make_batch()
        await store.insert_batch(rec)
        changed = dataclasses.replace(
            rec, status="in_progress", in_progress_at=NOW + 1, completed=3, metadata={"k": "v"}
        )
        written = await store.update_batch(changed)
        assert written.version == rec.version + 1
        assert written == dataclasses.replace(changed, version=rec.version + 1)
        assert await store.get_batch(rec.id) == written

    async def test_versions_increment_by_one_per_write(self, store: Store) -> None:
        rec = make_batch(version=0)
        await store.insert_batch(rec)
        for expected in range(1, 6):
            rec = await store.update_batch(dataclasses.replace(rec, completed=expected))
            assert rec.version == expected
        stored = await store.get_batch(rec.id)
        assert stored is not None and stored.version == 5 and stored.completed == 5

    async def test_stale_version_raises_version_conflict_and_writes_nothing(self, store: Store) -> None:
        rec = make_batch()
        await store.insert_batch(rec)
        current = await store.update_batch(dataclasses.replace(rec, completed=1))
        with pytest.raises(VersionConflict):
            await store.update_batch(dataclasses.replace(rec, status="failed"), checkpoint=b"stale")
        assert await store.get_batch(rec.id) == current
        assert await store.get_checkpoint(rec.id) is None

    async def test_update_of_missing_batch_raises_not_found(self, store: Store) -> None:
        with pytest.raises(NotFoundError):
            await store.update_batch(make_batch(), checkpoint=b"x")

    async def test_two_writers_racing_exactly_one_wins(self, store: Store) -> None:
        rec = make_batch(status="in_progress")
        await store.insert_batch(rec)
        read = await store.get_batch(rec.id)
        assert read is not None
        writers = [dataclasses.replace(read, completed=i, lease_owner=f"replica-{i}") for i in range(8)]
        results = await asyncio.gather(
            *(store.update_batch(w, checkpoint=f"cp-{w.lease_owner}".encode()) for w in writers),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, BatchRecord)]
        losers = [r for r in results if not isinstance(r, BatchRecord)]
        assert len(winners) == 1, results
        assert all(isinstance(e, VersionConflict) for e in losers), losers
        stored = await store.get_batch(rec.id)
        assert stored == winners[0]
        assert stored.version == read.version + 1
        assert await store.get_checkpoint(rec.id) == f"cp-{stored.lease_owner}".encode()

    async def test_racing_status_changes_keep_indexes_consistent(self, store: Store) -> None:
        rec = make_batch(status="in_progress", input_file_id="file-race")
        await store.insert_batch(rec)
        statuses = ["completed", "cancelling", "failed", "finalizing"]
        results = await asyncio.gather(
            *(store.update_batch(dataclasses.replace(rec, status=s)) for s in statuses), return_exceptions=True
        )
        (winner,) = [r for r in results if isinstance(r, BatchRecord)]
        active = winner.status in ACTIVE_STATUSES
        assert ids(await store.list_active_batches()) == ([rec.id] if active else [])
        assert ids(await store.batches_reading_file("file-race")) == ([rec.id] if active else [])

    # -- checkpoints -------------------------------------------------------
    async def test_no_checkpoint_until_one_is_written(self, store: Store) -> None:
        rec = make_batch()
        await store.insert_batch(rec)
        assert await store.get_checkpoint(rec.id) is None
        await store.update_batch(rec)
        assert await store.get_checkpoint(rec.id) is None
        assert await store.get_checkpoint("batch_unknown") is None

    @pytest.mark.parametrize(
        "blob",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"\x00" * 64, id="zero-bytes"),
            pytest.param(b"\x00\xff\x00{\"not\": json}\n\r\x00", id="binary"),
            pytest.param(os.urandom(200 * 1024), id="200KB-random"),
        ],
    )
    async def test_checkpoint_round_trips_bytes(self, store: Store, blob: bytes) -> None:
        rec = make_batch()
        await store.insert_batch(rec)
        await store.update_batch(rec, checkpoint=blob)
        got = await store.get_checkpoint(rec.id)
        assert isinstance(got, bytes)
        assert got == blob

    async def test_checkpoint_is_written_with_its_update(self, store: Store) -> None:
        rec = make_batch()
        other = make_batch()
        await store.insert_batch(rec)
        await store.insert_batch(other)
        v1 = await store.update_batch(dataclasses.replace(rec, completed=1), checkpoint=b"one")
        assert await store.get_checkpoint(rec.id) == b"one"
        v2 = await store.update_batch(dataclasses.replace(v1, completed=2), checkpoint=b"two")
        assert (await store.get_batch(rec.id)) == v2
        assert await store.get_checkpoint(rec.id) == b"two"
        # An update without a checkpoint leaves the last one alone.
        await store.update_batch(dataclasses.replace(v2, completed=3))
        assert await store.get_checkpoint(rec.id) == b"two"
        # A losing writer's checkpoint never lands.
        with pytest.raises(VersionConflict):
            await store.update_batch(v1, checkpoint=b"loser")
        assert await store.get_checkpoint(rec.id) == b"two"
        assert await store.get_checkpoint(other.id) is None
