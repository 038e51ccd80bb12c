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
shared ``Gate`` (the replica-wide global cap). A batch's floor
(``min_concurrency``, or ``concurrency`` for a fixed level) is granted even when
the adaptive limit is lower: it is the user's word that the engine can take it.

A batch that yields to other traffic (``yield_to_others``) on an engine that
publishes its queue gets at most ``yield_cap`` slots: the cap shrinks by the
engine's waiting count whenever anything waits there, and grows by a quarter
per metrics sample while nothing does, so interactive users of the same engine
never queue behind the batch for long. Without engine metrics it has no effect.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from overnight import defaults
from overnight.executor.limiter import AdaptiveLimit, ConcurrencyLimits, EngineLoad, Gate, Signal

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
        floor: int = 0,
        yield_to_others: bool = False,
    ) -> None:
        self.capacity = capacity
        self.name = name
        self.cap = max(1, cap)
        #: Slots this batch gets whatever the adaptive limit says.
        self.floor = min(max(0, floor), self.cap)
        self.yield_to_others = yield_to_others
        #: Slots allowed while yielding (grows and shrinks with the engine's queue).
        self.yield_cap = float(self.cap)
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

    def on_success(self, latency_s: float, tokens: int | None = None) -> None:
        """An answer came back (call before ``release``); ``tokens``: completion tokens."""
        cap = self.capacity
        cap.limit.on_success(latency_s, cap.inflight - 1, tokens)

    def _allowed(self) -> int:
        if self.yield_to_others:
            return max(self.floor, 1, min(self.cap, int(self.yield_cap)))
        return self.cap

    def snapshot(self) -> dict[str, object]:
        """The concurrency state shown on the batch object."""
        out = dict(self.capacity.limit.snapshot())
        out["inflight"] = self.inflight
        out["engine_inflight"] = self.capacity.inflight
        if self.floor:
            out["floor"] = self.floor
        if self.yield_to_others:
            out["yield_cap"] = self._allowed()
        return out

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
        floor: int = 0,
        yield_to_others: bool = False,
    ) -> BatchShare:
        """Register a batch; ``cap`` defaults to the limit's maximum; ``floor`` slots
        are granted whatever the adaptive limit says (``floor == cap``: fixed)."""
        share = BatchShare(
            self, name=name, cap=cap or self.limit.limits.max, priority=priority, deadline=deadline,
            window_s=window_s, remaining=remaining, floor=floor, yield_to_others=yield_to_others,
        )
        self.shares.append(share)
        return share

    # -- slot accounting ------------------------------------------------------
    def _held(self) -> bool:
        lim = self.limit
        if lim.hold_until and self.clock() < lim.hold_until:
            self._arm_hold_timer()
            return True
        return False

    def _room(self) -> bool:
        return self.inflight < self.limit.value and not self._held()

    def _may_take(self, share: BatchShare, room: bool) -> bool:
        """May ``share`` have one more slot (``room``: the adaptive limit has one)?"""
        if share.inflight >= share._allowed():
            return False
        return room or (share.inflight < share.floor and not self._held())

    def _try_take(self, share: BatchShare) -> bool:
        if share.waiters or not self._may_take(share, self._room()):
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
        while True:
            share = self._pick(self._room())
            if share is None:
                return
            fut = share.waiters.popleft()
            if fut.done():
                continue
            self._take(share)
            fut.set_result(None)

    def _pick(self, room: bool) -> BatchShare | None:
        shares = self.shares
        if len(shares) == 1:
            s = shares[0]
            return s if s.waiters and self._may_take(s, room) else None
        now = self.wall()
        best: BatchShare | None = None
        best_key: tuple[int, float] | None = None
        for s in shares:
            if not s.waiters or not self._may_take(s, room):
                continue
            key = (0, s.deadline) if s.urgent(now) else (1, s.inflight / s.weight)  # type: ignore[assignment]
            if best_key is None or key < best_key:
                best, best_key = s, key
        return best

    def on_metrics(self, load: EngineLoad, *, inflight: int | None = None) -> None:
        """A sample of the engine's load: feed the limit, and size yielding shares."""
        self.limit.on_metrics(load, inflight=self.inflight if inflight is None else inflight)
        grew = False
        for s in self.shares:
            if not s.yield_to_others:
                continue
            if load.waiting >= 1:
                # Somebody queues at the engine: give back at least that many slots.
                s.yield_cap = max(1.0, min(s.yield_cap, float(s.inflight)) - load.waiting)
            elif s.inflight >= int(s.yield_cap) - 1:
                s.yield_cap = min(float(s.cap), max(s.yield_cap + 1.0, s.yield_cap * 1.25))
                grew = True
        if grew:
            self._grant()

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
