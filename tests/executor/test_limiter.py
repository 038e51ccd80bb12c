"""The adaptive limit's control law, driven by a fake clock and a fake engine."""

from __future__ import annotations

import asyncio

import pytest

from overnight.executor.limiter import AdaptiveLimit, ConcurrencyLimits, Gate, Signal


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make(clock: FakeClock, **kw) -> AdaptiveLimit:
    kw.setdefault("initial", 8)
    kw.setdefault("max", 10_000)
    return AdaptiveLimit(ConcurrencyLimits(**kw), clock=clock)


def run_round(lim: AdaptiveLimit, clock: FakeClock, *, rtt: float = 0.05, inflight: int | None = None,
              n: int | None = None) -> None:
    """One round trip of a fake engine: ``inflight`` requests (default: the whole
    limit) all answer after ``rtt``."""
    inflight = lim.value if inflight is None else inflight
    lim.note_inflight(inflight)
    n = n or max(1, inflight)
    for _ in range(n - 1):
        lim.on_success(rtt, inflight)
    clock.advance(max(rtt, lim._round_len()) + 1e-9)  # the last answer ends the round
    lim.on_success(rtt, inflight)


def test_slow_start_doubles_each_round_while_the_limit_is_used() -> None:
    clock = FakeClock()
    lim = make(clock)
    seen = []
    for _ in range(4):
        run_round(lim, clock)
        seen.append(lim.value)
    assert seen == [16, 32, 64, 128]
    assert lim.slow_start


def test_an_unused_limit_does_not_grow() -> None:
    clock = FakeClock()
    lim = make(clock)
    for _ in range(5):
        run_round(lim, clock, inflight=3)
    assert lim.value == 8


def test_limit_stays_within_min_and_max() -> None:
    clock = FakeClock()
    lim = make(clock, initial=4, min=2, max=20)
    for _ in range(10):
        run_round(lim, clock)
    assert lim.value == 20
    for _ in range(30):
        clock.advance(1.0)
        lim.on_success(0.05, lim.value)  # keep it out of "outage"
        lim.on_overload(Signal.OVERLOAD, inflight=lim.value)
    assert lim.value == 2


def test_a_burst_of_429s_is_one_cut_per_round() -> None:
    clock = FakeClock()
    lim = make(clock, initial=100)
    run_round(lim, clock)  # leaves slow start at 200 with an RTT estimate
    lim.slow_start = False
    before = lim.limit
    for _ in range(50):
        lim.on_overload(Signal.OVERLOAD, inflight=int(before))
    assert lim.cuts == 1
    assert lim.limit == pytest.approx(before * 0.9)


def test_overload_in_slow_start_halves_the_limit() -> None:
    clock = FakeClock()
    lim = make(clock, initial=64)
    run_round(lim, clock)  # 128, still in slow start
    lim.on_overload(Signal.OVERLOAD, inflight=128)
    assert lim.value == 64 and not lim.slow_start


def test_each_further_refusal_within_the_limit_gives_up_a_slot() -> None:
    clock = FakeClock()
    lim = make(clock, initial=100)
    run_round(lim, clock)
    lim.slow_start = False
    lim.limit, lim.value = 100.0, 100
    lim.on_overload(Signal.OVERLOAD, inflight=100)
    assert lim.limit == pytest.approx(90.0)
    for inflight in range(99, 90, -1):  # sent before the cut: the same signal, no further cut
        lim.on_overload(Signal.OVERLOAD, inflight=inflight)
    assert lim.limit == pytest.approx(90.0)
    for _ in range(10):  # refused although we are within the limit: one slot less each
        lim.on_overload(Signal.OVERLOAD, inflight=int(lim.limit))
    assert lim.limit == pytest.approx(80.0)


def test_after_a_cut_growth_returns_to_the_refusal_level_then_plateaus_then_probes() -> None:
    clock = FakeClock()
    lim = make(clock, initial=64)
    run_round(lim, clock, inflight=64)  # 128 in slow start
    lim.slow_start = False
    lim.limit, lim.value = 66.0, 66
    clock.advance(1.0)
    lim.on_success(0.05, 0)  # a success just now: congestion, not an outage
    lim.on_overload(Signal.OVERLOAD, inflight=65)  # the engine refused the 65th
    assert lim.ceiling == 64.0
    levels = []
    for _ in range(10):
        run_round(lim, clock)
        levels.append(lim.value)
    assert levels[0] > 59  # halving steps towards 64
    assert 64 in levels[:4]
    plateau = levels[levels.index(64):]
    assert plateau[:4] == [64, 64, 64, 64]  # stays at the known-good level a while
    assert max(levels) > 64  # ... then probes beyond it


def test_rising_latency_cuts_gently_and_ends_slow_start() -> None:
    clock = FakeClock()
    lim = make(clock, initial=32)
    for _ in range(2):
        run_round(lim, clock, rtt=0.05)
    assert lim.value == 128
    run_round(lim, clock, rtt=0.2)  # the engine queues: round trips 4x the baseline
    assert not lim.slow_start
    assert lim.value == 64  # halved: feedback lags a round in slow start
    run_round(lim, clock, rtt=0.2)
    assert 50 <= lim.value < 64  # then gentle cuts (x0.9) while it stays high


