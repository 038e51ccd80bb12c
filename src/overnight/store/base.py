"""The record store interface.

A store keeps file metadata, batch records and batch checkpoints, the shard
records (and shard checkpoints) of batches sharded over several pods, and
document records of other kinds (the console's jobs, provisioning records,
models and templates). Every batch
or shard write is a compare-and-set on ``version``: two replicas or a racing
cancel cannot both win. Backends store each record as a document plus the few indexed fields
lists need (tenant, purpose, status, id), so adding a field never needs a migration.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal, Protocol, runtime_checkable

from overnight.store.records import BatchRecord, DocRecord, FileRecord, ShardRecord

__all__ = ["Store", "ACTIVE_STATUSES"]

#: Statuses a scheduler still has work for.
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")


@runtime_checkable
class Store(Protocol):
    """Records behind one interface. Methods that take more than two parameters are
    keyword-only. Lists are ordered by id (ids are time-ordered)."""

    async def open(self) -> None:
        """Connect and make sure the schema/indexes exist."""

    async def aclose(self) -> None: ...

    # -- files -------------------------------------------------------------
    async def insert_file(self, rec: FileRecord) -> None: ...

    async def get_file(self, file_id: str) -> FileRecord | None: ...

    async def list_files(
        self,
        *,
        tenant: str,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> list[FileRecord]: ...

    async def delete_file(self, file_id: str) -> bool:
        """Delete the record; True if it existed."""

    async def list_expired_files(self, *, now: int, limit: int = 100) -> list[FileRecord]: ...

    # -- batches -----------------------------------------------------------
    async def insert_batch(self, rec: BatchRecord) -> None: ...

    async def get_batch(self, batch_id: str) -> BatchRecord | None: ...

    async def list_batches(
        self, *, tenant: str, after: str | None = None, limit: int = 20
    ) -> list[BatchRecord]:
        """Newest first."""

    async def list_active_batches(self, *, limit: int = 1000) -> list[BatchRecord]:
        """Batches in ``ACTIVE_STATUSES``, oldest first."""

    async def batches_reading_file(self, file_id: str) -> list[BatchRecord]:
        """Active batches whose input is ``file_id``."""

    async def count_active_batches(self) -> dict[str, int]:
        """How many batches are in each of ``ACTIVE_STATUSES`` (every one a key, 0
        when none), store-wide. Served by the status index, never a scan of finished
        batches, so ``/metrics`` can call it on every scrape."""

    async def update_batch(self, rec: BatchRecord, *, checkpoint: bytes | None = None) -> BatchRecord:
        """Write ``rec`` if the stored version still equals ``rec.version``; return the
        record with the bumped version. With ``checkpoint``, store it in the same
        atomic write. Raises ``VersionConflict`` when another writer got there first,
        ``NotFoundError`` when the batch is gone."""

    async def get_checkpoint(self, batch_id: str) -> bytes | None: ...

    async def list_webhooks_due(self, *, now: float, limit: int = 100) -> list[BatchRecord]:
        """Batches with a webhook delivery due by ``now`` (``records.webhook_due_at``),
        soonest first. The index behind it is written in the same atomic step as the
        record, so a batch is listed exactly while its stored record owes a delivery."""

    # -- shards ------------------------------------------------------------
    # A shard is named by (batch_id, index). The store keeps what it is given; who
    # may claim or write a shard (leases, fencing) is ``batches/shards.py``'s rule.
    async def insert_shard(self, rec: ShardRecord) -> None:
        """Raises ``StoreError`` when the batch already has a shard ``rec.index``."""

    async def get_shard(self, batch_id: str, index: int) -> ShardRecord | None: ...

    async def list_shards(self, batch_id: str) -> list[ShardRecord]:
        """The batch's shards, ordered by index."""

    async def update_shard(self, rec: ShardRecord, *, checkpoint: bytes | None = None) -> ShardRecord:
        """Compare-and-set exactly like ``update_batch``: write ``rec`` if the stored
        version still equals ``rec.version`` (together with ``checkpoint``, when
        given) and return it with the bumped version. Raises ``VersionConflict``
        or ``NotFoundError``."""

    async def get_shard_checkpoint(self, batch_id: str, index: int) -> bytes | None: ...

    async def delete_shards(self, batch_id: str) -> int:
        """Delete the batch's shard records and their checkpoints; how many records went."""

    # -- document records ----------------------------------------------------
    # A doc is named by (kind, id); kinds never mix. Lists are ordered by
    # (created_at, id) and served by indexes (per kind, kind+tenant, kind+status,
    # kind+tenant+status), never by a scan of the kind.
    async def insert_doc(self, rec: DocRecord) -> None:
        """Raises ``StoreError`` ("already exists") when the kind already has a doc
        ``rec.id``, or, when ``rec.key`` is set, a doc of that tenant with that key;
        nothing is written then. ``InvalidRequestError`` (param ``body``) when the
        body is not JSON."""

    async def get_doc(self, kind: str, id: str) -> DocRecord | None: ...

    async def get_doc_by_key(self, kind: str, tenant: str, key: str) -> DocRecord | None: ...

    async def update_doc(self, rec: DocRecord) -> DocRecord:
        """Compare-and-set like ``update_batch``: write ``rec`` if the stored version
        still equals ``rec.version`` and return it with the bumped version. It may
        change status, body, key and updated_at; tenant and created_at are fixed at
        insert (``InvalidRequestError`` naming the field). Raises ``VersionConflict``,
        ``NotFoundError``, or ``StoreError`` when the new key is another doc's."""

    async def delete_doc(self, kind: str, id: str) -> bool:
        """Delete the doc (its key becomes free); True if it existed. The store keeps
        where it stood in the lists, so a cursor naming it still works."""

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
        """Docs of ``kind`` (of one tenant, in some statuses) ordered by
        (created_at, id), descending for ``newest``, ascending for ``oldest``.

        ``after`` is the id of a doc of this kind: the list goes on strictly after
        it in that order, so paging never repeats or skips a doc while docs change
        status or new ones arrive. Like ``list_batches``, a cursor doc that has
        since been deleted still works (the list goes on from where it stood); an
        id the kind never had raises ``NotFoundError``."""
