"""Shard leases, fenced shard writes and merged shard checkpoints (batches/shards.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from overnight.batches.service import LeaseLost
from overnight.batches.shards import (
    ShardBusy,
    claim_shard,
    merge_checkpoints,
    release_shard,
    renew_shard,
    update_shard,
)
from overnight.errors import ConflictError, NotFoundError
from overnight.executor.checkpoint import Checkpoint, Segment
from overnight.executor.run import Shard
from overnight.store.memory import MemoryStore
from overnight.store.records import ShardRecord
from overnight.store.sqlite import SQLiteStore

B = "batch_sharded"
T0 = 1_800_000_000.0


class InterleavingStore:
    """A memory store that yields to the event loop before and after every call, so
    racing coroutines really interleave between a read and the write after it."""

    def __init__(self) -> None:
        self._inner = MemoryStore()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            result = await attr(*args, **kwargs)
            await asyncio.sleep(0)
            return result

        return call


@pytest.fixture(params=["memory", "memory-interleaved", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "memory":
        s: Any = MemoryStore()
    elif request.param == "memory-interleaved":
        s = InterleavingStore()
    else:
        s = SQLiteStore(f"sqlite:///{tmp_path / 'overnight.db'}")
    await s.open()
    yield s
    await s.aclose()


async def claim(store: Any, holder: str, *, index: int = 0, now: float = T0, **kw: Any) -> ShardRecord:
    args: dict[str, Any] = {"count": 4, "lease_s": 30.0, "total": 25} | kw
    return await claim_shard(store, B, index, holder=holder, now=now, **args)


# -- claim ---------------------------------------------------------------------
async def test_first_claim_creates_the_shard_running_with_token_one(store: Any) -> None:
    rec = await claim(store, "pod-0", index=2)
    assert (rec.batch_id, rec.index, rec.count, rec.total) == (B, 2, 4, 25)
    assert (rec.status, rec.holder, rec.token, rec.attempts) == ("running", "pod-0", 1, 1)
    assert rec.lease_expires_at == T0 + 30.0
    assert await store.get_shard(B, 2) == rec
    assert await store.get_shard(B, 0) is None


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"count": 0}, "count"),
        ({"index": 4}, "index"),
        ({"index": -1}, "index"),
        ({"holder": ""}, "holder"),
        ({"lease_s": 0}, "lease_s"),
        ({"total": -1}, "total"),
    ],
)
async def test_bad_claim_arguments_name_the_field(store: Any, kw: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"index": 0, "count": 4, "holder": "pod", "lease_s": 30.0, "total": 1} | kw
    index = args.pop("index")
    with pytest.raises(ValueError, match=field):
        await claim_shard(store, B, index, **args)
    assert await store.list_shards(B) == []


async def test_a_live_lease_of_another_holder_is_busy(store: Any) -> None:
    held = await claim(store, "pod-a")
    with pytest.raises(ShardBusy) as err:
        await claim(store, "pod-b", now=T0 + 29.9)
    assert err.value.holder == "pod-a" and err.value.until == T0 + 30.0 and err.value.token == 1
    assert "pod-a" in str(err.value) and "shard 0 of batch" in str(err.value)
    assert await store.get_shard(B, 0) == held  # nothing written


async def test_an_expired_lease_is_taken_over_with_a_new_token(store: Any) -> None:
    await claim(store, "pod-a")
    taken = await claim(store, "pod-b", now=T0 + 30.0)
    assert (taken.holder, taken.token, taken.attempts, taken.status) == ("pod-b", 2, 2, "running")
    assert taken.lease_expires_at == T0 + 60.0
    assert await store.get_shard(B, 0) == taken


async def test_the_same_holder_claiming_again_gets_a_new_token(store: Any) -> None:
    first = await claim(store, "pod-a")
    again = await claim(store, "pod-a", now=T0 + 1)
    assert again.token == first.token + 1 and again.attempts == 2
    with pytest.raises(LeaseLost):
        await renew_shard(store, B, 0, token=first.token, lease_s=30)


async def test_a_done_shard_is_returned_unchanged_and_not_run_again(store: Any) -> None:
    rec = await claim(store, "pod-a")

    def finish(r: ShardRecord) -> ShardRecord:
        r.status, r.completed = "done", 25
        return r

    done = await update_shard(store, B, 0, finish, fence=rec.token, checkpoint=b"final")
    # Even a holder arriving long after the lease ran out gets the finished record back.
    again = await claim(store, "pod-b", now=T0 + 3600)
    assert again == done
    assert await store.get_shard(B, 0) == done
    assert await store.get_shard_checkpoint(B, 0) == b"final"


async def test_a_failed_shard_is_claimed_again_and_its_error_cleared(store: Any) -> None:
    rec = await claim(store, "pod-a")

    def fail(r: ShardRecord) -> ShardRecord:
        r.status, r.error = "failed", {"code": "engine_error", "message": "engine died"}
        return r

    await update_shard(store, B, 0, fail, fence=rec.token)
    await release_shard(store, B, 0, token=rec.token)
    retry = await claim(store, "pod-b", now=T0 + 1)
    assert (retry.status, retry.error, retry.token, retry.attempts) == ("running", None, 2, 2)


async def test_a_claim_with_another_count_is_refused(store: Any) -> None:
    await claim(store, "pod-a", count=4)
    with pytest.raises(ConflictError, match="split into 4 shards, not 8"):
        await claim(store, "pod-b", count=8, now=T0 + 3600)


async def test_claims_of_different_indexes_do_not_interfere(store: Any) -> None:
    recs = [await claim(store, f"pod-{i}", index=i) for i in range(4)]
    assert [r.token for r in recs] == [1, 1, 1, 1]
    assert [r.holder for r in await store.list_shards(B)] == ["pod-0", "pod-1", "pod-2", "pod-3"]


def reads_meet_first(store: Any, n: int) -> None:
    """The first ``n`` reads of a shard wait for each other: every racer reads the
    same state before any of them writes (the race at its worst, on any store)."""
    barrier = asyncio.Barrier(n)
    original = store.get_shard
    calls = 0

    async def get_shard(batch_id: str, index: int) -> ShardRecord | None:
        nonlocal calls
        calls += 1
        rec = await original(batch_id, index)
        if calls <= n:
            await barrier.wait()
        return rec

    store.get_shard = get_shard


async def test_racing_claims_of_a_new_shard_have_exactly_one_winner(store: Any) -> None:
    reads_meet_first(store, 8)
    results = await asyncio.gather(*(claim(store, f"pod-{i}") for i in range(8)), return_exceptions=True)
    winners = [r for r in results if isinstance(r, ShardRecord)]
    assert len(winners) == 1, results
    assert all(isinstance(r, ShardBusy) for r in results if not isinstance(r, ShardRecord)), results
    stored = await store.get_shard(B, 0)
    assert stored == winners[0] and stored.token == 1 and stored.attempts == 1


async def test_racing_takeovers_of_an_expired_shard_have_exactly_one_winner(store: Any) -> None:
    await claim(store, "pod-old")
    later = T0 + 31
    reads_meet_first(store, 8)
    results = await asyncio.gather(
        *(claim(store, f"pod-{i}", now=later) for i in range(8)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, ShardRecord)]
    assert len(winners) == 1, results
    assert all(isinstance(r, ShardBusy) for r in results if not isinstance(r, ShardRecord)), results
    stored = await store.get_shard(B, 0)
    assert stored == winners[0] and stored.token == 2 and stored.attempts == 2


# -- fenced writes ---------------------------------------------------------------
async def test_update_shard_writes_the_record_and_its_checkpoint(store: Any) -> None:
    rec = await claim(store, "pod-a")

    def progress(r: ShardRecord) -> ShardRecord:
        r.completed, r.failed, r.usage = 10, 1, {"input_tokens": 5}
        return r

    before = time.time()
    written = await update_shard(store, B, 0, progress, fence=rec.token, checkpoint=b"cp-10")
    assert (written.completed, written.failed, written.usage) == (10, 1, {"input_tokens": 5})
    assert written.version == rec.version + 1 and written.updated_at >= before
    assert await store.get_shard(B, 0) == written
    assert await store.get_shard_checkpoint(B, 0) == b"cp-10"


async def test_update_shard_mutate_returning_none_writes_nothing(store: Any) -> None:
    rec = await claim(store, "pod-a")
    assert await update_shard(store, B, 0, lambda r: None, fence=rec.token, checkpoint=b"x") == rec
    assert await store.get_shard(B, 0) == rec
    assert await store.get_shard_checkpoint(B, 0) is None


async def test_update_shard_may_not_move_the_token(store: Any) -> None:
    rec = await claim(store, "pod-a")
    with pytest.raises(ValueError, match="token"):
        await update_shard(store, B, 0, lambda r: dataclasses.replace(r, token=r.token + 5), fence=rec.token)
    assert await store.get_shard(B, 0) == rec


async def test_update_of_a_missing_shard_is_not_found(store: Any) -> None:
    with pytest.raises(NotFoundError):
        await update_shard(store, B, 3, lambda r: r, fence=1)


async def test_a_stale_token_after_a_reclaim_cannot_update_renew_or_release(store: Any) -> None:
    old = await claim(store, "pod-a")
    await update_shard(store, B, 0, lambda r: dataclasses.replace(r, completed=3), fence=old.token, checkpoint=b"a")
    new = await claim(store, "pod-b", now=T0 + 31)
    with pytest.raises(LeaseLost, match="pod-b"):
        await update_shard(
            store, B, 0, lambda r: dataclasses.replace(r, completed=99, status="done"), fence=old.token,
            checkpoint=b"stale",
        )
    with pytest.raises(LeaseLost):
        await renew_shard(store, B, 0, token=old.token, lease_s=300)
    await release_shard(store, B, 0, token=old.token)  # a no-op, not an error
    stored = await store.get_shard(B, 0)
    assert stored == new and stored.completed == 3 and stored.lease_expires_at == T0 + 61
    assert await store.get_shard_checkpoint(B, 0) == b"a"
    # The new holder continues from the checkpoint the old one left.
    await update_shard(store, B, 0, lambda r: dataclasses.replace(r, completed=4), fence=new.token, checkpoint=b"b")
    assert await store.get_shard_checkpoint(B, 0) == b"b"


async def test_a_concurrent_write_between_read_and_write_is_retried_on_the_new_record(store: Any) -> None:
    rec = await claim(store, "pod-a")
    original = store.update_shard
    seen: list[ShardRecord] = []

    async def contested(r: ShardRecord, **kw: Any) -> ShardRecord:
        if len(seen) == 1:  # another write lands between the first read and its write
            cur = await store.get_shard(B, 0)
            await original(dataclasses.replace(cur, failed=7))
        return await original(r, **kw)

    def bump(r: ShardRecord) -> ShardRecord:
        seen.append(dataclasses.replace(r))
        r.completed += 1
        return r

    store.update_shard = contested
    try:
        written = await update_shard(store, B, 0, bump, fence=rec.token, checkpoint=b"retried")
    finally:
        del store.update_shard
    assert [r.failed for r in seen] == [0, 7]  # the retry read the other write
    assert (written.completed, written.failed, written.version) == (1, 7, rec.version + 2)
    assert await store.get_shard(B, 0) == written
    assert await store.get_shard_checkpoint(B, 0) == b"retried"


async def test_renew_extends_the_lease_from_now(store: Any) -> None:
    rec = await claim(store, "pod-a", now=time.time())
    before = time.time()
    renewed = await renew_shard(store, B, 0, token=rec.token, lease_s=120)
    assert before + 120 <= renewed.lease_expires_at <= time.time() + 120
    assert renewed.token == rec.token and renewed.holder == "pod-a"
    with pytest.raises(ValueError, match="lease_s"):
        await renew_shard(store, B, 0, token=rec.token, lease_s=-1)


async def test_a_released_shard_is_claimed_at_once_by_a_replacement(store: Any) -> None:
    rec = await claim(store, "pod-a")
    with pytest.raises(ShardBusy):
        await claim(store, "pod-b", now=T0 + 1)
    await release_shard(store, B, 0, token=rec.token)
    released = await store.get_shard(B, 0)
    assert released.lease_expires_at == 0.0 and released.token == rec.token
    taken = await claim(store, "pod-b", now=T0 + 1)
    assert (taken.holder, taken.token) == ("pod-b", 2)


async def test_releasing_a_missing_shard_is_a_no_op(store: Any) -> None:
    await release_shard(store, B, 1, token=1)
    assert await store.list_shards(B) == []


# -- merge -----------------------------------------------------------------------
def shard_checkpoint(total: int, index: int, count: int, *, usage: dict[str, Any] | None = None) -> Checkpoint:
    """What shard ``index`` of ``count`` leaves after doing all its requests."""
    shard = Shard(index=index, count=count)
    cp = Checkpoint.empty(total)
    for i in range(total):
        if shard.owns(i):
            cp.done.add(i)
            if i % 5 == 0:
                cp.failed += 1
            else:
                cp.completed += 1
    cp.segments = [
        Segment("out", f"spool/{B}/shard-{index}/1-000000.out", 100 + index, cp.completed),
        Segment("err", f"spool/{B}/shard-{index}/1-000000.err", 10 + index, cp.failed),
    ]
    cp.usage = usage or {}
    cp.next_seq = 1 + index
    return cp


def usage(inp: int, out: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    u = {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
         "input_tokens_details": {"cached_tokens": cached}, "output_tokens_details": {"reasoning_tokens": reasoning}}
    return u


def test_merge_covers_the_batch_once_and_sums_everything() -> None:
    total = 23
    parts = [shard_checkpoint(total, i, 3, usage=usage(10 * (i + 1), i + 1, cached=i)) for i in range(3)]
    merged = merge_checkpoints(total, parts)
    assert merged.total == total and merged.done.count == total and merged.done.missing() == 0
    assert all(i in merged.done for i in range(total))
    assert merged.completed + merged.failed == total
    assert (merged.completed, merged.failed) == (sum(p.completed for p in parts), sum(p.failed for p in parts))
    assert [s.key for s in merged.segments] == [s.key for p in parts for s in p.segments]
    assert merged.usage["input_tokens"] == 60 and merged.usage["output_tokens"] == 6
    assert merged.usage["total_tokens"] == 66
    assert merged.usage["input_tokens_details"] == {"cached_tokens": 3}
    assert merged.next_seq == 3
    # The merged checkpoint is a valid one.
    assert Checkpoint.decode(merged.encode()).done.bits == merged.done.bits


def test_merge_of_unfinished_shards_leaves_their_undone_requests_undone() -> None:
    total = 40
    parts = [Checkpoint.empty(total) for _ in range(2)]
    for i in (0, 2, 38):
        parts[0].done.add(i)
    for i in (1, 39):
        parts[1].done.add(i)
    merged = merge_checkpoints(total, parts)
    assert {i for i in range(total) if i in merged.done} == {0, 1, 2, 38, 39}
    assert merged.done.count == 5 and merged.usage == {}


def test_merge_detects_a_request_done_by_two_shards() -> None:
    total = 30
    parts = [shard_checkpoint(total, i, 3) for i in range(3)]
    parts[2].done.add(16)  # shard 1's (16 % 3 == 1)
    with pytest.raises(ValueError, match=r"shard 2: request 16 is also done by shard 1"):
        merge_checkpoints(total, parts)


def test_merge_detects_a_segment_named_by_two_shards() -> None:
    total = 10
    parts = [shard_checkpoint(total, i, 2) for i in range(2)]
    parts[1].segments.append(parts[0].segments[0])
    with pytest.raises(ValueError, match="shard 1: segment .*shard-0.* also named by shard 0"):
        merge_checkpoints(total, parts)


def test_merge_refuses_a_part_of_another_batch_size() -> None:
    parts = [Checkpoint.empty(10), Checkpoint.empty(11)]
    with pytest.raises(ValueError, match="shard 1: .*11 requests, the batch has 10"):
        merge_checkpoints(10, parts)


def test_merge_of_no_parts_is_an_empty_checkpoint() -> None:
    merged = merge_checkpoints(9, [])
    assert merged.total == 9 and merged.done.count == 0 and merged.segments == []
