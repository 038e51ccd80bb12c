"""The behaviour every storage backend promises, run against each backend.

A backend's test module subclasses ``StorageContract`` and provides a ``storage``
fixture yielding an opened, empty storage.
"""

from __future__ import annotations

import pytest

from overnight.errors import NotFoundError, StorageError
from overnight.storage import Storage


async def _read_all(storage: Storage, key: str, **kwargs: int) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key, **kwargs)])


async def _lines(storage: Storage, key: str) -> list[tuple[int, bytes]]:
    return [item async for item in storage.read_lines(key)]


class WriterStateContract:
    """Mixed into the backend test classes that provide a ``storage`` fixture."""

    async def test_commit_after_abort_raises_and_publishes_nothing(self, storage):
        w = storage.writer("state/a")
        await w.write(b"data")
        await w.abort()
        await w.abort()  # idempotent
        with pytest.raises(StorageError):
            await w.commit()
        with pytest.raises(NotFoundError):
            await storage.size("state/a")

    async def test_write_after_commit_raises(self, storage):
        w = storage.writer("state/b")
        await w.write(b"data")
        await w.commit()
        with pytest.raises(StorageError):
            await w.write(b"more")
        assert await storage.get_bytes("state/b") == b"data"


class StorageContract(WriterStateContract):
    """Subclass as ``TestXStorage`` with a ``storage`` fixture."""

    async def test_round_trip_through_writer(self, storage: Storage) -> None:
        async with storage.writer("round/trip.bin") as w:
            await w.write(b"hello ")
            await w.write(b"")
            await w.write(b"world")
        assert await _read_all(storage, "round/trip.bin") == b"hello world"
        assert await storage.size("round/trip.bin") == 11

    async def test_commit_returns_size(self, storage: Storage) -> None:
        w = storage.writer("sized")
        await w.write(b"abc")
        await w.write(b"defg")
        assert await w.commit() == 7

    async def test_put_and_get_bytes(self, storage: Storage) -> None:
        data = bytes(range(256)) * 10
        assert await storage.put_bytes("blob", data) == len(data)
        assert await storage.get_bytes("blob") == data

    async def test_read_streams_in_bounded_chunks(self, storage: Storage) -> None:
        data = bytes(range(100))
        await storage.put_bytes("chunks", data)
        chunks = [c async for c in storage.read("chunks", chunk_bytes=7)]
        assert b"".join(chunks) == data
        assert len(chunks) > 1
        assert all(0 < len(c) <= 7 for c in chunks)
        assert all(isinstance(c, bytes) for c in chunks)

    async def test_empty_object(self, storage: Storage) -> None:
        w = storage.writer("empty")
        assert await w.commit() == 0
        assert await storage.size("empty") == 0
        assert await _read_all(storage, "empty") == b""
        assert await _lines(storage, "empty") == []

    async def test_empty_object_through_put_bytes(self, storage: Storage) -> None:
        await storage.put_bytes("empty2", b"")
        assert await storage.get_bytes("empty2") == b""

    async def test_read_lines_numbers_lines_and_keeps_final_line_without_newline(self, storage: Storage) -> None:
        await storage.put_bytes("lines.jsonl", b'{"a":1}\n\n{"b":2}\nlast')
        assert await _lines(storage, "lines.jsonl") == [(1, b'{"a":1}'), (2, b""), (3, b'{"b":2}'), (4, b"last")]

    async def test_read_lines_with_trailing_newline_has_no_phantom_line(self, storage: Storage) -> None:
        await storage.put_bytes("lines2.jsonl", b"one\ntwo\n")
        assert await _lines(storage, "lines2.jsonl") == [(1, b"one"), (2, b"two")]

    async def test_read_lines_skips_a_bom_and_trailing_blank_lines_and_splits_on_newline_only(
        self, storage: Storage
    ) -> None:
        data = b"\xef\xbb\xbf" + 'one \u2028 \u2029 \x85 x\n\n two\n \r\n\n'.encode()
        await storage.put_bytes("lenient.jsonl", data)
        assert await _lines(storage, "lenient.jsonl") == [
            (1, "one \u2028 \u2029 \x85 x".encode()), (2, b""), (3, b" two")
        ]

    async def test_read_lines_joins_a_line_spanning_chunks(self, storage: Storage) -> None:
        # The default read chunk is 1 MiB; a 3 MiB line crosses several chunk borders.
        long_line = b"x" * (3 * 1024 * 1024 + 17)
        await storage.put_bytes("long.jsonl", b"short\n" + long_line + b"\nend")
        lines = await _lines(storage, "long.jsonl")
        assert [n for n, _ in lines] == [1, 2, 3]
        assert lines[0][1] == b"short"
        assert lines[1][1] == long_line
        assert lines[2][1] == b"end"

    async def test_commit_overwrites_and_old_object_stays_until_commit(self, storage: Storage) -> None:
        await storage.put_bytes("over", b"old contents")
        w = storage.writer("over")
        await w.write(b"new")
        assert await storage.get_bytes("over") == b"old contents"
        await w.commit()
        assert await storage.get_bytes("over") == b"new"
        assert await storage.size("over") == 3

    async def test_abort_leaves_nothing(self, storage: Storage) -> None:
        w = storage.writer("aborted")
        await w.write(b"partial data")
        await w.abort()
        with pytest.raises(NotFoundError):
            await storage.size("aborted")

    async def test_abort_keeps_the_previous_object(self, storage: Storage) -> None:
        await storage.put_bytes("keep", b"previous")
        w = storage.writer("keep")
        await w.write(b"replacement")
        await w.abort()
        assert await storage.get_bytes("keep") == b"previous"

    async def test_exception_inside_writer_block_leaves_nothing(self, storage: Storage) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            async with storage.writer("raised") as w:
                await w.write(b"some bytes")
                raise RuntimeError("boom")
        with pytest.raises(NotFoundError):
            await storage.size("raised")
        with pytest.raises(NotFoundError):
            await storage.get_bytes("raised")

    async def test_missing_key_raises_not_found_on_read_and_size(self, storage: Storage) -> None:
        with pytest.raises(NotFoundError):
            await _read_all(storage, "missing/key")
        with pytest.raises(NotFoundError):
            await storage.size("missing/key")
        with pytest.raises(NotFoundError):
            await _lines(storage, "missing/key")

    async def test_delete_reports_whether_the_object_existed(self, storage: Storage) -> None:
        await storage.put_bytes("doomed", b"x")
        assert await storage.delete("doomed") is True
        assert await storage.delete("doomed") is False
        with pytest.raises(NotFoundError):
            await storage.size("doomed")

    async def test_keys_with_slashes_are_independent_objects(self, storage: Storage) -> None:
        await storage.put_bytes("files/file_1/input.jsonl", b"one")
        await storage.put_bytes("files/file_1/output.jsonl", b"two")
        await storage.put_bytes("files/file_2", b"three")
        assert await storage.get_bytes("files/file_1/input.jsonl") == b"one"
        assert await storage.get_bytes("files/file_1/output.jsonl") == b"two"
        assert await storage.get_bytes("files/file_2") == b"three"
        assert await storage.delete("files/file_1/input.jsonl") is True
        assert await storage.get_bytes("files/file_1/output.jsonl") == b"two"

