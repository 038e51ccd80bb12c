"""Redis record store (``redis://host:6379/0?prefix=overnight:``, ``rediss://`` for TLS).

Records are JSON documents in hashes, next to the few fields the indexes need.
Lists read sorted sets whose members are ids with score 0, so they come back in
lexicographic = creation order and ``after`` cursors are ``ZRANGEBYLEX`` bounds: no
``KEYS``/``SCAN`` on the serving path. Every write that touches more than one key
is a Lua script, so a record and its indexes change together or not at all, and
the batch compare-and-set and its checkpoint are one atomic step; shards the same.
Document records are listed by (created_at, id): their index members are the
created_at as 16 sortable hex digits followed by the id, so the same lexicographic
ranges serve them.
"""

from __future__ import annotations

import dataclasses
import heapq
import struct
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

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

__all__ = ["RedisStore", "DEFAULT_PREFIX"]

DEFAULT_PREFIX = "overnight:"

# -- keys ------------------------------------------------------------------
# Every key starts with the prefix. Parts that come from outside (tenants,
# purposes, ids) are percent-encoded, so a ':' inside one can never make two
# keys collide. Each script is handed every key it touches in KEYS.
#
#   file:{file_id}                       hash    doc (record JSON), tenant, purpose, expires_at ('' = never)
#   files:{tenant}                       zset    the tenant's file ids, score 0 (ordered by id)
#   files-by-purpose:{tenant}:{purpose}  zset    the same, for one purpose (the purpose filter)
#   files-expiry                         zset    ids of files that expire, scored by expires_at
#   batch:{batch_id}                     hash    doc (record JSON), version, status, tenant, input_file_id
#   batches:{tenant}                     zset    the tenant's batch ids, score 0 (ordered by id)
#   batches-active:{status}              zset    ids of batches in that active status, score 0
#   batches-reading:{file_id}            set     ids of active batches whose input is file_id
#   batches-webhook-due                  zset    ids of batches owing a webhook delivery, scored by when
#   checkpoint:{batch_id}                string  the batch's checkpoint bytes
#   shard:{batch_id}:{index}             hash    doc (record JSON), version, status
#   shard-checkpoint:{batch_id}:{index}  string  the shard's checkpoint bytes
#   shards:{batch_id}                    zset    the batch's shard indexes, scored by index
#   doc:{kind}:{id}                      hash    doc (record JSON), version, status, tenant, key ('' = none),
#                                                pos (its index member)
#   docs:{kind}                          zset    the kind's docs, score 0, members pos = created_at + id
#   docs-of-tenant:{kind}:{tenant}       zset    the same, for one tenant
#   docs-in-status:{kind}:{status}       zset    the same, for one status
#   docs-of-tenant-in-status:{kind}:{tenant}:{status}   zset   both filters at once
#   doc-key:{kind}:{tenant}:{key}        string  the id of the doc that has that key
#   doc-gone:{kind}:{id}                 string  pos of a deleted doc, so a cursor naming it goes on
#
# The by-status and by-input indexes hold active batches only, so they stay as
# small as the work in flight even though batch records are kept for good. A
# batch's shards are found through ``shards:{batch_id}`` (lists, deletes), never
# by a key scan.
_FILE = "file:{}"
_FILES_OF_TENANT = "files:{}"
_FILES_OF_PURPOSE = "files-by-purpose:{}:{}"
_FILES_EXPIRY = "files-expiry"
_BATCH = "batch:{}"
_BATCHES_OF_TENANT = "batches:{}"
_BATCHES_ACTIVE = "batches-active:{}"
_BATCHES_READING = "batches-reading:{}"
_BATCHES_WEBHOOK_DUE = "batches-webhook-due"
_CHECKPOINT = "checkpoint:{}"
_SHARD = "shard:{}:{}"
_SHARD_CHECKPOINT = "shard-checkpoint:{}:{}"
_SHARDS_OF_BATCH = "shards:{}"
_DOC = "doc:{}:{}"
_DOCS = "docs:{}"
_DOCS_OF_TENANT = "docs-of-tenant:{}:{}"
_DOCS_IN_STATUS = "docs-in-status:{}:{}"
_DOCS_OF_TENANT_IN_STATUS = "docs-of-tenant-in-status:{}:{}:{}"
_DOC_KEY = "doc-key:{}:{}:{}"
_DOC_GONE = "doc-gone:{}:{}"

