"""The adaptive limit's control law: unit rules with a fake clock, and whole
batches against a simulated batching engine (``engine_sim.py``, no sockets)."""

from __future__ import annotations

import asyncio
import random
import statistics
from dataclasses import replace

import pytest

from overnight.executor.limiter import AdaptiveLimit, ConcurrencyLimits, EngineLoad, Gate, Signal
from overnight.mock_engine.batching import PRESETS, BatchingParams, OutputLength

from .engine_sim import Simulation, best_fixed


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


def epoch(lim: AdaptiveLimit, clock: FakeClock, *, rate, latency: float = 0.1, inflight: int | None = None,
          seconds: float = 0.5) -> None:
    """``seconds`` of answers with ``inflight`` requests out (default: the limit);
    ``rate``: answers per second, or a function of the level in flight."""
    end = clock.t + seconds
    while clock.t < end:
        level = lim.value if inflight is None else inflight
        r = rate(level) if callable(rate) else rate
        lim.note_inflight(level)
        clock.advance(1.0 / r)
        lim.on_success(latency, level - 1)


# -- unit rules -----------------------------------------------------------------


def n_latency(level: int) -> float:
    return 1.0 + level / 64


def test_startup_doubles_while_the_rate_keeps_growing_even_as_latency_rises() -> None:
    clock = FakeClock()
    lim = make(clock)
    seen = []
    while len(seen) < 4:
        # A batching engine: twice the requests, nearly twice the rate, and each
        # request slower than before. Latency must not stop the growth.
        level = lim.value
        epoch(lim, clock, rate=lambda n: 20.0 * n**0.6, latency=0.1 * n_latency(level), seconds=0.05)
        if lim.value != level:
            seen.append(lim.value)
    assert seen == [16, 32, 64, 128]
    assert lim.slow_start and lim.cuts == 0


def test_startup_ends_at_the_level_where_doubling_stopped_paying() -> None:
    clock = FakeClock()
    lim = make(clock, initial=16)
    # 32 in flight gives no more than 16: the knee is at 16
    while lim.slow_start:
        epoch(lim, clock, rate=lambda n: 10.0 * min(n, 16), seconds=0.05)
    assert clock.t < 1003
    assert lim.value == 16
    assert "startup over" in lim.reason


def test_an_unused_limit_does_not_grow() -> None:
    clock = FakeClock()
    lim = make(clock)
    for _ in range(6):
        epoch(lim, clock, rate=100, inflight=3)
    assert lim.value == 8


def test_fixed_limits_never_change() -> None:
    clock = FakeClock()
    lim = make(clock, initial=24, min=24, max=24, fixed=True)
    for _ in range(6):
        epoch(lim, clock, rate=1000)
    lim.on_overload(Signal.OVERLOAD, inflight=24)
    lim.on_metrics(EngineLoad(10, 500), inflight=24)
    assert lim.value == 24
    assert lim.reason == "fixed"


def test_limit_stays_within_min_and_max() -> None:
    clock = FakeClock()
    lim = make(clock, initial=4, min=2, max=20)
    epoch(lim, clock, rate=lambda n: 50.0 * n, seconds=5.0)
    assert lim.value == 20
    for _ in range(30):
        clock.advance(1.0)
        lim.on_success(0.05, lim.value)  # keep it out of "outage"
        lim.on_overload(Signal.OVERLOAD, inflight=lim.value)
    assert lim.value == 2


def test_a_burst_of_429s_is_one_cut_per_round_below_the_refusal_level() -> None:
    clock = FakeClock()
    lim = make(clock, initial=100, max=100)
    epoch(lim, clock, rate=1000, latency=0.2)
    lim.on_overload(Signal.OVERLOAD, inflight=100)
    assert lim.value == int(99 * 0.9)
    assert lim.ceiling == 99
    after_first = lim.value
    for _ in range(50):
        lim.on_overload(Signal.OVERLOAD, inflight=150)  # sent before the cut: no more cuts
        lim.on_success(0.2, 100)
    assert lim.value == after_first


def test_each_further_refusal_within_the_limit_gives_up_a_slot() -> None:
    clock = FakeClock()
    lim = make(clock, initial=64)
    epoch(lim, clock, rate=640, latency=0.2)
    lim.on_overload(Signal.OVERLOAD, inflight=64)
    first = lim.value
    lim.on_success(0.2, 50)
    lim.on_overload(Signal.OVERLOAD, inflight=first)
    assert lim.value == first - 1


