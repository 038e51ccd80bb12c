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


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


async def test_open_removes_parts_left_by_a_killed_process_but_not_live_ones(tmp_path: Path) -> None:
    import os
    import time

    from overnight.storage import local

    root = tmp_path / "objects"
    (root / "files").mkdir(parents=True)
    dead = root / "files" / f".file-1.{local._HOST}-{_dead_pid()}-{'a' * 32}.part"
    old_foreign = root / "files" / f".file-2.deadbeef-1-{'b' * 32}.part"
    fresh_foreign = root / "files" / f".file-3.deadbeef-1-{'c' * 32}.part"
    alive_other = root / "files" / f".file-4.{local._HOST}-{os.getppid()}-{'d' * 32}.part"
    for p in (dead, old_foreign, fresh_foreign, alive_other):
        p.write_bytes(b"partial")
    os.utime(old_foreign, (time.time() - 2 * local.STALE_PART_S,) * 2)
    (root / "files" / "file-5").write_bytes(b"a real object")

    storage = LocalStorage(f"file://{root}")
    live = storage.writer("files/file-6")
    await live.write(b"being written")
    await storage.open()  # the start-up sweep, with a live writer of this process
    left = sorted(p.name for p in (root / "files").iterdir())
    assert dead.name not in left and old_foreign.name not in left
    assert fresh_foreign.name in left and alive_other.name in left and "file-5" in left
    assert await live.commit() == len(b"being written")
    assert await storage.get_bytes("files/file-6") == b"being written"
    # A part of this very process that no writer owns is dead too.
    own = root / "files" / f".file-7.{local._HOST}-{os.getpid()}-{'e' * 32}.part"
    own.write_bytes(b"x")
    assert storage.remove_stale_parts() == [own]


async def test_disk_full_is_storage_full_error(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from overnight.errors import StorageFullError

    w = storage.writer("files/full")
    await w.write(b"first")

    def full(*_a: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w._fh, "write", full)  # type: ignore[attr-defined]
    with pytest.raises(StorageFullError, match="No space left"):
        await w.write(b"more")
    await w.abort()
    assert [p for p in storage.root.rglob("*") if p.is_file()] == []
