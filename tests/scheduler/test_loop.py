"""The scheduler with batches sharing one engine: one capacity per engine, per-batch
caps, a global cap, and priority-weighted sharing. In process, with ``FakeEngine``."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson
import pytest

from overnight.batches import service
from overnight.batches.validation import ValidationLimits
from overnight.executor.engine import FakeEngine, HttpEngineClient
from overnight.executor.limiter import ConcurrencyLimits
from overnight.executor.retry import RetryPolicy
from overnight.files.service import create_file
from overnight.scheduler.loop import EnginePool, Scheduler
from overnight.scheduler.runner import RunnerConfig
from overnight.storage.memory import MemoryStorage
from overnight.store.memory import MemoryStore
from overnight.store.records import BatchRecord

LIMITS = ValidationLimits(max_requests=10_000, max_bytes=10**8)
ENGINE = "http://engine.test:8000"


def _record(**options) -> BatchRecord:
    return BatchRecord(id="batch_1", tenant="t", endpoint="/v1/chat/completions", input_file_id="f",
                       completion_window="24h", completion_window_s=86400, status="in_progress",
                       created_at=0, expires_at=86400, options=options)


async def test_batches_on_the_same_engine_share_one_capacity() -> None:
    pool = EnginePool(default_url=ENGINE, default_api_key=None, timeout_s=5)
    try:
        default = pool.capacity_for(_record())
        same = pool.capacity_for(_record(runtime={"endpoint": ENGINE + "/v1", "api_key": "other"}))
        other = pool.capacity_for(_record(runtime={"endpoint": "http://elsewhere:1"}))
        assert default is same and default is not other
        client = pool.client_for(_record())
        assert isinstance(client.inner, HttpEngineClient)  # wrapped to track the engine's health
        assert client.health is pool.health_for(_record(runtime={"endpoint": ENGINE + "/v1"}))
        assert len(pool._probes) == 2  # real HTTP engines get a /metrics probe
    finally:
        await pool.aclose()
    assert not pool._probes


class Harness:
    def __init__(self, tmp_path: Path, *, global_concurrency: int = 16) -> None:
        self.store, self.storage = MemoryStore(), MemoryStorage()
        self.inflight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.served: list[str] = []
        self.total_peak = 0
        config = RunnerConfig(
            spool_dir=tmp_path / "spool", lease_s=10, heartbeat_s=0.5, checkpoint_interval_s=0.05,
            limits=LIMITS, concurrency=ConcurrencyLimits(initial=8, max=1024),
            policy=RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05), output_expires_after_s=None,
        )
        engines = EnginePool(default_url=ENGINE, default_api_key=None, timeout_s=5)
        engines.set_client(ENGINE, None, FakeEngine(self.handle))
        self.scheduler = Scheduler(store=self.store, storage=self.storage, engines=engines, config=config,
                                   replica_id="r1", max_running=8, poll_s=0.05,
                                   global_concurrency=global_concurrency)

    async def handle(self, path: str, body: dict) -> tuple[int, dict]:
        name = body["messages"][0]["content"].split("-")[0]
        self.inflight[name] += 1
        self.peak[name] = max(self.peak[name], self.inflight[name])
        self.total_peak = max(self.total_peak, sum(self.inflight.values()))
        try:
            await asyncio.sleep(0.002)
            return 200, {"object": "chat.completion", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        finally:
            self.inflight[name] -= 1
            self.served.append(name)

    async def batch(self, name: str, n: int, **extension) -> str:
        data = b"".join(orjson.dumps({
            "custom_id": f"{name}{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": f"{name}-{i}"}]},
        }) + b"\n" for i in range(n))

        async def chunks():
            yield data

        f = await create_file(store=self.store, storage=self.storage, tenant="t", filename=f"{name}.jsonl",
                              purpose="batch", chunks=chunks())
        body = service.BatchCreate(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                   extension=extension or None)
        rec = await service.create_batch(store=self.store, storage=self.storage, tenant="t", body=body, limits=LIMITS)
        return rec.id


@pytest.fixture
async def harness(tmp_path: Path):
    h = Harness(tmp_path)
    yield h
    await h.scheduler.stop()
    await h.scheduler.engines.aclose()


async def test_caps_hold_per_batch_and_globally_on_a_shared_engine(harness: Harness) -> None:
    a = await harness.batch("a", 300, max_concurrency=3)
    b = await harness.batch("b", 300)
    await harness.scheduler.drain(30)
    for bid in (a, b):
        rec = await harness.store.get_batch(bid)
        assert rec.status == "completed" and rec.completed == 300
    assert harness.peak["a"] <= 3
    assert harness.total_peak <= 16  # the global cap
    assert harness.peak["b"] > 3  # the other batch used what "a" could not


async def test_a_higher_priority_batch_gets_most_of_a_shared_engine(tmp_path: Path) -> None:
    h = Harness(tmp_path, global_concurrency=8)
    try:
        low = await h.batch("low", 400)
        high = await h.batch("high", 400, priority=9)  # weight 10 against 1
        await h.scheduler.drain(30)
        for bid in (low, high):
            assert (await h.store.get_batch(bid)).status == "completed"
        served_when_high_done = h.served[: max(i for i, name in enumerate(h.served) if name == "high") + 1]
        low_share = served_when_high_done.count("low") / len(served_when_high_done)
        assert low_share < 0.3, low_share
    finally:
        await h.scheduler.stop()
        await h.scheduler.engines.aclose()


async def test_crashing_batch_is_retried_with_backoff_not_in_a_hot_loop(harness: Harness) -> None:
    from overnight.errors import StorageError

    bid = await harness.batch("a", 5)

    async def broken_size(key: str) -> int:  # storage is down: every run of this batch crashes
        raise StorageError("storage unreachable")

    harness.storage.size = broken_size  # type: ignore[method-assign]
    claims = []
    original = harness.store.update_batch

    async def counting_update(r, **kw):
        if r.lease_owner == "r1" and r.lease_token > len(claims):
            claims.append(r.lease_token)
        return await original(r, **kw)

    harness.store.update_batch = counting_update  # type: ignore[method-assign]
    await harness.scheduler.start()
    await asyncio.sleep(1.0)
    # Without backoff the 50 ms poll would re-claim it ~20 times a second.
    assert 1 <= len(claims) <= 3, claims
    assert (await harness.store.get_batch(bid)).status == "validating"


async def test_input_bytes_missing_fails_the_batch_with_a_clear_error(harness: Harness) -> None:
    bid = await harness.batch("a", 5)
    rec = await harness.store.get_batch(bid)
    harness.storage.objects.pop(f"files/{rec.input_file_id}")
    await harness.scheduler.drain(10)
    rec = await harness.store.get_batch(bid)
    assert rec.status == "failed" and rec.errors[0]["code"] == "file_not_found"


async def test_a_batch_that_stops_finishing_requests_says_so_in_the_log(harness: Harness, monkeypatch,
                                                                        caplog) -> None:
    # An engine that accepts requests and never answers: the batch is not failing,
    # just not moving. The log must say so, with its concurrency and engine state.
    import logging

    from overnight import defaults

    monkeypatch.setattr(defaults, "STALL_WARN_S", 0.3)
    hang = asyncio.Event()

    async def never(path: str, body: dict) -> tuple[int, dict]:
        await hang.wait()
        return 200, {"object": "chat.completion"}

    harness.scheduler.engines.set_client(ENGINE, None, FakeEngine(never))
    bid = await harness.batch("a", 20)
    with caplog.at_level(logging.WARNING, logger="overnight.scheduler"):
        await harness.scheduler.tick()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "no request finished" in caplog.text:
                break
    assert f"batch {bid}: no request finished for" in caplog.text and "(0 of 20 done)" in caplog.text
    assert "'inflight'" in caplog.text
    hang.set()
