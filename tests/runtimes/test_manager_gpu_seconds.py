"""``EngineManager.gpu_seconds()``: GPUs x seconds of the engines overnight starts,
from the handle's start to its release, a counter that never goes down."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from overnight.errors import RuntimeStartError
from overnight.runtimes.base import Endpoint
from overnight.runtimes.manager import EngineFailed, EngineManager

MOCK = {"runtime": {"type": "mock"}}


class GpuRuntime:
    """Hands out handles holding ``gpus`` GPUs (as the local runtime's do)."""

    def __init__(self, gpus: list[int], *, ready: bool = True) -> None:
        self.gpus, self.ready = gpus, ready
        self.ids = itertools.count()
        self.live: set[int] = set()

    async def acquire(self, spec: Any, *, owner: str, record: Any = None) -> dict[str, Any]:
        h = {"id": next(self.ids), "owner": owner, "gpus": list(self.gpus)}
        self.live.add(h["id"])
        if record is not None:
            await record(h)
        return h

    async def wait_ready(self, handle: dict[str, Any], *, timeout_s: float) -> Endpoint:
        if not self.ready:
            await asyncio.sleep(0.05)
            raise RuntimeStartError("the engine exited before it was ready")
        return Endpoint(f"http://127.0.0.1:{9000 + handle['id']}")

    async def alive(self, handle: dict[str, Any]) -> bool:
        return handle["id"] in self.live

    async def release(self, handle: dict[str, Any]) -> None:
        self.live.discard(handle["id"])

    async def sweep(self, live_owners: set[str]) -> list[dict[str, Any]]:
        return []

    async def aclose(self) -> None:
        return None


async def _record(handle: dict[str, Any]) -> None:
    return None


async def test_gpu_seconds_grow_while_an_engine_runs_and_stop_at_release() -> None:
    rt = GpuRuntime([0, 1])
    m = EngineManager({"local": rt}, watch_interval_s=60)
    key = EngineManager.key_for(MOCK)
    assert m.gpu_seconds() == {}
    await m.attach("batch_a", MOCK, record=_record)
    await asyncio.sleep(0.1)
    first = m.gpu_seconds()[(key, "local")]
    assert first >= 2 * 0.1  # two GPUs for at least 0.1 s
    await asyncio.sleep(0.1)
    second = m.gpu_seconds()[(key, "local")]
    assert second >= first + 2 * 0.1
    await m.detach("batch_a", MOCK)  # keep-alive 0: released now
    done = m.gpu_seconds()[(key, "local")]
    assert done >= second
    await asyncio.sleep(0.1)
    assert m.gpu_seconds()[(key, "local")] == done  # released: no longer grows
    # A second life of the same engine adds to the same total.
    await m.attach("batch_b", MOCK, record=_record)
    await asyncio.sleep(0.05)
    assert m.gpu_seconds()[(key, "local")] >= done + 2 * 0.05
    await m.aclose()
    final = m.gpu_seconds()[(key, "local")]
    await asyncio.sleep(0.05)
    assert m.gpu_seconds()[(key, "local")] == final


async def test_an_engine_that_never_got_ready_counts_its_start() -> None:
    m = EngineManager({"local": GpuRuntime([3], ready=False)}, watch_interval_s=60)
    with pytest.raises(EngineFailed):
        await m.attach("batch_a", MOCK, record=_record)
    spent = m.gpu_seconds()[(EngineManager.key_for(MOCK), "local")]
    assert spent >= 0.05  # one GPU through the failed start
    await asyncio.sleep(0.05)
    assert m.gpu_seconds()[(EngineManager.key_for(MOCK), "local")] == spent
    await m.aclose()


async def test_handles_that_do_not_say_which_gpus_are_not_counted() -> None:
    class NoGpus(GpuRuntime):
        async def acquire(self, spec: Any, *, owner: str, record: Any = None) -> dict[str, Any]:
            h = await super().acquire(spec, owner=owner, record=record)
            del h["gpus"]
            return h

    m = EngineManager({"local": NoGpus([0])}, watch_interval_s=60)
    await m.attach("batch_a", MOCK, record=_record)
    assert m.gpu_seconds() == {}
    await m.aclose()
    assert m.gpu_seconds() == {}
