"""The record store interface.

A store keeps file metadata, batch records and batch checkpoints, and the shard
records (and shard checkpoints) of batches sharded over several pods. Every batch
or shard write is a compare-and-set on ``version``: two replicas or a racing
cancel cannot both win. Backends store each record as a document plus the few indexed fields
lists need (tenant, purpose, status, id), so adding a field never needs a migration.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from overnight.store.records import BatchRecord, FileRecord, ShardRecord

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
