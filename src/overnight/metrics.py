"""Prometheus metrics of one replica, read from live state at scrape time.

Nothing here runs on the hot path: the collector walks the scheduler's running
batches when ``/metrics`` is scraped, so dispatching a request costs no metric
update at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["SchedulerCollector", "build_registry", "render"]


class SchedulerCollector(Collector):
    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Any]:
        # Replica-wide sums only: batch and tenant ids are other tenants' business
        # and unbounded label values (``/metrics`` may be served without a key).
        runners = dict(self.scheduler.runners)
        running = GaugeMetricFamily("overnight_batches_running", "Batches this replica is executing.")
        running.add_metric([], len(runners))
        yield running
        inflight = overloads = 0
        for runner in runners.values():
            share = getattr(runner, "limiter", None)
            if share is None:
                continue
            inflight += getattr(share, "inflight", 0)
            overloads += getattr(share, "overloads", 0)
        g = GaugeMetricFamily("overnight_requests_inflight", "Requests of running batches on the wire now.")
        g.add_metric([], inflight)
        yield g
        # A gauge, not a counter: the sum drops when a batch finishes.
        o = GaugeMetricFamily(
            "overnight_running_batches_engine_overloads",
            "Overload signals (429/503/timeouts) seen so far by the batches running now.",
        )
        o.add_metric([], overloads)
        yield o


class EngineCollector(Collector):
    """Each engine's shared concurrency: the adaptive limit, what it is doing, how
    many are in flight and the rate it measured (label: ``default`` or a hash)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Any]:
        engines = getattr(self.scheduler, "engines", None)
        caps = engines.capacities() if engines is not None and hasattr(engines, "capacities") else {}
        limit = GaugeMetricFamily("overnight_engine_concurrency_limit",
                                  "Requests an engine may have in flight now (the adaptive limit).", labels=["engine"])
        inflight = GaugeMetricFamily("overnight_engine_requests_inflight", "Requests in flight to an engine.",
                                     labels=["engine"])
        rate = GaugeMetricFamily("overnight_engine_measured_rate",
                                 "Answers per second the concurrency law last measured.", labels=["engine"])
        mode = GaugeMetricFamily("overnight_engine_concurrency_mode",
                                 "1 for the phase the concurrency law is in.", labels=["engine", "mode"])
        for label, cap in caps.items():
            lim = cap.limit
            limit.add_metric([label], lim.value)
            inflight.add_metric([label], cap.inflight)
            rate.add_metric([label], lim.rate)
            for m in ("startup", "cruise", "probe_up", "probe_down"):
                mode.add_metric([label, m], 1.0 if lim.mode == m else 0.0)
        yield limit
        yield inflight
        yield rate
        yield mode


def build_registry(scheduler: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(scheduler))
    registry.register(EngineCollector(scheduler))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
