"""One batch's fault stays in that batch: a poisoned engine endpoint, a crashing
runner or a cancel of such a batch never stops other tenants' batches."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from overnight.batches import service
from tests.scheduler.test_loop import Harness

POISONS = [
    {"endpoint": "http://127.0.0.1:99999"},
    {"endpoint": "http://"},
    {"endpoint": "http://[::1"},
    {"endpoint": "http://127.0.0.1:8000", "api_key": "caf\u2603"},
]


async def poison(h: Harness, batch_id: str, runtime: dict, **changes) -> None:
    """Write a bad runtime straight into the store, as if create validation were bypassed."""
    rec = await h.store.get_batch(batch_id)
    rec.options = {"runtime": {"type": "endpoint", **runtime}}
    for k, v in changes.items():
        setattr(rec, k, v)
    await h.store.update_batch(rec)


@pytest.fixture
async def harness(tmp_path: Path):
    h = Harness(tmp_path)
    yield h
    await h.scheduler.stop()
    await h.scheduler.engines.aclose()


@pytest.mark.parametrize("runtime", POISONS, ids=lambda r: repr(r)[:40])
async def test_a_poisoned_endpoint_fails_its_batch_and_others_complete(harness: Harness, runtime) -> None:
    bad = await harness.batch("bad", 3)  # the oldest active batch: the first one each pass looks at
    await poison(harness, bad, runtime, tenant="mallory")
    good = await harness.batch("good", 20)
    await harness.scheduler.drain(15)
    assert (await harness.store.get_batch(good)).status == "completed"
    rec = await harness.store.get_batch(bad)
    assert rec.status == "failed", rec.status
    assert rec.errors[0]["code"] == "engine_unusable" and rec.errors[0]["message"]
    assert "\u2603" not in rec.errors[0]["message"] or "api_key" not in runtime


async def test_cancel_of_a_poisoned_batch_reaches_a_terminal_status(harness: Harness) -> None:
    bad = await harness.batch("bad", 3)
    await poison(harness, bad, POISONS[0], tenant="mallory")
    await service.cancel_batch(store=harness.store, tenant="mallory", batch_id=bad)
    await harness.scheduler.drain(15)
    assert (await harness.store.get_batch(bad)).status == "cancelled"


async def test_a_poisoned_batch_already_in_progress_ends_every_line_with_the_reason(harness: Harness) -> None:
    bad = await harness.batch("bad", 4)
    await poison(harness, bad, POISONS[0], status="in_progress", in_progress_at=int(time.time()), total=4, model="m")
    await harness.scheduler.drain(15)
    rec = await harness.store.get_batch(bad)
    assert rec.status == "completed" and rec.failed == 4 and rec.output_file_id is None
    lines = [orjson.loads(x) for x in harness.storage.objects[f"files/{rec.error_file_id}"].splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"bad{i}" for i in range(4)]
    assert {x["error"]["code"] for x in lines} == {"engine_unusable"}
    assert "Port out of range" in lines[0]["error"]["message"]


async def test_a_runner_that_keeps_crashing_ends_its_batch_and_others_run(harness: Harness) -> None:
    bad = await harness.batch("bad", 3)
    original = harness.scheduler._run

    async def crash_bad(runner):
        if runner.batch.id == bad:
            async def boom() -> None:
                raise KeyError("a bug that only this batch hits")
            runner._advance = boom  # type: ignore[method-assign]
        await original(runner)

    harness.scheduler._run = crash_bad  # type: ignore[method-assign]
    good = await harness.batch("good", 20)
    await harness.scheduler.start()
    deadline = time.monotonic() + 15
    while (await harness.store.get_batch(bad)).status != "failed" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    rec = await harness.store.get_batch(bad)
    assert rec.status == "failed" and rec.errors[0]["code"] == "internal_error"
    assert "a bug that only this batch hits" in rec.errors[0]["message"]
    assert (await harness.store.get_batch(good)).status == "completed"


async def test_an_engine_usage_out_of_range_never_wedges_a_checkpoint(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def huge_usage(path: str, body: dict) -> tuple[int, dict]:
        return 200, {"object": "chat.completion", "usage": {"prompt_tokens": 1e30, "completion_tokens": 2}}

    from overnight.executor.engine import FakeEngine
    from tests.scheduler.test_loop import ENGINE

    h.scheduler.engines.set_client(ENGINE, None, FakeEngine(huge_usage))
    try:
        bid = await h.batch("a", 10)
        await h.scheduler.drain(15)
        rec = await h.store.get_batch(bid)
        assert rec.status == "completed" and rec.completed == 10
        assert rec.usage["input_tokens"] == 0 and rec.usage["output_tokens"] == 20
        assert rec.usage["ignored_values"] == 10
    finally:
        await h.scheduler.stop()
        await h.scheduler.engines.aclose()


async def test_the_endpoint_policy_is_checked_again_before_dispatch(harness: Harness) -> None:
    from overnight.runtimes.egress import EndpointPolicy
    from tests.scheduler.test_loop import ENGINE

    # Accepted at create under an older policy (or a DNS name that moved since).
    harness.scheduler.engines.policy = EndpointPolicy("none", keyed=True, default_url=ENGINE)
    bad = await harness.batch("bad", 3)
    await poison(harness, bad, {"endpoint": "http://169.254.169.254:80"}, tenant="mallory")
    good = await harness.batch("good", 5)
    await harness.scheduler.drain(15)
    assert (await harness.store.get_batch(good)).status == "completed"
    rec = await harness.store.get_batch(bad)
    assert rec.status == "failed" and rec.errors[0]["code"] == "endpoint_not_allowed"
    assert "metadata" in rec.errors[0]["message"]
