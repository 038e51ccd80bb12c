"""The vLLM /metrics signal: parsing, polling a fake /metrics, and what it does to the limit."""

from __future__ import annotations

import asyncio

from overnight.errors import RetryableEngineError
from overnight.executor.engine_metrics import MetricsProbe, parse_engine_load
from overnight.executor.limiter import AdaptiveLimit, ConcurrencyLimits, EngineLoad

VLLM_TEXT = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 200.0
vllm:num_requests_running{engine="1",model_name="m"} 56.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 30.0 1712345678000
vllm:num_requests_waiting{engine="1",model_name="m"} 10.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 999.0
vllm:kv_cache_usage_perc{model_name="m"} 0.5
"""


def test_parse_sums_label_sets_and_ignores_other_metrics() -> None:
    load = parse_engine_load(VLLM_TEXT)
    assert load is not None and (load.running, load.waiting) == (256.0, 40.0)


def test_parse_without_labels_and_without_the_waiting_metric() -> None:
    both = b"vllm:num_requests_running 3\nvllm:num_requests_waiting 1\n"
    assert parse_engine_load(both) == EngineLoad(3.0, 1.0, None, None)
    assert parse_engine_load(b"vllm:num_requests_running 3\n") is None
    assert parse_engine_load(b"") is None


def test_parse_reads_kv_cache_and_preemptions_under_old_and_new_names() -> None:
    assert parse_engine_load(VLLM_TEXT) == EngineLoad(256.0, 40.0, 0.5, None)
    old = b"vllm:num_requests_running 3\nvllm:num_requests_waiting 1\nvllm:gpu_cache_usage_perc 0.9\n" \
          b"vllm:num_preemptions_total 7\n"
    assert parse_engine_load(old) == EngineLoad(3.0, 1.0, 0.9, 7.0)


def test_parse_reads_sglang_metrics() -> None:
    text = b"""# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",tp_rank="0"} 12.0
sglang:num_queue_reqs{model_name="m",tp_rank="0"} 3.0
sglang:token_usage{model_name="m",tp_rank="0"} 0.42
sglang:gen_throughput{model_name="m"} 1234.5
"""
    assert parse_engine_load(text) == EngineLoad(12.0, 3.0, 0.42, None)


def test_parse_ignores_nan_negative_and_infinite_values() -> None:
    text = b"vllm:num_requests_running NaN\nvllm:num_requests_waiting -4\nvllm:num_requests_waiting +Inf\n" \
           b"vllm:num_requests_waiting 2\n"
    assert parse_engine_load(text) == EngineLoad(0.0, 2.0, None, None)


class FakeMetrics:
    """A fake ``GET /metrics``: answers from a list of (status, text) or raises."""

    def __init__(self, answers) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self, path: str) -> tuple[int, bytes]:
        assert path == "/metrics"
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _metrics(running: int, waiting: int) -> tuple[int, bytes]:
    return 200, b"vllm:num_requests_running %d\nvllm:num_requests_waiting %d\n" % (running, waiting)


async def test_probe_feeds_the_queue_to_the_limit() -> None:
    limit = AdaptiveLimit(ConcurrencyLimits(initial=600, max=10_000))
    probe = MetricsProbe(FakeMetrics([_metrics(256, 344)]), limit, active=lambda: True, inflight=lambda: 600)
    assert await probe.poll_once()
    assert probe.supported and limit.metrics_fresh()
    assert (limit.running, limit.waiting) == (256.0, 344.0)


async def test_probe_leaves_a_short_queue_alone() -> None:
    limit = AdaptiveLimit(ConcurrencyLimits(initial=300, max=10_000))
    fake = FakeMetrics([_metrics(256, 44)])
    probe = MetricsProbe(fake, limit, active=lambda: True, inflight=lambda: 300)
    await probe.poll_once()
    # 44 waiting is within twice the target (25.6): no cut on one sample; the
    # epoch's average decides (test_limiter.py)
    assert limit.value == 300


async def test_probe_sends_samples_to_its_sink() -> None:
    limit = AdaptiveLimit()
    seen = []
    probe = MetricsProbe(FakeMetrics([_metrics(5, 1)]), limit, active=lambda: True, inflight=lambda: 6,
                         sink=lambda load, inflight: seen.append((load, inflight)))
    assert await probe.poll_once()
    assert seen == [(EngineLoad(5.0, 1.0, None, None), 6)]


async def test_engine_without_vllm_metrics_is_not_polled_again_soon() -> None:
    limit = AdaptiveLimit()
    fake = FakeMetrics([(404, b"not found")])
    probe = MetricsProbe(fake, limit, active=lambda: True, interval_s=0.01, retry_unsupported_s=60)
    probe.start()
    await asyncio.sleep(0.1)
    await probe.stop()
    assert fake.calls == 1 and probe.supported is False
    assert not limit.metrics_fresh()


async def test_unreachable_metrics_are_not_a_signal() -> None:
    limit = AdaptiveLimit()
    probe = MetricsProbe(FakeMetrics([RetryableEngineError("down", code="engine_unreachable")]), limit,
                         active=lambda: True)
    assert not await probe.poll_once()
    assert limit.cuts == 0


async def test_probe_polls_only_while_batches_use_the_engine() -> None:
    busy = False
    fake = FakeMetrics([_metrics(1, 0)])
    probe = MetricsProbe(fake, AdaptiveLimit(), active=lambda: busy, interval_s=0.01)
    probe.start()
    await asyncio.sleep(0.05)
    assert fake.calls == 0
    busy = True
    await asyncio.sleep(0.05)
    await probe.stop()
    assert fake.calls >= 2
