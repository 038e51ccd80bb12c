"""Adaptive concurrency: how many requests an engine gets at once.

``AdaptiveLimit`` is the control law for one engine, shared by every batch that
uses it (``executor/sharing.py`` splits it between them). It is plain code with
an injectable clock, so tests drive it without sleeping.

What it optimises is **delivered throughput**, not latency. A batching engine
(vLLM, SGLang, TGI, transformers) answers each request more slowly the more it
runs at once, yet finishes more requests per second, up to a knee where its
batch is full (``max_num_seqs``, KV cache, compute); beyond the knee more in
flight only queues. Latency rising is therefore no sign of congestion here, and
the law never lowers the limit because of latency.

The law works in **epochs** at one in-flight level: wait about one round trip
for the pipe to settle at the new level, then count completions for about one
more round trip (and at least a handful). Each measured level's rate goes into a
small table (per level, the median of its last few epochs, forgotten after
``table_ttl_s``):

* **Startup** (BBR's startup): double the level each epoch while the rate grows
  by at least ``startup_gain`` (25%) per doubling; the first doubling that does
  not pay for itself ends startup.
* **Cruise**: run at the *smallest* measured level whose rate is within
  ``knee_tolerance`` of the best rate in the table: the knee, where more in
  flight adds latency but no throughput. Every few epochs probe one step
  (``probe_ratio``) above it, or below it, when the table has nothing recent
  (``probe_refresh_s``) about that neighbour, so the table stays current when the
  knee moves (a different request mix, another client on the engine). A probe up
  that gains a lot goes back to startup.
* **Refusals** (429/502/503/504), timeouts and dropped connections, at most one
  cut a round: the limit drops below the level the engine refused at
  (``backoff_ratio``), and that level becomes a ceiling until ``ceiling_ttl_s``
  has passed. The rest of the same burst narrows the ceiling down to the lowest
  level refused (the engine's capacity) and keeps the limit at or below it; a
  lone refusal at or below the ceiling later takes one slot away, so a refused
  slot is not refilled just to be refused again.
* **Outage**: failures with no success in between for a while (a second, or
  two round trips), or twice the limit of them in a row, stop all new sends
  until ``Retry-After`` (or an exponential backoff) has passed; the table is
  forgotten (a restarted engine may be another engine) and startup begins again
  from half the last good level.
* **Engine metrics** (vLLM ``num_requests_running/waiting``,
  ``kv_cache_usage_perc``, ``num_preemptions_total``; SGLang
  ``num_running_reqs/num_queue_reqs``): a waiting queue above a small target
  (``max(metrics_min_waiting, metrics_waiting_fraction x running)``) ends
  startup and forbids probing up, and a queue well above it is removed at once
  (the limit drops by the excess); a rising preemption count caps the level at
  what runs now. Throughput still decides below that: an engine whose queue is
  empty but whose compute is saturated is found by its rate.

Ideas taken: BBR's (the delivery rate is the thing to measure, a startup that
doubles until the rate stops growing, then periodic probes above the operating
point); Vegas's (compare delivered rate with the rate more in flight should
give); not the gradient or Vegas law itself, which read latency above a minimum
as queueing and on a batching engine shrink the limit while throughput still
rises (the failure this module replaced). See ``docs/architecture.md``.

The limit never leaves ``[min, max]``. Hard caps, floors and fixed levels per
batch are applied by ``sharing.py`` on top of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from overnight import defaults

__all__ = ["AdaptiveLimit", "ConcurrencyLimits", "EngineLoad", "Gate", "Signal"]

log = logging.getLogger("overnight.concurrency")


@dataclass(frozen=True, kw_only=True)
class ConcurrencyLimits:
    """Bounds and tuning of the adaptive limit. Defaults are in ``overnight.defaults``."""

    initial: int = defaults.INITIAL_CONCURRENCY
    min: int = defaults.MIN_CONCURRENCY
    max: int = defaults.MAX_CONCURRENCY_PER_BATCH
    #: ``initial`` forever: no adaptation (refusals are still retried per request).
    fixed: bool = False
    #: Cut on the first overload answer or timeout of a round. Mild, because every
    #: further refusal in the round takes one more slot away.
    backoff_ratio: float = 0.9
    #: A doubling in startup must raise the rate by this much to continue.
    #: (Quadrupling when a doubling nearly doubled the rate was tried: it ramps a
    #: flat-latency engine faster, but leaps past engines with a hard limit into a
    #: burst of 429s, each then waiting its Retry-After.)
    startup_gain: float = 0.25
    #: Cruise at the smallest level whose rate is within this of the best.
    knee_tolerance: float = 0.04
    #: A probe up that raises the rate by this much restarts the doubling.
    regrow_gain: float = 0.15
    #: Probe step: one level up is ``level x probe_ratio`` (at least +1).
    probe_ratio: float = 1.25
    #: Epochs at the operating level between probes; every ``probe_down_every``th
    #: probe goes down instead of up.
    cruise_epochs: int = 3
    probe_down_every: int = 3
    #: A neighbour level measured more recently than this is not probed again.
    probe_refresh_s: float = 20.0
    #: Measured rates are forgotten after this long (the knee moves).
    table_ttl_s: float = 60.0
    #: A refusal level stays a ceiling this long, then may be probed again.
    ceiling_ttl_s: float = 30.0
    #: Shortest settle / measurement phase, and fewest completions measured.
    min_round_s: float = 0.02
    min_epoch_samples: int = 8
    #: Longest settle phase (very long requests must not freeze the law).
    max_settle_s: float = 10.0
    #: Engine queue target: max(metrics_min_waiting, metrics_waiting_fraction * running).
    metrics_min_waiting: int = defaults.METRICS_MIN_WAITING
    metrics_waiting_fraction: float = defaults.METRICS_WAITING_FRACTION
    #: Metrics older than this are ignored.
    metrics_stale_s: float = 3.0
    #: Outage backoff (no new sends) without a Retry-After: base doubling to max.
    outage_backoff_base_s: float = defaults.BACKOFF_BASE_S
    outage_backoff_max_s: float = defaults.BACKOFF_MAX_S


#: Failures in a row that mean an outage: twice the limit, and at least twice this.
_OUTAGE_MIN_IN_A_ROW = 16


class Signal:
    """Kinds of bad news about one request (``AdaptiveLimit.on_overload``)."""

    OVERLOAD = "overload"  #: 429/502/503/504: the engine is full
    TIMEOUT = "timeout"  #: no answer in time
    UNREACHABLE = "unreachable"  #: no connection / reset: the engine is down


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One sample of an engine's own view of its load (``engine_metrics.py``)."""

    running: float
    waiting: float
    #: KV cache in use, 0..1 (None: not published).
    kv_usage: float | None = None
    #: Preemptions since the engine started (None: not published).
    preemptions: float | None = None


