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

from overnight.errors import NotFoundError, StoreError, VersionConflict
from overnight.ids import new_id
from overnight.store import ACTIVE_STATUSES, BatchRecord, FileRecord, ShardRecord, Store

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


class StoreContract(ShardContract, WebhookDueContract):
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
