"""The engine's own view of its load, from vLLM's Prometheus ``/metrics``.

``MetricsProbe`` reads ``GET {engine}/metrics`` every ``interval_s`` while
batches use the engine and feeds ``vllm:num_requests_running`` and
``vllm:num_requests_waiting`` to the engine's ``AdaptiveLimit``. An engine that
answers anything but 200 with ``vllm:num_requests_waiting`` is asked again only
every ``retry_unsupported_s``; the limit then works from latency and overload
answers alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

from overnight import defaults
from overnight.errors import OvernightError
from overnight.executor.limiter import AdaptiveLimit

__all__ = ["MetricsProbe", "parse_vllm_load"]

log = logging.getLogger("overnight.executor")

#: Poll interval while the limit is still in slow start.
_RAMP_POLL_S = 0.05
_RUNNING = b"vllm:num_requests_running"
_WAITING = b"vllm:num_requests_waiting"
# name, optional {labels}, whitespace, value (an optional timestamp may follow)
_SAMPLE = re.compile(rb"^(vllm:num_requests_(?:running|waiting))(?:\{[^\n]*\})?[ \t]+(\S+)", re.MULTILINE)


def parse_vllm_load(text: bytes) -> tuple[float, float] | None:
    """``(running, waiting)`` summed over label sets (one per model / engine), or
    None when the text has no ``vllm:num_requests_waiting`` sample."""
    running = waiting = 0.0
    seen_waiting = False
    for m in _SAMPLE.finditer(text):
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if value != value:  # NaN
            continue
        if m.group(1) == _WAITING:
            waiting += value
            seen_waiting = True
        else:
            running += value
    return (running, waiting) if seen_waiting else None


Getter = Callable[[str], Awaitable[tuple[int, bytes]]]


class MetricsProbe:
    """Polls one engine's ``/metrics`` while ``active()`` says batches use it."""

    def __init__(
        self,
        get: Getter,
        limit: AdaptiveLimit,
        *,
        active: Callable[[], bool],
        inflight: Callable[[], int] | None = None,
        interval_s: float = defaults.METRICS_POLL_S,
        retry_unsupported_s: float = 30.0,
        path: str = "/metrics",
    ) -> None:
        self._get = get
        self.limit = limit
        self.active = active
        self.inflight = inflight
        self.interval_s = interval_s
        self.retry_unsupported_s = retry_unsupported_s
        self.path = path
        self.supported: bool | None = None  #: None until the first answer
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="overnight-metrics-probe")

    async def poll_once(self) -> bool:
        """Read the metrics once; True if they were usable (and were fed to the limit)."""
        try:
            status, body = await self._get(self.path)
        except OvernightError:
            return False
        load = parse_vllm_load(body) if status == 200 else None
        if load is None:
            if self.supported is None:
                log.info("engine has no vLLM /metrics (HTTP %s); concurrency adapts on latency and overload", status)
            self.supported = False
            return False
        if not self.supported:
            log.info("engine publishes vLLM /metrics; concurrency keeps a short queue there")
        self.supported = True
        self.samples += 1
        self.limit.on_metrics(*load, inflight=self.inflight() if self.inflight is not None else None)
        return True

    async def _run(self) -> None:
        while True:
            if not self.active():
                await asyncio.sleep(self.interval_s)
                continue
            ok = await self.poll_once()
            if not ok:
                await asyncio.sleep(self.retry_unsupported_s)
            elif self.limit.slow_start:
                # While the limit doubles every round trip, a queue builds within
                # a few of them: look more often until the ramp is over.
                await asyncio.sleep(min(self.interval_s, _RAMP_POLL_S))
            else:
                await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
