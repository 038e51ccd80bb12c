"""Prometheus metrics of one replica, read from live state at scrape time.

Nothing here runs on the hot path: the collector walks the scheduler's running
batches when ``/metrics`` is scraped, so dispatching a request costs no metric
update at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["SchedulerCollector", "build_registry", "render"]


class SchedulerCollector(Collector):
    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Any]:
        runners = dict(self.scheduler.runners)
        running = GaugeMetricFamily("overnight_batches_running", "Batches this replica is executing.")
        running.add_metric([], len(runners))
        yield running
        inflight = GaugeMetricFamily(
            "overnight_batch_requests_inflight", "Requests of a batch on the wire now.", labels=["batch_id"]
        )
        peak = GaugeMetricFamily(
            "overnight_batch_requests_inflight_max", "Most requests a batch had in flight.", labels=["batch_id"]
        )
        overloads = CounterMetricFamily(
            "overnight_batch_engine_overloads", "Overload signals (429/503/timeouts) seen by a batch.",
            labels=["batch_id"],
        )
        for batch_id, runner in runners.items():
            share = getattr(runner, "limiter", None)
            if share is None:
                continue
            inflight.add_metric([batch_id], getattr(share, "inflight", 0))
            peak.add_metric([batch_id], getattr(share, "max_inflight_seen", 0))
            overloads.add_metric([batch_id], getattr(share, "overloads", 0))
        yield inflight
        yield peak
        yield overloads


def build_registry(scheduler: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(scheduler))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