def test_latency_within_tolerance_keeps_growing() -> None:
    clock = FakeClock()
    lim = make(clock, initial=32)
    run_round(lim, clock, rtt=0.05)
    lim.slow_start = False
    start = lim.value
    for _ in range(5):
        run_round(lim, clock, rtt=0.06)  # +20%: within the 1.5x tolerance
    assert lim.value > start and lim.cuts == 0


def test_outage_holds_new_sends_until_retry_after() -> None:
    clock = FakeClock()
    lim = make(clock, initial=32)
    lim.note_inflight(32)
    lim.on_overload(Signal.OVERLOAD, retry_after_s=30.0, inflight=32)
    assert lim.hold_until == 0.0  # one refusal is congestion ...
    clock.advance(5.0)
    lim.on_overload(Signal.OVERLOAD, retry_after_s=30.0, inflight=32)  # ... 5 s of nothing else is an outage
    assert lim.hold_until == pytest.approx(clock() + 30.0)
    assert lim.value == 1 and lim.slow_start


def test_outage_without_retry_after_backs_off_exponentially() -> None:
    clock = FakeClock()
    lim = make(clock, outage_backoff_base_s=0.5, outage_backoff_max_s=4.0)
    lim.note_inflight(1)
    lim.on_overload(Signal.UNREACHABLE)
    pauses = []
    for _ in range(6):
        clock.advance(2.0)
        lim.on_overload(Signal.UNREACHABLE)
        pauses.append(round(lim.hold_until - clock(), 3))
    assert pauses == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_refusals_while_other_requests_succeed_are_not_an_outage() -> None:
    clock = FakeClock()
    lim = make(clock, initial=32)
    run_round(lim, clock)
    lim.on_overload(Signal.OVERLOAD, retry_after_s=30.0, inflight=64)
    assert lim.hold_until == 0.0
    assert lim.value == 32  # cut (halved in slow start), not stopped


def test_a_long_run_of_instant_failures_is_an_outage_at_once() -> None:
    clock = FakeClock()
    lim = make(clock, initial=8)
    for _ in range(31):
        lim.on_overload(Signal.UNREACHABLE, inflight=1)
    assert lim.hold_until == 0.0
    lim.on_overload(Signal.UNREACHABLE, inflight=1)  # 32 in a row, no answer ever
    assert lim.hold_until > clock()


def test_a_burst_of_instant_refusals_before_any_answer_is_not_an_outage() -> None:
    clock = FakeClock()
    lim = make(clock, initial=8)
    run_round(lim, clock, rtt=0.05)
    for _ in range(100):  # extra slots refused at once, the rest still being served
        lim.on_overload(Signal.OVERLOAD, inflight=16)
    assert lim.hold_until == 0.0


def test_a_batch_starting_on_an_idle_engine_is_not_in_an_outage() -> None:
    clock = FakeClock()
    lim = make(clock)
    clock.advance(3600)  # idle for an hour
    lim.note_inflight(8)
    clock.advance(0.01)
    lim.on_overload(Signal.OVERLOAD, inflight=8)
    assert lim.hold_until == 0.0


def test_metrics_cut_the_excess_queue_and_stop_growth_above_target() -> None:
    clock = FakeClock()
    lim = make(clock, initial=300)
    run_round(lim, clock)  # 600
    lim.on_metrics(running=256, waiting=200, inflight=600)
    target = max(4, 0.05 * 256)
    assert lim.limit == pytest.approx(600 - (200 - target))
    assert not lim.slow_start
    value = lim.value
    lim.on_metrics(running=256, waiting=20, inflight=value)  # above target, below 2x: hold
    for _ in range(3):
        run_round(lim, clock, rtt=0.5)  # latency is ignored while metrics are trusted
    assert lim.value == value
    lim.on_metrics(running=256, waiting=2, inflight=value)
    run_round(lim, clock)
    assert lim.value > value


def test_metrics_that_do_not_see_our_requests_fall_back_to_latency() -> None:
    clock = FakeClock()
    lim = make(clock, initial=100)
    run_round(lim, clock, rtt=0.01)
    lim.slow_start = False
    lim.on_metrics(running=0, waiting=0, inflight=200)  # requests stuck in front of the engine
    assert not lim.metrics_fresh()
    run_round(lim, clock, rtt=0.05)
    assert lim.cuts == 1  # the latency rise counted


def test_stale_metrics_are_ignored() -> None:
    clock = FakeClock()
    lim = make(clock)
    lim.on_metrics(running=10, waiting=0, inflight=10)
    assert lim.metrics_fresh()
    clock.advance(10)
    assert not lim.metrics_fresh()


def test_baseline_probe_halves_the_limit_briefly_then_restores_it() -> None:
    clock = FakeClock()
    lim = make(clock, initial=64, baseline_window_s=1.0)
    run_round(lim, clock)
    lim.slow_start = False
    values = []
    for _ in range(12):
        run_round(lim, clock, rtt=0.05, inflight=lim.value)
        values.append(lim.value)
    low = min(values)
    assert low <= max(values) // 2 + 1  # one short probe at half the limit
    assert values[-1] >= 128


async def test_gate_is_fifo_and_resizable() -> None:
    gate = Gate(1)
    await gate.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await gate.acquire()
        order.append(i)

    tasks = [asyncio.create_task(take(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert order == [] and not gate.try_acquire()
    gate.resize(3)
    await asyncio.sleep(0)
    assert order == [0, 1]
    gate.release()
    await asyncio.sleep(0)
    assert order == [0, 1, 2]
    await asyncio.gather(*tasks)
