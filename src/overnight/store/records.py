"""Records kept by a store, as plain dataclasses.

Fields that never reach the wire (tenant, version, lease, storage key) live here and
not in the API schemas.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from overnight.errors import InvalidRequestError

__all__ = [
    "FileRecord",
    "BatchRecord",
    "ShardRecord",
    "DocRecord",
    "SHARD_STATUSES",
    "record_to_doc",
    "file_from_doc",
    "batch_from_doc",
    "shard_from_doc",
    "doc_record_from_doc",
    "doc_record_json",
    "check_doc_kind",
    "check_doc_order",
    "check_doc_statuses",
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


#: A doc's kind: lower-case letters, digits and '-' (it is part of Redis keys and
#: MongoDB ids, so it must never hold a separator).
_DOC_KIND = re.compile(r"[a-z0-9-]{1,32}")
#: Longest id, tenant, status and key a doc may have: what the SQL columns hold,
#: checked here so that every backend refuses the same records.
DOC_ID_MAX, DOC_TENANT_MAX, DOC_STATUS_MAX, DOC_KEY_MAX = 128, 128, 64, 256


@dataclass(kw_only=True)
class DocRecord:
    """A JSON document of some ``kind`` (a console job, a provisioning record, a
    model, a deployment template), kept by every store with the few fields that
    lists and lookups need beside it.

    ``created_at`` is set when the doc is inserted and never changes: lists are
    ordered by (created_at, id), so a cursor stays valid however the doc changes.
    ``key`` is an optional second name, unique per (kind, tenant) (an idempotency
    key, a model's name). Every write is a compare-and-set on ``version``, exactly
    like ``BatchRecord``."""

    kind: str
    id: str
    tenant: str
    created_at: float
    #: Queryable state (a job's status); "" when the kind has none.
    status: str = ""
    key: str | None = None
    body: dict[str, Any]
    updated_at: float = 0.0
    #: Compare-and-set version; every write bumps it.
    version: int = 0

    def __post_init__(self) -> None:
        # Checked on every construction (``dataclasses.replace`` included), so a
        # bad record fails where it is made, the same way on every backend.
        check_doc_kind(self.kind)
        _check_text("id", self.id, DOC_ID_MAX, allow_empty=False)
        _check_text("tenant", self.tenant, DOC_TENANT_MAX, allow_empty=True)
        _check_text("status", self.status, DOC_STATUS_MAX, allow_empty=True)
        if self.key is not None:
            _check_text("key", self.key, DOC_KEY_MAX, allow_empty=False)
        if not isinstance(self.body, dict):
            raise InvalidRequestError(f"doc body must be a JSON object, not {type(self.body).__name__}", param="body")
        self.created_at = _check_time("created_at", self.created_at)
        self.updated_at = _check_time("updated_at", self.updated_at)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise InvalidRequestError(f"doc version must be an integer >= 0, not {self.version!r}", param="version")


def check_doc_kind(kind: Any) -> str:
    """``kind`` if it is a valid doc kind, else ``InvalidRequestError`` naming it."""
    if not isinstance(kind, str) or not _DOC_KIND.fullmatch(kind):
        raise InvalidRequestError(f"doc kind {kind!r} must be 1 to 32 lower-case letters, digits or '-'", param="kind")
    return kind


def check_doc_order(order: Any) -> bool:
    """True for ``newest`` (descending), False for ``oldest``; anything else is refused."""
    if order not in ("newest", "oldest"):
        raise InvalidRequestError(f"doc list order must be 'newest' or 'oldest', not {order!r}", param="order")
    return order == "newest"


def check_doc_statuses(statuses: Any) -> list[str] | None:
    """The status filter as a sorted list without repeats (None: no filter). A bare
    string is refused: it is a collection of characters, not of statuses."""
    if statuses is None:
        return None
    if isinstance(statuses, (str, bytes)) or not all(isinstance(s, str) for s in statuses):
        raise InvalidRequestError(f"doc statuses must be a collection of strings, not {statuses!r}", param="statuses")
    return sorted(set(statuses))


def _check_text(name: str, value: Any, most: int, *, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise InvalidRequestError(f"doc {name} must be a string, not {type(value).__name__}", param=name)
    if not value and not allow_empty:
        raise InvalidRequestError(f"doc {name} must not be empty", param=name)
    if len(value) > most:
        raise InvalidRequestError(f"doc {name} is {len(value)} characters long; at most {most} are allowed", param=name)


def _check_time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"doc {name} must be a finite number of epoch seconds, not {value!r}", param=name)
    return float(value)


def doc_record_json(rec: DocRecord) -> bytes:
    """The record as the JSON every backend stores. A body that is not JSON (a set,
    a non-string key, an integer past 64 bits) is refused naming ``body``."""
    try:
        return orjson.dumps(dataclasses.asdict(rec))
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidRequestError(f"doc {rec.kind} {rec.id}: body is not JSON: {exc}", param="body") from exc


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


def record_to_doc(rec: FileRecord | BatchRecord | ShardRecord | DocRecord) -> dict[str, Any]:
    return dataclasses.asdict(rec)


_FILE_FIELDS = {f.name for f in dataclasses.fields(FileRecord)}
_BATCH_FIELDS = {f.name for f in dataclasses.fields(BatchRecord)}
_SHARD_FIELDS = {f.name for f in dataclasses.fields(ShardRecord)}
_DOC_FIELDS = {f.name for f in dataclasses.fields(DocRecord)}


def file_from_doc(doc: dict[str, Any]) -> FileRecord:
    return FileRecord(**{k: v for k, v in doc.items() if k in _FILE_FIELDS})


def batch_from_doc(doc: dict[str, Any]) -> BatchRecord:
    return BatchRecord(**{k: v for k, v in doc.items() if k in _BATCH_FIELDS})


def shard_from_doc(doc: dict[str, Any]) -> ShardRecord:
    return ShardRecord(**{k: v for k, v in doc.items() if k in _SHARD_FIELDS})


def doc_record_from_doc(doc: dict[str, Any]) -> DocRecord:
    return DocRecord(**{k: v for k, v in doc.items() if k in _DOC_FIELDS})
