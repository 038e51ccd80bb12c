"""What the console counts as it goes, as plain numbers (``overnight.metrics`` turns
them into metric families when ``/metrics`` is scraped).

Only what happens at a moment is kept here: a job reaching a terminal status, a
provision becoming ready (and how long it took), a release the provider did not
confirm, the GPU-seconds of a provision once released. Levels (jobs by status,
resources not yet released) are read from the store at scrape time instead, so
they are right across replicas and restarts.

Process-wide, like ``executor.stats.BATCH_TRANSITIONS``: a count is this process's
whichever app or planner made the write, and it is made only once the write that
records the event has won its compare-and-set. Labels are provider names and
statuses (bounded); never a job, provision or tenant id.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from overnight.executor.stats import Histogram

__all__ = ["CONSOLE_STATS", "PROVISION_BUCKETS_S", "ConsoleStats"]

#: Seconds from asking a provider for a resource to its engine answering: a mock
#: engine on this host (well under a second) to a cloud GPU with a large image (an hour).
PROVISION_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)


class ConsoleStats:
    """Counters of one process's console, never reset."""

    def __init__(self) -> None:
        #: Jobs this process moved to a terminal status, by that status.
        self.jobs_finished: Counter[str] = Counter()
        #: provider -> seconds from ``provision_requested`` to ``provision_ready``.
        self.provision_latency: dict[str, Histogram] = {}
        #: provider -> release attempts the provider did not confirm (each retry counts).
        self.release_failures: Counter[str] = Counter()
        #: provider -> GPU-seconds of provisions whose release was confirmed (as the job's cost counts them).
        self.gpu_seconds: defaultdict[str, float] = defaultdict(float)

    def job_finished(self, status: str) -> None:
        self.jobs_finished[status] += 1

    def provision_ready(self, provider: str, seconds: float) -> None:
        h = self.provision_latency.get(provider)
        if h is None:
            h = self.provision_latency[provider] = Histogram(PROVISION_BUCKETS_S)
        h.observe(max(0.0, seconds))

    def release_failed(self, provider: str) -> None:
        self.release_failures[provider] += 1

    def add_gpu_seconds(self, provider: str, seconds: float) -> None:
        self.gpu_seconds[provider] += max(0.0, float(seconds))


#: This process's console counters.
CONSOLE_STATS = ConsoleStats()
