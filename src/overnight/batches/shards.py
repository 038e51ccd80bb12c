"""Shards of one batch run by several pods: leases, fenced writes, merged checkpoints.

A batch sharded over N pods (a Kubernetes indexed Job) has one shard record per
index. A pod *claims* its shard: that takes the shard's lease and bumps its
fencing token. Every later write by that pod (progress, checkpoint, renewal) is
checked against the token, so when a pod is replaced (evicted, retried, paused
past its lease) the old one can never overwrite the new one's progress, and two
pods of one index never both write. The replacement resumes from the shard's
checkpoint. Stores only compare-and-set on ``version``; the lease rules are here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime

from overnight.batches.service import LeaseLost
from overnight.errors import ConflictError, NotFoundError, OvernightError, StoreError, VersionConflict
from overnight.executor.checkpoint import Bitmap, Checkpoint, Segment
from overnight.executor.usage import Usage
from overnight.store.base import Store
from overnight.store.records import ShardRecord

__all__ = [
    "ShardBusy",
    "claim_shard",
    "merge_checkpoints",
    "release_shard",
    "renew_shard",
    "update_shard",
]

#: Compare-and-set attempts before giving up on a shard that keeps changing.
_CAS_ATTEMPTS = 100


class ShardBusy(OvernightError):
    """Another holder's lease on the shard is still live: this pod must not run it
    (retry after ``until``, or give up)."""

    code = "shard_busy"

    def __init__(self, rec: ShardRecord, *, now: float) -> None:
        until = datetime.fromtimestamp(rec.lease_expires_at, UTC).isoformat(timespec="seconds")
        super().__init__(
            f"shard {rec.index} of batch {rec.batch_id} is held by {rec.holder!r} (token {rec.token}) "
            f"until {until} ({rec.lease_expires_at - now:.0f}s from now)"
        )
        self.holder = rec.holder
        self.until = rec.lease_expires_at
        self.token = rec.token


def _check_claim_args(index: int, count: int, holder: str, lease_s: float, total: int) -> None:
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"index must be in [0, count={count}), got {index}")
    if not holder:
        raise ValueError("holder must name the pod or process claiming the shard")
    if not lease_s > 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")
    if total < 0:
        raise ValueError(f"total must not be negative, got {total}")


async def claim_shard(
    store: Store,
    batch_id: str,
    index: int,
    *,
    count: int,
    holder: str,
    lease_s: float,
    total: int,
    now: float | None = None,
) -> ShardRecord:
    """Take shard ``index``'s lease for ``holder``; the claimed record (its ``token``
    fences every later write). A shard that is ``done`` comes back unchanged (the
    caller sees it is finished and runs nothing). Raises ``ShardBusy`` while another
    holder's lease is live, ``ConflictError`` if the shard was made for another
    ``count`` (the shards would not cover the batch exactly once)."""
    _check_claim_args(index, count, holder, lease_s, total)
    for _ in range(_CAS_ATTEMPTS):
        t = time.time() if now is None else now
        cur = await store.get_shard(batch_id, index)
        if cur is None:
            rec = ShardRecord(
                batch_id=batch_id,
                index=index,
                count=count,
                status="running",
                holder=holder,
                token=1,
                lease_expires_at=t + lease_s,
                attempts=1,
                total=total,
                updated_at=t,
            )
            try:
                await store.insert_shard(rec)
            except StoreError:
                # Lost the race to create it (or the store failed): read again.
                if await store.get_shard(batch_id, index) is None:
                    raise
                continue
            return rec
        if cur.count != count:
            raise ConflictError(
                f"shard {index} of batch {batch_id} belongs to a split into {cur.count} shards, not {count}",
                code="shard_count_mismatch",
            )
        if cur.status == "done":
            return cur
        if cur.holder not in (None, holder) and cur.lease_expires_at > t:
            raise ShardBusy(cur, now=t)
        taken = dataclasses.replace(
            cur,
            status="running",
            holder=holder,
            token=cur.token + 1,
            lease_expires_at=t + lease_s,
            attempts=cur.attempts + 1,
            total=total,
            error=None,
            updated_at=t,
        )
        try:
            return await store.update_shard(taken)
        except VersionConflict:
            continue
    raise ConflictError(f"shard {index} of batch {batch_id} is changing too fast to claim")


async def update_shard(
    store: Store,
    batch_id: str,
    index: int,
    mutate: Callable[[ShardRecord], ShardRecord | None],
    *,
    fence: int,
    checkpoint: bytes | None = None,
) -> ShardRecord:
    """Read-modify-write with compare-and-set, retried on conflict, only while
    ``fence`` is still the shard's token (else ``LeaseLost``). ``mutate`` gets the
    current record and returns the new one (or None to write nothing); with
    ``checkpoint``, it is stored in the same write."""
    for _ in range(_CAS_ATTEMPTS):
        cur = await store.get_shard(batch_id, index)
        if cur is None:
            raise NotFoundError(f"No shard {index} of batch {batch_id}")
        if cur.token != fence:
            raise LeaseLost(
                f"lease on shard {index} of batch {batch_id} lost (token {fence}, current {cur.token}, "
                f"held by {cur.holder!r})"
            )
        new = mutate(dataclasses.replace(cur))
        if new is None:
            return cur
        if (new.batch_id, new.index, new.token) != (cur.batch_id, cur.index, cur.token):
            raise ValueError("mutate must not change a shard's batch_id, index or token (claim_shard does)")
        new.updated_at = time.time()
        try:
            return await store.update_shard(new, checkpoint=checkpoint)
        except VersionConflict:
            continue
    raise ConflictError(f"shard {index} of batch {batch_id} is changing too fast to update")


async def renew_shard(store: Store, batch_id: str, index: int, *, token: int, lease_s: float) -> ShardRecord:
    """Extend the lease to ``lease_s`` from now; ``LeaseLost`` if ``token`` is no
    longer current (the pod must stop: another one runs the shard)."""
    if not lease_s > 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")

    def mutate(rec: ShardRecord) -> ShardRecord:
        rec.lease_expires_at = time.time() + lease_s
        return rec

    return await update_shard(store, batch_id, index, mutate, fence=token)


async def release_shard(store: Store, batch_id: str, index: int, *, token: int) -> None:
    """Give the lease back (a pod stopping), so a replacement claims at once instead
    of waiting for the lease to run out. Nothing happens if ``token`` moved on."""

    def mutate(rec: ShardRecord) -> ShardRecord:
        rec.lease_expires_at = 0.0
        return rec

    try:
        await update_shard(store, batch_id, index, mutate, fence=token)
    except (LeaseLost, NotFoundError):
        pass


def merge_checkpoints(total: int, parts: list[Checkpoint]) -> Checkpoint:
    """One checkpoint of the whole batch from its shards' (``parts[i]`` is shard
    ``i``'s): done bitmaps OR-ed, segments in shard order, counts and usage summed.
    Raises ``ValueError`` naming the shard when a part is of another batch size,
    marks a request another part already did (it would be written twice), or
    names a segment another part names."""
    done = 0
    owner_of_segment: dict[str, int] = {}
    segments: list[Segment] = []
    usage = Usage()
    any_usage = False
    completed = failed = next_seq = 0
    for i, part in enumerate(parts):
        if part.total != total or part.done.size != total:
            raise ValueError(f"shard {i}: its checkpoint covers {part.total} requests, the batch has {total}")
        bits = int.from_bytes(part.done.bits, "little")
        overlap = done & bits
        if overlap:
            request = (overlap & -overlap).bit_length() - 1
            other = next(j for j in range(i) if request in parts[j].done)
            raise ValueError(f"shard {i}: request {request} is also done by shard {other} (a duplicate)")
        done |= bits
        for seg in part.segments:
            if seg.key in owner_of_segment:
                raise ValueError(
                    f"shard {i}: segment {seg.key} is also named by shard {owner_of_segment[seg.key]}"
                )
            owner_of_segment[seg.key] = i
            segments.append(Segment(seg.kind, seg.key, seg.nbytes, seg.lines))
        completed += part.completed
        failed += part.failed
        if part.usage:
            any_usage = True
            usage.merge(part.usage)
        next_seq = max(next_seq, part.next_seq)
    bitmap = Bitmap(total, done.to_bytes((total + 7) // 8, "little"))
    return Checkpoint(
        total=total,
        done=bitmap,
        completed=completed,
        failed=failed,
        usage=usage.to_dict() if any_usage else {},
        segments=segments,
        next_seq=next_seq,
    )
