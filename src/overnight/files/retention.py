"""Retention: delete files whose ``expires_at`` has passed (bytes and record)."""

from __future__ import annotations

import asyncio
import logging
import time

from overnight.errors import OvernightError
from overnight.storage.base import Storage
from overnight.store.base import Store

__all__ = ["sweep_expired", "run_sweeper"]

log = logging.getLogger("overnight.retention")


async def sweep_expired(*, store: Store, storage: Storage, now: int | None = None, limit: int = 500) -> int:
    """Delete expired files; a file a running batch still reads waits. Returns how many went.
    Safe on several replicas at once: both deletes are idempotent."""
    now = int(time.time()) if now is None else now
    removed = 0
    for rec in await store.list_expired_files(now=now, limit=limit):
        if await store.batches_reading_file(rec.id):
            continue
        if await store.delete_file(rec.id):
            removed += 1
        await storage.delete(rec.storage_key)
    return removed


async def run_sweeper(*, store: Store, storage: Storage, interval_s: float) -> None:
    while True:
        try:
            n = await sweep_expired(store=store, storage=storage)
            if n:
                log.info("retention: deleted %d expired files", n)
        except OvernightError as exc:
            log.warning("retention sweep failed: %s", exc)
        await asyncio.sleep(interval_s)
