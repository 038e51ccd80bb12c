"""Local directory storage (the default): ``file:///abs/dir``."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from overnight._concurrency import to_thread
from overnight.defaults import READ_CHUNK_BYTES
from overnight.errors import NotFoundError, StorageError, StorageFullError
from overnight.storage.base import Storage, StorageWriter

__all__ = ["LocalStorage"]


#: Temp files are named ``.{name}.{host}-{pid}-{uuid}.part`` so that start-up can
#: tell a leftover of a dead process (SIGKILL while finalizing) from a live write.
_PART_RE = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{32}\.part$")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
#: A ``.part`` file nobody wrote to for this long is dead whoever made it: every
#: write touches it, and another host's process cannot be asked.
STALE_PART_S = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _translate(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"No space left in file storage while writing {what}; free space or raise the quota.")
    return StorageError(f"File storage failed while writing {what}: {exc.strerror or exc}")


class _LocalWriter(StorageWriter):
    """Writes to a hidden temp file beside the target; commit is an atomic rename."""

    def __init__(self, final: Path, live: set[Path]) -> None:
        self._final = final
        self._tmp = final.with_name(f".{final.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex}.part")
        self._live = live
        self._fh: BinaryIO | None = None
        self._size = 0
        self._closed = False

    def _open(self) -> BinaryIO:
        self._final.parent.mkdir(parents=True, exist_ok=True)
        self._live.add(self._tmp)
        return open(self._tmp, "wb")

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise StorageError(f"writer for {self._final.name} is already committed or aborted")
        try:
            if self._fh is None:
                self._fh = await to_thread(self._open)
            await to_thread(self._fh.write, data)
        except OSError as exc:
            raise _translate(exc, self._final.name) from exc
        self._size += len(data)

    async def commit(self) -> int:
        if self._fh is None:  # empty object
            await self.write(b"")
        assert self._fh is not None
        fh, self._fh = self._fh, None
        self._closed = True

        def _finish() -> None:
            try:
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fh.close()
            os.replace(self._tmp, self._final)
            self._live.discard(self._tmp)

        try:
            await to_thread(_finish)
        except OSError as exc:
            raise _translate(exc, self._final.name) from exc
        return self._size

    async def abort(self) -> None:
        self._closed = True
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                await to_thread(fh.close)
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        self._live.discard(self._tmp)


class LocalStorage(Storage):
    def __init__(self, url: str) -> None:
        self.url = url
        path = url.split("://", 1)[1] if "://" in url else url
        self.root = Path(path).resolve()
        #: Temp files of this process's writers that are open now.
        self._live: set[Path] = set()

    async def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        await to_thread(self.remove_stale_parts)

    def remove_stale_parts(self, *, now: float | None = None) -> list[Path]:
        """Delete ``.part`` files no live writer will finish; returns them."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                if not (name.startswith(".") and name.endswith(".part")):
                    continue
                p = Path(dirpath) / name
                if p in self._live:
                    continue
                m = _PART_RE.match(name)
                dead = False
                if m is not None and m["host"] == _HOST:
                    pid = int(m["pid"])
                    dead = pid == os.getpid() or not _pid_alive(pid)
                if not dead:
                    try:
                        dead = now - p.stat().st_mtime > STALE_PART_S
                    except FileNotFoundError:
                        continue
                if dead:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        removed.append(p)
        return removed

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
        return _LocalWriter(self.path(key), self._live)

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