def test_a_burst_of_refusals_narrows_the_ceiling_to_the_capacity_and_leaves_the_limit_there() -> None:
    # A doubling from 64 to 128 against an engine that takes 64: the refusals come back
    # at 128, 127, ..., 65 in flight as the requests sent into the congestion leave.
    clock = FakeClock()
    lim = make(clock, initial=128)
    epoch(lim, clock, rate=1280, latency=0.05)
    for inflight in range(128, 64, -1):
        lim.on_overload(Signal.OVERLOAD, inflight=inflight)
    # (It was: the ceiling stayed at 127 and each refusal gave up a slot, down to 51.)
    assert lim.ceiling == 64 and lim.value == 64


def test_one_or_two_slow_epochs_do_not_move_the_limit_below_the_capacity() -> None:
    """A level's rate is the median of its last epochs: a stall of the service (or the
    engine) for an epoch or two does not make a lower level look as good."""
    clock = FakeClock()
    lim = make(clock, initial=64, max=64)  # an engine of 64 at 50 ms: 20 answers/s per slot
    for _ in range(40):  # cruising at 64, with a probe down to 51 on record
        epoch(lim, clock, rate=lambda n: 20.0 * n, latency=0.05)
    assert lim.value == 64 and 51 in lim.table()
    epoch(lim, clock, rate=lambda n: 12.0 * n, latency=0.05, seconds=0.06)  # a stalled epoch
    epoch(lim, clock, rate=lambda n: 20.0 * n, latency=0.05, seconds=0.5)
    assert lim.value == 64


def test_a_refusal_level_is_a_ceiling_for_a_while_then_probed_again() -> None:
    clock = FakeClock()
    lim = make(clock, initial=64, ceiling_ttl_s=30.0)
    epoch(lim, clock, rate=640)
    lim.on_overload(Signal.OVERLOAD, inflight=70)
    for _ in range(40):  # 20 s of good epochs: never above the refusal level
        epoch(lim, clock, rate=lambda n: 10.0 * n)
        assert lim.value <= 69
    for _ in range(120):  # the ceiling expires: growth resumes above it
        epoch(lim, clock, rate=lambda n: 10.0 * n)
    assert lim.value > 69


def test_outage_holds_new_sends_until_retry_after() -> None:
    clock = FakeClock()
    lim = make(clock, initial=16)
    epoch(lim, clock, rate=160)
    for _ in range(40):
        clock.advance(0.05)
        lim.on_overload(Signal.UNREACHABLE, retry_after_s=5.0, inflight=16)
    assert lim.hold_until == pytest.approx(clock.t + 5.0, abs=2.0)
    assert lim.slow_start


def test_failures_during_a_hold_do_not_extend_it() -> None:
    """Requests sent before the pause fail after it began: no new outage for them
    (each used to double the pause: 0.5, 1, 2 ... 16 s within one instant)."""
    clock = FakeClock()
    lim = make(clock, initial=64)
    epoch(lim, clock, rate=640)
    while lim.hold_until <= clock.t:
        clock.advance(0.02)
        lim.on_overload(Signal.UNREACHABLE, inflight=64)
    hold = lim.hold_until
    assert hold > clock.t
    for _ in range(60):  # the rest of the window fails within the pause
        lim.on_overload(Signal.UNREACHABLE, inflight=64)
    assert lim.hold_until == hold


def test_an_outage_that_goes_on_backs_off_exponentially() -> None:
    clock = FakeClock()
    lim = make(clock, initial=16)
    epoch(lim, clock, rate=160)
    pauses = []
    for _ in range(4):
        while lim.hold_until <= clock.t:
            clock.advance(0.1)
            lim.on_overload(Signal.UNREACHABLE, inflight=lim.value)
        pauses.append(lim.hold_until - clock.t)
        clock.t = lim.hold_until
    assert pauses == pytest.approx([0.5, 1.0, 2.0, 4.0], abs=0.01)


def test_after_an_outage_startup_resumes_from_half_the_best_level() -> None:
    clock = FakeClock()
    lim = make(clock, initial=64)
    epoch(lim, clock, rate=lambda n: 10.0 * min(n, 80), seconds=3.0)
    best = max(lim.table(), key=lim.table().get)
    assert best >= 64
    while lim.hold_until <= clock.t:
        clock.advance(0.05)
        lim.on_overload(Signal.UNREACHABLE, inflight=lim.value)
    assert lim.value >= 32  # half of a level with the best rate
    assert lim.slow_start and lim.table() == {}


