"""OpenAI-shaped objects on the wire. Records carry more (tenant, version, lease);
only what is built here reaches a client."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from overnight.store.records import BatchRecord, FileRecord

__all__ = ["BatchCreateBody", "batch_object", "file_object", "list_object"]


class BatchCreateBody(BaseModel):
    """``POST /v1/batches``. Unknown top-level fields are ignored, as newer SDKs may
    send fields this server does not know; unknown extension fields are an error."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None = None
    output_expires_after: dict[str, Any] | None = None
    overnight: Any = None
    aibrix: Any = None


def file_object(rec: FileRecord) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": rec.id,
        "object": "file",
        "bytes": rec.bytes,
        "created_at": rec.created_at,
        "filename": rec.filename,
        "purpose": rec.purpose,
        "status": rec.status,
        "status_details": None,
    }
    if rec.expires_at is not None:
        obj["expires_at"] = rec.expires_at
    return obj


def batch_object(rec: BatchRecord) -> dict[str, Any]:
    usage = rec.usage or {}
    return {
        "id": rec.id,
        "object": "batch",
        "endpoint": rec.endpoint,
        "model": rec.model,
        "errors": {"object": "list", "data": rec.errors} if rec.errors else None,
        "input_file_id": rec.input_file_id,
        "completion_window": rec.completion_window,
        "status": rec.status,
        "output_file_id": rec.output_file_id,
        "error_file_id": rec.error_file_id,
        "created_at": rec.created_at,
        "in_progress_at": rec.in_progress_at,
        "expires_at": rec.expires_at,
        "finalizing_at": rec.finalizing_at,
        "completed_at": rec.completed_at,
        "failed_at": rec.failed_at,
        "expired_at": rec.expired_at,
        "cancelling_at": rec.cancelling_at,
        "cancelled_at": rec.cancelled_at,
        "request_counts": {"total": rec.total, "completed": rec.completed, "failed": rec.failed},
        "usage": {
            "input_tokens": usage.get("input_tokens", 0),
            "output_tokens": usage.get("output_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "input_tokens_details": usage.get("input_tokens_details", {"cached_tokens": 0}),
            "output_tokens_details": usage.get("output_tokens_details", {"reasoning_tokens": 0}),
        },
        "metadata": rec.metadata,
        **_overnight_section(rec),
    }


def _overnight_section(rec: BatchRecord) -> dict[str, Any]:
    """overnight's own view of the batch (absent until there is something to show):
    its engine's state and, while it waits for that engine, when it is tried again."""
    section: dict[str, Any] = {}
    if rec.engine:
        section["engine"] = rec.engine
    if rec.concurrency and rec.status in ("in_progress", "cancelling"):
        section["concurrency"] = rec.concurrency
    rt = rec.options.get("runtime") or {}
    if rt.get("type") and rt.get("type") != "endpoint":
        view: dict[str, Any] = {"type": rt["type"]}
        if rec.runtime:
            handle = rec.runtime.get("handle") or {}
            view.update({k: handle[k] for k in ("pid", "port", "gpus", "host", "namespace", "name", "shards")
                         if k in handle})
            if rt["type"] == "kubernetes-job":
                # The Job's pods and what went wrong with them (unschedulable, image pulls).
                for k in ("pods", "events"):
                    if rec.runtime.get(k):
                        view[k] = rec.runtime[k]
            else:
                view["restarts"] = rec.runtime.get("restarts", 0)
        section["runtime"] = view
    if rec.options.get("resource_allocation"):
        section["resource_allocation"] = rec.options["resource_allocation"]
    tpl = rec.options.get("template")
    if tpl:
        from overnight.templates.resolve import Resolved

        section["model_template"] = Resolved.from_record(tpl).summary()
    if rec.not_before > time.time() and rec.status == "in_progress":
        section["waiting_until"] = int(rec.not_before)
    if rec.webhook:
        from overnight.webhooks.state import view

        deliveries = view(rec)
        if deliveries:
            section["webhooks"] = deliveries
    return {"overnight": section} if section else {}


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
