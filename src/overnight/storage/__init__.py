"""Byte storage backends, chosen by URL scheme through one registry."""

from __future__ import annotations

import importlib
import types

from overnight.errors import StorageError
from overnight.storage.base import Storage, StorageWriter

__all__ = ["Storage", "StorageWriter", "open_storage", "register_storage", "registry"]

_registry: dict[str, tuple[str, str]] = {
    "file": ("overnight.storage.local:LocalStorage", ""),
    "memory": ("overnight.storage.memory:MemoryStorage", ""),
    "s3": ("overnight.storage.s3:S3Storage", "pip install 'overnight[s3]'"),
}
registry = types.MappingProxyType(_registry)


def register_storage(scheme: str, target: str, *, hint: str = "", clobber: bool = False) -> None:
    if scheme in _registry and not clobber:
        raise ValueError(f"storage scheme {scheme!r} is already registered")
    _registry[scheme] = (target, hint)


def open_storage(url: str) -> Storage:
    """Build (but do not open) the storage for ``url`` (``file:///dir``, ``s3://bucket/prefix``)."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme not in _registry:
        raise StorageError(f"unknown storage URL scheme {scheme!r}; known: {', '.join(sorted(_registry))}")
    target, hint = _registry[scheme]
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StorageError(f"the {scheme} storage needs extra packages ({exc.name}): {hint}") from exc
    return getattr(module, cls_name)(url)
