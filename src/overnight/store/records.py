"""Records kept by a store, as plain dataclasses.

Fields that never reach the wire (tenant, version, lease, storage key) live here and
not in the API schemas.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FileRecord",
    "BatchRecord",
    "ShardRecord",
    "SHARD_STATUSES",
    "record_to_doc",
    "file_from_doc",
    "batch_from_doc",
    "shard_from_doc",
    "webhook_due_at",
]


@dataclass(kw_only=True)
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    storage_key: str
    expires_at: int | None = None
    status: str = "processed"
    #: Batch that produced this file (output/error files), for cleanup and retention.
    batch_id: str | None = None
    version: int = 0


@dataclass(kw_only=True)
class BatchRecord:
    id: str
    tenant: str
    endpoint: str
    input_file_id: str
    completion_window: str
    completion_window_s: int
    status: str
    created_at: int
    expires_at: int
    #: The deadline to the sub-second (``expires_at``, the API's integer epoch
    #: seconds, is its floor): a ``1s`` window lasts a second, not what is left of one.
    expires_at_exact: float | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    #: OpenAI's ``errors.data`` entries: {code, message, line, param}.
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: dict[str, Any] = field(default_factory=dict)
    #: The ``overnight`` extension (runtime, max_concurrency, priority, job_id).
    options: dict[str, Any] = field(default_factory=dict)
    #: OpenAI's ``output_expires_after`` in seconds after the batch completes.
    output_expires_after_s: int | None = None
    #: Its engine's state as last seen by its runner (``executor/health.py``):
    #: shown in the batch object and carried over when another run takes over.
    engine: dict[str, Any] | None = None
    #: Its concurrency as of the last checkpoint (limit, why it last changed,
    #: measured rate, in flight): shown in the batch object.
    concurrency: dict[str, Any] | None = None
    #: The engine overnight started for it (``runtimes/``): the runtime's handle,
    #: recorded before the engine was waited on, and its restarts.
    runtime: dict[str, Any] | None = None
    #: Epoch seconds before which no scheduler claims it (it gave its running
    #: slot up while its engine was unreachable).
    not_before: float = 0.0
    #: Its webhook events and their deliveries (``webhooks/state.py``): set in the
    #: same write as the terminal status, so a delivery is owed exactly when the
    #: data it announces is durable. Stores index ``webhook_due_at`` of it.
    webhook: dict[str, Any] | None = None
    #: Compare-and-set version; every write bumps it.
    version: int = 0
    #: Lease: which replica executes the batch, until when, and the fencing token
    #: (bumped on every claim) that stale owners' writes are checked against.
    lease_owner: str | None = None
    lease_expires_at: float = 0.0
    lease_token: int = 0

    @property
    def deadline(self) -> float:
        """When the completion window ends (records made before ``expires_at_exact``
        existed fall back to ``expires_at``)."""
        return self.expires_at_exact if self.expires_at_exact is not None else float(self.expires_at)


#: What a shard can be: not claimed yet, held by a pod, finished, given up on.
SHARD_STATUSES = ("pending", "running", "done", "failed")


@dataclass(kw_only=True)
class ShardRecord:
    """One shard of a batch sharded over several pods: who runs it under which
    lease, and its progress. Its checkpoint is kept beside it (``update_shard``),
    so a retried pod for the same index resumes where the last one stopped."""

    batch_id: str
    #: 0-based; the shard owns the requests whose index mod ``count`` is ``index``.
    index: int
    #: How many shards the batch has.
    count: int
    #: One of ``SHARD_STATUSES``.
    status: str = "pending"
    #: Who holds the lease (pod name, process id); None when nobody has yet.
    holder: str | None = None
    #: Fencing token, bumped on every claim: a stale holder's writes are refused.
    token: int = 0
    lease_expires_at: float = 0.0
    #: Claims so far (the first run included).
    attempts: int = 0
    completed: int = 0
    failed: int = 0
    usage: dict[str, Any] = field(default_factory=dict)
    #: How many requests this shard owns.
    total: int = 0
    #: Why it failed: {code, message}.
    error: dict[str, Any] | None = None
    updated_at: float = 0.0
    #: Compare-and-set version; every write bumps it.
    version: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.batch_id, self.index)


def webhook_due_at(rec: BatchRecord) -> float | None:
    """When the batch's next webhook delivery is due (epoch seconds), or None when
    none is pending. Only the first pending delivery per target counts: the ones
    behind it wait for it, so they must not make the batch look due.

    The stores keep this in an index (a column, a sorted set, a field) written in
    the same atomic step as the record, so ``list_webhooks_due`` is one query."""
    state = rec.webhook
    if not state:
        return None
    due: float | None = None
    seen: set[str] = set()
    for d in state.get("pending") or ():
        target = d.get("target", "")
        if target in seen:
            continue
        seen.add(target)
        at = float(d.get("next_at", 0.0))
        due = at if due is None else min(due, at)
    return due


def record_to_doc(rec: FileRecord | BatchRecord | ShardRecord) -> dict[str, Any]:
    return dataclasses.asdict(rec)


_FILE_FIELDS = {f.name for f in dataclasses.fields(FileRecord)}
_BATCH_FIELDS = {f.name for f in dataclasses.fields(BatchRecord)}
_SHARD_FIELDS = {f.name for f in dataclasses.fields(ShardRecord)}


def file_from_doc(doc: dict[str, Any]) -> FileRecord:
    return FileRecord(**{k: v for k, v in doc.items() if k in _FILE_FIELDS})


def batch_from_doc(doc: dict[str, Any]) -> BatchRecord:
    return BatchRecord(**{k: v for k, v in doc.items() if k in _BATCH_FIELDS})


def shard_from_doc(doc: dict[str, Any]) -> ShardRecord:
    return ShardRecord(**{k: v for k, v in doc.items() if k in _SHARD_FIELDS})
