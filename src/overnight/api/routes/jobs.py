"""The console API under ``/api/v1``: jobs, models and their deployment templates,
the file proxy and the catalog.

API keys and tenants apply exactly as on ``/v1``: another tenant's job or model is
a 404, identical to an unknown id. The business rules are in ``console/``.
"""

from __future__ import annotations

import tempfile
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from overnight.api.deps import SettingsDep, StorageDep, StoreDep, TenantDep
from overnight.api.routes import files as file_routes
from overnight.console import jobs as job_service
from overnight.console import models as model_service
from overnight.console import templates as template_service
from overnight.api.multipart import Field, FileData, FileEnd, FileStart, form_events
from overnight.errors import InvalidRequestError, NotFoundError
from overnight.files import service as file_service

router = APIRouter(prefix="/api/v1", tags=["console"])


def _console(request: Request) -> Any:
    console = getattr(request.app.state.services, "console", None)
    if console is None:
        raise NotFoundError("The console is not enabled on this server (OVERNIGHT_CONSOLE=false).")
    return console


def _page(items: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": more}


# -- jobs ------------------------------------------------------------------------------------------
@router.post("/jobs")
async def create_job(request: Request, store: StoreDep, tenant: TenantDep) -> dict[str, Any]:
    console = _console(request)
    try:
        body = await request.json()
    except ValueError:
        raise InvalidRequestError("The request body must be JSON.") from None
    rec = await console.create_job(tenant=tenant, body=body)
    return job_service.job_object(rec)


@router.get("/jobs")
async def list_jobs(
    request: Request, store: StoreDep, tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None,
) -> dict[str, Any]:
    _console(request)
    recs, more = await job_service.list_jobs(store=store, tenant=tenant, after=after, limit=limit)
    return _page([job_service.job_object(r) for r in recs], more)


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str, store: StoreDep, tenant: TenantDep) -> dict[str, Any]:
    _console(request)
    return job_service.job_object(await job_service.get_job(store=store, tenant=tenant, job_id=job_id))


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str, store: StoreDep, tenant: TenantDep) -> dict[str, Any]:
    console = _console(request)
    rec = await job_service.cancel_job(store=store, tenant=tenant, job_id=job_id,
                                       webhooks=getattr(console, "job_webhooks", None))
    console.planner.kick(rec.id)
    return job_service.job_object(rec)


# -- models ----------------------------------------------------------------------------------------
@router.post("/models")
async def create_model(request: Request, store: StoreDep, tenant: TenantDep) -> dict[str, Any]:
    _console(request)
    rec = await model_service.create_model(store=store, tenant=tenant, body=await _json(request))
    return model_service.model_object(rec)


@router.get("/models")
async def list_models(
    request: Request, store: StoreDep, tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None,
) -> dict[str, Any]:
    _console(request)
    recs, more = await model_service.list_models(store=store, tenant=tenant, after=after, limit=limit)
    return _page([model_service.model_object(r) for r in recs], more)


@router.get("/models/{model_id}")
async def get_model(request: Request, model_id: str, store: StoreDep, tenant: TenantDep) -> dict[str, Any]:
    _console(request)
    return model_service.model_object(await model_service.get_model(store=store, tenant=tenant, model_id=model_id))


@router.patch("/models/{model_id}")
async def update_model(request: Request, model_id: str, store: StoreDep, tenant: TenantDep) -> dict[str, Any]:
    _console(request)
    rec = await model_service.update_model(store=store, tenant=tenant, model_id=model_id, body=await _json(request))
    return model_service.model_object(rec)


@router.delete("/models/{model_id}")
async def delete_model(request: Request, model_id: str, store: StoreDep, tenant: TenantDep) -> dict[str, Any]:
    console = _console(request)
    await model_service.get_model(store=store, tenant=tenant, model_id=model_id)
    # Its templates first: a crash in between leaves a model with fewer templates, never templates without a model.
    await template_service.delete_model_templates(store=store, tenant=tenant, model_id=model_id)
    console.templates.invalidate(tenant)
    await model_service.delete_model(store=store, tenant=tenant, model_id=model_id)
    return {"id": model_id, "object": "model", "deleted": True}


# -- a model's deployment templates ----------------------------------------------------------------
@router.post("/models/{model_id}/deployment-templates")
async def create_deployment_template(request: Request, model_id: str, store: StoreDep,
                                     tenant: TenantDep) -> dict[str, Any]:
    console = _console(request)
    server = console.rules.templates if console.rules is not None else None
    rec = await template_service.create_template(store=store, tenant=tenant, model_id=model_id,
                                                 body=await _json(request), server=server)
    console.templates.invalidate(tenant)
    return template_service.template_object(rec)


@router.get("/models/{model_id}/deployment-templates")
async def list_deployment_templates(
    request: Request, model_id: str, store: StoreDep, tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None,
) -> dict[str, Any]:
    _console(request)
    recs, more = await template_service.list_templates(store=store, tenant=tenant, model_id=model_id, after=after,
                                                       limit=limit)
    return _page([template_service.template_object(r) for r in recs], more)


