"""Byte storage: the small core every backend implements, helpers built once on it."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType

from overnight.defaults import READ_CHUNK_BYTES

__all__ = ["Storage", "StorageWriter"]

_BOM = b"\xef\xbb\xbf"


class StorageWriter(abc.ABC):
    """Receives an object's bytes in order. The object becomes visible only when
    ``commit()`` succeeds; ``abort()`` (or an exception in ``async with``) leaves
    nothing behind. ``abort()`` is idempotent and safe after a failed commit;
    writing or committing after commit/abort raises ``StorageError``."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def commit(self) -> int:
        """Publish the object; returns its size in bytes."""

    @abc.abstractmethod
    async def abort(self) -> None: ...

    async def __aenter__(self) -> StorageWriter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            await self.abort()
            return
        try:
            await self.commit()
        except BaseException:
            await self.abort()
            raise


class Storage(abc.ABC):
    """Objects addressed by a key such as ``files/file_0123``."""

    #: Safe to log: backends mask credentials in it.
    url: str

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    @abc.abstractmethod
    def read(self, key: str, *, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]:
        """Stream an object's bytes in chunks. Raises ``NotFoundError`` if absent
        (on the first iteration, not when called)."""

    @abc.abstractmethod
    def writer(self, key: str) -> StorageWriter:
        """A writer for a new object (replaces any object at ``key`` on commit)."""

    @abc.abstractmethod
    async def size(self, key: str) -> int:
        """Size in bytes. Raises ``NotFoundError`` if absent."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove an object; True if it existed."""

    # -- helpers built on the core -----------------------------------------
    async def read_lines(self, key: str) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(1-based line number, line bytes without the newline)`` of a JSONL
        object, leniently where that is harmless: a leading UTF-8 BOM is skipped and
        trailing blank (whitespace-only) lines are dropped. A blank line followed by
        more content is yielded, as ``b""``. Lines split on ``\\n`` only, never on
        U+2028 or other Unicode separators. A final line without a newline is
        yielded too.
        """
        blank_from, blanks = 0, 0
        async for lineno, raw in self._split_lines(key):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                if not blanks:
                    blank_from = lineno
                blanks += 1  # a count, not a list: memory stays flat
                continue
            for n in range(blank_from, blank_from + blanks):
                yield n, b""
            blanks = 0
            yield lineno, raw

    async def _split_lines(self, key: str) -> AsyncIterator[tuple[int, bytes]]:
        # A line may span many chunks; it is assembled with one join, so a 10 MB
        # line costs 10 MB once, never quadratic copies.
        parts: list[bytes] = []
        lineno = 0
        async for chunk in self.read(key):
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                if nl < 0:
                    if start < len(chunk):
                        parts.append(chunk[start:] if start else chunk)
                    break
                lineno += 1
                if parts:
                    parts.append(chunk[start:nl])
                    yield lineno, b"".join(parts)
                    parts = []
                else:
                    yield lineno, chunk[start:nl]
                start = nl + 1
        if parts:
            lineno += 1
            yield lineno, b"".join(parts)

    async def put_bytes(self, key: str, data: bytes) -> int:
        w = self.writer(key)
        try:
            await w.write(data)
            return await w.commit()
        except BaseException:
            await w.abort()
            raise

    async def get_bytes(self, key: str) -> bytes:
        return b"".join([c async for c in self.read(key)])
