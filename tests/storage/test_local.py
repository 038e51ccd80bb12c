"""Local directory storage against the storage contract, plus its own edges."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from overnight.errors import StorageError
from overnight.storage import open_storage
from overnight.storage.local import LocalStorage
from tests.storage.contract import StorageContract


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    store = open_storage(f"file://{tmp_path / 'objects'}")
    assert isinstance(store, LocalStorage)
    await store.open()
    yield store
    await store.aclose()


class TestLocalStorage(StorageContract):
    pass


async def test_aborted_write_leaves_no_temp_files(storage: LocalStorage) -> None:
    w = storage.writer("dir/obj")
    await w.write(b"abc")
    await w.abort()
    assert [p for p in storage.root.rglob("*") if p.is_file()] == []


def test_key_escaping_the_root_is_refused(storage: LocalStorage) -> None:
    with pytest.raises(StorageError):
        storage.writer("../outside")
