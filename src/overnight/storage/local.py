"""Local directory storage (the default): ``file:///abs/dir``."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from overnight._concurrency import to_thread
from overnight.defaults import READ_CHUNK_BYTES
from overnight.errors import NotFoundError, StorageError
from overnight.storage.base import Storage, StorageWriter

__all__ = ["LocalStorage"]


class _LocalWriter(StorageWriter):
    """Writes to a hidden temp file beside the target; commit is an atomic rename."""

    def __init__(self, final: Path) -> None:
        self._final = final
        self._tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")
        self._fh: BinaryIO | None = None
        self._size = 0
        self._closed = False

    def _open(self) -> BinaryIO:
        self._final.parent.mkdir(parents=True, exist_ok=True)
        return open(self._tmp, "wb")

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise StorageError(f"writer for {self._final.name} is already committed or aborted")
        if self._fh is None:
            self._fh = await to_thread(self._open)
        await to_thread(self._fh.write, data)
        self._size += len(data)

    async def commit(self) -> int:
        if self._fh is None:  # empty object
            await self.write(b"")
        assert self._fh is not None
        fh, self._fh = self._fh, None
        self._closed = True

        def _finish() -> None:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(self._tmp, self._final)

        await to_thread(_finish)
        return self._size

    async def abort(self) -> None:
        self._closed = True
        fh, self._fh = self._fh, None
        if fh is not None:
            await to_thread(fh.close)
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class LocalStorage(Storage):
    def __init__(self, url: str) -> None:
        self.url = url
        path = url.split("://", 1)[1] if "://" in url else url
        self.root = Path(path).resolve()

    async def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents:
            raise StorageError(f"storage key escapes the storage root: {key!r}")
        return p

    async def read(self, key: str, *, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]:
        try:
            fh = await to_thread(open, self.path(key), "rb")
        except FileNotFoundError as exc:
            raise NotFoundError(f"object {key} not found") from exc
        try:
            while chunk := await to_thread(fh.read, chunk_bytes):
                yield chunk
        finally:
            fh.close()

    def writer(self, key: str) -> StorageWriter:
        return _LocalWriter(self.path(key))

    async def size(self, key: str) -> int:
        try:
            return (await to_thread(os.stat, self.path(key))).st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"object {key} not found") from exc

    async def delete(self, key: str) -> bool:
        try:
            await to_thread(os.unlink, self.path(key))
            return True
        except FileNotFoundError:
            return False
