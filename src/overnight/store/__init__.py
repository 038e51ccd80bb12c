"""Record stores, chosen by URL scheme through one registry."""

from __future__ import annotations

from overnight._registry import LazyRegistry
from overnight.errors import StoreError
from overnight.store.base import ACTIVE_STATUSES, Store
from overnight.store.records import BatchRecord, DocRecord, FileRecord, ShardRecord

__all__ = [
    "ACTIVE_STATUSES",
    "BatchRecord",
    "DocRecord",
    "FileRecord",
    "ShardRecord",
    "Store",
    "connect_store",
    "register_store",
    "registry",
    "store_class",
]

_PG = ("overnight.store.postgres:PostgresStore", "pip install 'overnight[postgres]'")
_REDIS = ("overnight.store.redis:RedisStore", "pip install 'overnight[redis]'")
_MONGO = ("overnight.store.mongo:MongoStore", "pip install 'overnight[mongo]'")

_stores = LazyRegistry(
    "store",
    StoreError,
    {
        "sqlite": ("overnight.store.sqlite:SQLiteStore", ""),
        "memory": ("overnight.store.memory:MemoryStore", ""),
        "postgresql": _PG,
        "postgres": _PG,
        "redis": _REDIS,
        "rediss": _REDIS,
        "mongodb": _MONGO,
        "mongodb+srv": _MONGO,
    },
)
registry = _stores.entries
register_store = _stores.register


def store_class(url: str) -> type:
    scheme = url.split("://", 1)[0]
    if scheme not in registry:
        scheme = scheme.split("+", 1)[0]  # postgresql+asyncpg -> postgresql
    return _stores.load(scheme)


def connect_store(url: str) -> Store:
    """Build (but do not open) the store for ``url``."""
    return store_class(url)(url)
