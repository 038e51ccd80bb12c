"""``overnight.metrics`` collectors on their own: the store-backed batch gauge (cached,
and left out when the store fails), engine labels, GPU-seconds and request counters."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from overnight.executor.stats import ExecutorStats
from overnight.metrics import BatchCollector, Metrics
from overnight.scheduler.loop import EnginePool
from overnight.store.memory import MemoryStore
from tests.store.contract import make_batch


def families(body: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.counts = 0
        self.fail = False

    async def count_active_batches(self) -> dict[str, int]:
        self.counts += 1
        if self.fail:
            raise OSError("store down")
        return await super().count_active_batches()


def scheduler(store=None, **kw) -> SimpleNamespace:
    return SimpleNamespace(store=store, runners={}, engines=None, runtimes=None, cfg=SimpleNamespace(stats=None), **kw)


async def test_batch_gauge_is_read_from_the_store_once_per_ttl(caplog) -> None:
    store = CountingStore()
    await store.open()
    for status in ("validating", "in_progress", "in_progress", "completed"):
        await store.insert_batch(make_batch(status=status))
    m = Metrics(scheduler(store))
    m.batches.ttl_s = 3600.0
    fams = families(await m.render())
    got = {s.labels["status"]: s.value for s in fams["overnight_batches"].samples}
    assert got == {"validating": 1, "in_progress": 2, "finalizing": 0, "cancelling": 0}
    await store.insert_batch(make_batch(status="cancelling"))
    fams = families(await m.render())
    assert store.counts == 1  # within the TTL: the last count serves
    assert {s.labels["status"]: s.value for s in fams["overnight_batches"].samples}["cancelling"] == 0
    m.batches.ttl_s = 0.0
    fams = families(await m.render())
    assert store.counts == 2
    assert {s.labels["status"]: s.value for s in fams["overnight_batches"].samples}["cancelling"] == 1
    # A store error leaves the gauge out (absent() alerts on it) and the scrape still answers.
    store.fail = True
    with caplog.at_level(logging.WARNING, logger="overnight.metrics"):
        fams = families(await m.render())
    assert "overnight_batches" not in fams and "overnight_batch_transitions" in fams
    assert "store down" in caplog.text
    store.fail = False
    assert "overnight_batches" in families(await m.render())


async def test_without_a_store_there_is_no_batch_gauge() -> None:
    c = BatchCollector(None)
    await c.refresh()
    assert [f.name for f in c.collect()] == ["overnight_batch_transitions"]


def test_engine_labels_are_bounded_and_hide_tenant_urls() -> None:
    pool = EnginePool(default_url="http://10.0.0.5:8000/v1", default_api_key=None, timeout_s=5)
    assert pool.label_of("http://10.0.0.5:8000") == "default"
    tenant = pool.label_of("https://secret-host.example:9443/v1")
    assert tenant.startswith("engine-") and "secret" not in tenant and len(tenant) == len("engine-") + 8
    assert pool.label_of("https://secret-host.example:9443") == tenant  # the base URL decides
    pool.bind("batch_x", "http://127.0.0.1:40001", label="mock-abc")
    assert pool.label_of("http://127.0.0.1:40001/v1") == "mock-abc"
    pool.unbind("batch_x")
    assert pool.label_of("http://127.0.0.1:40001") == "mock-abc"  # the engine keeps its name


async def test_gpu_seconds_and_request_counters_are_exported() -> None:
    stats = ExecutorStats()
    st = stats.requests_for("default", "/v1/embeddings")
    st.dispatched, st.retried, st.succeeded, st.failed, st.tokens_in, st.tokens_out = 5, 1, 3, 1, 40, 0
    st.latency.observe(0.2)
    runtimes = SimpleNamespace(gpu_seconds=lambda: {("local-k1", "local"): 12.5})
    m = Metrics(SimpleNamespace(store=None, runners={}, engines=None, runtimes=runtimes,
                                cfg=SimpleNamespace(stats=stats)))
    fams = families(await m.render())
    (gpu,) = fams["overnight_engine_gpu_seconds"].samples
    assert gpu.name == "overnight_engine_gpu_seconds_total"
    assert gpu.labels == {"engine": "local-k1", "runtime": "local"} and gpu.value == 12.5
    lab = {"engine": "default", "endpoint": "/v1/embeddings"}
    for fam, want in (("overnight_requests_dispatched", 5), ("overnight_requests_retried", 1),
                      ("overnight_requests_succeeded", 3), ("overnight_requests_failed", 1),
                      ("overnight_input_tokens", 40), ("overnight_output_tokens", 0)):
        (s,) = fams[fam].samples
        assert s.labels == lab and s.value == want, fam
    lat = {(s.name, s.labels.get("le")): s.value for s in fams["overnight_engine_latency_seconds"].samples}
    assert lat[("overnight_engine_latency_seconds_bucket", "0.1")] == 0
    assert lat[("overnight_engine_latency_seconds_bucket", "0.25")] == 1
    assert lat[("overnight_engine_latency_seconds_count", None)] == 1
    assert fams["overnight_checkpoint_write_seconds"].type == "histogram"
