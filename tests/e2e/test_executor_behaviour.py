"""How the executor drives a real engine process: adaptive concurrency against a
capped engine, a short queue at an engine that publishes vLLM metrics, per-batch
caps, and a million-line batch (slow)."""

from __future__ import annotations

import json
import statistics
import time

import httpx
import pytest

from tests.e2e.helpers import (
    assert_exactly_once,
    client_for,
    mock_stats,
    results,
    wait_status,
)
from tests.factories import make_input_file

# Real processes end to end: the slow CI step (the default run stays short on 2 cores).
pytestmark = pytest.mark.slow


def _run(server, tmp_path, n: int, **extension):
    client = client_for(server.url)
    with make_input_file(tmp_path / "in.jsonl", n).open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    b = client.batches.create(input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_body={"overnight": extension} if extension else None)
    return client, b


def test_adaptive_concurrency_fits_an_engine_that_refuses_beyond_its_capacity(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "20", "--max-concurrency", "8", "--max-queue", "0")
    server = cluster.server(engine_url=engine.url)
    client, b = _run(server, tmp_path, 600)
    b = wait_status(client, b.id, timeout_s=60)
    assert b.status == "completed"
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(600)})
    assert not err  # every 429 was retried, none lost
    stats = mock_stats(engine.url)
    refused = stats["by_status"].get("429", 0)
    assert stats["received_total"] == 600 + refused
    assert refused < 150  # it learned the capacity instead of hammering it


def test_the_queue_at_an_engine_with_vllm_metrics_stays_short(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "30", "--max-concurrency", "32", "--max-queue", "1000")
    server = cluster.server(engine_url=engine.url)
    client, b = _run(server, tmp_path, 4000)
    waiting: list[float] = []
    started = None
    while True:
        b = client.batches.retrieve(b.id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            break
        if b.status == "in_progress":
            started = started or time.monotonic()
            if time.monotonic() - started > 1.0:  # past the ramp
                text = httpx.get(engine.url + "/metrics", timeout=5).text
                waiting += [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith("vllm:num_requests_waiting")]
        time.sleep(0.05)
    assert b.status == "completed" and b.request_counts.completed == 4000
    assert len(waiting) >= 10
    # A fixed window of 1024 would keep ~990 waiting; the target is a few (max(4, 5% of 32)).
    assert statistics.median(waiting) <= 16, waiting


def test_a_batch_cap_holds_at_the_engine(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "10")
    server = cluster.server(engine_url=engine.url)
    client, b = _run(server, tmp_path, 300, max_concurrency=5)
    assert wait_status(client, b.id, timeout_s=60).status == "completed"
    assert mock_stats(engine.url)["max_running_seen"] <= 5


@pytest.mark.slow
@pytest.mark.timeout(900)  # as long as it waits for the batch; the suite's 120 s is for ordinary tests
def test_a_million_line_batch_runs_with_the_limit_raised_in_flat_memory(cluster, tmp_path):
    n = 1_000_000
    engine = cluster.mock_engine("--latency-ms", "0", "--max-concurrency", "256")
    server = cluster.server(engine_url=engine.url, env={"OVERNIGHT_MAX_REQUESTS_PER_FILE": str(n)})
    client, b = _run(server, tmp_path, n)
    b = wait_status(client, b.id, timeout_s=900)
    assert b.status == "completed" and b.request_counts.completed == n
    with open(f"/proc/{server.proc.pid}/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    assert peak_kb * 1024 < 300 * 1024 * 1024, f"peak RSS {peak_kb} kB"
    seen = 0
    with client.with_streaming_response.files.content(b.output_file_id) as resp:
        for line in resp.iter_lines():
            if line:
                assert json.loads(line)["response"]["status_code"] == 200
                seen += 1
    assert seen == n


def _max_running_within(engine_url: str, seconds: float) -> int:
    seen = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen = max(seen, mock_stats(engine_url)["running"])
        time.sleep(0.02)
    return seen


def test_a_fixed_concurrency_is_exactly_what_the_engine_sees(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "20")
    server = cluster.server(engine_url=engine.url)
    client, b = _run(server, tmp_path, 400, concurrency=7)
    b = wait_status(client, b.id, timeout_s=60)
    assert b.status == "completed"
    # Adaptive would start at 32 and grow on a flat-latency engine; fixed is 7, no more.
    assert mock_stats(engine.url)["max_running_seen"] == 7


def test_a_concurrency_floor_holds_from_the_first_request(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "200")
    # The adaptive limit starts at 1 here and measures each level for a while.
    server = cluster.server(engine_url=engine.url, env={"OVERNIGHT_INITIAL_CONCURRENCY": "1"})
    client, b = _run(server, tmp_path, 200, min_concurrency=12)
    wait_status(client, b.id, {"in_progress", "completed"}, timeout_s=30)
    assert _max_running_within(engine.url, 1.0) >= 12
    assert wait_status(client, b.id, timeout_s=60).status == "completed"


def test_bad_concurrency_settings_are_a_400_naming_the_field(cluster, tmp_path):
    import openai

    engine = cluster.mock_engine("--latency-ms", "0")
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    with make_input_file(tmp_path / "in.jsonl", 3).open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    for ext, param in (
        ({"concurrency": 0}, "overnight.concurrency"),
        ({"concurrency": 4, "max_concurrency": 8}, "overnight.concurrency"),
        ({"min_concurrency": 9, "max_concurrency": 8}, "overnight.min_concurrency"),
        ({"yield_to_others": "yes"}, "overnight.yield_to_others"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.batches.create(input_file_id=fobj.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", extra_body={"overnight": ext})
        assert info.value.body["param"] == param, ext


@pytest.mark.slow
def test_a_batching_engine_is_kept_full_and_the_batch_shows_its_concurrency(cluster, tmp_path):
    engine = cluster.mock_engine("--batching", "knee-16")
    server = cluster.server(engine_url=engine.url)
    client, b = _run(server, tmp_path, 1200)
    running: list[int] = []
    shown = None
    while True:
        b = client.batches.retrieve(b.id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            break
        extra = (b.model_extra or {}).get("overnight") or {}
        if extra.get("concurrency"):
            shown = extra["concurrency"]
            running.append(mock_stats(engine.url)["running"])
        time.sleep(0.05)
    assert b.status == "completed" and b.request_counts.completed == 1200
    assert shown is not None and shown["limit"] >= 1 and shown["mode"] in ("startup", "cruise", "probe_up",
                                                                             "probe_down")
    # The engine runs 16 at once at most; it should be full most of the time
    # (the old latency-driven law let it sink to a few).
    assert statistics.median(running) >= 14, running
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert 'overnight_engine_concurrency_limit{engine="default"}' in metrics