# -- scripts ---------------------------------------------------------------
# KEYS: file, files:{tenant}, files-by-purpose, files-expiry
# ARGV: id, doc, tenant, purpose, expires_at ('' = never)
_INSERT_FILE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'tenant', ARGV[3], 'purpose', ARGV[4], 'expires_at', ARGV[5])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1]) end
return 1
"""

# KEYS: file, files:{tenant}, files-by-purpose, files-expiry
# ARGV: id
_DELETE_FILE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""

# KEYS: batch, batches:{tenant}, batches-reading:{input}, batches-webhook-due,
#       batches-active:{s} per active status
# ARGV: id, tenant, status, input_file_id, version, doc, webhook due ('' = none),
#       the active statuses (same order)
_INSERT_BATCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'doc', ARGV[6], 'version', ARGV[5], 'status', ARGV[3],
           'tenant', ARGV[2], 'input_file_id', ARGV[4])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[4], ARGV[7], ARGV[1]) end
for i = 8, #ARGV do
  if ARGV[i] == ARGV[3] then
    redis.call('ZADD', KEYS[i - 3], 0, ARGV[1])
    redis.call('SADD', KEYS[3], ARGV[1])
  end
end
return 1
"""

# The compare-and-set. Returns {1} when written, {0} when the batch does not exist,
# {-1, stored_version} when another writer got there first (nothing is written).
# KEYS: batch, checkpoint, batches-reading:{input}, batches-webhook-due,
#       batches-active:{s} per active status
# ARGV: id, expected version, new version, new status, doc, '1' to write the
#       checkpoint (else '0'), checkpoint bytes, webhook due ('' = none), the
#       active statuses (same order)
_UPDATE_BATCH = """
local stored = redis.call('HGET', KEYS[1], 'version')
if not stored then return {0} end
if stored ~= ARGV[2] then return {-1, stored} end
local old = redis.call('HGET', KEYS[1], 'status')
local new = ARGV[4]
redis.call('HSET', KEYS[1], 'doc', ARGV[5], 'version', ARGV[3], 'status', new)
if ARGV[8] == '' then
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  redis.call('ZADD', KEYS[4], ARGV[8], ARGV[1])
end
local active = false
for i = 9, #ARGV do
  if ARGV[i] == new then
    redis.call('ZADD', KEYS[i - 4], 0, ARGV[1])
    active = true
  elseif ARGV[i] == old then
    redis.call('ZREM', KEYS[i - 4], ARGV[1])
  end
end
if active then
  redis.call('SADD', KEYS[3], ARGV[1])
else
  redis.call('SREM', KEYS[3], ARGV[1])
end
if ARGV[6] == '1' then redis.call('SET', KEYS[2], ARGV[7]) end
return {1}
"""

# KEYS: shard, shards:{batch}
# ARGV: index, doc, version, status
_INSERT_SHARD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'version', ARGV[3], 'status', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1])
return 1
"""

# The shard compare-and-set, as _UPDATE_BATCH: {1} written, {0} no such shard,
# {-1, stored_version} lost to another writer (nothing is written).
# KEYS: shard, shard-checkpoint
# ARGV: expected version, new version, new status, doc, '1' to write the
#       checkpoint (else '0'), checkpoint bytes
_UPDATE_SHARD = """
local stored = redis.call('HGET', KEYS[1], 'version')
if not stored then return {0} end
if stored ~= ARGV[1] then return {-1, stored} end
redis.call('HSET', KEYS[1], 'doc', ARGV[4], 'version', ARGV[2], 'status', ARGV[3])
if ARGV[5] == '1' then redis.call('SET', KEYS[2], ARGV[6]) end
return {1}
"""

# Deletes the shards the caller read from the index, if the index still lists
# exactly those (else -1 and nothing is deleted: a shard came or went; read again).
# KEYS: shards:{batch}, then shard and shard-checkpoint per index (same order as ARGV)
# ARGV: the indexes, in the index's order
_DELETE_SHARDS = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
if #members ~= #ARGV then return -1 end
for i = 1, #ARGV do
  if members[i] ~= ARGV[i] then return -1 end
end
local deleted = 0
for i = 2, #KEYS, 2 do
  deleted = deleted + redis.call('DEL', KEYS[i])
  redis.call('DEL', KEYS[i + 1])
end
redis.call('DEL', KEYS[1])
return deleted
"""

