"""The in-memory record store against the store contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from overnight.store import connect_store
from overnight.store.memory import MemoryStore
from tests.store.contract import StoreContract


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = connect_store("memory://")
    assert isinstance(s, MemoryStore)
    await s.open()
    yield s
    await s.aclose()


class TestMemoryStore(StoreContract):
    pass
