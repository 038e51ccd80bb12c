"""A batching engine and a client, in simulated time, around one ``AdaptiveLimit``.

No sockets and no sleeping: events (an engine step ends, a metrics poll, a retry
is due) are taken from a heap in time order. The engine is the mock engine's own
model (``overnight.mock_engine.batching``); the client behaves like the
executor: it keeps ``limit.value`` requests in flight, reports each answer, waits
``Retry-After`` before re-sending a refused request, and respects ``hold_until``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from overnight.executor.limiter import AdaptiveLimit, ConcurrencyLimits, EngineLoad, Signal
from overnight.mock_engine.batching import BatchingEngine, BatchingParams, SimRequest


@dataclass
class SimResult:
    seconds: float
    completed: int
    completions: list[float] = field(default_factory=list)
    limits: list[tuple[float, int]] = field(default_factory=list)
    waiting_samples: list[tuple[float, float]] = field(default_factory=list)
    running_samples: list[tuple[float, float]] = field(default_factory=list)
    refusals: int = 0

    @property
    def rate(self) -> float:
        return self.completed / self.seconds

    def rate_between(self, t0: float, t1: float) -> float:
        return sum(1 for t in self.completions if t0 <= t < t1) / (t1 - t0)

    def time_to_fraction(self, fraction: float = 0.9, window: float | None = None) -> float:
        """When a sliding window's rate first reaches ``fraction`` of the rate of
        the run's second half (its 'final' rate)."""
        end = self.seconds
        final = self.rate_between(end / 2, end)
        window = window or max(0.5, end / 40)
        t = 0.0
        while t + window <= end:
            if self.rate_between(t, t + window) >= fraction * final:
                return t + window
            t += window / 4
        return end


class Simulation:
    def __init__(
        self,
        params: BatchingParams,
        limits: ConcurrencyLimits,
        *,
        metrics: bool = True,
        metrics_interval_s: float = 0.25,
        prompt_tokens: int = 30,
        max_tokens: Callable[[random.Random], int] | None = None,
        seed: int = 1,
        refuse_beyond: int | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        self.params = params
        self.t = 0.0
        self.limit = AdaptiveLimit(limits, clock=lambda: self.t, on_change=self._wake)
        self.engine = BatchingEngine(params)
        self.metrics = metrics
        self.metrics_interval_s = metrics_interval_s
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self.refuse_beyond = refuse_beyond
        self.retry_after_s = retry_after_s
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._step_pending = False
        self._wake_pending = False
        self.inflight = 0
        self.down_until = -1.0
        self._engine_epoch = 0
        self.pending: list[int] = []
        self.retry_ready: list[int] = []
        self.result = SimResult(0.0, 0)
        self._hooks: list[tuple[float, Callable[[Simulation], None]]] = []

    # -- scripting --------------------------------------------------------------
    def at(self, t: float, fn: Callable[[Simulation], None]) -> None:
        self._push(t, "hook", fn)

    def change_engine(self, params: BatchingParams) -> None:
        """The knee moves: same running requests, new shape."""
        self.params = params
        self.engine.params = params

    def restart_engine(self, down_s: float) -> None:
        """The engine dies now (every request in it is lost) and is back after ``down_s``."""
        for req in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(req)
            self._push(self.t, "fail", req.handle)
        self.engine = BatchingEngine(self.params)
        self._engine_epoch += 1
        self._step_pending = False
        self.down_until = self.t + down_s

    # -- running ----------------------------------------------------------------
    def run(self, n: int, *, max_seconds: float = 3600.0) -> SimResult:
        self.pending = list(range(n))[::-1]
        if self.metrics:
            self._push(self.metrics_interval_s, "metrics", None)
        self._fill()
        while self.result.completed < n and self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            if t > max_seconds:
                break
            self.t = t
            getattr(self, f"_on_{kind}")(payload)
            self._fill()
        self.result.seconds = self.t
        return self.result

    def _push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            self._push(self.t, "wake", None)

    def _on_wake(self, _: object) -> None:
        self._wake_pending = False

    def _on_hook(self, fn: Callable[[Simulation], None]) -> None:
        fn(self)

    def _on_retry(self, index: int) -> None:
        self.retry_ready.append(index)

    def _fill(self) -> None:
        lim = self.limit
        if self.t < lim.hold_until:
            self._push(lim.hold_until, "wake", None)
            return
        while self.inflight < lim.value and (self.retry_ready or self.pending):
            index = self.retry_ready.pop() if self.retry_ready else self.pending.pop()
            self._send(index)

    def _send(self, index: int) -> None:
        self.inflight += 1
        lim = self.limit
        lim.note_inflight(self.inflight)
        if self.t < self.down_until:
            self._push(self.t + 0.001, "fail", (index, self.t))
            return
        if self.refuse_beyond is not None and self.inflight > self.refuse_beyond:
            self._push(self.t + 0.001, "refuse", index)
            return
        out = self.params.output_len.sample(self.rng)
        if self.max_tokens is not None:
            out = min(out, self.max_tokens(self.rng))
        req = SimRequest(self.prompt_tokens, out, handle=(index, self.t))
        self.engine.add(req)
        self._kick()

    def _kick(self) -> None:
        if not self._step_pending and not self.engine.idle():
            ms = self.engine.begin_step()
            if ms > 0:
                self._step_pending = True
                self._push(self.t + ms / 1000.0, "step", self._engine_epoch)

    def _on_step(self, epoch: object) -> None:
        if epoch != self._engine_epoch:
            return
        self._step_pending = False
        for req in self.engine.end_step():
            index, sent = req.handle
            self.inflight -= 1
            self.limit.on_success(self.t - sent, self.inflight, req.output_tokens)
            self.result.completed += 1
            self.result.completions.append(self.t)
        self._record_limit()
        self._kick()

    def _on_fail(self, handle: object) -> None:
        index, _sent = handle  # type: ignore[misc]
        self.limit.on_overload(Signal.UNREACHABLE, inflight=self.inflight)
        self.inflight -= 1
        self._push(self.t + 0.5, "retry", index)

    def _on_refuse(self, index: int) -> None:
        self.result.refusals += 1
        self.limit.on_overload(Signal.OVERLOAD, retry_after_s=self.retry_after_s, inflight=self.inflight)
        self.inflight -= 1
        self._push(self.t + self.retry_after_s, "retry", index)

    def _on_metrics(self, _: object) -> None:
        e = self.engine
        if self.t >= self.down_until:
            load = EngineLoad(float(e.num_running), float(e.num_waiting), e.kv_usage(), float(e.preemptions_total))
            self.limit.on_metrics(load, inflight=self.inflight)
            self.result.waiting_samples.append((self.t, float(e.num_waiting)))
            self.result.running_samples.append((self.t, float(e.num_running)))
        self._push(self.t + self.metrics_interval_s, "metrics", None)

    def _record_limit(self) -> None:
        limits = self.result.limits
        if not limits or limits[-1][1] != self.limit.value:
            limits.append((self.t, self.limit.value))


def best_fixed(params: BatchingParams, n: int, levels: list[int], **kw: object) -> tuple[int, float]:
    """The best fixed concurrency among ``levels`` and its rate."""
    best = (0, 0.0)
    for level in levels:
        sim = Simulation(params, ConcurrencyLimits(initial=level, min=level, max=level, fixed=True), **kw)
        r = sim.run(n)
        if r.rate > best[1]:
            best = (level, r.rate)
    return best
