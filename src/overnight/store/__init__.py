"""Record stores, chosen by URL scheme through one registry.

Backends are imported on first use, so a default SQLite ``overnight serve`` never
imports asyncpg, redis or pymongo.
"""

from __future__ import annotations

import importlib
import types

from overnight.errors import StoreError
from overnight.store.base import ACTIVE_STATUSES, Store
from overnight.store.records import BatchRecord, FileRecord

__all__ = [
    "ACTIVE_STATUSES",
    "BatchRecord",
    "FileRecord",
    "Store",
    "connect_store",
    "register_store",
    "registry",
]

#: scheme -> ("module:Class", install hint)
_registry: dict[str, tuple[str, str]] = {
    "sqlite": ("overnight.store.sqlite:SQLiteStore", ""),
    "memory": ("overnight.store.memory:MemoryStore", ""),
    "postgresql": ("overnight.store.postgres:PostgresStore", "pip install 'overnight[postgres]'"),
    "postgres": ("overnight.store.postgres:PostgresStore", "pip install 'overnight[postgres]'"),
    "redis": ("overnight.store.redis:RedisStore", "pip install 'overnight[redis]'"),
    "rediss": ("overnight.store.redis:RedisStore", "pip install 'overnight[redis]'"),
    "mongodb": ("overnight.store.mongo:MongoStore", "pip install 'overnight[mongo]'"),
    "mongodb+srv": ("overnight.store.mongo:MongoStore", "pip install 'overnight[mongo]'"),
}
registry = types.MappingProxyType(_registry)


def register_store(scheme: str, target: str, *, hint: str = "", clobber: bool = False) -> None:
    """Register ``module:Class`` for a URL scheme; refuses to replace unless ``clobber``."""
    if scheme in _registry and not clobber:
        raise ValueError(f"store scheme {scheme!r} is already registered")
    _registry[scheme] = (target, hint)


def store_class(url: str) -> type:
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "+srv" not in url else "mongodb+srv"
    if scheme not in _registry:
        raise StoreError(f"unknown store URL scheme {scheme!r} in {url!r}; known: {', '.join(sorted(_registry))}")
    target, hint = _registry[scheme]
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StoreError(f"the {scheme} store needs extra packages ({exc.name}): {hint}") from exc
    return getattr(module, cls_name)


def connect_store(url: str) -> Store:
    """Build (but do not open) the store for ``url``."""
    return store_class(url)(url)
