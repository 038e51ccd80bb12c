"""One engine's capacity, shared by the batches that use it.

``EngineCapacity`` owns the engine's ``AdaptiveLimit`` and hands out in-flight
slots. Each batch joins with a ``BatchShare`` (its hard cap, priority and
deadline) and asks it for a slot before every request. When slots are scarce
they go, in this order:

1. to urgent batches, earliest deadline first: a batch is urgent in the last
   ``DEADLINE_URGENT_FRACTION`` of its completion window, or when finishing its
   remaining requests at the engine's whole measured rate would take more than
   1 / ``DEADLINE_URGENT_FACTOR`` of the time it has left;
2. otherwise to the batch with the fewest requests in flight per unit of weight,
   where weight = 1 + priority (0-100): weighted fair sharing that is work
   conserving (a batch that cannot use its share leaves it to the others).

A batch never exceeds its own cap, and every slot also takes one from each
shared ``Gate`` (the replica-wide global cap).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from overnight import defaults
from overnight.executor.limiter import AdaptiveLimit, ConcurrencyLimits, Gate, Signal

__all__ = ["BatchShare", "EngineCapacity"]


class BatchShare:
    """One batch's handle on an engine: acquire a slot before each request,
    release it after, and report how the request went."""

    def __init__(
        self,
        capacity: EngineCapacity,
        *,
        name: str,
        cap: int,
        priority: int,
        deadline: float | None,
        window_s: float | None,
        remaining: int,
    ) -> None:
        self.capacity = capacity
        self.name = name
        self.cap = max(1, cap)
        self.weight = 1.0 + max(0, priority)
        #: Epoch seconds by which the batch must finish (None: no deadline).
        self.deadline = deadline
        self.window_s = window_s
        #: Requests not finished yet; the executor keeps it current.
        self.remaining = remaining
        self.inflight = 0
        self.max_inflight_seen = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False

    @property
    def limit(self) -> AdaptiveLimit:
        return self.capacity.limit

    @property
    def overloads(self) -> int:
        return self.capacity.limit.overloads

    def urgent(self, now_wall: float) -> bool:
        if self.deadline is None:
            return False
        left = self.deadline - now_wall
        if self.window_s and left <= defaults.DEADLINE_URGENT_FRACTION * self.window_s:
            return True
        rate = self.capacity.limit.rate
        return rate > 0 and left <= defaults.DEADLINE_URGENT_FACTOR * self.remaining / rate

    def try_acquire(self) -> bool:
        """Take a slot now if one is free for this batch (no await, no fairness
        violation: free slots exist only when nobody eligible is waiting)."""
        return self.capacity._try_take(self)

    async def acquire(self) -> None:
        """Wait for a slot (for this batch and in every shared gate)."""
        cap = self.capacity
        if cap._try_take(self):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        cap._grant()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                cap._give_back(self)  # an engine slot was handed over as we were cancelled
            else:
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            raise
        # The engine slot is ours; the global gates are FIFO on their own.
        taken: list[Gate] = []
        try:
            for g in cap.gates:
                await g.acquire()
                taken.append(g)
        except BaseException:
            for g in taken:
                g.release()
            cap._give_back(self)
            raise

    def release(self) -> None:
        """Give a slot back (however the request ended)."""
        cap = self.capacity
        for g in cap.gates:
            g.release()
        cap._give_back(self)

    def on_success(self, latency_s: float) -> None:
        """An answer came back (call before ``release``)."""
        cap = self.capacity
        cap.limit.on_success(latency_s, cap.inflight - 1)

    def on_overload(self, kind: str = Signal.OVERLOAD, retry_after_s: float | None = None) -> None:
        self.capacity.limit.on_overload(kind, retry_after_s=retry_after_s, inflight=self.capacity.inflight)
        self.capacity._grant()

    def close(self) -> None:
        """Leave the engine (the batch stopped)."""
        if not self.closed:
            self.closed = True
            self.capacity._leave(self)


class EngineCapacity:
    """The shared in-flight budget of one engine endpoint."""

    def __init__(
        self,
        limits: ConcurrencyLimits | None = None,
        *,
        gates: tuple[Gate, ...] = (),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.limit = AdaptiveLimit(limits, clock=clock, on_change=self._grant)
        self.gates = gates
        self.clock = clock
        self.wall = wall
        self.inflight = 0
        self.shares: list[BatchShare] = []
        self._hold_timer: asyncio.TimerHandle | None = None

    def join(
        self,
        *,
        name: str = "",
        cap: int | None = None,
        priority: int = 0,
        deadline: float | None = None,
        window_s: float | None = None,
        remaining: int = 0,
    ) -> BatchShare:
        """Register a batch; ``cap`` defaults to the limit's maximum."""
        share = BatchShare(
            self, name=name, cap=cap or self.limit.limits.max, priority=priority, deadline=deadline,
            window_s=window_s, remaining=remaining,
        )
        self.shares.append(share)
        return share

    # -- slot accounting ------------------------------------------------------
    def _room(self) -> bool:
        lim = self.limit
        if self.inflight >= lim.value:
            return False
        if lim.hold_until and self.clock() < lim.hold_until:
            self._arm_hold_timer()
            return False
        return True

    def _try_take(self, share: BatchShare) -> bool:
        if share.waiters or share.inflight >= share.cap or not self._room():
            return False
        gates = self.gates
        for i, g in enumerate(gates):
            if not g.try_acquire():
                for taken in gates[:i]:
                    taken.release()
                return False
        self._take(share)
        return True

    def _take(self, share: BatchShare) -> None:
        share.inflight += 1
        if share.inflight > share.max_inflight_seen:
            share.max_inflight_seen = share.inflight
        self.inflight += 1
        self.limit.note_inflight(self.inflight)

    def _give_back(self, share: BatchShare) -> None:
        share.inflight -= 1
        self.inflight -= 1
        shares = self.shares
        if len(shares) == 1 and shares[0] is share and not share.waiters:
            return  # the common case: one batch, nobody waiting
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to waiting batches: urgent first, then fair by weight."""
        while self._room():
            share = self._pick()
            if share is None:
                return
            fut = share.waiters.popleft()
            if fut.done():
                continue
            self._take(share)
            fut.set_result(None)

    def _pick(self) -> BatchShare | None:
        shares = self.shares
        if len(shares) == 1:
            s = shares[0]
            return s if s.waiters and s.inflight < s.cap else None
        now = self.wall()
        best: BatchShare | None = None
        best_key: tuple[int, float] | None = None
        for s in shares:
            if not s.waiters or s.inflight >= s.cap:
                continue
            key = (0, s.deadline) if s.urgent(now) else (1, s.inflight / s.weight)  # type: ignore[assignment]
            if best_key is None or key < best_key:
                best, best_key = s, key
        return best

    def _leave(self, share: BatchShare) -> None:
        try:
            self.shares.remove(share)
        except ValueError:
            pass
        self._grant()

    def _arm_hold_timer(self) -> None:
        if self._hold_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max(0.0, self.limit.hold_until - self.clock())
        self._hold_timer = loop.call_later(delay, self._hold_over)

    def _hold_over(self) -> None:
        self._hold_timer = None
        if self.limit.hold_until and self.clock() >= self.limit.hold_until:
            self.limit.hold_until = 0.0
        self._grant()
