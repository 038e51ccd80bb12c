"""Byte storage backends, chosen by URL scheme through one registry."""

from __future__ import annotations

from overnight._registry import LazyRegistry
from overnight.errors import StorageError
from overnight.storage.base import Storage, StorageWriter

__all__ = ["Storage", "StorageWriter", "open_storage", "register_storage", "registry"]

_storages = LazyRegistry(
    "storage",
    StorageError,
    {
        "file": ("overnight.storage.local:LocalStorage", ""),
        "memory": ("overnight.storage.memory:MemoryStorage", ""),
        "s3": ("overnight.storage.s3:S3Storage", "pip install 'overnight[s3]'"),
    },
)
registry = _storages.entries
register_storage = _storages.register


def open_storage(url: str) -> Storage:
    """Build (but do not open) the storage for ``url`` (``file:///dir``, ``s3://bucket/prefix``)."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    return _storages.load(scheme)(url)
