"""In-memory storage for tests (``memory://``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from overnight.defaults import READ_CHUNK_BYTES
from overnight.errors import NotFoundError, StorageError
from overnight.storage.base import Storage, StorageWriter

__all__ = ["MemoryStorage"]


class _MemoryWriter(StorageWriter):
    def __init__(self, objects: dict[str, bytes], key: str) -> None:
        self._objects, self._key, self._parts = objects, key, list[bytes]()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"writer for {self._key} is already committed or aborted")

    async def write(self, data: bytes) -> None:
        self._check_open()
        self._parts.append(bytes(data))

    async def commit(self) -> int:
        self._check_open()
        self._closed = True
        self._objects[self._key] = b"".join(self._parts)
        return len(self._objects[self._key])

    async def abort(self) -> None:
        self._closed = True
        self._parts.clear()


class MemoryStorage(Storage):
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.objects: dict[str, bytes] = {}

    async def read(self, key: str, *, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]:
        if key not in self.objects:
            raise NotFoundError(f"object {key} not found")
        data = self.objects[key]
        for i in range(0, len(data), chunk_bytes):
            yield data[i : i + chunk_bytes]

    def writer(self, key: str) -> StorageWriter:
        return _MemoryWriter(self.objects, key)

    async def size(self, key: str) -> int:
        if key not in self.objects:
            raise NotFoundError(f"object {key} not found")
        return len(self.objects[key])

    async def delete(self, key: str) -> bool:
        return self.objects.pop(key, None) is not None
