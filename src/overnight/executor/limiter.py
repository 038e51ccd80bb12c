"""Adaptive concurrency: how many requests a batch keeps in flight.

AIMD with slow start. The limit doubles per round trip while the engine keeps up,
then grows by about one per round trip; an overload signal (429/503, timeout, an
unreachable engine) cuts it to ``backoff_ratio`` of itself, at most once per
round trip so one burst of 429s is one signal, not a collapse. Hard caps (the
batch's ``max_concurrency``, a shared ``Gate`` per engine and one global) are
never exceeded.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from overnight import defaults

__all__ = ["AdaptiveLimiter", "ConcurrencyLimits", "Gate"]


@dataclass(frozen=True, kw_only=True)
class ConcurrencyLimits:
    initial: int = defaults.INITIAL_CONCURRENCY
    min: int = defaults.MIN_CONCURRENCY
    max: int = defaults.MAX_CONCURRENCY_PER_BATCH
    backoff_ratio: float = 0.7


class Gate:
    """A plain FIFO semaphore whose size can change (shared caps: engine, global)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

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


class AdaptiveLimiter:
    """Per-batch adaptive limit on top of optional shared gates."""

    def __init__(self, limits: ConcurrencyLimits, *, gates: tuple[Gate, ...] = ()) -> None:
        self.limits = limits
        self.limit = float(max(limits.min, min(limits.initial, limits.max)))
        self.inflight = 0
        self.overloads = 0
        self.max_inflight_seen = 0
        self._gates = gates
        self._slow_start = True
        self._last_cut = 0.0
        self._rtt_s = 0.05
        self._gate = Gate(int(self.limit))

    async def acquire(self) -> None:
        """Wait for a slot in the batch limit, then in every shared gate."""
        await self._gate.acquire()
        taken: list[Gate] = []
        try:
            for g in self._gates:
                await g.acquire()
                taken.append(g)
        except BaseException:
            for g in taken:
                g.release()
            self._gate.release()
            raise
        self.inflight += 1
        if self.inflight > self.max_inflight_seen:
            self.max_inflight_seen = self.inflight

    def release(self) -> None:
        self.inflight -= 1
        for g in self._gates:
            g.release()
        self._gate.release()

    def on_success(self, latency_s: float) -> None:
        self._rtt_s += (latency_s - self._rtt_s) * 0.1
        # Grow only when the limit is actually in use, or an idle batch would
        # "learn" a limit it never tested.
        if self.inflight + 1 < int(self.limit):
            return
        if self._slow_start:
            self.limit += 1.0
        else:
            self.limit += 1.0 / self.limit
        self._apply()

    def on_overload(self) -> None:
        self.overloads += 1
        now = time.monotonic()
        if now - self._last_cut < max(self._rtt_s, 0.01):
            return
        self._last_cut = now
        self._slow_start = False
        self.limit = max(float(self.limits.min), self.limit * self.limits.backoff_ratio)
        self._apply()

    def _apply(self) -> None:
        self.limit = min(self.limit, float(self.limits.max))
        self._gate.resize(int(self.limit))
