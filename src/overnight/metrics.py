"""Prometheus metrics of one replica, read from live state at scrape time.

Nothing here runs on the hot path. The executor counts requests in plain ints
(``executor/stats.py``); the collectors below turn those, the engines' shared
capacities, the engine manager's GPU-seconds and the store's batch counts into
metric families when ``/metrics`` is scraped.

Labels are bounded: ``engine`` is ``default``, a runtime key or a short hash of
an engine URL (``EnginePool.label_of``), ``endpoint`` one of the supported
endpoints, ``status`` a batch status. No batch or tenant id is ever a label
value: ``/metrics`` may be served without a key.

Across replicas: ``overnight_batches`` is read from the shared store, so every
replica reports the same store-wide numbers (aggregate with ``max``); everything
else is this replica's own (aggregate with ``sum``).

The console's jobs and provisions (``ConsoleCollector``, when the console runs in
this process; ``ConsoleMetrics``, the whole ``/metrics`` of ``overnight console``
as its own process) follow the same rules: jobs by status and live resources from
the store at scrape time (``max``), the rest counted where the planner writes them
(``console/stats.py``; ``sum``). Labels: a job status, a provider name.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from overnight.console.jobs import ACTIVE as JOB_ACTIVE_STATUSES
from overnight.console.jobs import JOB, PROVISION
from overnight.console.stats import CONSOLE_STATS, ConsoleStats
from overnight.executor.stats import BATCH_TRANSITIONS, ExecutorStats, Histogram
from overnight.store.base import ACTIVE_STATUSES

__all__ = ["METRIC_NAMES", "ConsoleCollector", "ConsoleMetrics", "Metrics", "SchedulerCollector", "build_registry",
           "render"]

log = logging.getLogger("overnight.metrics")

#: How long one store count of the active batches serves scrapes.
BATCH_COUNT_TTL_S = 1.0
#: How long one read of the console's active jobs and live provisions serves scrapes.
CONSOLE_COUNT_TTL_S = 1.0
#: The most active jobs / live provisions one scrape reads (the planner's own tick reads as many).
CONSOLE_COUNT_LIMIT = 10_000
#: Provision statuses that hold (or may hold) a resource at a provider: all but ``released``.
LIVE_PROVISION_STATUSES = ("requested", "provisioning", "release_pending")

#: Every metric family this module exposes (the Grafana dashboard may use only these).
METRIC_NAMES = (
    "overnight_batches",
    "overnight_batch_transitions_total",
    "overnight_batches_running",
    "overnight_requests_inflight",
    "overnight_running_batches_engine_overloads",
    "overnight_requests_dispatched_total",
    "overnight_requests_succeeded_total",
    "overnight_requests_failed_total",
    "overnight_requests_retried_total",
    "overnight_input_tokens_total",
    "overnight_output_tokens_total",
    "overnight_engine_latency_seconds",
    "overnight_checkpoint_write_seconds",
    "overnight_engine_concurrency_limit",
    "overnight_engine_requests_inflight",
    "overnight_engine_measured_rate",
    "overnight_engine_concurrency_mode",
    "overnight_engine_gpu_seconds_total",
    "overnight_console_jobs",
    "overnight_console_jobs_finished_total",
    "overnight_console_provision_latency_seconds",
    "overnight_console_live_resources",
    "overnight_console_release_failures_total",
    "overnight_console_gpu_seconds_total",
)


def _histogram(fam: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    fam.add_metric(labels, h.cumulative(), sum_value=h.sum)


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
    many are in flight and the rate it measured (label: ``EnginePool.label_of``)."""

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
        runtimes = getattr(self.scheduler, "runtimes", None)
        gpu = CounterMetricFamily(
            "overnight_engine_gpu_seconds",
            "GPUs x seconds held by engines overnight started (local runtime), from start to release.",
            labels=["engine", "runtime"],
        )
        if runtimes is not None:
            for (key, kind), seconds in sorted(runtimes.gpu_seconds().items()):
                gpu.add_metric([key, kind], seconds)
        yield gpu


