"""``/v1/files``."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from overnight.errors import InvalidRequestError
from overnight.files import service
from overnight.api.multipart import Field, FileData, FileEnd, FileStart, form_events
from overnight.config import Settings
from overnight.api.deps import SettingsDep, StorageDep, StoreDep, TenantDep
from overnight.api.schemas import file_object, list_object

router = APIRouter(prefix="/files", tags=["files"])

#: Upload limit for purposes other than batch (batch uses the input limit).
_MAX_OTHER_BYTES = 512 * 1024 * 1024


def _limit_for(purpose: str | None, settings: Settings) -> int:
    if purpose is None:  # not sent yet: the larger limit now, the right one at the end
        return max(settings.max_input_bytes, _MAX_OTHER_BYTES)
    return settings.max_input_bytes if purpose == "batch" else _MAX_OTHER_BYTES


@router.post("")
async def create_file(request: Request, store: StoreDep, storage: StorageDep, tenant: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    # The body is parsed as it arrives and the file part goes straight to storage,
    # so an upload over the limit stops at the limit (no temporary copy, no 2 GB
    # written before the 400).
    fields: dict[str, str] = {}
    upload: service.Upload | None = None
    filename = ""
    done = False
    try:
        async for ev in form_events(request.headers.get("content-type", ""), request.stream()):
            if isinstance(ev, Field):
                fields[ev.name] = ev.value
                if ev.name == "purpose":
                    service.check_purpose(ev.value)
            elif isinstance(ev, FileStart):
                if ev.name != "file":
                    raise InvalidRequestError(f"Unexpected file field {ev.name!r}; send the file as 'file'.", param=ev.name)
                if upload is not None:
                    raise InvalidRequestError("Send exactly one file per upload.", param="file")
                filename = ev.filename or "upload"
                upload = service.Upload(storage, max_bytes=_limit_for(fields.get("purpose"), settings))
            elif isinstance(ev, FileData):
                assert upload is not None
                await upload.write(ev.data, purpose=fields.get("purpose"))
            elif isinstance(ev, FileEnd):
                done = True
        if upload is None or not done:
            raise InvalidRequestError("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        purpose = fields.get("purpose")
        if not purpose:
            raise InvalidRequestError("Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter")
        expires_s = service.parse_expires_after(fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]"))
        rec = await upload.finish(
            store=store,
            tenant=tenant,
            filename=filename,
            purpose=purpose,
            expires_after_s=expires_s,
            max_bytes=_limit_for(purpose, settings),
        )
    except BaseException:
        if upload is not None:
            await upload.abort()
        raise
    return file_object(rec)


@router.get("")
async def list_files(
    store: StoreDep,
    tenant: TenantDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    recs, more = await service.list_files(store=store, tenant=tenant, purpose=purpose, after=after, limit=limit, order=order)
    return list_object([file_object(r) for r in recs], more)


@router.get("/{file_id}")
async def retrieve_file(file_id: str, store: StoreDep, tenant: TenantDep) -> dict[str, Any]:
    return file_object(await service.get_file(store=store, tenant=tenant, file_id=file_id))


@router.delete("/{file_id}")
async def delete_file(file_id: str, store: StoreDep, storage: StorageDep, tenant: TenantDep) -> dict[str, Any]:
    rec = await service.delete_file(store=store, storage=storage, tenant=tenant, file_id=file_id)
    return {"id": rec.id, "object": "file", "deleted": True}


@router.get("/{file_id}/content")
async def file_content(file_id: str, store: StoreDep, storage: StorageDep, tenant: TenantDep) -> StreamingResponse:
    rec, chunks = await service.read_content(store=store, storage=storage, tenant=tenant, file_id=file_id)
    await storage.size(rec.storage_key)  # 404 now rather than a broken stream later
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"Content-Length": str(rec.bytes), "Content-Disposition": content_disposition(rec.filename)},
    )


def content_disposition(filename: str) -> str:
    """RFC 6266: a quoted ASCII fallback for old clients and the exact name as an
    RFC 5987 ``filename*`` (headers are Latin-1, so a raw CJK name cannot go in)."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in filename) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
