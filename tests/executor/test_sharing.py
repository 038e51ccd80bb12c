"""One engine's capacity shared by batches: caps, weighted fairness, deadlines, holds."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from overnight.executor.limiter import ConcurrencyLimits, Gate, Signal
from overnight.executor.sharing import EngineCapacity


def capacity(limit: int, **kw) -> EngineCapacity:
    # min = max = limit: a fixed engine limit, so the tests see only the sharing.
    return EngineCapacity(ConcurrencyLimits(initial=limit, min=limit, max=limit), **kw)


async def test_a_batch_takes_free_slots_without_waiting() -> None:
    cap = capacity(4)
    share = cap.join(cap=10)
    for _ in range(4):
        assert share.try_acquire()
    assert not share.try_acquire()
    assert cap.inflight == 4 and share.inflight == 4
    share.release()
    assert share.try_acquire()


async def test_the_batch_cap_is_never_exceeded() -> None:
    cap = capacity(100)
    share = cap.join(cap=3)
    assert [share.try_acquire() for _ in range(5)] == [True, True, True, False, False]
    waiter = asyncio.create_task(share.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    share.release()
    await asyncio.wait_for(waiter, 1)
    assert share.inflight == 3 and share.max_inflight_seen == 3


async def test_batches_on_one_engine_split_its_limit() -> None:
    cap = capacity(10)
    a, b = cap.join(cap=100), cap.join(cap=100)
    for _ in range(10):
        assert a.try_acquire()
    assert not b.try_acquire()  # the engine is full, whoever asks
    waiting = asyncio.create_task(b.acquire())
    await asyncio.sleep(0)
    a.release()
    await asyncio.wait_for(waiting, 1)
    assert cap.inflight == 10 and b.inflight == 1


async def _contend(cap: EngineCapacity, shares, rounds: int, seed: int = 1) -> Counter:
    """Every share always wants more; slots are freed one at a time at random.
    Returns how many slots each share held on average."""
    rng = random.Random(seed)
    held: list = []
    waiters = {s: [] for s in shares}

    def refill(s) -> None:
        while len(waiters[s]) < 3:
            waiters[s].append(asyncio.create_task(s.acquire()))

    for s in shares:
        refill(s)
    await asyncio.sleep(0)
    occupancy: Counter = Counter()
    for _ in range(rounds):
        for s in shares:
            done = [t for t in waiters[s] if t.done()]
            for t in done:
                waiters[s].remove(t)
                held.append(s)
            refill(s)
        for s in shares:
            occupancy[s.name] += s.inflight
        victim = held.pop(rng.randrange(len(held)))
        victim.release()
        await asyncio.sleep(0)
    for ts in waiters.values():
        for t in ts:
            t.cancel()
    await asyncio.gather(*(t for ts in waiters.values() for t in ts), return_exceptions=True)
    return occupancy


async def test_shares_are_weighted_by_priority() -> None:
    cap = capacity(40)
    low = cap.join(name="low", cap=1000, priority=0)  # weight 1
    high = cap.join(name="high", cap=1000, priority=2)  # weight 3
    occ = await _contend(cap, [low, high], rounds=2000)
    ratio = occ["high"] / occ["low"]
    assert 2.5 < ratio < 3.5, occ


async def test_a_capped_batch_leaves_its_share_to_the_others() -> None:
    cap = capacity(40)
    small = cap.join(name="small", cap=5)
    big = cap.join(name="big", cap=1000)
    occ = await _contend(cap, [small, big], rounds=1000)
    assert occ["small"] / 1000 <= 5
    assert occ["big"] / 1000 > 30  # work conserving: nothing sits idle


async def test_a_batch_near_its_deadline_goes_first() -> None:
    now = 1_000_000.0
    cap = capacity(10, wall=lambda: now)
    relaxed = cap.join(name="relaxed", cap=100, priority=100, deadline=now + 86_400, window_s=86_400, remaining=10)
    urgent = cap.join(name="urgent", cap=100, priority=0, deadline=now + 60, window_s=86_400, remaining=10)
    assert urgent.urgent(now) and not relaxed.urgent(now)
    occ = await _contend(cap, [relaxed, urgent], rounds=300)
    assert occ["urgent"] > 9 * occ["relaxed"], occ


async def test_urgency_from_remaining_work_at_the_engine_rate() -> None:
    now = 1_000_000.0
    cap = capacity(10, wall=lambda: now)
    share = cap.join(cap=100, deadline=now + 20_000, window_s=86_400, remaining=1_000_000)
    cap.limit.rate = 1000.0  # 1,000 s of work at full speed, 20,000 s left: fine
    assert not share.urgent(now)
    cap.limit.rate = 80.0  # 12,500 s of work: more than half the time left
    assert share.urgent(now)
    late = cap.join(cap=100, deadline=now + 8000, window_s=86_400, remaining=1)
    assert late.urgent(now)  # in the last 10% of its window, whatever is left


async def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    cap = capacity(1)
    share = cap.join(cap=10)
    assert share.try_acquire()
    waiter = asyncio.create_task(share.acquire())
    await asyncio.sleep(0)
    share.release()  # hands the slot to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs
    await asyncio.gather(waiter, return_exceptions=True)
    assert cap.inflight == 0 and share.inflight == 0
    assert share.try_acquire()


async def test_the_global_gate_bounds_all_engines_together() -> None:
    gate = Gate(3)
    e1, e2 = capacity(10, gates=(gate,)), capacity(10, gates=(gate,))
    a, b = e1.join(cap=10), e2.join(cap=10)
    assert a.try_acquire() and a.try_acquire() and b.try_acquire()
    assert not b.try_acquire() and not a.try_acquire()
    waiter = asyncio.create_task(b.acquire())
    await asyncio.sleep(0)
    a.release()
    await asyncio.wait_for(waiter, 1)
    assert gate.used == 3 and e1.inflight == 1 and e2.inflight == 2


async def test_an_outage_stops_new_sends_until_the_hold_ends() -> None:
    class Clock:
        t = 100.0

        def __call__(self) -> float:
            return self.t

    clock = Clock()
    cap = EngineCapacity(ConcurrencyLimits(initial=4, max=4), clock=clock)
    share = cap.join(cap=10)
    assert share.try_acquire()
    share.on_overload(Signal.OVERLOAD, retry_after_s=0.05)
    clock.t += 5.0  # nothing but refusals for 5 s: an outage
    share.on_overload(Signal.OVERLOAD, retry_after_s=0.05)
    share.release()
    assert not share.try_acquire()
    waiter = asyncio.create_task(share.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    clock.t += 0.05  # Retry-After has passed
    await asyncio.wait_for(waiter, 1)
    assert share.inflight == 1


async def test_closing_a_share_removes_it_from_the_engine() -> None:
    cap = capacity(2)
    a = cap.join(cap=10)
    a.close()
    a.close()
    assert cap.shares == []


@pytest.mark.parametrize("priority", [0, 100])
async def test_weight_is_one_plus_priority(priority: int) -> None:
    assert capacity(1).join(priority=priority).weight == 1 + priority


async def test_a_floor_is_granted_even_when_the_adaptive_limit_is_lower() -> None:
    cap = capacity(2)
    low = cap.join(cap=100)
    floored = cap.join(cap=100, floor=5)
    assert [low.try_acquire() for _ in range(3)] == [True, True, False]
    assert [floored.try_acquire() for _ in range(6)] == [True] * 5 + [False]
    assert cap.inflight == 7


async def test_a_fixed_batch_gets_exactly_its_level() -> None:
    cap = capacity(100)
    fixed = cap.join(cap=8, floor=8)
    assert sum(fixed.try_acquire() for _ in range(20)) == 8


async def test_a_yielding_batch_backs_off_while_others_queue_and_returns_when_they_stop() -> None:
    from overnight.executor.limiter import EngineLoad

    cap = capacity(64)
    bg = cap.join(cap=64, yield_to_others=True)
    assert sum(bg.try_acquire() for _ in range(64)) == 64
    # another client's requests wait at the engine: give up that many slots
    cap.on_metrics(EngineLoad(64, 10), inflight=64)
    assert bg.snapshot()["yield_cap"] == 54
    for _ in range(64):
        bg.release()
    assert sum(bg.try_acquire() for _ in range(64)) == 54
    # still queueing: shrinks further
    cap.on_metrics(EngineLoad(64, 20), inflight=54)
    assert bg.snapshot()["yield_cap"] == 34
    # the queue is gone: grows back by a quarter per sample
    for _ in range(54):
        bg.release()
    assert sum(bg.try_acquire() for _ in range(64)) == 34
    cap.on_metrics(EngineLoad(34, 0), inflight=34)
    assert bg.snapshot()["yield_cap"] == 42


async def test_a_batch_that_does_not_yield_ignores_the_queue() -> None:
    from overnight.executor.limiter import EngineLoad

    cap = capacity(64)
    share = cap.join(cap=64)
    cap.on_metrics(EngineLoad(64, 30), inflight=64)
    assert sum(share.try_acquire() for _ in range(64)) == 64