class _Rate:
    """What one level delivered: the median of its last ``_RATE_HISTORY`` epochs, so
    one or two epochs that a stall (of the engine or of this process) or luck put
    far off move nothing. An epoch is about one round trip, a few dozen answers at
    a level of 64, so single epochs are noisy and a stall of one round trip spoils
    two of them; with a 50/50 average such a stall at 64 pulled its rate within the
    knee tolerance of the level below, and the limit then stayed a step too low
    until that level was probed again (bench/adaptive.py's 429 case, one run in
    three). A level whose rate really changed moves the knee three epochs later."""

    __slots__ = ("_rates", "_tokens", "rate", "tokens", "n", "at")

    def __init__(self, rate: float, tokens: float, at: float) -> None:
        self._rates, self._tokens, self.n, self.at = [rate], [tokens], 1, at
        self.rate, self.tokens = rate, tokens

    def add(self, rate: float, tokens: float, at: float) -> None:
        # The medians are worked out here, once per epoch, not at every read of the table.
        self._rates = [*self._rates[1 - _RATE_HISTORY:], rate]
        self._tokens = [*self._tokens[1 - _RATE_HISTORY:], tokens]
        self.rate, self.tokens = statistics.median(self._rates), statistics.median(self._tokens)
        self.n += 1
        self.at = at


#: Epochs a level's rate is the median of.
_RATE_HISTORY = 5


# Modes
STARTUP = "startup"
CRUISE = "cruise"
PROBE_UP = "probe_up"
PROBE_DOWN = "probe_down"


