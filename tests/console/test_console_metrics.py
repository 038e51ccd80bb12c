"""The console's metrics on ``/metrics`` of ``overnight serve``, and of ``overnight
console`` as its own process, scraped before, during and after real jobs with the
``fake`` provider: every console family moves the way its job did, and no label
names a job, a provision or a tenant."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Cluster
from tests.console.test_console_e2e import Console
from tests.console.test_console_process import SplitConsole
from tests.factories import make_input_file

# Many processes and seconds each: in the slow CI step (.ci/run); the default run keeps the core console tests.
pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(url + "/metrics", timeout=10).raise_for_status().text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_metric(url: str, name: str, want: float, timeout_s: float = 20, **labels: str) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        s = scrape(url)
        if value(s, name, **labels) == want or time.monotonic() > deadline:
            assert value(s, name, **labels) == want, (name, labels, value(s, name, **labels))
            return s
        time.sleep(0.2)


@pytest.fixture
def console(cluster: Cluster, tmp_path: Path):
    c = Console(cluster, tmp_path)
    yield c
    cluster.close()
    left = c.clean_up()
    assert not left, left


def test_console_metrics_move_with_the_jobs(console: Console) -> None:
    # The provider takes a second to be ready and fails the first two releases.
    server = console.start(OVERNIGHT_FAKE_PROVIDER_DELAY_S="1", OVERNIGHT_FAKE_FAIL_RELEASE="2",
                           OVERNIGHT_FAKE_PROVIDER_PRICE_PER_HOUR="1.0")
    url = server.url
    before = scrape(url)
    assert value(before, "overnight_console_live_resources", provider="fake") == 0
    assert value(before, "overnight_console_jobs", status="queued") == 0
    with console.http() as c:
        # One job whose requests take a minute (held in progress), one that runs through.
        slow_path = make_input_file(console.tmp / "slow.jsonl", 2, model="tiny", mock={"sleep_ms": 60_000})
        fid = c.post("/api/v1/files/upload", files={"file": ("slow.jsonl", slow_path.read_bytes())},
                     data={"purpose": "batch"}).raise_for_status().json()["id"]
        slow = c.post("/api/v1/jobs", json={"input_dataset": fid, "endpoint": "/v1/chat/completions",
                                            "model_template_name": "tiny"}).raise_for_status().json()
        console.wait(c, slow["id"], {"in_progress"})
        during = wait_metric(url, "overnight_console_jobs", 1, status="in_progress")
        assert value(during, "overnight_console_live_resources", provider="fake") == 1
        assert value(during, "overnight_console_provision_latency_seconds_count", provider="fake") == 1

        fast = console.job(c, 5)
        done = console.wait(c, fast["id"])
        assert done["status"] == "completed", done
        c.post(f"/api/v1/jobs/{slow['id']}/cancel").raise_for_status()
        assert console.wait(c, slow["id"])["status"] == "cancelled"
        released = [console.wait_released(c, j["id"]) for j in (fast, slow)]

    after = wait_metric(url, "overnight_console_live_resources", 0, provider="fake")
    for status in ("queued", "resource_preparing", "submitting", "in_progress", "cancelling"):
        assert value(after, "overnight_console_jobs", status=status) == 0
    assert value(after, "overnight_console_jobs_finished_total", status="completed") == 1
    assert value(after, "overnight_console_jobs_finished_total", status="cancelled") == 1
    assert value(after, "overnight_console_jobs_finished_total", status="failed") == 0
    # Both provisions were ready after the provider's one-second delay.
    assert value(after, "overnight_console_provision_latency_seconds_count", provider="fake") == 2
    assert value(after, "overnight_console_provision_latency_seconds_sum", provider="fake") >= 2 * 1.0
    assert value(after, "overnight_console_provision_latency_seconds_bucket", provider="fake", le="0.5") == 0
    assert value(after, "overnight_console_provision_latency_seconds_bucket", provider="fake", le="+Inf") == 2
    # The two failed releases, each retried until confirmed.
    assert value(after, "overnight_console_release_failures_total", provider="fake") == 2
    assert sum(e["type"] == "release_failed" for j in released for e in j["events"]) == 2
    # GPU-seconds: exactly what the two jobs' costs say.
    costs = sum(j["cost"]["gpu_seconds"] for j in released)
    assert costs > 0
    assert value(after, "overnight_console_gpu_seconds_total", provider="fake") == pytest.approx(costs, abs=1e-6)
    # No label value names a job, a provision, a file or a tenant.
    ids = {fast["id"], slow["id"], fid, *(j["provision_id"] for j in released)}
    for (_name, labels) in after:
        assert not {v for _k, v in labels} & ids
        assert not any(v.startswith(("job_", "prov_", "file-")) for _k, v in labels), labels


def test_no_console_families_when_the_console_is_off(cluster: Cluster) -> None:
    server = cluster.server(engine_url=None, env={"OVERNIGHT_CONSOLE": "false"})
    names = {name for name, _ in scrape(server.url)}
    assert not [n for n in names if n.startswith("overnight_console_")], names
    assert "overnight_batches" in names  # the batches' own families are there as ever


@pytest.fixture
def split(cluster: Cluster, tmp_path: Path):
    c = SplitConsole(cluster, tmp_path)
    yield c
    cluster.close()
    left = c.clean_up()
    assert not left, left


def test_the_console_process_exports_the_console_metrics_of_its_own_planner(split: SplitConsole) -> None:
    """``overnight console`` against ``overnight serve``: the console process's
    ``/metrics`` has every console family, moved by the job its planner ran, with
    the names and labels ``serve`` uses, and no batch family (the batches service's)."""
    split.start(OVERNIGHT_FAKE_PROVIDER_DELAY_S="1", OVERNIGHT_FAKE_FAIL_RELEASE="1",
                OVERNIGHT_FAKE_PROVIDER_PRICE_PER_HOUR="1.0")
    url = split.server.url
    before = scrape(url)
    assert value(before, "overnight_console_live_resources", provider="fake") == 0
    assert ("overnight_console_live_resources", (("provider", "fake"),)) in before  # a 0 sample, not none
    for status in ("queued", "resource_preparing", "submitting", "in_progress"):
        assert ("overnight_console_jobs", (("status", status),)) in before
    with split.http() as c:
        # Three requests of 4 s each: the job stays in progress long enough to be scraped there.
        path = make_input_file(split.tmp / "slow.jsonl", 3, model="tiny", mock={"sleep_ms": 4000})
        fid = c.post("/api/v1/files/upload", files={"file": ("slow.jsonl", path.read_bytes())},
                     data={"purpose": "batch"}).raise_for_status().json()["id"]
        j = c.post("/api/v1/jobs", json={"input_dataset": fid, "endpoint": "/v1/chat/completions",
                                         "model_template_name": "tiny"}).raise_for_status().json()
        split.wait(c, j["id"], {"in_progress"})
        during = wait_metric(url, "overnight_console_jobs", 1, status="in_progress")
        assert value(during, "overnight_console_live_resources", provider="fake") == 1
        assert value(during, "overnight_console_provision_latency_seconds_count", provider="fake") == 1
        done = split.wait(c, j["id"])
        assert done["status"] == "completed", done
        done = split.wait_released(c, j["id"])
    after = wait_metric(url, "overnight_console_live_resources", 0, provider="fake")
    for status in ("queued", "resource_preparing", "submitting", "validating", "in_progress", "finalizing"):
        assert value(after, "overnight_console_jobs", status=status) == 0
    assert value(after, "overnight_console_jobs_finished_total", status="completed") == 1
    assert value(after, "overnight_console_provision_latency_seconds_count", provider="fake") == 1
    assert value(after, "overnight_console_provision_latency_seconds_sum", provider="fake") >= 1.0
    assert value(after, "overnight_console_provision_latency_seconds_bucket", provider="fake", le="0.5") == 0
    assert value(after, "overnight_console_release_failures_total", provider="fake") == 1
    assert [e["type"] for e in done["events"]].count("release_failed") == 1
    assert done["cost"]["gpu_seconds"] > 0
    assert value(after, "overnight_console_gpu_seconds_total", provider="fake") == pytest.approx(
        done["cost"]["gpu_seconds"], abs=1e-6)
    names = {name for name, _ in after}
    assert "process_resident_memory_bytes" in names
    ours = {n for n in names if n.startswith("overnight_")}
    assert ours and all(n.startswith("overnight_console_") for n in ours), ours  # no batch or engine family
    ids = {j["id"], fid, done["provision_id"], done["batch_id"]}
    for (_name, labels) in after:
        assert not {v for _k, v in labels} & ids, labels
    # The batches service's /metrics has the batch, and no console family (its console is off).
    assert split.mds is not None
    mds = scrape(split.mds.url)
    assert value(mds, "overnight_batch_transitions_total", status="completed") == 1
    assert not [n for n, _ in mds if n.startswith("overnight_console_")]