def test_refusals_while_other_requests_succeed_are_not_an_outage() -> None:
    clock = FakeClock()
    lim = make(clock, initial=32)
    epoch(lim, clock, rate=320)
    for _ in range(200):
        clock.advance(0.01)
        lim.on_overload(Signal.OVERLOAD, inflight=32)
        lim.on_success(0.1, 31)
    assert lim.hold_until == 0.0


def test_a_long_run_of_instant_failures_is_an_outage_at_once() -> None:
    clock = FakeClock()
    lim = make(clock, initial=8)
    for _ in range(40):
        lim.on_overload(Signal.UNREACHABLE, inflight=8)
    assert lim.hold_until > clock.t


def test_a_burst_of_instant_refusals_before_any_answer_is_not_an_outage() -> None:
    clock = FakeClock()
    lim = make(clock, initial=8)
    epoch(lim, clock, rate=80, latency=0.5)
    for _ in range(20):  # a round trip is 0.5 s: 20 refusals within it are congestion
        lim.on_overload(Signal.OVERLOAD, inflight=8)
    assert lim.hold_until == 0.0


def test_one_sample_with_a_queue_is_no_reason_to_cut() -> None:
    """A burst waits a step before the engine admits it, whatever its room."""
    clock = FakeClock()
    lim = make(clock, initial=64)
    epoch(lim, clock, rate=640)
    before = lim.value
    lim.on_metrics(EngineLoad(10, 54), inflight=before)
    assert lim.value == before


def test_a_queue_at_an_engine_known_to_be_full_is_cut_to_what_it_runs() -> None:
    clock = FakeClock()
    lim = make(clock, initial=128)
    # an epoch at 128 with the engine running 100 and 28 waiting: it is full at 100
    for _ in range(4):
        lim.on_metrics(EngineLoad(100, 28), inflight=128)
    epoch(lim, clock, rate=lambda n: 10.0 * min(n, 100), seconds=0.12)
    assert lim.value == 128 - (28 - 5)  # the queue above half the target goes
    assert not lim.slow_start
    clock.advance(1.0)
    lim.value = lim.limit = 200.0  # something pushed it up again (a probe)
    lim.on_metrics(EngineLoad(100, 100), inflight=200)
    assert lim.value == int(100 + lim.waiting_target() / 2)
    assert "engine queue" in lim.reason


def test_metrics_that_do_not_see_our_requests_are_ignored() -> None:
    clock = FakeClock()
    lim = make(clock, initial=100)
    epoch(lim, clock, rate=1000)
    lim.on_metrics(EngineLoad(5, 20), inflight=100)  # the engine sees 25 of our 100
    assert not lim.metrics_fresh()
    assert lim.value >= 100


def test_stale_metrics_are_ignored() -> None:
    clock = FakeClock()
    lim = make(clock, initial=100)
    lim.on_metrics(EngineLoad(100, 0), inflight=100)
    clock.advance(10.0)
    assert not lim.metrics_fresh()


def test_kv_preemption_stops_startup_at_what_the_engine_holds() -> None:
    clock = FakeClock()
    lim = make(clock, initial=64)
    epoch(lim, clock, rate=lambda n: 10.0 * n, seconds=0.1)
    assert lim.value == 128
    lim.on_metrics(EngineLoad(90, 0, 0.99, 10.0), inflight=128)
    clock.advance(1.0)
    lim.on_metrics(EngineLoad(90, 0, 0.99, 14.0), inflight=128)
    assert not lim.slow_start
    assert lim.value <= 90 + 9


async def test_gate_is_fifo_and_resizable() -> None:
    gate = Gate(1)
    order: list[int] = []

    async def user(i: int) -> None:
        await gate.acquire()
        order.append(i)
        await asyncio.sleep(0)
        gate.release()

    await gate.acquire()
    tasks = [asyncio.create_task(user(i)) for i in range(3)]
    await asyncio.sleep(0)
    gate.resize(2)
    gate.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


# -- whole batches against a simulated batching engine ----------------------------

