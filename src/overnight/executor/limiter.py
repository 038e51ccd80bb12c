"""Adaptive concurrency: how many requests an engine gets at once.

``AdaptiveLimit`` is the control law for one engine, shared by every batch that
uses it (``executor/sharing.py`` splits it between them). It is plain code with
an injectable clock, so tests drive it without sleeping.

The law, per round (about one round trip):

* **Slow start**: the limit doubles each round while the limit is actually in
  use and no congestion signal has been seen.
* **Additive increase** afterwards: back towards the level where congestion was
  last seen in halving steps (fast while far below it), then probing beyond it
  in steps of 1, 2, 4 ... (capped), like BIC-TCP.
* **Multiplicative decrease** on congestion, at most once per round:
  429/502/503/504 and timeouts cut to ``backoff_ratio`` of the limit (half in
  slow start); each further refusal in the same round while in-flight is already
  within the limit takes one more slot away, so a refused slot is not refilled
  just to be refused again. Rising latency (a round's mean round trip above
  ``latency_tolerance`` x the baseline) cuts gently (``latency_backoff``).
* **Outage**: failures with no success in between for a while (a second, or
  two round trips), or twice the limit of them in a row over two round trips,
  stop all new sends until
  ``Retry-After`` (or an exponential backoff) has passed, then the limit
  restarts from the minimum in slow start.
  Overload answers while other requests still succeed only cut the limit; the
  rejected request itself waits its ``Retry-After`` (``executor/retry.py``).
* **Engine queue** (when the engine publishes vLLM's ``/metrics``): the waiting
  queue replaces latency as the signal. Growth stops while
  ``vllm:num_requests_waiting`` is above a small target (a few % of running,
  at least ``metrics_min_waiting``); well above it, the limit is cut by the
  excess, so the engine keeps a short queue instead of a long one.
* **Baseline probe**: without metrics, the latency baseline (a windowed minimum)
  is refreshed every ``baseline_window_s`` by halving the limit for two round
  trips, so a standing queue at the engine cannot become the new baseline.

The limit never leaves ``[min, max]``. Hard caps (per batch, global) are applied
by the callers on top of it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from overnight import defaults

__all__ = ["AdaptiveLimit", "ConcurrencyLimits", "Gate", "Signal"]


@dataclass(frozen=True, kw_only=True)
class ConcurrencyLimits:
    """Bounds and tuning of the adaptive limit. Defaults are in ``overnight.defaults``."""

    initial: int = defaults.INITIAL_CONCURRENCY
    min: int = defaults.MIN_CONCURRENCY
    max: int = defaults.MAX_CONCURRENCY_PER_BATCH
    #: Cut on the first overload answer or timeout of a round. Mild, because every
    #: further refusal in the round takes one more slot away.
    backoff_ratio: float = 0.9
    #: Cut on rising latency (a softer, earlier signal).
    latency_backoff: float = 0.9
    #: A round's mean latency above this multiple of the baseline is congestion.
    latency_tolerance: float = 1.5
    #: ... and only when it is also this much above it (tiny latencies are noisy).
    latency_floor_s: float = 0.002
    #: How long the latency baseline (a minimum) is remembered.
    baseline_window_s: float = 10.0
    #: Shortest round, so a very fast engine is not re-evaluated every request.
    min_round_s: float = 0.01
    #: Engine queue target: max(metrics_min_waiting, metrics_waiting_fraction * running).
    metrics_min_waiting: int = defaults.METRICS_MIN_WAITING
    metrics_waiting_fraction: float = defaults.METRICS_WAITING_FRACTION
    #: Metrics older than this are ignored (latency becomes the signal again).
    metrics_stale_s: float = 3.0
    #: Outage backoff (no new sends) without a Retry-After: base doubling to max.
    outage_backoff_base_s: float = defaults.BACKOFF_BASE_S
    outage_backoff_max_s: float = defaults.BACKOFF_MAX_S


#: Rounds to stay at the level of the last congestion before probing beyond it.
_PLATEAU_ROUNDS = 4
#: Failures in a row that mean an outage: twice the limit, and at least twice this.
_OUTAGE_MIN_IN_A_ROW = 16


class Signal:
    """Kinds of bad news about one request (``AdaptiveLimit.on_overload``)."""

    OVERLOAD = "overload"  #: 429/502/503/504: the engine is full
    TIMEOUT = "timeout"  #: no answer in time
    UNREACHABLE = "unreachable"  #: no connection / reset: the engine is down


class AdaptiveLimit:
    """The adaptive in-flight limit of one engine (see the module docstring).

    Callers report every finished request (``on_success`` / ``on_overload``) with
    the engine's in-flight count, and ``note_inflight`` when it rises, and read
    ``value`` (the integer limit now) and ``hold_until`` (monotonic time before
    which nothing new may be sent). ``on_change`` is called whenever ``value``
    grows, so waiters can be woken.
    """

    def __init__(
        self,
        limits: ConcurrencyLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.limits = limits = limits or ConcurrencyLimits()
        self.clock = clock
        self.on_change = on_change
        self.limit = float(min(max(limits.initial, limits.min), limits.max))
        self.value = int(self.limit)
        self.slow_start = True
        #: The limit at the last congestion signal (0: none yet).
        self.ceiling = 0.0
        self._probe_step = 1.0
        self._plateau = 0
        #: No new sends before this monotonic time (outage / Retry-After).
        self.hold_until = 0.0
        self._outage_streak = 0
        now = clock()
        # one round of samples
        self._round_start = now
        self._round_n = 0
        self._round_rtt_sum = 0.0
        self._round_peak = 0
        self._round_overloads = 0
        self._last_cut = -math.inf
        #: Since when every answer has been a failure (None: the last one succeeded),
        #: how many failures in a row, and the limit when the run of failures began.
        self._failing_since: float | None = None
        self._failing_count = 0
        self._failing_from = 0
        #: Smoothed round trip (s) and completions per second.
        self.rtt_s: float | None = None
        self.rate = 0.0
        # latency baseline: minimum over two half-windows
        self._base_cur = math.inf
        self._base_prev = math.inf
        self._base_since = now
        self._probe_rtt_until = 0.0
        # engine metrics
        self.running: float | None = None
        self.waiting: float | None = None
        self._metrics_at = -math.inf
        self._metrics_visible = False
        # counters, for progress reports and tests
        self.overloads = 0
        self.cuts = 0

    # -- reading --------------------------------------------------------------
    @property
    def baseline_s(self) -> float:
        return min(self._base_cur, self._base_prev)

    def metrics_fresh(self, now: float | None = None) -> bool:
        """Use the engine's queue (not latency) as the signal: the sample is recent,
        and the engine saw at least half of what we had in flight. When it saw much
        less, our requests wait somewhere the metrics cannot see (the engine's HTTP
        front end, a proxy, the network): latency is the better signal then."""
        now = self.clock() if now is None else now
        return now - self._metrics_at <= self.limits.metrics_stale_s and self._metrics_visible

    def waiting_target(self) -> float:
        lim = self.limits
        return max(float(lim.metrics_min_waiting), lim.metrics_waiting_fraction * (self.running or 0.0))

    def _round_len(self) -> float:
        return max(self.limits.min_round_s, self.rtt_s or 0.0)

    # -- signals --------------------------------------------------------------
    def note_inflight(self, inflight: int) -> None:
        """The engine's in-flight count just rose to ``inflight``."""
        if inflight > self._round_peak:
            self._round_peak = inflight

    def on_success(self, latency_s: float, inflight: int) -> None:
        """An answer came back (any status but overload). ``inflight`` excludes it."""
        self._round_n += 1
        self._round_rtt_sum += latency_s
        if latency_s < self._base_cur:
            self._base_cur = latency_s
        now = self.clock()
        self._failing_since = None
        self._failing_count = 0
        self._outage_streak = 0
        if now - self._round_start >= self._round_len():
            self._end_round(now, inflight)

    def on_overload(
        self, kind: str = Signal.OVERLOAD, *, retry_after_s: float | None = None, inflight: int | None = None
    ) -> None:
        """One request met congestion or an outage; ``inflight`` (including it) is
        how many we had at the engine, so the engine refused at that level."""
        self.overloads += 1
        now = self.clock()
        # An outage is "nothing but failures for a while, or many in a row"
        # (whatever the kind of failure): a reset among thousands of successes is
        # only congestion; a stream of instant refusals must not wait a second.
        if self._failing_since is None:
            self._failing_since, self._failing_from = now, self.value
        self._failing_count += 1
        failing_s = now - self._failing_since
        two_rtt = 2.0 * (self.rtt_s or 0.0)
        in_a_row = self._failing_count >= 2 * max(self._failing_from, _OUTAGE_MIN_IN_A_ROW)
        # (Many in a row only count once they span two round trips, when a round
        # trip is known: right after a pause, instant refusals of the extra slots
        # arrive before any success can.)
        if failing_s > max(two_rtt, defaults.OUTAGE_AFTER_S) or (in_a_row and failing_s >= two_rtt):
            # Nothing is getting through: stop sending until the engine can take
            # requests again, then start over carefully.
            if retry_after_s is not None:
                pause = retry_after_s
            else:
                lim = self.limits
                pause = min(lim.outage_backoff_max_s, lim.outage_backoff_base_s * 2**self._outage_streak)
            self._outage_streak += 1
            self.hold_until = max(self.hold_until, now + pause)
            if self.limit > self.limits.min:
                self.ceiling = max(self.ceiling, self.limit)
            self.limit = float(self.limits.min)
            self.slow_start = True
            self._last_cut = now
            self.cuts += 1
            self._apply()
            return
        self._round_overloads += 1
        if now - self._last_cut >= self._round_len():
            self._cut(now, self.limits.backoff_ratio, refused_at=inflight)
        elif inflight is not None and inflight <= self.limit:
            # Refused again within the round although we are already at the cut
            # limit: give up this slot too, or a refused request's slot would be
            # refilled at once and refused again, in a loop as fast as the engine
            # can say 429. (Refusals of requests sent before the cut, while in-flight
            # is still above the limit, are the same signal and cost nothing more.)
            self.limit = max(float(self.limits.min), self.limit - 1.0)
            self._apply()

    def on_metrics(self, running: float, waiting: float, *, inflight: int | None = None) -> None:
        """A fresh sample of the engine's ``num_requests_running`` / ``_waiting``;
        ``inflight`` is what we had in flight to it at that moment."""
        now = self.clock()
        self.running, self.waiting, self._metrics_at = running, waiting, now
        self._metrics_visible = inflight is None or running + waiting >= 0.5 * inflight
        if not self._metrics_visible:
            return
        target = self.waiting_target()
        if waiting > 2.0 * target and now - self._last_cut >= self._round_len():
            # Remove the excess queue (at most half the limit at once).
            new = max(float(self.limits.min), self.limit - (waiting - target), self.limit * 0.5)
            if new < self.limit:
                self.limit = new
                self.ceiling = new
                self.slow_start = False
                self._probe_step = 1.0
                self._last_cut = now
                self.cuts += 1
                self._apply()

    # -- the law --------------------------------------------------------------
    def _end_round(self, now: float, inflight: int) -> None:
        n = self._round_n
        dt = now - self._round_start
        mean_rtt = self._round_rtt_sum / n
        self.rtt_s = mean_rtt if self.rtt_s is None else 0.5 * self.rtt_s + 0.5 * mean_rtt
        rate = n / dt if dt > 0 else 0.0
        self.rate = rate if self.rate == 0.0 else 0.7 * self.rate + 0.3 * rate
        utilized = self._round_peak >= self.value - max(1, self.value // 20)
        overloads = self._round_overloads
        self._round_start = now
        self._round_n = 0
        self._round_rtt_sum = 0.0
        self._round_peak = inflight
        self._round_overloads = 0
        if overloads:
            return  # no growth in a round with refusals
        probing = now < self._probe_rtt_until
        if self._probe_rtt_until and not probing:
            self._probe_rtt_until = 0.0
            self._apply()  # the baseline probe is over: back to the full limit
        lim = self.limits
        if now - self._base_since >= lim.baseline_window_s / 2:
            self._base_prev, self._base_cur, self._base_since = self._base_cur, math.inf, now
            if not self.slow_start and not self.metrics_fresh(now) and not probing:
                self._probe_rtt_until = now + 2.0 * self._round_len()
                self._apply()
                return
        if probing or now < self.hold_until:
            return
        if self.metrics_fresh(now):
            if self.waiting is not None and self.waiting > self.waiting_target():
                return  # the engine already has its queue: do not add to it
        else:
            base = self.baseline_s
            # In slow start a smaller rise already ends the doubling (as HyStart does).
            tolerance = 1.0 + (lim.latency_tolerance - 1.0) / (2.0 if self.slow_start else 1.0)
            if mean_rtt > base * tolerance and mean_rtt - base > lim.latency_floor_s:
                if now - self._last_cut >= self._round_len():
                    self._cut(now, lim.latency_backoff)
                return
        if utilized:
            self._grow()

    def _grow(self) -> None:
        lim = self.limits
        if self.slow_start:
            new = self.limit * 2.0
            if self.ceiling and new >= self.ceiling:
                new = max(self.limit, self.ceiling)
                self.slow_start = False
        elif self.ceiling and self.limit < self.ceiling - 0.5:
            # Back towards the level of the last congestion in halving steps.
            new = min(self.ceiling, self.limit + max(1.0, (self.ceiling - self.limit) / 2.0))
            self._probe_step = 1.0
            self._plateau = _PLATEAU_ROUNDS
        elif self._plateau > 0:
            self._plateau -= 1  # stay at the known-good level for a few rounds
            return
        else:
            # Beyond it: probe in growing steps (1, 2, 4 ... up to 5% of the limit).
            new = self.limit + self._probe_step
            self._probe_step = min(self._probe_step * 2.0, max(1.0, self.limit * 0.05))
        self.limit = min(new, float(lim.max))
        self._apply()

    def _cut(self, now: float, ratio: float, *, refused_at: int | None = None) -> None:
        # The level to come back to: where congestion showed, or one below the
        # in-flight count the engine refused at, whichever is lower.
        self.ceiling = self.limit if refused_at is None else max(
            float(self.limits.min), min(self.limit, refused_at - 1.0)
        )
        if self.slow_start:
            # Feedback lags a round behind: the limit has doubled at least once since
            # the congestion began, so halve it (the last level that was fine).
            ratio = min(ratio, 0.5)
        self.limit = max(float(self.limits.min), self.limit * ratio)
        self.slow_start = False
        self._probe_step = 1.0
        self._plateau = 0
        self._last_cut = now
        self.cuts += 1
        self._apply()

    def _apply(self) -> None:
        lim = self.limits
        self.limit = min(max(self.limit, float(lim.min)), float(lim.max))
        value = int(self.limit)
        if self._probe_rtt_until:
            value = max(lim.min, value // 2)
        grew = value > self.value
        self.value = value
        if grew and self.on_change is not None:
            self.on_change()


class Gate:
    """A plain FIFO semaphore whose size can change (the global cap)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        if self.used < self.size and not self._waiters:
            self.used += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.used < self.size and not self._waiters:
            self.used += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot while being cancelled
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def resize(self, size: int) -> None:
        self.size = max(1, size)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.size:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)
