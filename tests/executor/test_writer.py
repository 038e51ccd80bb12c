"""The spool: write once per index, recover after a crash, seal into segments, assemble."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest

from overnight.errors import StorageError
from overnight.executor.checkpoint import Checkpoint
from overnight.executor.writer import Spool
from overnight.storage.local import LocalStorage
from overnight.storage.memory import MemoryStorage


def line(i: int, usage: int = 1) -> bytes:
    return orjson.dumps({"id": f"r{i}", "custom_id": f"c{i}", "response": {"status_code": 200, "body": {
        "usage": {"prompt_tokens": usage, "completion_tokens": usage}}}, "error": None})


@pytest.fixture(params=["local", "memory"])
async def storage(request, tmp_path: Path):
    s = LocalStorage(f"file://{tmp_path / 'files'}") if request.param == "local" else MemoryStorage()
    await s.open()
    yield s
    await s.aclose()


def new_spool(tmp_path: Path, storage, total: int, *, token: int = 1, cp: Checkpoint | None = None) -> Spool:
    spool = Spool(spool_dir=tmp_path / "spool", storage=storage, batch_id="batch_x", token=token,
                  checkpoint=cp or Checkpoint.empty(total))
    spool.open()
    return spool


async def test_each_index_is_written_once(tmp_path, storage) -> None:
    spool = new_spool(tmp_path, storage, 5)
    assert spool.write(0, line(0), error=False, usage={"prompt_tokens": 2})
    assert not spool.write(0, line(0), error=False)
    assert spool.write(1, b'{"e":1}', error=True)
    assert (spool.cp.completed, spool.cp.failed, spool.cp.done.count) == (1, 1, 2)
    assert spool.usage.input_tokens == 2
    spool.close()


async def test_lines_of_one_loop_iteration_are_written_together(tmp_path, storage) -> None:
    spool = new_spool(tmp_path, storage, 100)
    out = spool._paths["out"]
    for i in range(50):
        spool.write(i, line(i), error=False)
    assert out.read_bytes() == b""  # queued until the end of this iteration
    await asyncio.sleep(0)
    data = out.read_bytes()
    assert data.count(b"\n") == 50 and data.startswith(b"0\t{")
    spool.close()


async def test_seal_stores_segments_and_assemble_builds_the_final_files(tmp_path, storage) -> None:
    spool = new_spool(tmp_path, storage, 10)
    for i in range(4):
        spool.write(i, line(i), error=False)
    spool.write(4, b'{"bad":4}', error=True)
    first = await spool.seal()
    spool.discard(first.sealed_paths)
    for i in range(5, 10):
        spool.write(i, line(i), error=False)
    second = await spool.seal()
    cp = Checkpoint.decode(second.checkpoint)
    assert [s.kind for s in cp.segments] == ["out", "err", "out"]
    assert sum(s.lines for s in cp.segments) == 10 and cp.done.count == 10
    result = await spool.assemble(out_key="files/out", err_key="files/err")
    out = (await storage.get_bytes("files/out")).splitlines()
    assert [orjson.loads(x)["id"] for x in out] == [f"r{i}" for i in [0, 1, 2, 3, 5, 6, 7, 8, 9]]
    assert await storage.get_bytes("files/err") == b'{"bad":4}\n'
    assert (result.out_lines, result.err_lines, result.err_bytes) == (9, 1, 10)
    await spool.cleanup()
    assert not (tmp_path / "spool" / "batch_x").exists()


async def test_local_segments_are_hard_links_not_copies(tmp_path) -> None:
    storage = LocalStorage(f"file://{tmp_path / 'files'}")
    await storage.open()
    spool = new_spool(tmp_path, storage, 3)
    spool.write(0, line(0), error=False)
    path = spool._paths["out"]
    sealed = await spool.seal()
    seg = Checkpoint.decode(sealed.checkpoint).segments[0]
    assert os.stat(storage.path(seg.key)).st_ino == os.stat(path).st_ino
    spool.discard(sealed.sealed_paths)
    assert await storage.get_bytes(seg.key) == b"0\t" + line(0) + b"\n"
    spool.close()


async def test_recover_keeps_complete_lines_and_drops_a_torn_one(tmp_path, storage) -> None:
    crashed = new_spool(tmp_path, storage, 6, token=1)
    for i in range(3):
        crashed.write(i, line(i, usage=5), error=False)
    crashed.close()
    with crashed._paths["out"].open("ab") as f:
        f.write(b"3\t{\"torn")  # SIGKILL mid-write
    cp = Checkpoint.empty(6)
    cp.done.add(0)  # the stored checkpoint already had index 0
    cp.completed = 1
    resumed = new_spool(tmp_path, storage, 6, token=2, cp=cp)
    assert await resumed.recover() == 2
    assert [i in resumed.cp.done for i in range(6)] == [True, True, True, False, False, False]
    assert resumed.usage.input_tokens == 10  # the two recovered lines' usage
    assert len(list((tmp_path / "spool" / "batch_x").iterdir())) == 2  # old files folded in
    resumed.close()


async def test_a_seal_interrupted_by_cancellation_still_stores_before_the_next_checkpoint(tmp_path) -> None:
    storage = MemoryStorage()
    gate = asyncio.Event()
    real_writer = storage.writer

    class SlowWriter:
        def __init__(self, key):
            self.inner = real_writer(key)

        async def __aenter__(self):
            return self

        async def write(self, data):
            await gate.wait()
            await self.inner.write(data)

        async def __aexit__(self, *exc):
            await self.inner.commit()

    storage.writer = SlowWriter  # type: ignore[method-assign]
    spool = new_spool(tmp_path, storage, 2)
    spool.write(0, line(0), error=False)
    sealing = asyncio.create_task(spool.seal())
    await asyncio.sleep(0.05)
    sealing.cancel()  # a shutdown cancels the checkpoint ticker mid-upload
    await asyncio.gather(sealing, return_exceptions=True)
    gate.set()
    final = await spool.seal()  # the shutdown checkpoint
    for seg in Checkpoint.decode(final.checkpoint).segments:
        assert await storage.get_bytes(seg.key)  # never names a missing segment
    spool.close()


async def test_after_a_failed_store_no_checkpoint_is_produced(tmp_path) -> None:
    storage = MemoryStorage()

    def broken(key):
        raise StorageError("bucket gone")

    storage.writer = broken  # type: ignore[method-assign]
    spool = new_spool(tmp_path, storage, 2)
    spool.write(0, line(0), error=False)
    with pytest.raises(StorageError):
        await spool.seal()
    spool.write(1, line(1), error=False)
    with pytest.raises(StorageError):
        await spool.seal()
    spool.close()


class _SmallChunks(MemoryStorage):
    """Reads in 4 KiB pieces, so a long line spans thousands of chunks."""

    async def read(self, key: str, *, chunk_bytes: int = 4 * 1024):
        async for chunk in super().read(key, chunk_bytes=4 * 1024):
            yield chunk


async def test_assembling_long_lines_is_linear_in_bytes(tmp_path) -> None:
    import time

    storage = _SmallChunks()
    spool = new_spool(tmp_path, storage, 4)
    big = [b'{"custom_id":"c%d","pad":"%b"}' % (i, b"x" * (20 * 1024 * 1024)) for i in range(3)]
    for i, data in enumerate(big):
        spool.write(i, data, error=False)
    spool.write(3, line(3), error=False)
    await spool.seal()
    t0 = time.perf_counter()
    result = await spool.assemble(out_key="out", err_key="err")
    elapsed = time.perf_counter() - t0
    assert result.out_lines == 4
    assert (await storage.get_bytes("out")).split(b"\n")[:3] == big
    # Copying each 20 MB line again for every 4 KiB chunk took about ten seconds.
    assert elapsed < 1.0, f"assembling 60 MB took {elapsed:.1f}s"
    spool.close()
