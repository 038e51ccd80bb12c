"""Running slots shared between tenants, and batches whose engine is down: they
give their slot up, show the engine's state, and fail after a bounded time.
In process, with ``FakeEngine``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from overnight.batches import service
from overnight.batches.validation import ValidationLimits
from overnight.errors import RetryableEngineError
from overnight.executor.engine import FakeEngine
from overnight.executor.limiter import ConcurrencyLimits
from overnight.executor.retry import RetryPolicy
from overnight.files.service import create_file
from overnight.scheduler.loop import EnginePool, Scheduler
from overnight.scheduler.runner import RunnerConfig
from overnight.storage.memory import MemoryStorage
from overnight.store.memory import MemoryStore

LIMITS = ValidationLimits(max_requests=10_000, max_bytes=10**8)
GOOD = "http://good.test:8000"
DEAD = "http://dead.test:8000"
REFUSED = "Could not reach the engine: cannot connect to dead.test:8000: [Errno 111] Connection refused"


class Harness:
    def __init__(self, tmp_path: Path, *, max_running: int = 16, latency_s: float = 0.002, **cfg) -> None:
        self.store, self.storage = MemoryStore(), MemoryStorage()
        self.latency_s = latency_s
        self.sent: Counter[str] = Counter()
        self.dead_sends = 0
        config = RunnerConfig(
            spool_dir=tmp_path / "spool", lease_s=10, heartbeat_s=0.2, checkpoint_interval_s=0.05,
            limits=LIMITS, concurrency=ConcurrencyLimits(initial=8, max=1024),
            policy=RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05), output_expires_after_s=None,
            **cfg,
        )
        engines = EnginePool(default_url=GOOD, default_api_key=None, timeout_s=5)
        engines.set_client(GOOD, None, FakeEngine(self.good))
        engines.set_client(DEAD, None, FakeEngine(self.dead))
        self.scheduler = Scheduler(store=self.store, storage=self.storage, engines=engines, config=config,
                                   replica_id="r1", max_running=max_running, poll_s=0.05, global_concurrency=64)

    async def good(self, path: str, body: dict) -> tuple[int, dict]:
        self.sent[body["messages"][0]["content"]] += 1
        await asyncio.sleep(self.latency_s)
        return 200, {"object": "chat.completion", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    async def dead(self, path: str, body: dict) -> tuple[int, dict]:
        self.dead_sends += 1
        await asyncio.sleep(0.005)
        raise RetryableEngineError(REFUSED, code="engine_unreachable")

    async def batch(self, tenant: str, name: str, n: int, *, engine: str | None = None, **extension) -> str:
        data = b"".join(orjson.dumps({
            "custom_id": f"{name}-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": f"{name}-{i}"}]},
        }) + b"\n" for i in range(n))

        async def chunks():
            yield data

        f = await create_file(store=self.store, storage=self.storage, tenant=tenant, filename=f"{name}.jsonl",
                              purpose="batch", chunks=chunks())
        if engine is not None:
            extension["runtime"] = {"endpoint": engine}
        body = service.BatchCreate(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="30d",
                                   extension=extension or None)
        rec = await service.create_batch(store=self.store, storage=self.storage, tenant=tenant, body=body,
                                         limits=LIMITS)
        self.scheduler.wake()
        return rec.id

    async def wait(self, batch_id: str, statuses: set[str], timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rec = await self.store.get_batch(batch_id)
            if rec.status in statuses:
                return rec
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{batch_id} still {rec.status} after {timeout_s}s")

    async def lines(self, file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        f = await self.store.get_file(file_id)
        return [orjson.loads(line) async for _, line in self.storage.read_lines(f.storage_key)]

    async def close(self) -> None:
        await self.scheduler.stop()
        await self.scheduler.engines.aclose()


@pytest.fixture
async def make(tmp_path: Path):
    made: list[Harness] = []

    def _make(**kw) -> Harness:
        h = Harness(tmp_path, **kw)
        made.append(h)
        return h

    yield _make
    for h in made:
        await h.close()


async def test_a_tenant_with_16_batches_on_a_dead_engine_does_not_starve_another_tenant(make) -> None:
    h = make(engine_yield_after_s=60)  # only fair sharing can let "b" in here
    a = [await h.batch("tenant-a", f"a{i}", 20, engine=DEAD) for i in range(16)]
    await h.scheduler.start()
    for _ in range(100):  # tenant a holds every running slot
        if len(h.scheduler.runners) == 16:
            break
        await asyncio.sleep(0.02)
    assert {r.batch.tenant for r in h.scheduler.runners.values()} == {"tenant-a"}
    t0 = time.monotonic()
    b = await h.batch("tenant-b", "b", 10)
    done = await h.wait(b, {"completed"}, timeout_s=5)
    assert done.completed == 10 and time.monotonic() - t0 < 5
    for bid in a:  # nothing lost: tenant a's batches wait on, none ended
        assert (await h.store.get_batch(bid)).status == "in_progress"


async def test_running_slots_are_shared_between_tenants_and_a_yielded_batch_loses_nothing(make) -> None:
    h = make(max_running=4, latency_s=0.02)
    a = [await h.batch("tenant-a", f"a{i}", 60, max_concurrency=2) for i in range(4)]
    await h.scheduler.start()
    await asyncio.sleep(0.2)
    b = await h.batch("tenant-b", "b", 4, max_concurrency=2)
    done_b = await h.wait(b, {"completed"}, timeout_s=5)
    still_running_a = [(await h.store.get_batch(x)).status for x in a]
    assert "in_progress" in still_running_a  # b did not wait for a's batches to end
    assert done_b.completed == 4
    for i, bid in enumerate(a):
        rec = await h.wait(bid, {"completed"}, timeout_s=20)
        out = await h.lines(rec.output_file_id)
        assert sorted(line["custom_id"] for line in out) == sorted(f"a{i}-{k}" for k in range(60))
        assert rec.completed == 60 and rec.failed == 0
    # A batch that gave its slot up re-sends at most what it had in flight.
    assert sum(h.sent.values()) - len(h.sent) <= 4 * 2


async def test_a_batch_whose_engine_is_unreachable_gives_its_slot_up(make) -> None:
    h = make(max_running=1, engine_yield_after_s=0.3, engine_recheck_s=30)
    dead = await h.batch("t", "dead", 5, engine=DEAD)
    good = await h.batch("t", "good", 5)
    await h.scheduler.start()
    done = await h.wait(good, {"completed"}, timeout_s=5)
    assert done.completed == 5
    rec = await h.store.get_batch(dead)
    assert rec.status == "in_progress" and rec.lease_owner is None
    assert rec.not_before > time.time() + 20  # not claimed again until the recheck
    assert rec.engine["state"] == "unreachable" and rec.engine["last_error"] == REFUSED
    assert rec.engine["unreachable_since"] <= time.time()
    from overnight.api.schemas import batch_object

    assert batch_object(rec)["overnight"]["engine"]["state"] == "unreachable"


async def test_a_batch_fails_once_its_engine_was_unreachable_too_long(make, caplog) -> None:
    caplog.set_level(logging.INFO, logger="overnight")
    h = make(engine_yield_after_s=0.3, engine_recheck_s=0.2, engine_unreachable_timeout_s=1.0)
    bid = await h.batch("t", "dead", 30, engine=DEAD)
    await h.scheduler.start()
    rec = await h.wait(bid, {"failed"}, timeout_s=10)
    assert rec.errors and rec.errors[0]["code"] == "engine_unreachable"
    assert "unreachable for" in rec.errors[0]["message"] and REFUSED in rec.errors[0]["message"]
    err = await h.lines(rec.error_file_id)
    assert sorted(line["custom_id"] for line in err) == sorted(f"dead-{i}" for i in range(30))  # each once
    assert {line["error"]["code"] for line in err} == {"engine_unreachable"}
    assert rec.failed == 30 and rec.output_file_id is None
    # The outage is logged once per flip, not once per request.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "is unreachable" in r.getMessage()]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]
    assert h.dead_sends > len(warnings)


async def test_cancelled_lines_say_whether_a_send_was_attempted(make) -> None:
    h = make(engine_yield_after_s=60)
    bid = await h.batch("t", "dead", 600, engine=DEAD, max_concurrency=4)
    await h.scheduler.start()
    for _ in range(200):
        if h.dead_sends >= 8:
            break
        await asyncio.sleep(0.02)
    await service.cancel_batch(store=h.store, tenant="t", batch_id=bid)
    h.scheduler.notify_cancel(bid)
    rec = await h.wait(bid, {"cancelled"}, timeout_s=5)
    err = await h.lines(rec.error_file_id)
    assert len(err) == 600 and len({line["custom_id"] for line in err}) == 600
    messages = [line["error"]["message"] for line in err]
    tried = [m for m in messages if "attempt" in m]
    assert tried and all(("failed with: " + REFUSED) in m or "in flight" in m for m in tried), tried[:3]
    assert any(m == "The batch was cancelled before this request was sent." for m in messages)
