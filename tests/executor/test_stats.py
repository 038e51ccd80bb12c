"""The executor's plain-number counters (``executor/stats.py``): histogram buckets,
and what ``execute()`` counts for answers, retries, timeouts, refusals and a cancel."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import orjson
import pytest

from overnight.errors import RetryableEngineError
from overnight.executor.checkpoint import Checkpoint
from overnight.executor.engine import FakeEngine
from overnight.executor.limiter import ConcurrencyLimits
from overnight.executor.retry import RetryPolicy
from overnight.executor.run import ExecuteParams, Outcome, StopSignal, execute
from overnight.executor.sharing import EngineCapacity
from overnight.executor.stats import ExecutorStats, Histogram
from overnight.executor.writer import Spool
from overnight.storage.memory import MemoryStorage

CHAT = "/v1/chat/completions"
POLICY = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.01)


def test_histogram_buckets_are_le_and_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    assert h.counts == [2, 2, 1]  # 0.1 itself is in le=0.1; 7 only in +Inf
    assert h.cumulative() == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert h.count == 5 and h.sum == pytest.approx(8.65)


def test_histogram_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((1.0, 0.5))
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((1.0, 1.0))


def test_request_stats_are_one_object_per_engine_and_endpoint() -> None:
    s = ExecutorStats()
    a = s.requests_for("default", CHAT)
    assert s.requests_for("default", CHAT) is a
    assert s.requests_for("default", "/v1/embeddings") is not a
    assert s.requests_for("engine-1", CHAT) is not a


async def _run(tmp_path, contents: list[str], handler, *, stop: StopSignal | None = None, limit: int = 4):
    storage = MemoryStorage()
    lines = [orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT,
                           "body": {"model": "m", "messages": [{"role": "user", "content": c}]}})
             for i, c in enumerate(contents)]
    await storage.put_bytes("in", b"\n".join(lines) + b"\n")
    spool = Spool(spool_dir=tmp_path / "spool", storage=storage, batch_id="batch_t", token=1,
                  checkpoint=Checkpoint.empty(len(contents)))
    spool.open()
    persisted: list[bytes] = []

    async def persist(data: bytes) -> None:
        await asyncio.sleep(0.001)
        persisted.append(data)

    stats = ExecutorStats()
    params = ExecuteParams(endpoint=CHAT, input_key="in", batch_suffix="t", deadline=time.time() + 3600,
                           checkpoint_interval_s=0.02, persist=persist,
                           stats=stats.requests_for("default", CHAT), checkpoint_latency=stats.checkpoint)
    share = EngineCapacity(ConcurrencyLimits(initial=limit, max=limit)).join(cap=limit)
    engine = FakeEngine(handler)
    try:
        outcome = await execute(storage=storage, spool=spool, engine=engine, limiter=share, policy=POLICY,
                                params=params, stop=stop or StopSignal())
    finally:
        share.close()
        spool.close()
    return outcome, spool.cp, stats, engine, persisted


async def test_execute_counts_attempts_retries_outcomes_tokens_and_latency(tmp_path) -> None:
    seen: Counter = Counter()

    def handler(path, body):
        text = body["messages"][0]["content"]
        seen[text] += 1
        if text == "flaky" and seen[text] < 3:
            return 500, {"error": {"message": "boom"}}
        if text == "bad":
            return 400, {"error": {"message": "no"}}
        if text == "slow":
            raise RetryableEngineError("no answer", code="request_timeout")
        return 200, {"usage": {"prompt_tokens": 5, "completion_tokens": 7}}

    contents = ["flaky", "bad", "slow"] + [f"x{i}" for i in range(10)]
    outcome, cp, stats, engine, persisted = await _run(tmp_path, contents, handler)
    assert outcome is Outcome.DONE
    st = stats.requests_for("default", CHAT)
    assert engine.calls == 3 + 1 + 3 + 10
    assert st.dispatched == engine.calls
    assert st.retried == 2 + 2  # flaky twice, the timeout twice; the third timeout is final
    assert (st.succeeded, st.failed) == (cp.completed, cp.failed) == (11, 2)
    # Every attempt with an HTTP answer is timed; a timeout has no answer to time.
    assert st.latency.count == engine.calls - 3
    assert (st.tokens_in, st.tokens_out) == (11 * 5, 11 * 7)
    assert stats.checkpoint.count == len(persisted) >= 1
    assert stats.checkpoint.sum >= 0.001 * len(persisted)


async def test_lines_written_for_a_cancel_count_as_failed(tmp_path) -> None:
    stop = StopSignal()
    calls = 0

    async def handler(path, body):
        nonlocal calls
        calls += 1
        if calls == 5:
            stop.set(Outcome.CANCELLED)
        await asyncio.sleep(0.001)
        return 200, {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    outcome, cp, stats, engine, _ = await _run(tmp_path, [f"x{i}" for i in range(60)], handler, stop=stop, limit=1)
    assert outcome is Outcome.CANCELLED
    st = stats.requests_for("default", CHAT)
    assert cp.failed > 0 and st.succeeded + st.failed == 60
    assert (st.succeeded, st.failed) == (cp.completed, cp.failed)
    assert st.dispatched == engine.calls
