"""``/metrics`` of a real ``overnight serve`` while a batch runs through it and after.

The batch runs on the built-in mock engine (``engine_url=None``), with lines the
engine answers slowly (so a scrape sees requests in flight), lines it fails once
(retried, then succeed) and lines it refuses with 400 (failed for good).
"""

from __future__ import annotations

import time
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from overnight.metrics import METRIC_NAMES
from tests.e2e.helpers import TERMINAL, client_for, results
from tests.factories import request_line, write_lines

# Real processes end to end: the slow CI step (the default run stays short on 2 cores).
pytestmark = pytest.mark.slow

ENDPOINT = "/v1/chat/completions"
OK, RETRIED, REFUSED = 80, 8, 6


def scrape(url: str) -> dict[str, list]:
    """Family name -> its samples (name, labels, value)."""
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200
    fams: dict[str, list] = defaultdict(list)
    for fam in text_string_to_metric_families(r.text):
        fams[fam.name].extend(fam.samples)
    return fams


def value(fams: dict[str, list], sample: str, **labels: str) -> float:
    """The one sample named ``sample`` whose labels include ``labels`` (0 when absent)."""
    family = sample.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
    hits = [s for s in fams.get(family, []) if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) <= 1, hits
    return hits[0].value if hits else 0.0


def _input(path):
    lines = [request_line(i, mock={"sleep_ms": 150}) for i in range(OK)]
    # Each fails once with 500 (retried), then succeeds: one retry apiece.
    lines += [request_line(OK + i, content=f"flaky {i}", mock={"fail_times": 1}) for i in range(RETRIED)]
    # 400 is not retried: failed for good.
    lines += [request_line(OK + RETRIED + i, mock={"status": 400}) for i in range(REFUSED)]
    return write_lines(path, lines)


def test_metrics_follow_a_batch_through_serve(cluster, tmp_path):
    server = cluster.server(engine_url=None)
    client = client_for(server.url)
    before = scrape(server.url)
    assert value(before, "overnight_requests_dispatched_total", engine="default", endpoint=ENDPOINT) == 0
    with _input(tmp_path / "in.jsonl").open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    b = client.batches.create(input_file_id=fobj.id, endpoint=ENDPOINT, completion_window="24h",
                              extra_body={"overnight": {"concurrency": 4}})
    total = OK + RETRIED + REFUSED

    # During: requests on the wire, counters moving, the batch counted in_progress.
    seen_inflight = seen_engine_inflight = seen_in_progress = 0.0
    dispatched: list[float] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        b = client.batches.retrieve(b.id)
        if b.status in TERMINAL:
            break
        fams = scrape(server.url)
        seen_inflight = max(seen_inflight, value(fams, "overnight_requests_inflight"))
        seen_engine_inflight = max(seen_engine_inflight,
                                   value(fams, "overnight_engine_requests_inflight", engine="default"))
        seen_in_progress = max(seen_in_progress, value(fams, "overnight_batches", status="in_progress"))
        dispatched.append(value(fams, "overnight_requests_dispatched_total", engine="default", endpoint=ENDPOINT))
        time.sleep(0.1)
    assert b.status == "completed", b
    assert 1 <= seen_inflight <= 4 and 1 <= seen_engine_inflight <= 4
    assert seen_in_progress == 1
    assert len(set(dispatched)) >= 3 and dispatched == sorted(dispatched)  # moved, and only up

    # After: the counts add up to the batch's, and nothing is in flight.
    assert (b.request_counts.completed, b.request_counts.failed, b.request_counts.total) == (
        OK + RETRIED, REFUSED, total)
    deadline = time.monotonic() + 10
    while True:
        fams = scrape(server.url)
        if value(fams, "overnight_batches", status="in_progress") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    lab = {"engine": "default", "endpoint": ENDPOINT}
    succeeded = value(fams, "overnight_requests_succeeded_total", **lab)
    failed = value(fams, "overnight_requests_failed_total", **lab)
    assert (succeeded, failed) == (b.request_counts.completed, b.request_counts.failed)
    assert succeeded + failed == b.request_counts.total
    assert value(fams, "overnight_requests_retried_total", **lab) == RETRIED
    assert value(fams, "overnight_requests_dispatched_total", **lab) == total + RETRIED
    assert value(fams, "overnight_engine_latency_seconds_count", **lab) == total + RETRIED
    slow = value(fams, "overnight_engine_latency_seconds_bucket", le="0.1", **lab)
    assert value(fams, "overnight_engine_latency_seconds_bucket", le="+Inf", **lab) == total + RETRIED
    assert slow <= total + RETRIED - OK  # the 150 ms answers are above 0.1 s
    assert value(fams, "overnight_engine_latency_seconds_sum", **lab) >= OK * 0.15
    assert value(fams, "overnight_requests_inflight") == 0
    assert value(fams, "overnight_engine_requests_inflight", engine="default") == 0
    assert value(fams, "overnight_engine_concurrency_limit", engine="default") >= 1
    assert value(fams, "overnight_checkpoint_write_seconds_count") >= 1
    assert value(fams, "overnight_batches", status="in_progress") == 0
    assert value(fams, "overnight_batch_transitions_total", status="validating") >= 1
    assert value(fams, "overnight_batch_transitions_total", status="completed") >= 1

    # Tokens: what the engine reported in each output line's usage.
    out, err = results(client, b)
    assert len(out) == OK + RETRIED and len(err) == REFUSED
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)
    assert completion > 0 and prompt > 0
    assert value(fams, "overnight_input_tokens_total", **lab) == prompt
    assert value(fams, "overnight_output_tokens_total", **lab) == completion

    # Every family the module documents is exposed, and no label value names a batch or file.
    assert {n.removesuffix("_total") for n in METRIC_NAMES} <= set(fams)
    ids = {b.id, b.id.split("_", 1)[1], fobj.id, b.output_file_id, b.error_file_id}
    for samples in fams.values():
        for s in samples:
            for v in s.labels.values():
                assert not any(i and i in v for i in ids), (s.name, s.labels)
                assert not v.startswith(("batch_", "file-")), (s.name, s.labels)
