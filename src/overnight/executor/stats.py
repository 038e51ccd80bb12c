"""What the executor counts, as plain numbers: no lock, no label lookup, no
Prometheus object on the hot path.

``send_one`` runs once per request attempt, tens of thousands of times a second;
a ``prometheus_client`` counter costs a lock and a method call per update. So the
executor adds to ``int``/``float`` slots of a ``RequestStats`` it was handed once
(one per engine and endpoint), and ``overnight.metrics`` reads them when
``/metrics`` is scraped. Everything runs on the event loop, scrapes included, so
the plain ``+=`` is never torn.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

__all__ = [
    "BATCH_TRANSITIONS", "CHECKPOINT_BUCKETS_S", "ExecutorStats", "Histogram", "LATENCY_BUCKETS_S", "RequestStats",
]

#: Engine answer times, seconds: a fast embedding to a long generation (and a timeout).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Checkpoint writes, seconds: a local SQLite commit to S3 plus PostgreSQL across regions.
CHECKPOINT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Batch status changes this process wrote, by the status reached (``batches/service.py``
#: counts each ``transition`` once it is durable, and each create as ``validating``).
#: Process-wide: a write is this process's whichever app or scheduler made it.
BATCH_TRANSITIONS: Counter[str] = Counter()


class Histogram:
    """Fixed buckets (``le`` bounds, plus +Inf), a count per bucket and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must be strictly increasing: {bounds}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. the bucket with value <= le.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count of observations <= le)`` pairs ending with ``+Inf``, as the
        Prometheus exposition wants them."""
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append((_le(bound), float(total)))
        out.append(("+Inf", float(total + self.counts[-1])))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


def _le(bound: float) -> str:
    return repr(float(bound))


class RequestStats:
    """One engine and endpoint's request counts in this process (never reset).

    Per attempt, in ``send_one``: ``dispatched`` (attempts sent to the engine; a
    retry is another one), ``retried`` (attempts that failed and were tried
    again) and ``latency`` (seconds from sending an attempt to its whole answer,
    for every attempt that got an HTTP answer).

    Moved in from the spool at every checkpoint and at the end of a run, so never
    per request and at most a checkpoint interval late: ``succeeded`` / ``failed``
    (requests whose line went to the output / error file; a line written for a
    cancel, an expiry or an unusable engine is a failed request) and
    ``tokens_in`` / ``tokens_out`` (the usage the batch reports). Over a batch run
    by one process they equal its ``request_counts`` and ``usage``."""

    __slots__ = ("dispatched", "failed", "latency", "retried", "succeeded", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.dispatched = self.retried = self.succeeded = self.failed = 0
        self.tokens_in = self.tokens_out = 0
        self.latency = Histogram(LATENCY_BUCKETS_S)


class ExecutorStats:
    """A scheduler's counters: ``RequestStats`` by (engine label, endpoint), and
    how long checkpoint writes take. The labels are bounded by the engines and
    endpoints in use, never a batch or tenant."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], RequestStats] = {}
        #: Seconds per checkpoint: spool segments stored, then the record written.
        self.checkpoint = Histogram(CHECKPOINT_BUCKETS_S)

    def requests_for(self, engine: str, endpoint: str) -> RequestStats:
        key = (engine, endpoint)
        st = self.requests.get(key)
        if st is None:
            st = self.requests[key] = RequestStats()
        return st
