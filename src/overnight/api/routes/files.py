"""``/v1/files``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from overnight.errors import InvalidRequestError
from overnight.files import service
from overnight.api.deps import SettingsDep, StorageDep, StoreDep, TenantDep
from overnight.api.schemas import file_object, list_object

router = APIRouter(prefix="/files", tags=["files"])

_UPLOAD_CHUNK_BYTES = 1024 * 1024
#: Upload limit for purposes other than batch (batch uses the input limit).
_MAX_OTHER_BYTES = 512 * 1024 * 1024


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_UPLOAD_CHUNK_BYTES):
        yield chunk


@router.post("")
async def create_file(request: Request, store: StoreDep, storage: StorageDep, tenant: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    # Starlette spools the file part to a temporary file past 1 MB, so an upload is
    # never whole in memory; from there it streams to storage in 1 MB chunks.
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as exc:  # malformed multipart
        raise InvalidRequestError(f"Could not parse the multipart upload: {exc}", param="file") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise InvalidRequestError("Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter")
        expires_s = service.parse_expires_after(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
        rec = await service.create_file(
            store=store,
            storage=storage,
            tenant=tenant,
            filename=upload.filename or "upload",
            purpose=purpose,
            chunks=_chunks(upload),
            expires_after_s=expires_s,
            max_bytes=settings.max_input_bytes if purpose == "batch" else _MAX_OTHER_BYTES,
        )
    finally:
        await form.close()
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
        headers={"Content-Length": str(rec.bytes), "Content-Disposition": f'attachment; filename="{rec.filename}"'},
    )