class AdaptiveLimit:
    """The adaptive in-flight limit of one engine (see the module docstring).

    Callers report every finished request (``on_success`` / ``on_overload``) with
    the engine's in-flight count, ``note_inflight`` when it rises, and engine
    metrics samples (``on_metrics``); they read ``value`` (the integer limit now)
    and ``hold_until`` (monotonic time before which nothing new may be sent).
    ``on_change`` is called whenever ``value`` grows, so waiters can be woken.
    ``reason`` says why the limit last changed (also logged at DEBUG).
    """

    def __init__(
        self,
        limits: ConcurrencyLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
        name: str = "engine",
    ) -> None:
        self.limits = limits = limits or ConcurrencyLimits()
        self.clock = clock
        self.on_change = on_change
        self.name = name
        self.limit = float(min(max(limits.initial, limits.min), limits.max))
        self.value = int(self.limit)
        self.mode = CRUISE if limits.fixed else STARTUP
        self.reason = "fixed" if limits.fixed else "initial"
        #: Level refused at (0: none) and until when it stays a ceiling.
        self.ceiling = 0.0
        self._ceiling_until = 0.0
        self._burst_at = -math.inf
        #: No new sends before this monotonic time (outage / Retry-After).
        self.hold_until = 0.0
        self._outage_streak = 0
        now = clock()
        self._table: dict[int, _Rate] = {}
        #: The level with the best measured rate, kept across outages.
        self._good_level = 0
        self._good_rate = 0.0
        self._startup_prev: float | None = None
        self._cruise_left = limits.cruise_epochs
        self._probes = 0
        self._probe_base = 0
        # the epoch being measured
        self._settle_until = now
        self._first_at = None
        self._n = 0
        self._tokens = 0
        self._if_area = 0.0
        self._if_t = now
        self._if_last = 0
        self._epoch_overloads = 0
        #: The epoch's metrics samples (waiting, running).
        #: Recent metrics samples (time, waiting, running, our in-flight), a few
        #: seconds' worth whatever the level: fast engines change level faster
        #: than metrics can be sampled.
        self._samples: deque[tuple[float, float, float, float]] = deque()
        #: What the engine ran when it was last judged full (the queue branch).
        self._full_running = 0.0
        #: Requests the engine ran while a real queue waited there (its capacity), and when.
        self._capacity = 0.0
        self._capacity_at = -math.inf
        self._last_cut = -math.inf
        #: Since when every answer has been a failure (None: the last one succeeded),
        #: how many failures in a row, and the limit when the run of failures began.
        self._failing_since: float | None = None
        self._failing_count = 0
        self._failing_from = 0
        #: Smoothed round trip (s) and completions per second (measured).
        self.rtt_s: float | None = None
        self.rate = 0.0
        self.tokens_rate = 0.0
        # engine metrics
        self.running: float | None = None
        self.waiting: float | None = None
        self.kv_usage: float | None = None
        self._preemptions: float | None = None
        self._metrics_at = -math.inf
        self._metrics_visible = False
        # counters, for progress reports and tests
        self.overloads = 0
        self.cuts = 0
        self.changes = 0

    # -- reading --------------------------------------------------------------
    @property
    def slow_start(self) -> bool:
        """Still doubling (the metrics probe samples faster meanwhile)."""
        return self.mode == STARTUP

    def metrics_fresh(self, now: float | None = None) -> bool:
        """The engine's metrics are recent and saw at least half of what we had in
        flight (else our requests wait somewhere the metrics cannot see)."""
        now = self.clock() if now is None else now
        return now - self._metrics_at <= self.limits.metrics_stale_s and self._metrics_visible

    def waiting_target(self) -> float:
        lim = self.limits
        return max(float(lim.metrics_min_waiting), lim.metrics_waiting_fraction * (self.running or 0.0))

    def table(self) -> dict[int, float]:
        """Measured requests/s per in-flight level (fresh entries only)."""
        now = self.clock()
        return {k: r.rate for k, r in sorted(self._table.items()) if now - r.at <= self.limits.table_ttl_s}

    def snapshot(self) -> dict[str, object]:
        """For the batch object and logs."""
        return {
            "limit": self.value, "mode": self.mode, "reason": self.reason,
            "rate_rps": round(self.rate, 2), "tokens_per_s": round(self.tokens_rate, 1),
            "engine_running": self.running, "engine_waiting": self.waiting,
        }

    def _settle_s(self) -> float:
        lim = self.limits
        return min(lim.max_settle_s, max(lim.min_round_s, self.rtt_s or 0.0))

    # -- signals --------------------------------------------------------------
    def note_inflight(self, inflight: int) -> None:
        """The engine's in-flight count just rose to ``inflight``."""
        self._track(self.clock(), inflight)

    def _track(self, now: float, inflight: int) -> None:
        # time-weighted in-flight count over the epoch's measurement phase
        if now > self._if_t:
            if self._if_t >= self._settle_until:
                self._if_area += self._if_last * (now - self._if_t)
            self._if_t = now
        self._if_last = inflight

    def on_success(self, latency_s: float, inflight: int, tokens: int | None = None) -> None:
        """An answer came back (any status but overload). ``inflight`` excludes it;
        ``tokens``: completion tokens, when the answer said."""
        self.rtt_s = latency_s if self.rtt_s is None else 0.9 * self.rtt_s + 0.1 * latency_s
        self._failing_since = None
        self._failing_count = 0
        self._outage_streak = 0
        if self.limits.fixed:
            return
        now = self.clock()
        self._track(now, inflight)
        if now < self._settle_until:
            return
        if self._first_at is None:
            # The rate is counted between answers, from this one on: (n - 1) / span
            # has no bias from where the span starts.
            self._first_at = now
            return
        self._n += 1
        if tokens:
            self._tokens += tokens
        lim = self.limits
        elapsed = now - self._first_at
        # Startup measures half a round trip: it only asks whether a doubling paid
        # (a 25% step), and every round trip saved there is throughput.
        need_s = max(lim.min_round_s, self.rtt_s * (0.5 if self.mode == STARTUP else 1.0))
        if (elapsed >= need_s and self._n >= lim.min_epoch_samples) or elapsed >= 4 * need_s + 1.0:
            self._end_epoch(now, elapsed)

    def on_overload(
        self, kind: str = Signal.OVERLOAD, *, retry_after_s: float | None = None, inflight: int | None = None
    ) -> None:
        """One request met congestion or an outage; ``inflight`` (including it) is
        how many we had at the engine, so the engine refused at that level."""
        self.overloads += 1
        now = self.clock()
        if now < self.hold_until:
            return  # requests sent before the pause failing now: already known
        # An outage is "nothing but failures for a while, or many in a row"
        # (whatever the kind of failure): a reset among thousands of successes is
        # only congestion; a stream of instant refusals must not wait a second.
        if self._failing_since is None:
            self._failing_since, self._failing_from = now, self.value
        self._failing_count += 1
        failing_s = now - self._failing_since
        two_rtt = 2.0 * (self.rtt_s or 0.0)
        in_a_row = self._failing_count >= 2 * max(self._failing_from, _OUTAGE_MIN_IN_A_ROW)
        if failing_s > max(two_rtt, defaults.OUTAGE_AFTER_S) or (in_a_row and failing_s >= two_rtt):
            self._outage(now, retry_after_s)
            return
        if self.limits.fixed:
            return
        self._epoch_overloads += 1
        refused = kind == Signal.OVERLOAD  # the engine said it is full; else it failed us
        refused_at = inflight if inflight is not None else self.value
        level = float(max(self.limits.min, min(self.value, refused_at - 1)))
        if refused and self.ceiling and now < self._ceiling_until and now - self._burst_at <= self._settle_s():
            # The rest of the burst whose first refusal set the ceiling and cut the
            # limit: each refusal, as the requests sent into the congestion leave, shows
            # the engine took no more than what was in flight beside it, so the ceiling
            # narrows down to the engine's capacity and the limit stays at or below it.
            # Not one slot each: that walked the limit far below the capacity (a burst
            # of 64 refusals from 128 to an engine of 64 ended at 51).
            self.ceiling = min(self.ceiling, level)
            if self.limit > self.ceiling:
                self._set(self.ceiling, f"{kind} at {refused_at} in flight", quiet=True)
            return
        if refused and self.ceiling and now < self._ceiling_until and refused_at <= self.ceiling + 1:
            # Refused at (or below) the capacity it already showed: an engine that
            # counts a finished request a moment too long. One slot, not a cut; the
            # ceiling stays (lowering it on every such refusal would ratchet down).
            self._set(min(self.limit, self.ceiling) - 1.0, f"{kind} at {refused_at} in flight", quiet=True)
            return
        if refused:
            # What the engine took is at most what was in flight beside this request;
            # within one burst of refusals (each leaving as it comes) that narrows
            # down to the engine's capacity. A later, lone refusal (an engine that
            # counts a finished request a moment too long) sets the ceiling anew
            # instead of ratcheting it down. It stays a ceiling for a while.
            if not self.ceiling or now >= self._ceiling_until or now - self._burst_at > self._settle_s():
                self.ceiling = level
                self._burst_at = now
            else:
                self.ceiling = min(self.ceiling, level)
            self._ceiling_until = now + self.limits.ceiling_ttl_s
        if now - self._last_cut >= self._settle_s():
            self._last_cut = now
            self.cuts += 1
            if self.mode == STARTUP:
                self.mode = CRUISE
            self._set(min(self.limit, level) * self.limits.backoff_ratio, f"{kind} at {refused_at} in flight")
            self._restart_epoch(now)
        elif refused and inflight is not None and inflight <= self.limit:
            # Refused again within the round although already at the cut limit:
            # give up this slot too, or it would be refilled and refused in a loop.
            self._set(self.limit - 1.0, f"{kind} again at {inflight} in flight", quiet=True)

    def on_metrics(self, running: float | EngineLoad, waiting: float | None = None, *,
                   inflight: int | None = None) -> None:
        """A fresh sample of the engine's load; ``inflight`` is what we had in
        flight to it at that moment."""
        load = running if isinstance(running, EngineLoad) else EngineLoad(float(running), float(waiting or 0.0))
        now = self.clock()
        self.running, self.waiting, self.kv_usage, self._metrics_at = load.running, load.waiting, load.kv_usage, now
        self._metrics_visible = inflight is None or load.running + load.waiting >= 0.5 * inflight
        preempted = (
            load.preemptions is not None and self._preemptions is not None and load.preemptions > self._preemptions
        )
        if load.preemptions is not None:
            self._preemptions = load.preemptions
        if not self._metrics_visible or self.limits.fixed:
            return
        samples = self._samples
        samples.append((now, load.waiting, load.running, float(inflight if inflight is not None else self.value)))
        horizon = now - max(1.0, 3.0 * self._settle_s())
        while samples and (samples[0][0] < horizon or len(samples) > 64):
            samples.popleft()
        target = self.waiting_target()
        if now - self._last_cut < self._settle_s():
            return
        # One sample is not enough to cut on: a burst of requests waits a step
        # before the engine admits it, whatever its room. Only an engine known to
        # be full (running at its measured capacity) with a long queue is cut at once.
        full = now - self._capacity_at <= self.limits.table_ttl_s and load.running >= 0.97 * self._capacity
        if full and load.waiting > 2.0 * target:
            # What it runs plus a short queue (at most half the limit at once; the
            # same answer however often the sample is seen before the queue drains).
            new = max(load.running + target / 2.0, self.limit * 0.5)
            self._metrics_cut(now, new, f"engine queue {load.waiting:g} > target {target:g}")
        elif preempted and self.mode in (STARTUP, PROBE_UP):
            # The KV cache is full: what runs now is all the engine can hold.
            self._metrics_cut(now, min(self.limit, max(load.running, 1.0) + target),
                              f"engine preempted requests (KV cache {load.kv_usage or 0:.0%})")

    # -- the law --------------------------------------------------------------
    def _metrics_cut(self, now: float, new: float, why: str) -> None:
        # (No ceiling: the queue itself says when the engine is full again.)
        if new >= self.limit:
            return
        self._last_cut = now
        self.cuts += 1
        if self.mode in (STARTUP, PROBE_UP):
            self.mode = CRUISE
            self._cruise_left = self.limits.cruise_epochs
        self._set(new, why)
        self._restart_epoch(now)

    def _outage(self, now: float, retry_after_s: float | None) -> None:
        """Nothing is getting through: stop sending until the engine can take
        requests again, then start over carefully."""
        lim = self.limits
        if retry_after_s is not None:
            pause = retry_after_s
        else:
            pause = min(lim.outage_backoff_max_s, lim.outage_backoff_base_s * 2**self._outage_streak)
        self._outage_streak += 1
        self.hold_until = max(self.hold_until, now + pause)
        self._failing_since, self._failing_count = None, 0
        if lim.fixed:
            return
        good = self._good_level or int(self.limit)
        self._table.clear()
        self._capacity, self._capacity_at = 0.0, -math.inf
        self.ceiling, self._ceiling_until = 0.0, 0.0
        self.mode = STARTUP
        self._startup_prev = None
        self._last_cut = now
        self.cuts += 1
        self._set(max(float(lim.min), good / 2.0), f"engine unreachable or refusing everything; pause {pause:.1f}s")
        self._restart_epoch(self.hold_until)

    def _restart_epoch(self, now: float, *, settle: bool = True) -> None:
        self._settle_until = now + self._settle_s() if settle else now
        self._first_at: float | None = None if settle else now
        self._n = 0
        self._tokens = 0
        self._if_area = 0.0
        self._if_t = max(self._if_t, self._settle_until) if settle else now
        self._epoch_overloads = 0

    def _end_epoch(self, now: float, elapsed: float) -> None:
        n = self._n
        rate = n / elapsed if elapsed > 0 else 0.0
        tokens_rate = self._tokens / elapsed if elapsed > 0 else 0.0
        self.rate = rate if self.rate == 0.0 else 0.5 * self.rate + 0.5 * rate
        self.tokens_rate = tokens_rate if self.tokens_rate == 0.0 else 0.5 * self.tokens_rate + 0.5 * tokens_rate
        level = self.value
        self._track(now, self._if_last)
        span = now - self._settle_until
        mean_inflight = self._if_area / span if span > 0 else 0.0
        overloads = self._epoch_overloads
        queue = None
        if len(self._samples) >= 3 and self.metrics_fresh(now):
            # Requests that arrived during a step wait for the next one even when
            # the engine has room, and a burst shows as a queue for a step: the
            # medians of the last few seconds' samples, not one sample, say whether
            # the engine is full. It is full when the queue is a good part of what
            # we had in flight (then what it runs is its capacity), or when it runs
            # as many as that capacity.
            waiting = statistics.median(x[1] for x in self._samples)
            running = statistics.median(x[2] for x in self._samples)
            ours = statistics.median(x[3] for x in self._samples)
            if waiting > max(self.waiting_target(), 0.15 * ours):
                self._capacity, self._capacity_at = running, now
                queue = waiting
            elif now - self._capacity_at <= self.limits.table_ttl_s and running >= 0.97 * self._capacity:
                queue = waiting
            self._full_running = running
        self._restart_epoch(now, settle=False)
        if overloads:
            return  # no decisions on an epoch with refusals
        # An epoch that did not keep the level busy (the input ran dry, other
        # batches' caps, the batch's tail) says nothing about the level.
        if mean_inflight < 0.85 * level:
            return
        self._record(level, rate, tokens_rate, now)
        self._decide(now, level, rate, queue)
        if self.value != level:
            self._restart_epoch(now)  # let the pipe settle at the new level first

    def _record(self, level: int, rate: float, tokens_rate: float, now: float) -> None:
        if rate >= self._good_rate or level == self._good_level:
            self._good_level, self._good_rate = level, rate
        r = self._table.get(level)
        if r is None or now - r.at > self.limits.table_ttl_s:
            self._table[level] = _Rate(rate, tokens_rate, now)
        else:
            r.add(rate, tokens_rate, now)

    def _cap(self, now: float) -> float:
        """The highest level allowed now: max, the refusal ceiling, and, while the
        engine's measured capacity is fresh, that capacity plus the queue target."""
        top = float(self.limits.max)
        if self.ceiling and now < self._ceiling_until:
            top = min(top, self.ceiling)
        if self._capacity and now - self._capacity_at <= self.limits.table_ttl_s and self.metrics_fresh(now):
            top = min(top, max(float(self.limits.min), self._capacity + self.waiting_target() / 2.0 + 1.0))
        return top

    def _step_up(self, level: int) -> int:
        return max(level + 1, int(round(level * self.limits.probe_ratio)))

    def _step_down(self, level: int) -> int:
        return min(level - 1, int(round(level / self.limits.probe_ratio)))

    def _knee(self, now: float) -> int | None:
        """Smallest fresh level whose rate is within tolerance of the best one."""
        ttl, cap = self.limits.table_ttl_s, self._cap(now)
        fresh = [(k, r.rate) for k, r in self._table.items() if now - r.at <= ttl and k <= cap]
        if not fresh:
            return None
        best = max(rate for _, rate in fresh)
        good = [k for k, rate in fresh if rate >= (1.0 - self.limits.knee_tolerance) * best]
        return min(good)

    def _decide(self, now: float, level: int, rate: float, queue: float | None) -> None:
        lim = self.limits
        cap = self._cap(now)
        if queue is not None:
            # The engine is full and says how many wait: the knee is what it runs
            # plus a short queue, whatever the rates say.
            target = self.waiting_target()
            if queue > target / 2.0:
                # What it runs plus half the target: the same answer however
                # often the queue is seen before it drains.
                new = max(float(lim.min), min(float(level), self._full_running + target / 2.0), level * 0.5)
                if self.mode != CRUISE or int(new) != level:
                    self._set(new, f"engine queue {queue:.1f}, target {target / 2.0:.1f}")
                self.mode = CRUISE
                self._cruise_left = lim.cruise_epochs
                return
        if self.mode == STARTUP:
            prev = self._startup_prev
            grew = prev is None or rate >= prev * (1.0 + lim.startup_gain)
            if grew and level < cap:
                self._startup_prev = rate
                self._set(min(cap, level * 2.0), f"startup: {rate:.1f} req/s at {level}")
                return
            self.mode = CRUISE
            self._cruise_left = lim.cruise_epochs
            knee = self._knee(now) or level
            self._set(knee, f"startup over: best rate at {knee}")
            return
        if self.mode in (PROBE_UP, PROBE_DOWN):
            base = self._table.get(self._probe_base)
            was_up = self.mode == PROBE_UP
            self.mode = CRUISE
            self._cruise_left = lim.cruise_epochs
            if was_up and base is not None and rate >= base.rate * (1.0 + lim.regrow_gain) and level < cap:
                # Much more throughput one step up: the knee moved up; double again.
                self.mode = STARTUP
                self._startup_prev = rate
                self._set(min(cap, level * 2.0), f"probe up gained {rate / base.rate - 1:.0%}: startup again")
                return
            knee = self._knee(now) or self._probe_base
            self._set(knee, f"{'probe up' if was_up else 'probe down'} done: knee at {knee}")
            return
        # cruise
        knee = self._knee(now) or level
        if knee != level:
            self._set(knee, f"knee at {knee}")
            return
        self._cruise_left -= 1
        if self._cruise_left > 0:
            return
        self._cruise_left = lim.cruise_epochs
        if queue is not None:
            return  # the engine is full and says so: nothing to learn above or below
        # Probe a neighbour only when the table has nothing recent about it: a
        # probe down costs throughput, a probe up beyond the knee latency.
        up = int(min(cap, float(self._step_up(level))))
        down = int(max(float(lim.min), float(self._step_down(level))))
        want_up = up > level and not self._known(now, level + 1, up)
        want_down = down < level and not self._known(now, down, level - 1)
        self._probes += 1
        if want_down and (not want_up or self._probes % lim.probe_down_every == 0):
            self._probe_base = level
            self.mode = PROBE_DOWN
            self._set(down, f"probe down from {level}")
        elif want_up:
            self._probe_base = level
            self.mode = PROBE_UP
            self._set(up, f"probe up from {level}")

    def _known(self, now: float, low: int, high: int) -> bool:
        """A recent measurement exists for a level in ``[low, high]``."""
        fresh = self.limits.probe_refresh_s
        return any(low <= k <= high and now - r.at <= fresh for k, r in self._table.items())

    def _set(self, new: float, reason: str, *, quiet: bool = False) -> None:
        lim = self.limits
        new = min(max(new, float(lim.min)), float(lim.max))
        old = self.value
        self.limit = new
        value = int(new)
        self.value = value
        if value != old:
            self.changes += 1
            self.reason = reason
            if not quiet and log.isEnabledFor(logging.DEBUG):
                log.debug("%s: concurrency %d -> %d (%s)", self.name, old, value, reason)
            if value > old and self.on_change is not None:
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
