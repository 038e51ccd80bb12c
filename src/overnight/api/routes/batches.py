"""``/v1/batches``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from overnight.api.deps import SchedulerDep, SettingsDep, StorageDep, StoreDep, TenantDep
from overnight.api.edge import is_console_key
from overnight.api.schemas import BatchCreateBody, batch_object, list_object
from overnight.batches import service
from overnight.batches.validation import ValidationLimits
from overnight.errors import InvalidRequestError

router = APIRouter(prefix="/batches", tags=["batches"])


@router.post("")
async def create_batch(
    request: Request,
    body: BatchCreateBody,
    store: StoreDep,
    storage: StorageDep,
    tenant: TenantDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
) -> dict[str, Any]:
    if body.overnight is not None and body.aibrix is not None:
        raise InvalidRequestError("Pass the extension as 'overnight' or 'aibrix', not both.", param="aibrix")
    ext_key = "aibrix" if body.aibrix is not None else "overnight"
    ext = body.aibrix if body.aibrix is not None else body.overnight
    rec = await service.create_batch(
        store=store,
        storage=storage,
        tenant=tenant,
        body=service.BatchCreate(
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            output_expires_after=body.output_expires_after,
            extension=ext,
            extension_key=ext_key,
        ),
        limits=ValidationLimits(max_requests=settings.max_requests_per_file, max_bytes=settings.max_input_bytes),
        validate_now=settings.validate_on_create,
        policy=request.app.state.endpoint_policy,
        secrets=request.app.state.secrets,
        rules=request.app.state.runtime_rules,
        webhooks=request.app.state.services.webhooks,
        console=is_console_key(request.headers.raw, getattr(request.app.state, "console_keys", frozenset())),
    )
    scheduler.wake()
    return batch_object(rec)


@router.get("")
async def list_batches(
    store: StoreDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict[str, Any]:
    recs, more = await service.list_batches(store=store, tenant=tenant, after=after, limit=limit)
    return list_object([batch_object(r) for r in recs], more)


@router.get("/{batch_id}")
async def retrieve_batch(batch_id: str, store: StoreDep, tenant: TenantDep) -> dict[str, Any]:
    return batch_object(await service.get_batch(store=store, tenant=tenant, batch_id=batch_id))


@router.post("/{batch_id}/cancel")
async def cancel_batch(batch_id: str, store: StoreDep, tenant: TenantDep, scheduler: SchedulerDep) -> dict[str, Any]:
    rec = await service.cancel_batch(store=store, tenant=tenant, batch_id=batch_id)
    scheduler.notify_cancel(batch_id)
    scheduler.wake()
    return batch_object(rec)


@router.get("/{batch_id}/engine/logs")
async def engine_logs(
    request: Request, batch_id: str, store: StoreDep, tenant: TenantDep,
    lines: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    """The last lines of the log of the engine overnight started for this batch."""
    rec = await service.get_batch(store=store, tenant=tenant, batch_id=batch_id)
    text = service.engine_log_tail(rec, request.app.state.services.engines, lines)
    return {"object": "engine.log", "batch_id": rec.id, "lines": text.splitlines() if text else []}
