"""In-memory storage against the storage contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from overnight.storage import open_storage
from overnight.storage.memory import MemoryStorage
from tests.storage.contract import StorageContract


@pytest.fixture
async def storage() -> AsyncIterator[MemoryStorage]:
    store = open_storage("memory://")
    assert isinstance(store, MemoryStorage)
    await store.open()
    yield store
    await store.aclose()


class TestMemoryStorage(StorageContract):
    pass
