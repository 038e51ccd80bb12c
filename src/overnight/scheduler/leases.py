"""Batch leases: which replica executes a batch, for how long, with which fencing token.

A claim is a compare-and-set on the record version: of two replicas racing for a
batch, one wins and the other skips it. The token grows on every claim, and every
write an owner makes checks it (``fence=``), so a replica that lost its lease
(paused, partitioned) cannot overwrite the new owner's progress.
"""

from __future__ import annotations

import time
from typing import Any

from overnight.batches.service import LeaseLost, update_batch
from overnight.errors import NotFoundError, VersionConflict
from overnight.store.base import ACTIVE_STATUSES, Store
from overnight.store.records import BatchRecord

__all__ = ["claim_batch", "release_lease", "renew_lease", "lease_is_free"]


def lease_is_free(rec: BatchRecord, owner: str, now: float) -> bool:
    return rec.lease_owner in (None, owner) or rec.lease_expires_at <= now


async def claim_batch(store: Store, rec: BatchRecord, *, owner: str, lease_s: float) -> BatchRecord | None:
    """Try once to take ``rec``'s lease; the claimed record (new token) or None."""
    now = time.time()
    if rec.status not in ACTIVE_STATUSES or not lease_is_free(rec, owner, now):
        return None
    rec.lease_owner = owner
    rec.lease_expires_at = now + lease_s
    rec.lease_token += 1
    try:
        return await store.update_batch(rec)
    except (VersionConflict, NotFoundError):
        return None


async def renew_lease(store: Store, batch_id: str, *, token: int, lease_s: float) -> BatchRecord:
    """Extend the lease; raises ``LeaseLost`` if the token is no longer current."""

    def mutate(rec: BatchRecord) -> BatchRecord:
        rec.lease_expires_at = time.time() + lease_s
        return rec

    return await update_batch(store, batch_id, mutate, fence=token)


async def release_lease(
    store: Store, batch_id: str, *, token: int, not_before: float = 0.0, engine: dict[str, Any] | None = None
) -> None:
    """Give the lease up; with ``not_before``, no scheduler claims the batch before
    then (it is waiting for its engine). ``engine`` records its engine's state."""

    def mutate(rec: BatchRecord) -> BatchRecord:
        rec.lease_owner = None
        rec.lease_expires_at = 0.0
        rec.not_before = not_before
        if engine is not None:
            rec.engine = engine
        return rec

    try:
        await update_batch(store, batch_id, mutate, fence=token)
    except (LeaseLost, NotFoundError):
        pass
