"""The engine's own view of its load, from its Prometheus ``/metrics``.

``MetricsProbe`` reads ``GET {engine}/metrics`` every ``interval_s`` while
batches use the engine and feeds an ``EngineLoad`` (running, waiting, KV-cache
use, preemptions) to the engine's capacity. Both engines overnight targets are
understood:

* vLLM: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (older releases: ``vllm:gpu_cache_usage_perc``),
  ``vllm:num_preemptions_total`` (older: ``vllm:num_preemptions``);
* SGLang: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
  ``sglang:token_usage``.

Gauges are summed over label sets (one per model or data-parallel rank; KV use
is averaged). An engine that answers anything but 200 with a waiting-queue
gauge is asked again only every ``retry_unsupported_s``; the limit then works
from throughput and overload answers alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

from overnight import defaults
from overnight.errors import OvernightError
from overnight.executor.limiter import AdaptiveLimit, EngineLoad

__all__ = ["MetricsProbe", "parse_engine_load"]

log = logging.getLogger("overnight.executor")

#: Poll interval while the limit is still in startup.
_RAMP_POLL_S = 0.05
#: metric name -> which field it feeds
_FIELDS = {
    b"vllm:num_requests_running": "running",
    b"vllm:num_requests_waiting": "waiting",
    b"vllm:kv_cache_usage_perc": "kv",
    b"vllm:gpu_cache_usage_perc": "kv",
    b"vllm:num_preemptions_total": "preempt",
    b"vllm:num_preemptions": "preempt",
    b"sglang:num_running_reqs": "running",
    b"sglang:num_queue_reqs": "waiting",
    b"sglang:token_usage": "kv",
}
# name, optional {labels}, whitespace, value (an optional timestamp may follow)
_SAMPLE = re.compile(
    rb"^(vllm:(?:num_requests_running|num_requests_waiting|kv_cache_usage_perc|gpu_cache_usage_perc"
    rb"|num_preemptions_total|num_preemptions)|sglang:(?:num_running_reqs|num_queue_reqs|token_usage))"
    rb"(?:\{[^\n]*\})?[ \t]+(\S+)",
    re.MULTILINE,
)


def parse_engine_load(text: bytes) -> EngineLoad | None:
    """The load in a vLLM or SGLang exposition, or None when it has no
    waiting-queue gauge (then it is not an engine we understand)."""
    sums = {"running": 0.0, "waiting": 0.0, "kv": 0.0, "preempt": 0.0}
    counts = {"running": 0, "waiting": 0, "kv": 0, "preempt": 0}
    kv_name: bytes | None = None
    for m in _SAMPLE.finditer(text):
        name = m.group(1)
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if value != value or value in (float("inf"), float("-inf")) or value < 0:
            continue  # NaN, infinities and negatives are no load
        field = _FIELDS[name]
        if field == "kv":
            # Both vLLM names may be present in transition releases: use one.
            if kv_name is None:
                kv_name = name
            elif name != kv_name:
                continue
        sums[field] += value
        counts[field] += 1
    if not counts["waiting"]:
        return None
    kv = min(1.0, sums["kv"] / counts["kv"]) if counts["kv"] else None
    return EngineLoad(sums["running"], sums["waiting"], kv, sums["preempt"] if counts["preempt"] else None)


Getter = Callable[[str], Awaitable[tuple[int, bytes]]]


class MetricsProbe:
    """Polls one engine's ``/metrics`` while ``active()`` says batches use it."""

    def __init__(
        self,
        get: Getter,
        limit: AdaptiveLimit,
        *,
        active: Callable[[], bool],
        sink: Callable[..., None] | None = None,
        inflight: Callable[[], int] | None = None,
        interval_s: float = defaults.METRICS_POLL_S,
        retry_unsupported_s: float = 30.0,
        path: str = "/metrics",
    ) -> None:
        self._get = get
        self.limit = limit
        #: Where samples go: the engine's capacity (``EngineCapacity.on_metrics``)
        #: or the limit itself.
        self.sink = sink or limit.on_metrics
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
        load = parse_engine_load(body) if status == 200 else None
        if load is None:
            if self.supported is None:
                log.info("engine has no vLLM/SGLang /metrics (HTTP %s); concurrency adapts on throughput and "
                         "overload", status)
            self.supported = False
            return False
        if not self.supported:
            log.info("engine publishes its queue in /metrics; concurrency keeps a short queue there")
        self.supported = True
        self.samples += 1
        self.sink(load, inflight=self.inflight() if self.inflight is not None else None)
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
