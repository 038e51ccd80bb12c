"""In-memory record store for tests and throwaway runs (``memory://``)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Collection
from typing import Literal

import orjson

from overnight.errors import InvalidRequestError, NotFoundError, StoreError, VersionConflict
from overnight.store.base import ACTIVE_STATUSES
from overnight.store.records import (
    BatchRecord,
    DocRecord,
    FileRecord,
    ShardRecord,
    check_doc_kind,
    check_doc_order,
    check_doc_statuses,
    doc_record_from_doc,
    doc_record_json,
    webhook_due_at,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._files: dict[str, FileRecord] = {}
        self._batches: dict[str, BatchRecord] = {}
        self._checkpoints: dict[str, bytes] = {}
        self._shards: dict[tuple[str, int], ShardRecord] = {}
        self._shard_checkpoints: dict[tuple[str, int], bytes] = {}
        self._docs: dict[tuple[str, str], DocRecord] = {}
        #: (kind, tenant, key) -> id
        self._doc_keys: dict[tuple[str, str, str], str] = {}
        #: (kind, id) -> created_at of deleted docs, so a cursor naming one still works.
        self._docs_gone: dict[tuple[str, str], float] = {}

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def insert_file(self, rec: FileRecord) -> None:
        if rec.id in self._files:
            raise StoreError(f"file {rec.id} already exists")
        self._files[rec.id] = copy.deepcopy(rec)

    async def get_file(self, file_id: str) -> FileRecord | None:
        rec = self._files.get(file_id)
        return copy.deepcopy(rec) if rec else None

    async def list_files(
        self,
        *,
        tenant: str,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> list[FileRecord]:
        desc = order == "desc"
        recs = sorted((r for r in self._files.values() if r.tenant == tenant), key=lambda r: r.id, reverse=desc)
        if purpose:
            recs = [r for r in recs if r.purpose == purpose]
        if after:
            recs = [r for r in recs if (r.id < after if desc else r.id > after)]
        return copy.deepcopy(recs[:limit])

    async def delete_file(self, file_id: str) -> bool:
        return self._files.pop(file_id, None) is not None

    async def list_expired_files(self, *, now: int, limit: int = 100) -> list[FileRecord]:
        out = sorted(
            (r for r in self._files.values() if r.expires_at is not None and r.expires_at <= now),
            key=lambda r: (r.expires_at, r.id),
        )
        return copy.deepcopy(out[:limit])

    async def insert_batch(self, rec: BatchRecord) -> None:
        if rec.id in self._batches:
            raise StoreError(f"batch {rec.id} already exists")
        self._batches[rec.id] = copy.deepcopy(rec)

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        rec = self._batches.get(batch_id)
        return copy.deepcopy(rec) if rec else None

    async def list_batches(self, *, tenant: str, after: str | None = None, limit: int = 20) -> list[BatchRecord]:
        recs = sorted((r for r in self._batches.values() if r.tenant == tenant), key=lambda r: r.id, reverse=True)
        if after:
            recs = [r for r in recs if r.id < after]
        return copy.deepcopy(recs[:limit])

    async def list_active_batches(self, *, limit: int = 1000) -> list[BatchRecord]:
        recs = sorted((r for r in self._batches.values() if r.status in ACTIVE_STATUSES), key=lambda r: r.id)
        return copy.deepcopy(recs[:limit])

    async def count_active_batches(self) -> dict[str, int]:
        counts = dict.fromkeys(ACTIVE_STATUSES, 0)
        for r in self._batches.values():
            if r.status in counts:
                counts[r.status] += 1
        return counts

    async def batches_reading_file(self, file_id: str) -> list[BatchRecord]:
        return [
            copy.deepcopy(r)
            for r in self._batches.values()
            if r.input_file_id == file_id and r.status in ACTIVE_STATUSES
        ]

    async def update_batch(self, rec: BatchRecord, *, checkpoint: bytes | None = None) -> BatchRecord:
        cur = self._batches.get(rec.id)
        if cur is None:
            raise NotFoundError(f"batch {rec.id} not found")
        if cur.version != rec.version:
            raise VersionConflict(f"batch {rec.id} changed (version {cur.version} != {rec.version})")
        new = dataclasses.replace(copy.deepcopy(rec), version=rec.version + 1)
        self._batches[rec.id] = new
        if checkpoint is not None:
            self._checkpoints[rec.id] = checkpoint
        return copy.deepcopy(new)

    async def get_checkpoint(self, batch_id: str) -> bytes | None:
        return self._checkpoints.get(batch_id)

    async def list_webhooks_due(self, *, now: float, limit: int = 100) -> list[BatchRecord]:
        due = []
        for r in self._batches.values():
            at = webhook_due_at(r)
            if at is not None and at <= now:
                due.append((at, r.id, r))
        due.sort(key=lambda t: (t[0], t[1]))
        return copy.deepcopy([r for _, _, r in due[:max(limit, 0)]])

    async def insert_shard(self, rec: ShardRecord) -> None:
        if rec.key in self._shards:
            raise StoreError(f"shard {rec.index} of batch {rec.batch_id} already exists")
        self._shards[rec.key] = copy.deepcopy(rec)

    async def get_shard(self, batch_id: str, index: int) -> ShardRecord | None:
        rec = self._shards.get((batch_id, index))
        return copy.deepcopy(rec) if rec else None

    async def list_shards(self, batch_id: str) -> list[ShardRecord]:
        recs = sorted((r for r in self._shards.values() if r.batch_id == batch_id), key=lambda r: r.index)
        return copy.deepcopy(recs)

    async def update_shard(self, rec: ShardRecord, *, checkpoint: bytes | None = None) -> ShardRecord:
        cur = self._shards.get(rec.key)
        if cur is None:
            raise NotFoundError(f"shard {rec.index} of batch {rec.batch_id} not found")
        if cur.version != rec.version:
            raise VersionConflict(
                f"shard {rec.index} of batch {rec.batch_id} changed (version {cur.version} != {rec.version})"
            )
        new = dataclasses.replace(copy.deepcopy(rec), version=rec.version + 1)
        self._shards[rec.key] = new
        if checkpoint is not None:
            self._shard_checkpoints[rec.key] = checkpoint
        return copy.deepcopy(new)

    async def get_shard_checkpoint(self, batch_id: str, index: int) -> bytes | None:
        return self._shard_checkpoints.get((batch_id, index))

    async def delete_shards(self, batch_id: str) -> int:
        keys = [k for k in self._shards if k[0] == batch_id]
        for key in keys:
            del self._shards[key]
        for key in [k for k in self._shard_checkpoints if k[0] == batch_id]:
            del self._shard_checkpoints[key]
        return len(keys)

    # -- document records --------------------------------------------------
    @staticmethod
    def _copy(rec: DocRecord) -> DocRecord:
        # Through JSON, as every other store keeps it (a tuple comes back a list).
        return doc_record_from_doc(orjson.loads(doc_record_json(rec)))

    async def insert_doc(self, rec: DocRecord) -> None:
        stored = self._copy(rec)
        if (rec.kind, rec.id) in self._docs:
            raise StoreError(f"{rec.kind} {rec.id} already exists")
        if rec.key is not None and (rec.kind, rec.tenant, rec.key) in self._doc_keys:
            raise StoreError(f"{rec.kind} key {rec.key!r} already exists in tenant {rec.tenant!r}")
        self._docs[(rec.kind, rec.id)] = stored
        if rec.key is not None:
            self._doc_keys[(rec.kind, rec.tenant, rec.key)] = rec.id

    async def get_doc(self, kind: str, id: str) -> DocRecord | None:
        rec = self._docs.get((check_doc_kind(kind), id))
        return copy.deepcopy(rec) if rec else None

    async def get_doc_by_key(self, kind: str, tenant: str, key: str) -> DocRecord | None:
        doc_id = self._doc_keys.get((check_doc_kind(kind), tenant, key))
        return await self.get_doc(kind, doc_id) if doc_id is not None else None

    async def update_doc(self, rec: DocRecord) -> DocRecord:
        new = self._copy(dataclasses.replace(rec, version=rec.version + 1))
        cur = self._docs.get((rec.kind, rec.id))
        if cur is None:
            raise NotFoundError(f"{rec.kind} {rec.id} not found")
        if cur.version != rec.version:
            raise VersionConflict(f"{rec.kind} {rec.id} changed (version {cur.version} != {rec.version})")
        for name in ("tenant", "created_at"):
            if getattr(cur, name) != getattr(rec, name):
                raise InvalidRequestError(f"{rec.kind} {rec.id}: {name} cannot change after insert", param=name)
        if rec.key is not None and rec.key != cur.key and (rec.kind, rec.tenant, rec.key) in self._doc_keys:
            raise StoreError(f"{rec.kind} key {rec.key!r} already exists in tenant {rec.tenant!r}")
        if cur.key is not None:
            del self._doc_keys[(cur.kind, cur.tenant, cur.key)]
        if new.key is not None:
            self._doc_keys[(new.kind, new.tenant, new.key)] = new.id
        self._docs[(rec.kind, rec.id)] = new
        return copy.deepcopy(new)

    async def delete_doc(self, kind: str, id: str) -> bool:
        rec = self._docs.pop((check_doc_kind(kind), id), None)
        if rec is None:
            return False
        if rec.key is not None:
            del self._doc_keys[(kind, rec.tenant, rec.key)]
        self._docs_gone[(kind, id)] = rec.created_at
        return True

    async def list_docs(
        self,
        kind: str,
        *,
        tenant: str | None = None,
        statuses: Collection[str] | None = None,
        after: str | None = None,
        limit: int = 100,
        order: Literal["newest", "oldest"] = "newest",
    ) -> list[DocRecord]:
        check_doc_kind(kind)
        desc = check_doc_order(order)
        wanted = check_doc_statuses(statuses)
        if limit <= 0:
            return []
        recs = sorted(
            (
                r
                for (k, _), r in self._docs.items()
                if k == kind and (tenant is None or r.tenant == tenant) and (wanted is None or r.status in wanted)
            ),
            key=lambda r: (r.created_at, r.id),
            reverse=desc,
        )
        if after is not None:
            cur = self._docs.get((kind, after))
            at = cur.created_at if cur is not None else self._docs_gone.get((kind, after))
            if at is None:
                raise NotFoundError(f"no {kind} {after} to list after")
            pos = (at, after)
            recs = [r for r in recs if ((r.created_at, r.id) < pos if desc else (r.created_at, r.id) > pos)]
        return copy.deepcopy(recs[:limit])