class RequestCollector(Collector):
    """The executor's plain-int request counters and histograms (``ExecutorStats``)."""

    def __init__(self, stats: ExecutorStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        labels = ["engine", "endpoint"]
        fams = {
            "dispatched": CounterMetricFamily(
                "overnight_requests_dispatched", "Request attempts sent to an engine (each retry is one more).",
                labels=labels),
            "succeeded": CounterMetricFamily(
                "overnight_requests_succeeded", "Requests that ended with a line in the output file.", labels=labels),
            "failed": CounterMetricFamily(
                "overnight_requests_failed",
                "Requests that ended with a line in the error file (engine errors after the last attempt, and lines "
                "written for a cancel, an expiry or an unusable engine).", labels=labels),
            "retried": CounterMetricFamily(
                "overnight_requests_retried", "Attempts that failed and were tried again.", labels=labels),
            "tokens_in": CounterMetricFamily(
                "overnight_input_tokens", "Prompt tokens of succeeded requests, as the engine reported them.",
                labels=labels),
            "tokens_out": CounterMetricFamily(
                "overnight_output_tokens", "Completion tokens of succeeded requests, as the engine reported them.",
                labels=labels),
        }
        latency = HistogramMetricFamily(
            "overnight_engine_latency_seconds", "Seconds from sending an attempt to its whole answer (answered ones).",
            labels=labels)
        for (engine, endpoint), st in sorted(self.stats.requests.items()):
            for attr, fam in fams.items():
                fam.add_metric([engine, endpoint], getattr(st, attr))
            _histogram(latency, [engine, endpoint], st.latency)
        yield from fams.values()
        yield latency
        cp = HistogramMetricFamily(
            "overnight_checkpoint_write_seconds",
            "Seconds to store one checkpoint: spool segments to storage, then the record with the checkpoint.")
        _histogram(cp, [], self.stats.checkpoint)
        yield cp


class BatchCollector(Collector):
    """Batches by status. Active statuses come from the store (``count_active_batches``,
    an indexed count, cached ``BATCH_COUNT_TTL_S``), so every replica reports the
    same store-wide numbers; finished ones as a counter of the transitions this
    process wrote (its rate is batches finished per second; sum over replicas)."""

    def __init__(self, store: Any, ttl_s: float = BATCH_COUNT_TTL_S) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.counts: dict[str, int] | None = None
        self._at = -float("inf")

    async def refresh(self) -> None:
        """Count again when the last count is older than the TTL. A store error leaves
        the gauge out of this scrape (``absent()`` shows it) rather than failing it."""
        now = time.monotonic()
        if self.store is None or now - self._at < self.ttl_s:
            return
        self._at = now
        try:
            self.counts = await self.store.count_active_batches()
        except Exception as exc:
            self.counts = None
            log.warning("metrics: counting batches in the store failed: %s", exc)

    def collect(self) -> Iterator[Any]:
        if self.counts is not None:
            g = GaugeMetricFamily("overnight_batches", "Batches in each active status, store-wide (all replicas).",
                                  labels=["status"])
            for status in ACTIVE_STATUSES:
                g.add_metric([status], self.counts.get(status, 0))
            yield g
        t = CounterMetricFamily("overnight_batch_transitions",
                                "Batch status changes this process wrote, by the status reached.", labels=["status"])
        for status, n in sorted(BATCH_TRANSITIONS.items()):
            t.add_metric([status], n)
        yield t


class ConsoleCollector(Collector):
    """The console's jobs and provisions. Levels come from the store at scrape time
    (the active jobs by status, the provisions not yet released by provider: the
    same status-filtered, indexed lists the planner reads every tick, cached
    ``CONSOLE_COUNT_TTL_S``), so every replica reports the same store-wide numbers;
    events are this process's counters (``console/stats.py``)."""

    def __init__(self, store: Any, providers: Any = (), *, stats: ConsoleStats = CONSOLE_STATS,
                 ttl_s: float = CONSOLE_COUNT_TTL_S) -> None:
        self.store = store
        #: Configured providers: each gets a live-resources sample, 0 included.
        self.providers = tuple(providers)
        self.stats = stats
        self.ttl_s = ttl_s
        self.jobs: dict[str, int] | None = None
        self.live: dict[str, int] | None = None
        self._at = -float("inf")

    async def refresh(self) -> None:
        """Read again when the last read is older than the TTL. A store error leaves
        the two gauges out of this scrape (``absent()`` shows it), as for batches."""
        now = time.monotonic()
        if self.store is None or now - self._at < self.ttl_s:
            return
        self._at = now
        try:
            jobs = await self.store.list_docs(JOB, statuses=JOB_ACTIVE_STATUSES, order="oldest",
                                              limit=CONSOLE_COUNT_LIMIT)
            provs = await self.store.list_docs(PROVISION, statuses=LIVE_PROVISION_STATUSES, order="oldest",
                                               limit=CONSOLE_COUNT_LIMIT)
        except Exception as exc:
            self.jobs = self.live = None
            log.warning("metrics: reading the console's jobs and provisions failed: %s", exc)
            return
        self.jobs = dict(Counter(j.status for j in jobs))
        live = Counter(str(p.body.get("provider")) for p in provs)
        self.live = {**{p: 0 for p in self.providers}, **live}

    def collect(self) -> Iterator[Any]:
        if self.jobs is not None and self.live is not None:
            g = GaugeMetricFamily("overnight_console_jobs", "Console jobs not yet terminal, by status "
                                  "(store-wide: every replica reports the same).", labels=["status"])
            for status in JOB_ACTIVE_STATUSES:
                g.add_metric([status], self.jobs.get(status, 0))
            yield g
            live = GaugeMetricFamily(
                "overnight_console_live_resources",
                "Console provisions a provider may still hold (requested, provisioning or running, or waiting for "
                "a confirmed release), by provider, store-wide.", labels=["provider"])
            for provider, n in sorted(self.live.items()):
                live.add_metric([provider], n)
            yield live
        s = self.stats
        done = CounterMetricFamily("overnight_console_jobs_finished",
                                   "Console jobs this process moved to a terminal status, by that status.",
                                   labels=["status"])
        for status, n in sorted(s.jobs_finished.items()):
            done.add_metric([status], n)
        yield done
        lat = HistogramMetricFamily(
            "overnight_console_provision_latency_seconds",
            "Seconds from asking the provider for a job's resource to its engine answering (provision_requested "
            "to provision_ready), by provider.", labels=["provider"])
        for provider, h in sorted(s.provision_latency.items()):
            _histogram(lat, [provider], h)
        yield lat
        rel = CounterMetricFamily("overnight_console_release_failures",
                                  "Release attempts the provider did not confirm (each retry counts), by provider.",
                                  labels=["provider"])
        for provider, n in sorted(s.release_failures.items()):
            rel.add_metric([provider], n)
        yield rel
        gpu = CounterMetricFamily(
            "overnight_console_gpu_seconds",
            "GPUs x seconds of console provisions from running to the confirmed release (as the jobs' cost counts "
            "them), added at the release, by provider.", labels=["provider"])
        for provider, secs in sorted(s.gpu_seconds.items()):
            gpu.add_metric([provider], secs)
        yield gpu


class Metrics:
    """One app's ``/metrics``: the registry and what must be read before a scrape."""

    def __init__(self, scheduler: Any, console: Any = None) -> None:
        self.batches = BatchCollector(getattr(scheduler, "store", None))
        #: The console's jobs and provisions, when it runs in this process (``console/service.py``).
        self.console = ConsoleCollector(console.store, console.provisioners) if console is not None else None
        self.registry = build_registry(scheduler, batches=self.batches, console=self.console)

    async def render(self) -> bytes:
        await self.batches.refresh()
        if self.console is not None:
            await self.console.refresh()
        return render(self.registry)


class ConsoleMetrics:
    """``/metrics`` of ``overnight console`` as its own process: the console's families
    from its own store and planner (the same names and labels as ``overnight serve``
    exports for an embedded console) and the process's; no batch, request or engine
    family, since batches run at the batches service, which exports those."""

    def __init__(self, console: Any) -> None:
        self.console = ConsoleCollector(console.store, console.provisioners)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.console)
        ProcessCollector(registry=self.registry)

    async def render(self) -> bytes:
        await self.console.refresh()
        return render(self.registry)


def build_registry(scheduler: Any, *, batches: BatchCollector | None = None,
                   console: ConsoleCollector | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(scheduler))
    registry.register(EngineCollector(scheduler))
    stats = getattr(getattr(scheduler, "cfg", None), "stats", None)
    if stats is not None:
        registry.register(RequestCollector(stats))
    registry.register(batches if batches is not None else BatchCollector(None))
    if console is not None:
        registry.register(console)
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