# -- document records --------------------------------------------------------
# Returns 1 inserted, 0 the id exists, -1 the key is taken (nothing is written).
# KEYS: doc, docs, docs-of-tenant, docs-in-status, docs-of-tenant-in-status,
#       doc-key (any key when the doc has none: not touched)
# ARGV: pos, doc, version, status, tenant, key ('' = none), id
_INSERT_DOC = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[6] ~= '' then
  if redis.call('EXISTS', KEYS[6]) == 1 then return -1 end
  redis.call('SET', KEYS[6], ARGV[7])
end
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'version', ARGV[3], 'status', ARGV[4], 'tenant', ARGV[5],
           'key', ARGV[6], 'pos', ARGV[1])
for i = 2, 5 do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
return 1
"""

# The doc compare-and-set. {1} written; {0} no such doc; {-1, stored version} lost
# to another writer; {-2} the status or key the caller read is no longer the
# stored one (read again); {-3, field} tenant or created_at differ from the
# stored ones; {-4} the new key is another doc's. Only {1} writes anything.
# KEYS: doc, old docs-in-status, old docs-of-tenant-in-status, new docs-in-status,
#       new docs-of-tenant-in-status, old doc-key, new doc-key (any key for none)
# ARGV: expected version, new version, new status, doc, old status, old key,
#       new key ('' = none), tenant, pos, id
_UPDATE_DOC = """
local cur = redis.call('HMGET', KEYS[1], 'version', 'status', 'key', 'tenant', 'pos')
if not cur[1] then return {0} end
if cur[1] ~= ARGV[1] then return {-1, cur[1]} end
if cur[4] ~= ARGV[8] then return {-3, 'tenant'} end
if cur[5] ~= ARGV[9] then return {-3, 'created_at'} end
if cur[2] ~= ARGV[5] or cur[3] ~= ARGV[6] then return {-2} end
if ARGV[7] ~= '' and ARGV[7] ~= ARGV[6] and redis.call('EXISTS', KEYS[7]) == 1 then return {-4} end
redis.call('HSET', KEYS[1], 'doc', ARGV[4], 'version', ARGV[2], 'status', ARGV[3], 'key', ARGV[7])
if ARGV[3] ~= ARGV[5] then
  redis.call('ZREM', KEYS[2], ARGV[9])
  redis.call('ZREM', KEYS[3], ARGV[9])
  redis.call('ZADD', KEYS[4], 0, ARGV[9])
  redis.call('ZADD', KEYS[5], 0, ARGV[9])
end
if ARGV[7] ~= ARGV[6] then
  if ARGV[6] ~= '' then redis.call('DEL', KEYS[6]) end
  if ARGV[7] ~= '' then redis.call('SET', KEYS[7], ARGV[10]) end
end
return {1}
"""

# Returns 1 deleted, 0 no such doc, -1 the fields the caller read changed (read again).
# KEYS: doc, docs, docs-of-tenant, docs-in-status, docs-of-tenant-in-status,
#       doc-key (any key when none), doc-gone
# ARGV: status, key ('' = none), pos, tenant (all as the caller read them)
_DELETE_DOC = """
local cur = redis.call('HMGET', KEYS[1], 'status', 'key', 'pos', 'tenant')
if not cur[3] then return 0 end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] or cur[3] ~= ARGV[3] or cur[4] ~= ARGV[4] then return -1 end
redis.call('DEL', KEYS[1])
for i = 2, 5 do redis.call('ZREM', KEYS[i], ARGV[3]) end
if ARGV[2] ~= '' then redis.call('DEL', KEYS[6]) end
redis.call('SET', KEYS[7], ARGV[3])
return 1
"""


def _part(value: str) -> str:
    """Percent-encode a key component that comes from outside."""
    return quote(value, safe="")


def _split_prefix(url: str) -> tuple[str, str]:
    """Take overnight's ``prefix`` option out of the URL (redis-py rejects unknown ones)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    kept = []
    for key, value in query:
        if key == "prefix":
            prefix = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


def _dumps(rec: FileRecord | BatchRecord | ShardRecord) -> bytes:
    return orjson.dumps(record_to_doc(rec))


def _due_arg(rec: BatchRecord) -> str:
    """The batch's score in ``batches-webhook-due`` ('' = not in it). ``repr`` of a
    float round-trips exactly, so the score is the due time to the bit."""
    due = webhook_due_at(rec)
    return "" if due is None else repr(float(due))


