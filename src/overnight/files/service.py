"""File operations behind ``/v1/files``. Routes call these; no rules live in routes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Literal

from overnight.errors import ConflictError, InvalidRequestError, NotFoundError
from overnight.ids import new_id
from overnight.storage.base import Storage
from overnight.store.base import Store
from overnight.store.records import FileRecord

__all__ = [
    "UPLOAD_PURPOSES",
    "Upload",
    "check_purpose",
    "create_file",
    "delete_file",
    "get_file",
    "list_files",
    "parse_expires_after",
    "read_content",
    "storage_key_for",
]

#: Purposes a client may upload with (OpenAI's list); ``batch_output`` is ours to set.
UPLOAD_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})

#: OpenAI bounds for ``expires_after.seconds``: one hour to thirty days.
MIN_EXPIRES_S = 3600
MAX_EXPIRES_S = 30 * 24 * 3600


def storage_key_for(file_id: str) -> str:
    return f"files/{file_id}"


def parse_expires_after(anchor: object, seconds: object, *, param: str = "expires_after") -> int | None:
    """Check OpenAI's ``{"anchor": "created_at", "seconds": N}``; returns seconds or None."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequestError(f"'{param}.anchor' must be \"created_at\", got {anchor!r}.", param=f"{param}.anchor")
    try:
        secs = int(str(seconds))
    except ValueError:
        raise InvalidRequestError(f"'{param}.seconds' must be an integer.", param=f"{param}.seconds") from None
    if not MIN_EXPIRES_S <= secs <= MAX_EXPIRES_S:
        raise InvalidRequestError(
            f"'{param}.seconds' must be between {MIN_EXPIRES_S} and {MAX_EXPIRES_S}, got {secs}.",
            param=f"{param}.seconds",
        )
    return secs


#: Bytes gathered before one storage write: few thread hops, bounded memory.
_WRITE_BUFFER_BYTES = 1024 * 1024


def check_purpose(purpose: str) -> None:
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"Invalid purpose {purpose!r}; expected one of {', '.join(sorted(UPLOAD_PURPOSES))}.",
            param="purpose",
        )


class Upload:
    """One file being received: bytes go straight to a storage writer, counted
    against ``max_bytes``; passing it aborts the writer (no partial object stays)
    before a byte over the limit is written."""

    def __init__(self, storage: Storage, *, max_bytes: int | None) -> None:
        self.file_id = new_id("file", "-")
        self.key = storage_key_for(self.file_id)
        self.max_bytes = max_bytes
        self.size = 0
        self._writer = storage.writer(self.key)
        self._storage = storage
        self._buf: list[bytes] = []
        self._buffered = 0

    def _too_large(self, limit: int, purpose: str | None) -> InvalidRequestError:
        what = f" for purpose {purpose!r}" if purpose else ""
        return InvalidRequestError(f"File is larger than the {limit}-byte limit{what}.", param="file")

    async def write(self, chunk: bytes, *, purpose: str | None = None) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            await self.abort()
            raise self._too_large(self.max_bytes, purpose)
        self._buf.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= _WRITE_BUFFER_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._buf:
            data, self._buf, self._buffered = b"".join(self._buf), [], 0
            await self._writer.write(data)

    async def abort(self) -> None:
        self._buf, self._buffered = [], 0
        await self._writer.abort()

    async def finish(
        self,
        *,
        store: Store,
        tenant: str,
        filename: str,
        purpose: str,
        expires_after_s: int | None = None,
        max_bytes: int | None = None,
    ) -> FileRecord:
        """Publish the bytes and record the file; on any failure nothing stays."""
        try:
            check_purpose(purpose)
            if max_bytes is not None and self.size > max_bytes:
                raise self._too_large(max_bytes, purpose)
            await self._flush()
            await self._writer.commit()
        except BaseException:
            await self.abort()
            raise
        now = int(time.time())
        rec = FileRecord(
            id=self.file_id,
            tenant=tenant,
            filename=filename,
            purpose=purpose,
            bytes=self.size,
            created_at=now,
            storage_key=self.key,
            expires_at=now + expires_after_s if expires_after_s else None,
        )
        try:
            await store.insert_file(rec)
        except BaseException:
            await self._storage.delete(self.key)
            raise
        return rec


async def create_file(
    *,
    store: Store,
    storage: Storage,
    tenant: str,
    filename: str,
    purpose: str,
    chunks: AsyncIterator[bytes],
    expires_after_s: int | None = None,
    max_bytes: int | None = None,
) -> FileRecord:
    """Stream ``chunks`` into storage and record the file. Nothing is recorded (and
    no object is left) if the stream fails or breaks a limit."""
    check_purpose(purpose)
    upload = Upload(storage, max_bytes=max_bytes)
    try:
        async for chunk in chunks:
            await upload.write(chunk, purpose=purpose)
    except BaseException:
        await upload.abort()
        raise
    return await upload.finish(
        store=store, tenant=tenant, filename=filename, purpose=purpose, expires_after_s=expires_after_s
    )


async def get_file(*, store: Store, tenant: str, file_id: str) -> FileRecord:
    rec = await store.get_file(file_id)
    if rec is None or rec.tenant != tenant:
        raise NotFoundError(f"No such File object: {file_id}")
    return rec


async def list_files(
    *,
    store: Store,
    tenant: str,
    purpose: str | None,
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"],
) -> tuple[list[FileRecord], bool]:
    """One page and whether more follow."""
    recs = await store.list_files(tenant=tenant, purpose=purpose, after=after, limit=limit + 1, order=order)
    return recs[:limit], len(recs) > limit


async def delete_file(*, store: Store, storage: Storage, tenant: str, file_id: str) -> FileRecord:
    rec = await get_file(store=store, tenant=tenant, file_id=file_id)
    readers = await store.batches_reading_file(file_id)
    if readers:
        raise ConflictError(
            f"File {file_id} is the input of batch {readers[0].id}, which is still {readers[0].status}; "
            "cancel the batch or wait for it to finish before deleting the file.",
            code="file_in_use",
        )
    await store.delete_file(file_id)
    # The record goes first: a crash between the two leaves unreachable bytes, never
    # a record pointing at nothing.
    await storage.delete(rec.storage_key)
    return rec


async def read_content(*, store: Store, storage: Storage, tenant: str, file_id: str) -> tuple[FileRecord, AsyncIterator[bytes]]:
    rec = await get_file(store=store, tenant=tenant, file_id=file_id)
    return rec, storage.read(rec.storage_key)