@router.get("/models/{model_id}/deployment-templates/by-name/{name}")
async def get_deployment_template_by_name(request: Request, model_id: str, name: str, store: StoreDep,
                                          tenant: TenantDep, version: str | None = None) -> dict[str, Any]:
    _console(request)
    rec = await template_service.get_template_by_name(store=store, tenant=tenant, model_id=model_id, name=name,
                                                      version=version or None)
    return template_service.template_object(rec)


@router.get("/models/{model_id}/deployment-templates/{template_id}")
async def get_deployment_template(request: Request, model_id: str, template_id: str, store: StoreDep,
                                  tenant: TenantDep) -> dict[str, Any]:
    _console(request)
    rec = await template_service.get_template(store=store, tenant=tenant, model_id=model_id,
                                              template_id=template_id)
    return template_service.template_object(rec)


@router.delete("/models/{model_id}/deployment-templates/{template_id}")
async def delete_deployment_template(request: Request, model_id: str, template_id: str, store: StoreDep,
                                     tenant: TenantDep) -> dict[str, Any]:
    console = _console(request)
    await template_service.delete_template(store=store, tenant=tenant, model_id=model_id, template_id=template_id)
    console.templates.invalidate(tenant)
    return {"id": template_id, "object": "deployment_template", "deleted": True}


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise InvalidRequestError("The request body must be JSON.") from None


# -- the file proxy --------------------------------------------------------------------------------
# ``overnight serve`` keeps the files itself; ``overnight console`` as its own process
# (``api/console_app.py``) forwards them to the batches service, where they live.
def _remote(request: Request) -> Any:
    """The batches service, when this process is the console on its own (files live there)."""
    return getattr(request.app.state.services, "remote", None)


@router.post("/files/upload")
async def upload_file(request: Request, store: StoreDep, storage: StorageDep, tenant: TenantDep,
                      settings: SettingsDep) -> dict[str, Any]:
    remote = _remote(request)
    if remote is not None:
        return await _forward_upload(request, remote, tenant, settings)
    return await file_routes.create_file(request, store, storage, tenant, settings)


@router.get("/files/{file_id}/content")
async def file_content(request: Request, file_id: str, store: StoreDep, storage: StorageDep,
                       tenant: TenantDep) -> StreamingResponse:
    remote = _remote(request)
    if remote is not None:
        headers, chunks = await remote.content(tenant=tenant, file_id=file_id)
        media = headers.pop("content-type", "application/octet-stream")
        return StreamingResponse(chunks, media_type=media, headers=headers)
    return await file_routes.file_content(file_id, store, storage, tenant)


async def _forward_upload(request: Request, remote: Any, tenant: str, settings: Any) -> dict[str, Any]:
    """Read the multipart upload as it arrives into a spool file (memory up to
    8 MiB, then the data dir, the one writable place; never past this server's
    upload limit), then send it to the batches service as the tenant."""
    fields: dict[str, str] = {}
    filename, seen_file, done, size = "upload", False, False, 0
    spool_dir = settings.data_dir / "tmp"
    spool_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.SpooledTemporaryFile(max_size=8 << 20, dir=spool_dir) as spool:
        async for ev in form_events(request.headers.get("content-type", ""), request.stream()):
            if isinstance(ev, Field):
                fields[ev.name] = ev.value
                if ev.name == "purpose":
                    file_service.check_purpose(ev.value)
            elif isinstance(ev, FileStart):
                if ev.name != "file":
                    raise InvalidRequestError(f"Unexpected file field {ev.name!r}; send the file as 'file'.",
                                              param=ev.name)
                if seen_file:
                    raise InvalidRequestError("Send exactly one file per upload.", param="file")
                seen_file, filename = True, ev.filename or "upload"
            elif isinstance(ev, FileData):
                size += len(ev.data)
                limit = file_routes._limit_for(fields.get("purpose"), settings)
                if size > limit:
                    raise InvalidRequestError(f"File is larger than the {limit}-byte upload limit.", param="file",
                                              code="file_too_large")
                spool.write(ev.data)
            elif isinstance(ev, FileEnd):
                done = True
        if not seen_file or not done:
            raise InvalidRequestError("Missing required parameter: 'file'.", param="file",
                                      code="missing_required_parameter")
        purpose = fields.get("purpose")
        if not purpose:
            raise InvalidRequestError("Missing required parameter: 'purpose'.", param="purpose",
                                      code="missing_required_parameter")
        limit = file_routes._limit_for(purpose, settings)
        if size > limit:
            raise InvalidRequestError(f"File is larger than the {limit}-byte upload limit.", param="file",
                                      code="file_too_large")
        expires_s = file_service.parse_expires_after(fields.get("expires_after[anchor]"),
                                                     fields.get("expires_after[seconds]"))
        spool.seek(0)
        return await remote.upload(
            tenant=tenant, filename=filename, file=spool, purpose=purpose,
            expires_after={"anchor": "created_at", "seconds": expires_s} if expires_s else None)


# -- the catalog -----------------------------------------------------------------------------------
@router.get("/catalog")
async def catalog(request: Request) -> dict[str, Any]:
    console = _console(request)
    items: list[dict[str, Any]] = []
    for name, p in console.provisioners.items():
        try:
            items += await p.catalog()
        except Exception as exc:  # one provider's catalog down does not hide the others
            items.append({"provider": name, "error": str(exc)})
    return {"object": "list", "data": items, "at": int(time.time())}