def _doc_pos(rec: DocRecord) -> str:
    """The doc's member in its list indexes: created_at as 16 hex digits that sort
    like the number (IEEE 754 bits, sign-flipped), then the id. Byte order of
    members is then (created_at, id) order, which ZRANGEBYLEX ranges follow."""
    bits = struct.unpack(">Q", struct.pack(">d", rec.created_at + 0.0))[0]  # + 0.0: -0.0 is 0.0
    bits = bits ^ 0xFFFF_FFFF_FFFF_FFFF if bits >> 63 else bits | 1 << 63
    return f"{bits:016x}{rec.id}"


_POS_DIGITS = 16


@asynccontextmanager
async def _translated(what: str) -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreError(f"redis store: {what} failed: {exc}") from exc


class RedisStore:
    """Records in Redis. Keys live under a prefix (``?prefix=``, default ``overnight:``),
    so several deployments can share one database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client_url, self.prefix = _split_prefix(url)
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------
    async def open(self) -> None:
        client = aioredis.from_url(self._client_url, decode_responses=False, socket_connect_timeout=10)
        try:
            async with _translated("connecting"):
                await client.ping()
        except StoreError:
            await client.aclose()
            raise
        self._client = client
        self._scripts = {
            "insert_file": client.register_script(_INSERT_FILE),
            "delete_file": client.register_script(_DELETE_FILE),
            "insert_batch": client.register_script(_INSERT_BATCH),
            "update_batch": client.register_script(_UPDATE_BATCH),
            "insert_shard": client.register_script(_INSERT_SHARD),
            "update_shard": client.register_script(_UPDATE_SHARD),
            "delete_shards": client.register_script(_DELETE_SHARDS),
            "insert_doc": client.register_script(_INSERT_DOC),
            "update_doc": client.register_script(_UPDATE_DOC),
            "delete_doc": client.register_script(_DELETE_DOC),
        }

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreError("store is not open")
        return self._client

    def _script(self, name: str) -> Any:
        if self._client is None:
            raise StoreError("store is not open")
        return self._scripts[name]

    def _key(self, pattern: str, *parts: str) -> str:
        return self.prefix + pattern.format(*(_part(p) for p in parts))

    def _active_keys(self) -> list[str]:
        return [self._key(_BATCHES_ACTIVE, s) for s in ACTIVE_STATUSES]

    async def _docs(self, pattern: str, ids: Iterable[str]) -> list[bytes]:
        """The ``doc`` field of each record, in order, skipping ids that vanished."""
        ids = list(ids)
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for record_id in ids:
            pipe.hget(self._key(pattern, record_id), "doc")
        return [doc for doc in await pipe.execute() if doc is not None]

    # -- files -------------------------------------------------------------
    def _file_keys(self, file_id: str, tenant: str, purpose: str) -> list[str]:
        return [
            self._key(_FILE, file_id),
            self._key(_FILES_OF_TENANT, tenant),
            self._key(_FILES_OF_PURPOSE, tenant, purpose),
            self.prefix + _FILES_EXPIRY,
        ]

    async def insert_file(self, rec: FileRecord) -> None:
        expires = "" if rec.expires_at is None else str(rec.expires_at)
        async with _translated("insert_file"):
            created = await self._script("insert_file")(
                keys=self._file_keys(rec.id, rec.tenant, rec.purpose),
                args=[rec.id, _dumps(rec), rec.tenant, rec.purpose, expires],
            )
        if not created:
            raise StoreError(f"file {rec.id} already exists")

    async def get_file(self, file_id: str) -> FileRecord | None:
        async with _translated("get_file"):
            doc = await self.client.hget(self._key(_FILE, file_id), "doc")
        return file_from_doc(orjson.loads(doc)) if doc is not None else None

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
        key = self._key(_FILES_OF_PURPOSE, tenant, purpose) if purpose else self._key(_FILES_OF_TENANT, tenant)
        async with _translated("list_files"):
            if order == "desc":
                upper = f"({after}" if after else "+"
                ids = await self.client.zrevrangebylex(key, upper, "-", start=0, num=limit)
            else:
                lower = f"({after}" if after else "-"
                ids = await self.client.zrangebylex(key, lower, "+", start=0, num=limit)
            docs = await self._docs(_FILE, (i.decode() for i in ids))
        return [file_from_doc(orjson.loads(d)) for d in docs]

    async def delete_file(self, file_id: str) -> bool:
        async with _translated("delete_file"):
            # tenant and purpose never change, so reading them first cannot race.
            tenant, purpose = await self.client.hmget(self._key(_FILE, file_id), ["tenant", "purpose"])
            if tenant is None or purpose is None:
                return False
            deleted = await self._script("delete_file")(
                keys=self._file_keys(file_id, tenant.decode(), purpose.decode()), args=[file_id]
            )
        return bool(deleted)

    async def list_expired_files(self, *, now: int, limit: int = 100) -> list[FileRecord]:
        if limit <= 0:
            return []
        async with _translated("list_expired_files"):
            ids = await self.client.zrangebyscore(self.prefix + _FILES_EXPIRY, "-inf", now, start=0, num=limit)
            docs = await self._docs(_FILE, (i.decode() for i in ids))
        return [file_from_doc(orjson.loads(d)) for d in docs]

    # -- batches -----------------------------------------------------------
    async def insert_batch(self, rec: BatchRecord) -> None:
        async with _translated("insert_batch"):
            created = await self._script("insert_batch")(
                keys=[
                    self._key(_BATCH, rec.id),
                    self._key(_BATCHES_OF_TENANT, rec.tenant),
                    self._key(_BATCHES_READING, rec.input_file_id),
                    self.prefix + _BATCHES_WEBHOOK_DUE,
                    *self._active_keys(),
                ],
                args=[
                    rec.id,
                    rec.tenant,
                    rec.status,
                    rec.input_file_id,
                    str(rec.version),
                    _dumps(rec),
                    _due_arg(rec),
                    *ACTIVE_STATUSES,
                ],
            )
        if not created:
            raise StoreError(f"batch {rec.id} already exists")

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        async with _translated("get_batch"):
            doc = await self.client.hget(self._key(_BATCH, batch_id), "doc")
        return batch_from_doc(orjson.loads(doc)) if doc is not None else None

    async def list_batches(self, *, tenant: str, after: str | None = None, limit: int = 20) -> list[BatchRecord]:
        if limit <= 0:
            return []
        upper = f"({after}" if after else "+"
        async with _translated("list_batches"):
            ids = await self.client.zrevrangebylex(
                self._key(_BATCHES_OF_TENANT, tenant), upper, "-", start=0, num=limit
            )
            docs = await self._docs(_BATCH, (i.decode() for i in ids))
        return [batch_from_doc(orjson.loads(d)) for d in docs]

    async def list_active_batches(self, *, limit: int = 1000) -> list[BatchRecord]:
        if limit <= 0:
            return []
        async with _translated("list_active_batches"):
            # One snapshot of all per-status indexes, then the oldest ``limit`` overall.
            pipe = self.client.pipeline(transaction=True)
            for key in self._active_keys():
                pipe.zrangebylex(key, "-", "+", start=0, num=limit)
            per_status = await pipe.execute()
            ids = list(heapq.merge(*([i.decode() for i in ids] for ids in per_status)))[:limit]
            docs = await self._docs(_BATCH, ids)
        recs = (batch_from_doc(orjson.loads(d)) for d in docs)
        # A batch can finish between the two reads; report only what is still active.
        return [r for r in recs if r.status in ACTIVE_STATUSES]

    async def count_active_batches(self) -> dict[str, int]:
        async with _translated("count_active_batches"):
            pipe = self.client.pipeline(transaction=True)
            for key in self._active_keys():
                pipe.zcard(key)
            sizes = await pipe.execute()
        return {s: int(n) for s, n in zip(ACTIVE_STATUSES, sizes)}

    async def batches_reading_file(self, file_id: str) -> list[BatchRecord]:
        async with _translated("batches_reading_file"):
            ids = sorted(i.decode() for i in await self.client.smembers(self._key(_BATCHES_READING, file_id)))
            docs = await self._docs(_BATCH, ids)
        recs = (batch_from_doc(orjson.loads(d)) for d in docs)
        return [r for r in recs if r.status in ACTIVE_STATUSES and r.input_file_id == file_id]

    async def update_batch(self, rec: BatchRecord, *, checkpoint: bytes | None = None) -> BatchRecord:
        new = dataclasses.replace(rec, version=rec.version + 1)
        async with _translated("update_batch"):
            reply = await self._script("update_batch")(
                keys=[
                    self._key(_BATCH, rec.id),
                    self._key(_CHECKPOINT, rec.id),
                    self._key(_BATCHES_READING, rec.input_file_id),
                    self.prefix + _BATCHES_WEBHOOK_DUE,
                    *self._active_keys(),
                ],
                args=[
                    rec.id,
                    str(rec.version),
                    str(new.version),
                    new.status,
                    _dumps(new),
                    "0" if checkpoint is None else "1",
                    b"" if checkpoint is None else checkpoint,
                    _due_arg(new),
                    *ACTIVE_STATUSES,
                ],
            )
        outcome = int(reply[0])
        if outcome == 0:
            raise NotFoundError(f"batch {rec.id} not found")
        if outcome < 0:
            raise VersionConflict(f"batch {rec.id} changed (version {reply[1].decode()} != {rec.version})")
        return new

    async def get_checkpoint(self, batch_id: str) -> bytes | None:
        async with _translated("get_checkpoint"):
            data = await self.client.get(self._key(_CHECKPOINT, batch_id))
        return bytes(data) if data is not None else None

    async def list_webhooks_due(self, *, now: float, limit: int = 100) -> list[BatchRecord]:
        if limit <= 0:
            return []
        async with _translated("list_webhooks_due"):
            ids = await self.client.zrangebyscore(
                self.prefix + _BATCHES_WEBHOOK_DUE, "-inf", repr(float(now)), start=0, num=limit
            )
            docs = await self._docs(_BATCH, (i.decode() for i in ids))
        recs = (batch_from_doc(orjson.loads(d)) for d in docs)
        return [r for r in recs if (due := webhook_due_at(r)) is not None and due <= now]

    # -- shards ------------------------------------------------------------
    def _shard_key(self, batch_id: str, index: int) -> str:
        return self._key(_SHARD, batch_id, str(index))

    async def insert_shard(self, rec: ShardRecord) -> None:
        async with _translated("insert_shard"):
            created = await self._script("insert_shard")(
                keys=[self._shard_key(rec.batch_id, rec.index), self._key(_SHARDS_OF_BATCH, rec.batch_id)],
                args=[str(rec.index), _dumps(rec), str(rec.version), rec.status],
            )
        if not created:
            raise StoreError(f"shard {rec.index} of batch {rec.batch_id} already exists")

    async def get_shard(self, batch_id: str, index: int) -> ShardRecord | None:
        async with _translated("get_shard"):
            doc = await self.client.hget(self._shard_key(batch_id, index), "doc")
        return shard_from_doc(orjson.loads(doc)) if doc is not None else None

    async def _shard_indexes(self, batch_id: str) -> list[str]:
        """The batch's shard indexes, in order (the zset's scores are the indexes)."""
        return [i.decode() for i in await self.client.zrange(self._key(_SHARDS_OF_BATCH, batch_id), 0, -1)]

    async def list_shards(self, batch_id: str) -> list[ShardRecord]:
        async with _translated("list_shards"):
            indexes = await self._shard_indexes(batch_id)
            if not indexes:
                return []
            pipe = self.client.pipeline(transaction=False)
            for index in indexes:
                pipe.hget(self._key(_SHARD, batch_id, index), "doc")
            docs = [doc for doc in await pipe.execute() if doc is not None]
        return [shard_from_doc(orjson.loads(d)) for d in docs]

    async def update_shard(self, rec: ShardRecord, *, checkpoint: bytes | None = None) -> ShardRecord:
        new = dataclasses.replace(rec, version=rec.version + 1)
        async with _translated("update_shard"):
            reply = await self._script("update_shard")(
                keys=[
                    self._shard_key(rec.batch_id, rec.index),
                    self._key(_SHARD_CHECKPOINT, rec.batch_id, str(rec.index)),
                ],
                args=[
                    str(rec.version),
                    str(new.version),
                    new.status,
                    _dumps(new),
                    "0" if checkpoint is None else "1",
                    b"" if checkpoint is None else checkpoint,
                ],
            )
        outcome = int(reply[0])
        if outcome == 0:
            raise NotFoundError(f"shard {rec.index} of batch {rec.batch_id} not found")
        if outcome < 0:
            raise VersionConflict(
                f"shard {rec.index} of batch {rec.batch_id} changed (version {reply[1].decode()} != {rec.version})"
            )
        return new

    async def get_shard_checkpoint(self, batch_id: str, index: int) -> bytes | None:
        async with _translated("get_shard_checkpoint"):
            data = await self.client.get(self._key(_SHARD_CHECKPOINT, batch_id, str(index)))
        return bytes(data) if data is not None else None

    async def delete_shards(self, batch_id: str) -> int:
        async with _translated("delete_shards"):
            for _ in range(100):
                indexes = await self._shard_indexes(batch_id)
                if not indexes:
                    return 0
                keys = [self._key(_SHARDS_OF_BATCH, batch_id)]
                for index in indexes:
                    keys += [self._key(_SHARD, batch_id, index), self._key(_SHARD_CHECKPOINT, batch_id, index)]
                deleted = int(await self._script("delete_shards")(keys=keys, args=indexes))
                if deleted >= 0:
                    return deleted
        raise StoreError(f"redis store: the shards of batch {batch_id} change too fast to delete")

    # -- document records --------------------------------------------------
    def _doc_index_keys(self, kind: str, tenant: str, status: str) -> list[str]:
        """docs, docs-of-tenant, docs-in-status, docs-of-tenant-in-status."""
        return [
            self._key(_DOCS, kind),
            self._key(_DOCS_OF_TENANT, kind, tenant),
            self._key(_DOCS_IN_STATUS, kind, status),
            self._key(_DOCS_OF_TENANT_IN_STATUS, kind, tenant, status),
        ]

    def _doc_key_key(self, kind: str, tenant: str, key: str | None) -> str:
        # A doc without a key still fills the script's KEYS slot; the script never touches it then.
        return self._key(_DOC_KEY, kind, tenant, key) if key is not None else self._key(_DOC, kind, "")

    async def insert_doc(self, rec: DocRecord) -> None:
        data = doc_record_json(rec)
        async with _translated("insert_doc"):
            created = await self._script("insert_doc")(
                keys=[
                    self._key(_DOC, rec.kind, rec.id),
                    *self._doc_index_keys(rec.kind, rec.tenant, rec.status),
                    self._doc_key_key(rec.kind, rec.tenant, rec.key),
                ],
                args=[_doc_pos(rec), data, str(rec.version), rec.status, rec.tenant, rec.key or "", rec.id],
            )
        if created == 0:
            raise StoreError(f"{rec.kind} {rec.id} already exists")
        if created < 0:
            raise StoreError(f"{rec.kind} key {rec.key!r} already exists in tenant {rec.tenant!r}")

    async def get_doc(self, kind: str, id: str) -> DocRecord | None:
        async with _translated("get_doc"):
            doc = await self.client.hget(self._key(_DOC, check_doc_kind(kind), id), "doc")
        return doc_record_from_doc(orjson.loads(doc)) if doc is not None else None

    async def get_doc_by_key(self, kind: str, tenant: str, key: str) -> DocRecord | None:
        check_doc_kind(kind)
        async with _translated("get_doc_by_key"):
            for _ in range(10):
                doc_id = await self.client.get(self._key(_DOC_KEY, kind, tenant, key))
                if doc_id is None:
                    return None
                rec = await self.get_doc(kind, doc_id.decode())
                # The key can move to another doc between the two reads: then read again.
                if rec is not None and rec.tenant == tenant and rec.key == key:
                    return rec
        raise StoreError(f"redis store: the {kind} key {key!r} changes too fast to read")

    async def update_doc(self, rec: DocRecord) -> DocRecord:
        new = dataclasses.replace(rec, version=rec.version + 1)
        data = doc_record_json(new)
        doc_key = self._key(_DOC, rec.kind, rec.id)
        async with _translated("update_doc"):
            for _ in range(100):
                status, old_key = await self.client.hmget(doc_key, ["status", "key"])
                if status is None:
                    raise NotFoundError(f"{rec.kind} {rec.id} not found")
                old_status, old = status.decode(), old_key.decode()
                reply = await self._script("update_doc")(
                    keys=[
                        doc_key,
                        self._key(_DOCS_IN_STATUS, rec.kind, old_status),
                        self._key(_DOCS_OF_TENANT_IN_STATUS, rec.kind, rec.tenant, old_status),
                        self._key(_DOCS_IN_STATUS, rec.kind, new.status),
                        self._key(_DOCS_OF_TENANT_IN_STATUS, rec.kind, rec.tenant, new.status),
                        self._doc_key_key(rec.kind, rec.tenant, old or None),
                        self._doc_key_key(rec.kind, rec.tenant, new.key),
                    ],
                    args=[
                        str(rec.version),
                        str(new.version),
                        new.status,
                        data,
                        old_status,
                        old,
                        new.key or "",
                        rec.tenant,
                        _doc_pos(rec),
                        rec.id,
                    ],
                )
                outcome = int(reply[0])
                if outcome == 1:
                    return new
                if outcome == 0:
                    raise NotFoundError(f"{rec.kind} {rec.id} not found")
                if outcome == -1:
                    raise VersionConflict(
                        f"{rec.kind} {rec.id} changed (version {reply[1].decode()} != {rec.version})"
                    )
                if outcome == -3:
                    name = reply[1].decode()
                    raise InvalidRequestError(f"{rec.kind} {rec.id}: {name} cannot change after insert", param=name)
                if outcome == -4:
                    raise StoreError(f"{rec.kind} key {rec.key!r} already exists in tenant {rec.tenant!r}")
                # -2: written by someone else since the read above; read again.
        raise StoreError(f"redis store: {rec.kind} {rec.id} changes too fast to update")

    async def delete_doc(self, kind: str, id: str) -> bool:
        doc_key = self._key(_DOC, check_doc_kind(kind), id)
        async with _translated("delete_doc"):
            for _ in range(100):
                status, key, pos, tenant = await self.client.hmget(doc_key, ["status", "key", "pos", "tenant"])
                if pos is None:
                    return False
                st, k, t = status.decode(), key.decode(), tenant.decode()
                deleted = int(
                    await self._script("delete_doc")(
                        keys=[
                            doc_key,
                            *self._doc_index_keys(kind, t, st),
                            self._doc_key_key(kind, t, k or None),
                            self._key(_DOC_GONE, kind, id),
                        ],
                        args=[st, k, pos, t],
                    )
                )
                if deleted >= 0:
                    return bool(deleted)
        raise StoreError(f"redis store: {kind} {id} changes too fast to delete")

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
        if wanted is None:
            keys = [self._key(_DOCS, kind) if tenant is None else self._key(_DOCS_OF_TENANT, kind, tenant)]
        elif tenant is None:
            keys = [self._key(_DOCS_IN_STATUS, kind, st) for st in wanted]
        else:
            keys = [self._key(_DOCS_OF_TENANT_IN_STATUS, kind, tenant, st) for st in wanted]
        out: list[DocRecord] = []
        async with _translated("list_docs"):
            bound = await self._doc_cursor(kind, after) if after is not None else None
            # An index entry whose doc was deleted or changed status after the index
            # was read is dropped, and the page is filled up from further on.
            for _ in range(100):
                want = limit - len(out)
                members = await self._doc_members(keys, desc=desc, bound=bound, limit=want)
                for rec in await self._load_docs(kind, [m[_POS_DIGITS:] for m in members]):
                    if (tenant is None or rec.tenant == tenant) and (wanted is None or rec.status in wanted):
                        out.append(rec)
                if len(members) < want or len(out) >= limit:
                    break
                bound = members[-1]
        return out[:limit]

    async def _load_docs(self, kind: str, ids: list[str]) -> list[DocRecord]:
        """The docs with these ids, in order, skipping ids that vanished."""
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for doc_id in ids:
            pipe.hget(self._key(_DOC, kind, doc_id), "doc")
        return [doc_record_from_doc(orjson.loads(d)) for d in await pipe.execute() if d is not None]

    async def _doc_cursor(self, kind: str, doc_id: str) -> str:
        """The index member of the cursor doc, live or deleted."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(self._key(_DOC, kind, doc_id), "pos")
        pipe.get(self._key(_DOC_GONE, kind, doc_id))
        live, gone = await pipe.execute()
        pos = live if live is not None else gone
        if pos is None:
            raise NotFoundError(f"no {kind} {doc_id} to list after")
        return pos.decode()

    async def _doc_members(self, keys: list[str], *, desc: bool, bound: str | None, limit: int) -> list[str]:
        """The first ``limit`` members after ``bound`` across ``keys`` (one snapshot),
        in list order: each index gives at most ``limit``, then they are merged."""
        pipe = self.client.pipeline(transaction=len(keys) > 1)
        for key in keys:
            if desc:
                pipe.zrevrangebylex(key, f"({bound}" if bound else "+", "-", start=0, num=limit)
            else:
                pipe.zrangebylex(key, f"({bound}" if bound else "-", "+", start=0, num=limit)
        per_key = [[m.decode() for m in members] for members in await pipe.execute()]
        return list(heapq.merge(*per_key, reverse=desc))[:limit]
