"""Flat memory: validation and execution cost a few bytes per line, not the line.

Measured with tracemalloc (numpy reports its buffers to it) as the growth of the
peak between a small and a larger file, so fixed costs cancel out.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import orjson
import pytest

from overnight.batches.validation import ValidationLimits, validate_input
from overnight.executor.checkpoint import Checkpoint
from overnight.executor.engine import EngineReply
from overnight.executor.limiter import ConcurrencyLimits
from overnight.executor.retry import RetryPolicy
from overnight.executor.run import ExecuteParams, Outcome, StopSignal, execute
from overnight.executor.sharing import EngineCapacity
from overnight.executor.writer import Spool
from overnight.storage.local import LocalStorage

CHAT = "/v1/chat/completions"
REPLY = orjson.dumps({"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})


class InstantEngine:
    async def send(self, path: str, body: bytes) -> EngineReply:
        return EngineReply(status=200, body=REPLY)

    async def aclose(self) -> None:
        return None


async def _input(storage: LocalStorage, key: str, n: int) -> None:
    line = b'{"custom_id":"request-%d","method":"POST","url":"/v1/chat/completions",' \
           b'"body":{"model":"m","messages":[{"role":"user","content":"hello %d"}]}}\n'
    async with storage.writer(key) as w:
        for start in range(0, n, 10_000):
            await w.write(b"".join(line % (i, i) for i in range(start, min(n, start + 10_000))))


async def _peak(coro) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        await coro
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_validation_keeps_about_8_bytes_per_line(tmp_path: Path) -> None:
    storage = LocalStorage(f"file://{tmp_path}")
    await storage.open()
    limits = ValidationLimits(max_requests=10**7, max_bytes=10**10)
    peaks = {}
    for n in (10_000, 110_000):  # both bigger than one 1 MB read chunk
        await _input(storage, f"in{n}", n)
        peaks[n] = await _peak(validate_input(storage, f"in{n}", endpoint=CHAT, limits=limits))
    per_line = (peaks[110_000] - peaks[10_000]) / 100_000
    assert per_line < 40, per_line  # hashes (8 B) plus the sort's copies, never the lines


@pytest.mark.slow  # 10 s
async def test_execution_keeps_a_bit_per_line(tmp_path: Path) -> None:
    storage = LocalStorage(f"file://{tmp_path / 'files'}")
    await storage.open()

    async def run(n: int) -> None:
        await _input(storage, f"in{n}", n)
        spool = Spool(spool_dir=tmp_path / "spool", storage=storage, batch_id=f"b{n}", token=1,
                      checkpoint=Checkpoint.empty(n))
        spool.open()
        share = EngineCapacity(ConcurrencyLimits(initial=64, max=64)).join(cap=64)

        async def persist(data: bytes) -> None:
            return None

        params = ExecuteParams(endpoint=CHAT, input_key=f"in{n}", batch_suffix="m", deadline=time.time() + 600,
                               checkpoint_interval_s=0.05, persist=persist)
        outcome = await execute(storage=storage, spool=spool, engine=InstantEngine(), limiter=share,
                                policy=RetryPolicy(), params=params, stop=StopSignal())
        assert outcome is Outcome.DONE and spool.cp.done.count == n
        spool.close()

    small = await _peak(run(10_000))  # both bigger than one 1 MB read chunk
    large = await _peak(run(40_000))
    per_line = (large - small) / 30_000
    assert per_line < 20, (small, large, per_line)
