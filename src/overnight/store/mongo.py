"""MongoDB record store (``mongodb://host:27017/overnight``), on pymongo's asyncio API.

The database is the URL's path (default ``overnight``), with these collections:

- ``files``: ``{_id, tenant, purpose, expires_at, doc}``
- ``batches``: ``{_id, tenant, status, input_file_id, version, webhook_due_at, doc}``
  (``webhook_due_at``: when the batch's next webhook delivery is due, null when none)
- ``checkpoints``: ``{_id: batch_id, version, data}``
- ``shards``: ``{_id: "<batch_id>:<index>", batch_id, index, status, version, doc, checkpoint}``
- ``docs``: ``{_id: "<kind>:<id>", kind, id, tenant, status, key, created_at, version, doc}``
  (document records; ``key`` is null when the doc has none, and a partial unique
  index over the string ones makes it unique per kind and tenant)
- ``docs_gone``: ``{_id: "<kind>:<id>", created_at}``: where deleted docs stood in
  the lists, so that a cursor naming one goes on from there

``doc`` is the record as a JSON string rather than a sub-document, as in the SQL
store: user-supplied ``metadata`` keys may contain ``.`` or start with ``$``, which
MongoDB treats specially, and a string round-trips every record exactly.

Atomicity without a replica set: the batch compare-and-set is one single-document
``update_one`` filtered on ``version``, so of two racing writers exactly one wins.
The checkpoint lives in another document and is written *after* that CAS, and only
when it won. That ordering is what makes it safe:

- a writer that lost the CAS never touches the checkpoint;
- the checkpoint is only read by the batch's lease owner when it resumes, and
  every lease owner writes through this CAS, fenced by the batch's lease token,
  so a replica that lost its lease cannot get a checkpoint in;
- each checkpoint carries the batch version it was written with and only replaces
  an older one, so a slow winner cannot overwrite a newer owner's checkpoint;
- if the process dies between the two writes, the stored checkpoint is simply an
  older, consistent one: the resuming owner redoes the requests it does not list,
  and the output segments only the lost checkpoint named are never used, so no
  line is lost or written twice.

A shard keeps its checkpoint in its own document instead (``checkpoint``, never
read with the record), so the shard compare-and-set and its checkpoint are one
single-document write: atomic without the ordering argument above, and nothing
is left behind when the shard's document is deleted. The cost is MongoDB's 16 MB
document limit on a shard checkpoint (a done bitmap of a million requests is
125 KB before compression); a larger one is refused with ``StoreError``.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any, Literal

import orjson
from bson import Binary
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.errors import DocumentTooLarge, DuplicateKeyError, PyMongoError

from overnight.errors import InvalidRequestError, NotFoundError, StoreError, VersionConflict
from overnight.store.base import ACTIVE_STATUSES
from overnight.store.records import (
    BatchRecord,
    DocRecord,
    FileRecord,
    ShardRecord,
    batch_from_doc,
    check_doc_kind,
    check_doc_order,
    check_doc_statuses,
    doc_record_from_doc,
    doc_record_json,
    file_from_doc,
    record_to_doc,
    shard_from_doc,
    webhook_due_at,
)

__all__ = ["MongoStore", "DEFAULT_DATABASE"]

DEFAULT_DATABASE = "overnight"

#: collection -> [(index name, keys)], created (idempotently) by ``open()``.
_INDEXES: dict[str, list[tuple[str, list[tuple[str, int]]]]] = {
    "files": [
        ("tenant_id", [("tenant", ASCENDING), ("_id", ASCENDING)]),
        ("tenant_purpose_id", [("tenant", ASCENDING), ("purpose", ASCENDING), ("_id", ASCENDING)]),
        ("expires_at", [("expires_at", ASCENDING)]),
    ],
    "batches": [
        ("tenant_id", [("tenant", ASCENDING), ("_id", ASCENDING)]),
        ("status_id", [("status", ASCENDING), ("_id", ASCENDING)]),
        ("input_file_id_status", [("input_file_id", ASCENDING), ("status", ASCENDING)]),
        ("webhook_due_at", [("webhook_due_at", ASCENDING)]),
    ],
    "shards": [
        ("batch_id_index", [("batch_id", ASCENDING), ("index", ASCENDING)]),
    ],
    # One per list shape, each ending in (created_at, id): a page is one index range.
    "docs": [
        ("kind_created_id", [("kind", ASCENDING), ("created_at", ASCENDING), ("id", ASCENDING)]),
        (
            "kind_tenant_created_id",
            [("kind", ASCENDING), ("tenant", ASCENDING), ("created_at", ASCENDING), ("id", ASCENDING)],
        ),
        (
            "kind_status_created_id",
            [("kind", ASCENDING), ("status", ASCENDING), ("created_at", ASCENDING), ("id", ASCENDING)],
        ),
        (
            "kind_tenant_status_created_id",
            [
                ("kind", ASCENDING),
                ("tenant", ASCENDING),
                ("status", ASCENDING),
                ("created_at", ASCENDING),
                ("id", ASCENDING),
            ],
        ),
    ],
}

#: A doc's key is unique per (kind, tenant) among the docs that have one.
_DOC_KEY_INDEX = (
    "kind_tenant_key",
    [("kind", ASCENDING), ("tenant", ASCENDING), ("key", ASCENDING)],
    {"unique": True, "partialFilterExpression": {"key": {"$type": "string"}}},
)

_DOC_ONLY = {"doc": 1, "_id": 0}


def _dumps(rec: FileRecord | BatchRecord | ShardRecord) -> str:
    return orjson.dumps(record_to_doc(rec)).decode()


@asynccontextmanager
async def _translated(what: str) -> AsyncIterator[None]:
    try:
        yield
    except DuplicateKeyError as exc:
        raise StoreError(f"mongodb store: {what}: record already exists") from exc
    except PyMongoError as exc:
        raise StoreError(f"mongodb store: {what} failed: {exc}") from exc


class MongoStore:
    """Records in MongoDB; works on a standalone server (no transactions needed).
    Extra keyword arguments go to ``pymongo.AsyncMongoClient``."""

    def __init__(self, url: str, **client_kwargs: Any) -> None:
        self.url = url
        self._client_kwargs = client_kwargs
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._db: Any = None

    # -- lifecycle ---------------------------------------------------------
    async def open(self) -> None:
        try:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(self.url, **self._client_kwargs)
        except (PyMongoError, ValueError) as exc:
            raise StoreError(f"bad MongoDB URL: {exc}") from exc
        try:
            db = client.get_default_database(default=DEFAULT_DATABASE)
            async with _translated("connecting"):
                await db.command("ping")
                for collection, indexes in _INDEXES.items():
                    for name, keys in indexes:
                        await db[collection].create_index(keys, name=name)
                key_name, key_keys, key_options = _DOC_KEY_INDEX
                await db["docs"].create_index(key_keys, name=key_name, **key_options)
        except BaseException:
            await client.close()
            raise
        self._client, self._db = client, db

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client, self._db = self._client, None, None
            await client.close()

    @property
    def database_name(self) -> str:
        return self._require().name

    def _require(self) -> Any:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    @property
    def _files(self) -> Any:
        return self._require()["files"]

    @property
    def _batches(self) -> Any:
        return self._require()["batches"]

    @property
    def _checkpoints(self) -> Any:
        return self._require()["checkpoints"]

    @property
    def _shards(self) -> Any:
        return self._require()["shards"]

    @property
    def _doc_coll(self) -> Any:
        return self._require()["docs"]

    @property
    def _docs_gone(self) -> Any:
        return self._require()["docs_gone"]

    @staticmethod
    async def _docs(cursor: Any) -> list[dict[str, Any]]:
        return [orjson.loads(row["doc"]) async for row in cursor]

    # -- files -------------------------------------------------------------
    async def insert_file(self, rec: FileRecord) -> None:
        async with _translated(f"insert_file {rec.id}"):
            await self._files.insert_one(
                {
                    "_id": rec.id,
                    "tenant": rec.tenant,
                    "purpose": rec.purpose,
                    "expires_at": rec.expires_at,
                    "doc": _dumps(rec),
                }
            )

    async def get_file(self, file_id: str) -> FileRecord | None:
        async with _translated("get_file"):
            row = await self._files.find_one({"_id": file_id}, _DOC_ONLY)
        return file_from_doc(orjson.loads(row["doc"])) if row else None

    async def list_files(
        self,
        *,
        tenant: str,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> list[FileRecord]:
        if limit <= 0:
            return []
        query: dict[str, Any] = {"tenant": tenant}
        if purpose:
            query["purpose"] = purpose
        if after:
            query["_id"] = {"$lt" if order == "desc" else "$gt": after}
        direction = DESCENDING if order == "desc" else ASCENDING
        async with _translated("list_files"):
            docs = await self._docs(self._files.find(query, _DOC_ONLY).sort("_id", direction).limit(limit))
        return [file_from_doc(d) for d in docs]

    async def delete_file(self, file_id: str) -> bool:
        async with _translated("delete_file"):
            res = await self._files.delete_one({"_id": file_id})
        return res.deleted_count > 0

    async def list_expired_files(self, *, now: int, limit: int = 100) -> list[FileRecord]:
        if limit <= 0:
            return []
        query = {"expires_at": {"$ne": None, "$lte": now}}
        async with _translated("list_expired_files"):
            cursor = self._files.find(query, _DOC_ONLY).sort([("expires_at", ASCENDING), ("_id", ASCENDING)])
            docs = await self._docs(cursor.limit(limit))
        return [file_from_doc(d) for d in docs]

    # -- batches -----------------------------------------------------------
    async def insert_batch(self, rec: BatchRecord) -> None:
        async with _translated(f"insert_batch {rec.id}"):
            await self._batches.insert_one(
                {
                    "_id": rec.id,
                    "tenant": rec.tenant,
                    "status": rec.status,
                    "input_file_id": rec.input_file_id,
                    "version": rec.version,
                    "webhook_due_at": webhook_due_at(rec),
                    "doc": _dumps(rec),
                }
            )

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        async with _translated("get_batch"):
            row = await self._batches.find_one({"_id": batch_id}, _DOC_ONLY)
        return batch_from_doc(orjson.loads(row["doc"])) if row else None

    async def list_batches(self, *, tenant: str, after: str | None = None, limit: int = 20) -> list[BatchRecord]:
        if limit <= 0:
            return []
        query: dict[str, Any] = {"tenant": tenant}
        if after:
            query["_id"] = {"$lt": after}
        async with _translated("list_batches"):
            docs = await self._docs(self._batches.find(query, _DOC_ONLY).sort("_id", DESCENDING).limit(limit))
        return [batch_from_doc(d) for d in docs]

    async def list_active_batches(self, *, limit: int = 1000) -> list[BatchRecord]:
        if limit <= 0:
            return []
        query = {"status": {"$in": list(ACTIVE_STATUSES)}}
        async with _translated("list_active_batches"):
            docs = await self._docs(self._batches.find(query, _DOC_ONLY).sort("_id", ASCENDING).limit(limit))
        return [batch_from_doc(d) for d in docs]

    async def count_active_batches(self) -> dict[str, int]:
        counts = dict.fromkeys(ACTIVE_STATUSES, 0)
        async with _translated("count_active_batches"):
            for status in ACTIVE_STATUSES:  # one indexed count each (the status_id index)
                counts[status] = await self._batches.count_documents({"status": status})
        return counts

    async def batches_reading_file(self, file_id: str) -> list[BatchRecord]:
        query = {"input_file_id": file_id, "status": {"$in": list(ACTIVE_STATUSES)}}
        async with _translated("batches_reading_file"):
            docs = await self._docs(self._batches.find(query, _DOC_ONLY).sort("_id", ASCENDING))
        return [batch_from_doc(d) for d in docs]

    async def update_batch(self, rec: BatchRecord, *, checkpoint: bytes | None = None) -> BatchRecord:
        new = dataclasses.replace(rec, version=rec.version + 1)
        async with _translated("update_batch"):
            res = await self._batches.update_one(
                {"_id": rec.id, "version": rec.version},
                {"$set": {"status": new.status, "version": new.version,
                          "webhook_due_at": webhook_due_at(new), "doc": _dumps(new)}},
            )
            if res.matched_count == 0:
                stored = await self._batches.find_one({"_id": rec.id}, {"version": 1})
                if stored is None:
                    raise NotFoundError(f"batch {rec.id} not found")
                raise VersionConflict(f"batch {rec.id} changed (version {stored['version']} != {rec.version})")
        if checkpoint is not None:
            await self._store_checkpoint(rec.id, new.version, checkpoint)
        return new

    async def _store_checkpoint(self, batch_id: str, version: int, data: bytes) -> None:
        """Write the checkpoint of batch ``version`` unless a later one is already stored."""
        try:
            await self._checkpoints.update_one(
                {"_id": batch_id, "version": {"$lt": version}},
                {"$set": {"version": version, "data": Binary(data)}},
                upsert=True,
            )
        except DuplicateKeyError:
            # The filter missed because a newer version's checkpoint is there (so the
            # upsert tried to insert a second document): keep the newer one.
            return
        except PyMongoError as exc:
            raise StoreError(f"mongodb store: storing the checkpoint of {batch_id} failed: {exc}") from exc

    async def get_checkpoint(self, batch_id: str) -> bytes | None:
        async with _translated("get_checkpoint"):
            row = await self._checkpoints.find_one({"_id": batch_id}, {"data": 1})
        return bytes(row["data"]) if row else None

    async def list_webhooks_due(self, *, now: float, limit: int = 100) -> list[BatchRecord]:
        if limit <= 0:
            return []
        # Documents written before the field existed lack it: they owe nothing.
        query = {"webhook_due_at": {"$ne": None, "$lte": float(now)}}
        async with _translated("list_webhooks_due"):
            cursor = self._batches.find(query, _DOC_ONLY).sort([("webhook_due_at", ASCENDING), ("_id", ASCENDING)])
            docs = await self._docs(cursor.limit(limit))
        recs = (batch_from_doc(d) for d in docs)
        return [r for r in recs if (due := webhook_due_at(r)) is not None and due <= now]

    # -- shards ------------------------------------------------------------
    @staticmethod
    def _shard_id(batch_id: str, index: int) -> str:
        # The index is digits after the last ':', so no two (batch, index) pairs
        # share an id whatever the batch id holds.
        return f"{batch_id}:{index}"

    async def insert_shard(self, rec: ShardRecord) -> None:
        async with _translated(f"insert_shard {rec.index} of {rec.batch_id}"):
            await self._shards.insert_one(
                {
                    "_id": self._shard_id(rec.batch_id, rec.index),
                    "batch_id": rec.batch_id,
                    "index": rec.index,
                    "status": rec.status,
                    "version": rec.version,
                    "doc": _dumps(rec),
                }
            )

    async def get_shard(self, batch_id: str, index: int) -> ShardRecord | None:
        async with _translated("get_shard"):
            row = await self._shards.find_one({"_id": self._shard_id(batch_id, index)}, _DOC_ONLY)
        return shard_from_doc(orjson.loads(row["doc"])) if row else None

    async def list_shards(self, batch_id: str) -> list[ShardRecord]:
        async with _translated("list_shards"):
            docs = await self._docs(self._shards.find({"batch_id": batch_id}, _DOC_ONLY).sort("index", ASCENDING))
        return [shard_from_doc(d) for d in docs]

    async def update_shard(self, rec: ShardRecord, *, checkpoint: bytes | None = None) -> ShardRecord:
        new = dataclasses.replace(rec, version=rec.version + 1)
        changes: dict[str, Any] = {"status": new.status, "version": new.version, "doc": _dumps(new)}
        if checkpoint is not None:
            changes["checkpoint"] = Binary(checkpoint)
        shard_id = self._shard_id(rec.batch_id, rec.index)
        async with _translated("update_shard"):
            try:
                res = await self._shards.update_one({"_id": shard_id, "version": rec.version}, {"$set": changes})
            except DocumentTooLarge as exc:
                raise StoreError(
                    f"mongodb store: the checkpoint of shard {rec.index} of batch {rec.batch_id} "
                    f"({len(checkpoint or b'')} bytes) is over MongoDB's document limit: {exc}"
                ) from exc
            if res.matched_count == 0:
                stored = await self._shards.find_one({"_id": shard_id}, {"version": 1})
                if stored is None:
                    raise NotFoundError(f"shard {rec.index} of batch {rec.batch_id} not found")
                raise VersionConflict(
                    f"shard {rec.index} of batch {rec.batch_id} changed (version {stored['version']} != {rec.version})"
                )
        return new

    async def get_shard_checkpoint(self, batch_id: str, index: int) -> bytes | None:
        async with _translated("get_shard_checkpoint"):
            row = await self._shards.find_one({"_id": self._shard_id(batch_id, index)}, {"checkpoint": 1})
        return bytes(row["checkpoint"]) if row and row.get("checkpoint") is not None else None

    async def delete_shards(self, batch_id: str) -> int:
        async with _translated("delete_shards"):
            res = await self._shards.delete_many({"batch_id": batch_id})
        return int(res.deleted_count)

    # -- document records --------------------------------------------------
    @staticmethod
    def _doc_id(kind: str, doc_id: str) -> str:
        # A kind never holds ':' (``check_doc_kind``), so no two (kind, id) pairs share one.
        return f"{kind}:{doc_id}"

    async def insert_doc(self, rec: DocRecord) -> None:
        data = doc_record_json(rec).decode()
        row = {
            "_id": self._doc_id(rec.kind, rec.id),
            "kind": rec.kind,
            "id": rec.id,
            "tenant": rec.tenant,
            "status": rec.status,
            "key": rec.key,
            "created_at": rec.created_at,
            "version": rec.version,
            "doc": data,
        }
        try:
            await self._doc_coll.insert_one(row)
        except DuplicateKeyError:
            if await self._doc_coll.find_one({"_id": row["_id"]}, {"_id": 1}) is not None:
                raise StoreError(f"{rec.kind} {rec.id} already exists") from None
            raise StoreError(f"{rec.kind} key {rec.key!r} already exists in tenant {rec.tenant!r}") from None
        except PyMongoError as exc:
            raise StoreError(f"mongodb store: insert_doc failed: {exc}") from exc

    async def get_doc(self, kind: str, id: str) -> DocRecord | None:
        async with _translated("get_doc"):
            row = await self._doc_coll.find_one({"_id": self._doc_id(check_doc_kind(kind), id)}, _DOC_ONLY)
        return doc_record_from_doc(orjson.loads(row["doc"])) if row else None

    async def get_doc_by_key(self, kind: str, tenant: str, key: str) -> DocRecord | None:
        query = {"kind": check_doc_kind(kind), "tenant": tenant, "key": key}
        async with _translated("get_doc_by_key"):
            row = await self._doc_coll.find_one(query, _DOC_ONLY)
        return doc_record_from_doc(orjson.loads(row["doc"])) if row else None

    async def update_doc(self, rec: DocRecord) -> DocRecord:
        new = dataclasses.replace(rec, version=rec.version + 1)
        data = doc_record_json(new).decode()
        doc_id = self._doc_id(rec.kind, rec.id)
        try:
            res = await self._doc_coll.update_one(
                {"_id": doc_id, "version": rec.version, "tenant": rec.tenant, "created_at": rec.created_at},
                {"$set": {"status": new.status, "key": new.key, "version": new.version, "doc": data}},
            )
            if res.matched_count == 1:
                return new
            stored = await self._doc_coll.find_one({"_id": doc_id}, {"version": 1, "tenant": 1})
        except DuplicateKeyError:
            raise StoreError(f"{rec.kind} key {rec.key!r} already exists in tenant {rec.tenant!r}") from None
        except PyMongoError as exc:
            raise StoreError(f"mongodb store: update_doc failed: {exc}") from exc
        if stored is None:
            raise NotFoundError(f"{rec.kind} {rec.id} not found")
        if stored["version"] != rec.version:
            raise VersionConflict(f"{rec.kind} {rec.id} changed (version {stored['version']} != {rec.version})")
        name = "tenant" if stored["tenant"] != rec.tenant else "created_at"
        raise InvalidRequestError(f"{rec.kind} {rec.id}: {name} cannot change after insert", param=name)

    async def delete_doc(self, kind: str, id: str) -> bool:
        doc_id = self._doc_id(check_doc_kind(kind), id)
        async with _translated("delete_doc"):
            row = await self._doc_coll.find_one({"_id": doc_id}, {"created_at": 1})
            if row is None:
                return False
            # Where it stood first, then the doc: a crash between the two leaves the
            # doc in place (a live doc's position wins), never a cursor with no position.
            await self._docs_gone.update_one(
                {"_id": doc_id}, {"$set": {"created_at": row["created_at"]}}, upsert=True
            )
            res = await self._doc_coll.delete_one({"_id": doc_id})
        return res.deleted_count > 0

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
        if limit <= 0 or wanted == []:
            return []
        base: dict[str, Any] = {"kind": kind}
        if tenant is not None:
            base["tenant"] = tenant
        direction = DESCENDING if desc else ASCENDING
        sort = [("created_at", direction), ("id", direction)]
        async with _translated("list_docs"):
            at = await self._doc_position(kind, after) if after is not None else None
            # Each status is its own index range (an $in would have to sort the
            # ranges together), and the cursor splits each into two ranges: the ties
            # at the cursor's created_at past its id, then everything past that
            # created_at. Every range is read in index order, ``limit`` at most.
            queries: list[list[dict[str, Any]]] = []
            for status in wanted if wanted is not None else [None]:
                query = dict(base) if status is None else {**base, "status": status}
                if at is None:
                    queries.append([query])
                else:
                    past = "$lt" if desc else "$gt"
                    queries.append(
                        [{**query, "created_at": at, "id": {past: after}}, {**query, "created_at": {past: at}}]
                    )
            per_status: list[list[dict[str, Any]]] = []
            for ranges in queries:
                rows: list[dict[str, Any]] = []
                for query in ranges:
                    want = limit - len(rows)
                    if want <= 0:
                        break
                    cursor = self._doc_coll.find(query, {"doc": 1, "created_at": 1, "id": 1, "_id": 0})
                    rows += [row async for row in cursor.sort(sort).limit(want)]
                per_status.append(rows)
        merged = heapq.merge(*per_status, key=lambda r: (r["created_at"], r["id"]), reverse=desc)
        return [doc_record_from_doc(orjson.loads(r["doc"])) for _, r in zip(range(limit), merged)]

    async def _doc_position(self, kind: str, doc_id: str) -> float:
        """The created_at of the cursor doc, live or deleted."""
        key = self._doc_id(kind, doc_id)
        row = await self._doc_coll.find_one({"_id": key}, {"created_at": 1})
        if row is None:
            row = await self._docs_gone.find_one({"_id": key}, {"created_at": 1})
        if row is None:
            raise NotFoundError(f"no {kind} {doc_id} to list after")
        return float(row["created_at"])