MIXED = replace(PRESETS["knee-64"], output_len=OutputLength("uniform", 4, 512))
#: shape, requests, fixed levels to sweep
CASES = {
    "knee-16": (PRESETS["knee-16"], 4000, [8, 16, 24, 32, 64]),
    "knee-64": (PRESETS["knee-64"], 12000, [32, 64, 96, 128]),
    "knee-256": (PRESETS["knee-256"], 30000, [128, 256, 384, 512]),
    "h200-llama-1b": (PRESETS["h200-llama-1b"], 8000, [64, 128, 192, 256]),
    "mixed-max-tokens": (MIXED, 3000, [64, 96, 128]),
}


def _median_waiting_ok(sim: Simulation) -> bool:
    r = sim.result
    waiting = statistics.median(w for _, w in r.waiting_samples)
    running = statistics.median(x for _, x in r.running_samples)
    return waiting <= max(4.0, 0.10 * running)


@pytest.mark.parametrize("metrics", [True, False], ids=["metrics", "no-metrics"])
@pytest.mark.parametrize("case", list(CASES))
def test_adaptive_reaches_the_best_fixed_concurrency(case: str, metrics: bool) -> None:
    params, n, levels = CASES[case]
    _, best = best_fixed(params, n, levels)
    sim = Simulation(params, ConcurrencyLimits(), metrics=metrics)
    r = sim.run(n)
    assert r.completed == n
    assert r.rate >= 0.90 * best, (case, r.rate, best, r.limits[-10:])
    assert r.time_to_fraction(0.9) <= 0.10 * r.seconds
    if metrics:
        assert _median_waiting_ok(sim), (statistics.median(w for _, w in r.waiting_samples))


def test_refusals_beyond_64_settle_just_below_them() -> None:
    params = PRESETS["knee-256"]
    _, best = best_fixed(params, 8000, [56, 64], refuse_beyond=64)
    sim = Simulation(params, ConcurrencyLimits(), metrics=False, refuse_beyond=64)
    r = sim.run(8000)
    assert r.completed == 8000
    assert r.rate >= 0.90 * best
    assert r.refusals < 0.05 * 8000


def test_the_knee_moving_mid_batch_is_followed_down_and_up() -> None:
    sim = Simulation(PRESETS["knee-64"], ConcurrencyLimits(), metrics=False)
    sim.at(20.0, lambda s: s.change_engine(PRESETS["knee-16"]))
    sim.at(60.0, lambda s: s.change_engine(PRESETS["knee-256"]))
    r = sim.run(36000)
    _, best16 = best_fixed(PRESETS["knee-16"], 3000, [16, 24, 32])
    _, best256 = best_fixed(PRESETS["knee-256"], 20000, [256, 384])
    assert r.rate_between(35, 60) >= 0.85 * best16
    end = r.seconds
    assert end > 75
    assert r.rate_between(end - 10, end) >= 0.85 * best256, r.limits[-10:]


@pytest.mark.parametrize("metrics", [True, False], ids=["metrics", "no-metrics"])
def test_an_engine_restart_mid_batch_is_ridden_out(metrics: bool) -> None:
    params = PRESETS["knee-64"]
    _, best = best_fixed(params, 5000, [64, 96])
    sim = Simulation(params, ConcurrencyLimits(), metrics=metrics)
    sim.at(10.0, lambda s: s.restart_engine(3.0))
    r = sim.run(12000)
    assert r.completed == 12000
    # back at full speed within a few seconds of the engine's return (at 13 s)
    assert r.rate_between(19, 25) >= 0.90 * best, r.limits


def test_a_flat_latency_engine_is_driven_to_the_max() -> None:
    """Today's mock engine: fixed latency whatever the load, so more is always better."""
    flat = BatchingParams(step_base_ms=50, step_per_seq_ms=0, step_per_prefill_token_ms=0, max_num_seqs=100_000,
                          output_len=OutputLength("fixed", 1))
    fixed = Simulation(flat, ConcurrencyLimits(initial=512, min=512, max=512, fixed=True), metrics=False)
    bound = fixed.run(40_000).rate
    sim = Simulation(flat, ConcurrencyLimits(max=512), metrics=False)
    r = sim.run(40_000)
    assert sim.limit.value >= 400
    assert r.rate >= 0.85 * bound


def test_the_simulation_is_deterministic() -> None:
    a = Simulation(PRESETS["knee-16"], ConcurrencyLimits(), seed=3).run(2000)
    b = Simulation(PRESETS["knee-16"], ConcurrencyLimits(), seed=3).run(2000)
    assert a.seconds == b.seconds and a.limits == b.limits
    assert random.Random(3).random() == random.Random(3).random()
