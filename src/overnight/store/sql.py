"""SQL record store on SQLAlchemy's async engine: shared by SQLite and PostgreSQL.

Each record is a JSON document plus the columns lists and compare-and-set need.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable, Collection
from typing import Any, Literal, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from overnight.errors import (
    InvalidRequestError,
    NotFoundError,
    StoreError,
    VersionConflict,
)
from overnight.store.base import ACTIVE_STATUSES
from overnight.store.records import (
    DOC_ID_MAX,
    DOC_KEY_MAX,
    DOC_STATUS_MAX,
    DOC_TENANT_MAX,
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

__all__ = [
    "SQLStore",
    "batches_table",
    "checkpoints_table",
    "docs_gone_table",
    "docs_table",
    "files_table",
    "metadata",
    "shard_checkpoints_table",
    "shards_table",
    "webhook_due_table",
]

metadata = sa.MetaData()

files_table = sa.Table(
    "overnight_files",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Index("ix_overnight_files_tenant_id", "tenant", "id"),
    sa.Index("ix_overnight_files_expires_at", "expires_at"),
)

batches_table = sa.Table(
    "overnight_batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Index("ix_overnight_batches_tenant_id", "tenant", "id"),
    sa.Index("ix_overnight_batches_status", "status"),
    sa.Index("ix_overnight_batches_input_file_id", "input_file_id"),
)

checkpoints_table = sa.Table(
    "overnight_checkpoints",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# A batch's shards: the primary key orders a batch's shards by index, which is
# what list_shards and delete_shards need, so no other index.
shards_table = sa.Table(
    "overnight_shards",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("shard_index", sa.Integer, primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("doc", sa.Text, nullable=False),
)

shard_checkpoints_table = sa.Table(
    "overnight_shard_checkpoints",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("shard_index", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# When each batch that owes a webhook delivery is due (``records.webhook_due_at``):
# an index of the batch documents, written in the same transaction as the batch,
# kept in its own table (not a column of overnight_batches) so that an older
# SQLite file gains it on open like any new table, with no ALTER TABLE.
webhook_due_table = sa.Table(
    "overnight_webhook_due",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("due_at", sa.Float, nullable=False),
    sa.Index("ix_overnight_webhook_due_due_at", "due_at"),
)


# Document records of every kind (the console's jobs, provisions, models,
# templates): the JSON record beside the columns lookups and lists need. Lists
# are ordered by (created_at, id) within a kind, optionally of one tenant and/or
# in some statuses, and each of those four shapes has its index, so a page is an
# index range scan however many docs the kind holds. The unique index on the key
# lets any number of docs go without one (NULLs are distinct). On PostgreSQL the
# id compares byte-wise (collation "C"), as SQLite, Redis, MongoDB and Python do,
# so ties in created_at break the same way on every backend.
_DOC_ID = sa.String(DOC_ID_MAX).with_variant(sa.String(DOC_ID_MAX, collation="C"), "postgresql")

docs_table = sa.Table(
    "overnight_docs",
    metadata,
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("id", _DOC_ID, primary_key=True),
    sa.Column("tenant", sa.String(DOC_TENANT_MAX), nullable=False),
    sa.Column("status", sa.String(DOC_STATUS_MAX), nullable=False),
    sa.Column("doc_key", sa.String(DOC_KEY_MAX), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Index("ix_overnight_docs_kind_created", "kind", "created_at", "id"),
    sa.Index("ix_overnight_docs_tenant_created", "kind", "tenant", "created_at", "id"),
    sa.Index("ix_overnight_docs_status_created", "kind", "status", "created_at", "id"),
    sa.Index("ix_overnight_docs_tenant_status_created", "kind", "tenant", "status", "created_at", "id"),
    sa.Index("ux_overnight_docs_key", "kind", "tenant", "doc_key", unique=True),
)

# Where deleted docs stood in the lists, so that a cursor naming one goes on from
# there (as ``list_batches`` does for a deleted batch) instead of failing.
docs_gone_table = sa.Table(
    "overnight_docs_gone",
    metadata,
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("id", _DOC_ID, primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)


#: What a query can raise besides overnight's own errors. Drivers let some connection
#: failures (refused, reset, timed out) through as plain OSError, unwrapped by SQLAlchemy.
_DRIVER_ERRORS = (SQLAlchemyError, OSError)
T = TypeVar("T")


def _dumps(rec: FileRecord | BatchRecord | ShardRecord) -> str:
    return orjson.dumps(record_to_doc(rec)).decode()


class SQLStore:
    """Store on any SQLAlchemy async URL (``sqlite+aiosqlite://``, ``postgresql+asyncpg://``)."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self._engine_kwargs = engine_kwargs
        self._engine: AsyncEngine | None = None
        #: SQLite: the one thread this process's write transactions run on (``_tx``).
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._sync: Any = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StoreError("store is not open")
        return self._engine

    async def open(self) -> None:
        self._engine = create_async_engine(self.url, **self._engine_kwargs)
        self._configure_engine(self._engine)
        self._sync = self._sync_engine()
        if self._sync is not None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="overnight-store-writer")
        try:
            await self._prepare_schema()
        except (SQLAlchemyError, OSError) as exc:
            await self.aclose()
            raise StoreError(f"cannot open the store: {exc}") from exc
        except BaseException:
            await self.aclose()
            raise

    def _configure_engine(self, engine: AsyncEngine) -> None:
        """Hook for backends that set per-connection options."""

    def _sync_engine(self) -> Any:
        """A synchronous engine for this store's write transactions (SQLite), or None:
        writes then run as async transactions (``run_sync``)."""
        return None

    async def _tx(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(conn)`` (plain, synchronous statements) as one write transaction.

        On SQLite every write of this process runs on one writer thread, the whole
        transaction in one hand-off: SQLite takes one writer at a time per file, and
        an async transaction (checkout, BEGIN, statement, COMMIT) is four trips
        between the event loop and a driver thread, each waiting for a busy loop.
        Measured with 200 console jobs at once (bench/console.py): a write held
        SQLite's lock for 8.7 ms (median) that way and waited 142 ms for it; on the
        writer thread a write takes 19 ms from call to answer, queueing included.
        Before writes queued in this process at all, they met in SQLite's busy
        handler, which sleeps up to 100 ms a try. Reads (``_rows``) stay async and
        never wait on a write (WAL). Elsewhere (PostgreSQL) ``fn`` runs in an async
        transaction (``run_sync``)."""
        if self._writer is not None:
            return await asyncio.get_running_loop().run_in_executor(self._writer, self._in_tx, fn)
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn)

    def _in_tx(self, fn: Callable[[Any], T]) -> T:
        with self._sync.begin() as conn:
            return fn(conn)

    async def _prepare_schema(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def aclose(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.get_running_loop().run_in_executor(None, writer.shutdown)
        if self._sync is not None:
            self._sync.dispose()
            self._sync = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    def _insert(self) -> Any:
        """The dialect's INSERT, which has ``on_conflict_do_update``."""
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:  # pragma: no cover - only the two dialects above are registered
            raise StoreError(f"unsupported SQL dialect {dialect}")
        return insert

    def _upsert_checkpoint(self, batch_id: str, data: bytes) -> sa.Executable:
        stmt = self._insert()(checkpoints_table).values(batch_id=batch_id, data=data)
        return stmt.on_conflict_do_update(index_elements=["batch_id"], set_={"data": data})

    def _upsert_shard_checkpoint(self, batch_id: str, index: int, data: bytes) -> sa.Executable:
        stmt = self._insert()(shard_checkpoints_table).values(batch_id=batch_id, shard_index=index, data=data)
        return stmt.on_conflict_do_update(index_elements=["batch_id", "shard_index"], set_={"data": data})

    async def _run(self, stmt: sa.Executable) -> sa.CursorResult[Any]:
        try:
            return await self._tx(lambda conn: conn.execute(stmt))
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"store query failed: {exc}") from exc

    async def _rows(self, stmt: sa.Executable) -> list[Any]:
        try:
            async with self.engine.connect() as conn:
                return list((await conn.execute(stmt)).all())
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"store query failed: {exc}") from exc

    # -- files -------------------------------------------------------------
    async def insert_file(self, rec: FileRecord) -> None:
        await self._run(
            sa.insert(files_table).values(
                id=rec.id, tenant=rec.tenant, purpose=rec.purpose, expires_at=rec.expires_at, doc=_dumps(rec)
            )
        )

    async def get_file(self, file_id: str) -> FileRecord | None:
        rows = await self._rows(sa.select(files_table.c.doc).where(files_table.c.id == file_id))
        return file_from_doc(orjson.loads(rows[0][0])) if rows else None

    async def list_files(
        self,
        *,
        tenant: str,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> list[FileRecord]:
        c = files_table.c
        stmt = sa.select(c.doc).where(c.tenant == tenant)
        if purpose:
            stmt = stmt.where(c.purpose == purpose)
        if after:
            stmt = stmt.where(c.id < after if order == "desc" else c.id > after)
        stmt = stmt.order_by(c.id.desc() if order == "desc" else c.id.asc()).limit(limit)
        return [file_from_doc(orjson.loads(r[0])) for r in await self._rows(stmt)]

    async def delete_file(self, file_id: str) -> bool:
        res = await self._run(sa.delete(files_table).where(files_table.c.id == file_id))
        return res.rowcount > 0

    async def list_expired_files(self, *, now: int, limit: int = 100) -> list[FileRecord]:
        c = files_table.c
        stmt = (
            sa.select(c.doc)
            .where(c.expires_at.is_not(None), c.expires_at <= now)
            .order_by(c.expires_at.asc(), c.id.asc())
            .limit(limit)
        )
        return [file_from_doc(orjson.loads(r[0])) for r in await self._rows(stmt)]

    def _webhook_due(self, rec: BatchRecord) -> sa.Executable:
        """The statement that makes the due index say what ``rec`` owes."""
        due = webhook_due_at(rec)
        c = webhook_due_table.c
        if due is None:
            return sa.delete(webhook_due_table).where(c.batch_id == rec.id)
        stmt = self._insert()(webhook_due_table).values(batch_id=rec.id, due_at=due)
        return stmt.on_conflict_do_update(index_elements=["batch_id"], set_={"due_at": due})

    # -- batches -----------------------------------------------------------
    async def insert_batch(self, rec: BatchRecord) -> None:
        try:
            def tx(conn: Any) -> Any:
                conn.execute(
                    sa.insert(batches_table).values(
                        id=rec.id,
                        tenant=rec.tenant,
                        status=rec.status,
                        input_file_id=rec.input_file_id,
                        version=rec.version,
                        doc=_dumps(rec),
                    )
                )
                if rec.webhook is not None:
                    conn.execute(self._webhook_due(rec))

            await self._tx(tx)
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"store query failed: {exc}") from exc

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        rows = await self._rows(sa.select(batches_table.c.doc).where(batches_table.c.id == batch_id))
        return batch_from_doc(orjson.loads(rows[0][0])) if rows else None

    async def list_batches(self, *, tenant: str, after: str | None = None, limit: int = 20) -> list[BatchRecord]:
        c = batches_table.c
        stmt = sa.select(c.doc).where(c.tenant == tenant)
        if after:
            stmt = stmt.where(c.id < after)
        stmt = stmt.order_by(c.id.desc()).limit(limit)
        return [batch_from_doc(orjson.loads(r[0])) for r in await self._rows(stmt)]

    async def list_active_batches(self, *, limit: int = 1000) -> list[BatchRecord]:
        c = batches_table.c
        stmt = sa.select(c.doc).where(c.status.in_(ACTIVE_STATUSES)).order_by(c.id.asc()).limit(limit)
        return [batch_from_doc(orjson.loads(r[0])) for r in await self._rows(stmt)]

    async def count_active_batches(self) -> dict[str, int]:
        c = batches_table.c
        stmt = sa.select(c.status, sa.func.count()).where(c.status.in_(ACTIVE_STATUSES)).group_by(c.status)
        counts = dict.fromkeys(ACTIVE_STATUSES, 0)
        for status, n in await self._rows(stmt):
            counts[status] = int(n)
        return counts

    async def batches_reading_file(self, file_id: str) -> list[BatchRecord]:
        c = batches_table.c
        stmt = sa.select(c.doc).where(c.input_file_id == file_id, c.status.in_(ACTIVE_STATUSES))
        return [batch_from_doc(orjson.loads(r[0])) for r in await self._rows(stmt)]

    async def update_batch(self, rec: BatchRecord, *, checkpoint: bytes | None = None) -> BatchRecord:
        c = batches_table.c
        new = _bumped(rec)
        try:
            def tx(conn: Any) -> Any:
                res = conn.execute(
                    sa.update(batches_table)
                    .where(c.id == rec.id, c.version == rec.version)
                    .values(status=new.status, version=new.version, doc=_dumps(new))
                )
                if res.rowcount == 0:
                    exists = (conn.execute(sa.select(c.version).where(c.id == rec.id))).first()
                    if exists is None:
                        raise NotFoundError(f"batch {rec.id} not found")
                    raise VersionConflict(f"batch {rec.id} changed (version {exists[0]} != {rec.version})")
                if checkpoint is not None:
                    conn.execute(self._upsert_checkpoint(rec.id, checkpoint))
                # Only records that ever owed a webhook touch the index: a running
                # batch's checkpoint writes (every second) cost no extra statement.
                # ``webhook`` is never set back to None once set.
                if new.webhook is not None:
                    conn.execute(self._webhook_due(new))

            await self._tx(tx)
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"store query failed: {exc}") from exc
        return new

    async def get_checkpoint(self, batch_id: str) -> bytes | None:
        rows = await self._rows(
            sa.select(checkpoints_table.c.data).where(checkpoints_table.c.batch_id == batch_id)
        )
        return bytes(rows[0][0]) if rows else None

    async def list_webhooks_due(self, *, now: float, limit: int = 100) -> list[BatchRecord]:
        if limit <= 0:
            return []
        b, w = batches_table.c, webhook_due_table.c
        stmt = (
            sa.select(b.doc)
            .join(webhook_due_table, w.batch_id == b.id)
            .where(w.due_at <= now)
            .order_by(w.due_at.asc(), w.batch_id.asc())
            .limit(limit)
        )
        recs = [batch_from_doc(orjson.loads(r[0])) for r in await self._rows(stmt)]
        return [r for r in recs if (due := webhook_due_at(r)) is not None and due <= now]

    # -- shards ------------------------------------------------------------
    async def insert_shard(self, rec: ShardRecord) -> None:
        await self._run(
            sa.insert(shards_table).values(
                batch_id=rec.batch_id, shard_index=rec.index, status=rec.status, version=rec.version, doc=_dumps(rec)
            )
        )

    async def get_shard(self, batch_id: str, index: int) -> ShardRecord | None:
        c = shards_table.c
        rows = await self._rows(sa.select(c.doc).where(c.batch_id == batch_id, c.shard_index == index))
        return shard_from_doc(orjson.loads(rows[0][0])) if rows else None

    async def list_shards(self, batch_id: str) -> list[ShardRecord]:
        c = shards_table.c
        stmt = sa.select(c.doc).where(c.batch_id == batch_id).order_by(c.shard_index.asc())
        return [shard_from_doc(orjson.loads(r[0])) for r in await self._rows(stmt)]

    async def update_shard(self, rec: ShardRecord, *, checkpoint: bytes | None = None) -> ShardRecord:
        c = shards_table.c
        new = _bumped(rec)
        where = (c.batch_id == rec.batch_id, c.shard_index == rec.index)
        try:
            def tx(conn: Any) -> Any:
                res = conn.execute(
                    sa.update(shards_table)
                    .where(*where, c.version == rec.version)
                    .values(status=new.status, version=new.version, doc=_dumps(new))
                )
                if res.rowcount == 0:
                    exists = (conn.execute(sa.select(c.version).where(*where))).first()
                    if exists is None:
                        raise NotFoundError(f"shard {rec.index} of batch {rec.batch_id} not found")
                    raise VersionConflict(
                        f"shard {rec.index} of batch {rec.batch_id} changed (version {exists[0]} != {rec.version})"
                    )
                if checkpoint is not None:
                    conn.execute(self._upsert_shard_checkpoint(rec.batch_id, rec.index, checkpoint))

            await self._tx(tx)
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"store query failed: {exc}") from exc
        return new

    async def get_shard_checkpoint(self, batch_id: str, index: int) -> bytes | None:
        c = shard_checkpoints_table.c
        rows = await self._rows(sa.select(c.data).where(c.batch_id == batch_id, c.shard_index == index))
        return bytes(rows[0][0]) if rows else None

    async def delete_shards(self, batch_id: str) -> int:
        try:
            def tx(conn: Any) -> Any:
                conn.execute(
                    sa.delete(shard_checkpoints_table).where(shard_checkpoints_table.c.batch_id == batch_id)
                )
                return int(conn.execute(sa.delete(shards_table).where(shards_table.c.batch_id == batch_id)).rowcount)

            return int(await self._tx(tx))
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"store query failed: {exc}") from exc

    # -- document records --------------------------------------------------
    async def _doc_clash(self, rec: DocRecord) -> StoreError:
        """Which unique index refused ``rec``: its id or its key."""
        c = docs_table.c
        rows = await self._rows(sa.select(c.id).where(c.kind == rec.kind, c.id == rec.id))
        if rows:
            return StoreError(f"{rec.kind} {rec.id} already exists")
        return StoreError(f"{rec.kind} key {rec.key!r} already exists in tenant {rec.tenant!r}")

    async def insert_doc(self, rec: DocRecord) -> None:
        data = doc_record_json(rec).decode()
        try:
            await self._run_unique(
                sa.insert(docs_table).values(
                    kind=rec.kind,
                    id=rec.id,
                    tenant=rec.tenant,
                    status=rec.status,
                    doc_key=rec.key,
                    created_at=rec.created_at,
                    version=rec.version,
                    doc=data,
                )
            )
        except IntegrityError:
            raise await self._doc_clash(rec) from None

    async def _run_unique(self, stmt: sa.Executable) -> None:
        """``_run`` that lets ``IntegrityError`` (a unique index refused the row)
        through, for the caller to say which."""
        try:
            def tx(conn: Any) -> Any:
                conn.execute(stmt)

            await self._tx(tx)
        except IntegrityError:
            raise
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"store query failed: {exc}") from exc

    async def get_doc(self, kind: str, id: str) -> DocRecord | None:
        c = docs_table.c
        rows = await self._rows(sa.select(c.doc).where(c.kind == check_doc_kind(kind), c.id == id))
        return doc_record_from_doc(orjson.loads(rows[0][0])) if rows else None

    async def get_doc_by_key(self, kind: str, tenant: str, key: str) -> DocRecord | None:
        c = docs_table.c
        stmt = sa.select(c.doc).where(c.kind == check_doc_kind(kind), c.tenant == tenant, c.doc_key == key)
        rows = await self._rows(stmt)
        return doc_record_from_doc(orjson.loads(rows[0][0])) if rows else None

    async def update_doc(self, rec: DocRecord) -> DocRecord:
        c = docs_table.c
        new = dataclasses.replace(rec, version=rec.version + 1)
        data = doc_record_json(new).decode()
        try:
            def tx(conn: Any) -> Any:
                res = conn.execute(
                    sa.update(docs_table)
                    .where(
                        c.kind == rec.kind,
                        c.id == rec.id,
                        c.version == rec.version,
                        c.tenant == rec.tenant,
                        c.created_at == rec.created_at,
                    )
                    .values(status=new.status, doc_key=new.key, version=new.version, doc=data)
                )
                if res.rowcount == 0:
                    stored = (
                        conn.execute(
                            sa.select(c.version, c.tenant, c.created_at).where(c.kind == rec.kind, c.id == rec.id)
                        )
                    ).first()
                    if stored is None:
                        raise NotFoundError(f"{rec.kind} {rec.id} not found")
                    if stored[0] != rec.version:
                        raise VersionConflict(f"{rec.kind} {rec.id} changed (version {stored[0]} != {rec.version})")
                    name = "tenant" if stored[1] != rec.tenant else "created_at"
                    raise InvalidRequestError(f"{rec.kind} {rec.id}: {name} cannot change after insert", param=name)

            await self._tx(tx)
        except IntegrityError:
            raise StoreError(f"{rec.kind} key {rec.key!r} already exists in tenant {rec.tenant!r}") from None
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"store query failed: {exc}") from exc
        return new

    async def delete_doc(self, kind: str, id: str) -> bool:
        c = docs_table.c
        where = (c.kind == check_doc_kind(kind), c.id == id)
        try:
            def tx(conn: Any) -> Any:
                row = (conn.execute(sa.select(c.created_at).where(*where))).first()
                if row is None:
                    return False
                res = conn.execute(sa.delete(docs_table).where(*where))
                if res.rowcount == 0:  # another delete got there between the two statements
                    return False
                gone = self._insert()(docs_gone_table).values(kind=kind, id=id, created_at=row[0])
                conn.execute(
                    gone.on_conflict_do_update(index_elements=["kind", "id"], set_={"created_at": row[0]})
                )
                return True

            return bool(await self._tx(tx))
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"store query failed: {exc}") from exc

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
        c = docs_table.c
        base = sa.select(c.doc, c.created_at, c.id).where(c.kind == kind)
        if tenant is not None:
            base = base.where(c.tenant == tenant)
        if after is not None:
            at = await self._doc_position(kind, after)
            cursor = sa.tuple_(sa.literal(at, sa.Float), sa.literal(after, sa.String))
            position = sa.tuple_(c.created_at, c.id)
            base = base.where(position < cursor if desc else position > cursor)

        def ordered(stmt: Any, cols: Any) -> Any:
            if desc:
                return stmt.order_by(cols.created_at.desc(), cols.id.desc()).limit(limit)
            return stmt.order_by(cols.created_at.asc(), cols.id.asc()).limit(limit)

        if wanted is None:
            stmt = ordered(base, c)
        elif len(wanted) == 1:
            stmt = ordered(base.where(c.status == wanted[0]), c)
        else:
            # One ordered, limited range per status, merged: each reads at most
            # ``limit`` rows off its (kind[, tenant], status, created_at, id) index,
            # where one IN over the statuses would read every doc they hold.
            parts = [ordered(base.where(c.status == st), c).subquery() for st in wanted]
            merged = sa.union_all(*(sa.select(p.c.doc, p.c.created_at, p.c.id) for p in parts)).subquery()
            stmt = ordered(sa.select(merged.c.doc, merged.c.created_at, merged.c.id), merged.c)
        return [doc_record_from_doc(orjson.loads(r[0])) for r in await self._rows(stmt)]

    async def _doc_position(self, kind: str, doc_id: str) -> float:
        """The created_at of the cursor doc, live or deleted; ``NotFoundError`` if
        the kind never had it."""
        live, gone = docs_table.c, docs_gone_table.c
        stmt = sa.select(
            sa.func.coalesce(
                sa.select(live.created_at).where(live.kind == kind, live.id == doc_id).scalar_subquery(),
                sa.select(gone.created_at).where(gone.kind == kind, gone.id == doc_id).scalar_subquery(),
            )
        )
        rows = await self._rows(stmt)
        if not rows or rows[0][0] is None:
            raise NotFoundError(f"no {kind} {doc_id} to list after")
        return float(rows[0][0])


_R = TypeVar("_R", BatchRecord, ShardRecord)


def _bumped(rec: _R) -> _R:
    return dataclasses.replace(rec, version=rec.version + 1)
