"""Redis record store (``redis://host:6379/0?prefix=overnight:``, ``rediss://`` for TLS).

Records are JSON documents in hashes, next to the few fields the indexes need.
Lists read sorted sets whose members are ids with score 0, so they come back in
lexicographic = creation order and ``after`` cursors are ``ZRANGEBYLEX`` bounds: no
``KEYS``/``SCAN`` on the serving path. Every write that touches more than one key
is a Lua script, so a record and its indexes change together or not at all, and
the batch compare-and-set and its checkpoint are one atomic step; shards the same.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from overnight.errors import NotFoundError, StoreError, VersionConflict
from overnight.store.base import ACTIVE_STATUSES
from overnight.store.records import (
    BatchRecord,
    FileRecord,
    ShardRecord,
    batch_from_doc,
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
