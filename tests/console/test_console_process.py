"""``overnight console`` as its own process, against ``overnight serve`` as the
batches service ("MDS", its own console off) that it reaches only through the
OpenAI-compatible API. The ``fake`` provider's resources are mock engines the
console process starts on this host, which MDS's batches then call. After every
test the provider holds no live resource."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from overnight.batches.service import BatchCreate, batch_id_for_job
from overnight.errors import ConflictError
from tests.cli.test_missing_extras import _run_without
from tests.conftest import FAST_ENV, Cluster, Proc, free_port
from tests.console import test_console_e2e as e2e
from tests.factories import make_input_file

# Many processes and seconds each: in the slow CI step (.ci/run); the default run keeps the core console tests.
pytestmark = pytest.mark.slow

PLANNER_ENV = {"OVERNIGHT_PLANNER_TICK_S": "0.2", "OVERNIGHT_PLANNER_POLL_S": "0.2"}


def start_console(cluster: Cluster, *, mds_url: str, data_dir: Path, templates_dir: Path,
                  env: dict[str, str] | None = None, port: int | None = None) -> Proc:
    """``overnight console`` as a process (as ``Cluster.server`` starts ``serve``)."""
    port = port or free_port()
    args = [sys.executable, "-m", "overnight.cli.main", "console", "--port", str(port), "--data-dir", str(data_dir),
            "--metadata-service-url", mds_url, "--templates-dir", str(templates_dir)]
    p = Proc(args, port, {**os.environ, **FAST_ENV, **PLANNER_ENV, **(env or {})}, cluster.tmp / f"console-{port}.log")
    cluster.procs.append(p)
    return p.start()


class SplitConsole(e2e.Console):
    """The e2e helper (jobs, waits, ``live_resources``) with the console in its own
    process: ``self.server`` is the console, ``self.mds`` the batches service."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        super().__init__(cluster, tmp)
        self.data = tmp / "console-data"  # the fake provider's state: live_resources reads it
        self.mds_data = tmp / "mds-data"
        self.mds_port = free_port()
        self.mds: Proc | None = None
        self.mds_env: dict[str, str] = {}

    def start_mds(self, **env: str) -> Proc:
        self.mds_env = env or self.mds_env
        self.mds = self.cluster.server(engine_url=None, data_dir=self.mds_data, port=self.mds_port,
                                       env={"OVERNIGHT_CONSOLE": "false", **self.mds_env})
        return self.mds

    def start(self, **env: str) -> Proc:
        if self.mds is None:
            self.start_mds()
        assert self.mds is not None
        self.server = start_console(self.cluster, mds_url=self.mds.url, data_dir=self.data, templates_dir=self.tdir,
                                    env=env)
        return self.server

    def mds_http(self, key: str = "k") -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.mds_port}", headers={"Authorization": f"Bearer {key}"},
                            timeout=30)


@pytest.fixture
def console(cluster: Cluster, tmp_path: Path):
    c = SplitConsole(cluster, tmp_path)
    yield c
    cluster.close()
    left = c.clean_up()
    assert not left, left


types = e2e._types


def test_a_job_runs_its_whole_life_through_the_console_process(console: SplitConsole) -> None:
    console.start(OVERNIGHT_FAKE_PROVIDER_PRICE_PER_HOUR="3.6")
    with console.http() as c, console.mds_http() as m:
        j = console.job(c, 50, metadata={"team": "a"})
        # the input went through the console's proxy to MDS, where files live
        f = m.get(f"/v1/files/{j['input_dataset']}")
        assert f.status_code == 200 and f.json()["purpose"] == "batch"
        done = console.wait(c, j["id"])
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
        done = console.wait_released(c, j["id"])
        t = types(done)
        for name in ("queued", "provision_requested", "provision_ready", "batch_created", "in_progress", "completed",
                     "release_requested", "release_confirmed"):
            assert name in t, (name, t)
        assert t.index("batch_created") < t.index("completed") < t.index("release_confirmed")
        assert done["cost"]["usd"] is not None and done["usage"]["total_tokens"] > 0
        # the batch is an ordinary batch of the same tenant at MDS, named by the job
        b = m.get(f"/v1/batches/{done['batch_id']}").json()
        assert b["status"] == "completed" and b["metadata"]["overnight_job_id"] == j["id"]
        assert b["id"] == batch_id_for_job("anonymous", j["id"])
        assert [x["id"] for x in console.batches_of(m, j["id"])] == [b["id"]]
        # the output, through the console's proxy, is MDS's file byte for byte
        out = c.get(f"/api/v1/files/{done['output_dataset']}/content")
        assert out.status_code == 200 and len(out.text.splitlines()) == 50
        assert out.content == m.get(f"/v1/files/{done['output_dataset']}/content").content
        assert "attachment" in out.headers["content-disposition"]
        assert int(out.headers["content-length"]) == len(out.content)
        # the console keeps no batches or files; MDS runs no console
        assert c.get("/v1/batches").status_code == 404
        assert not (console.data / "files").exists()
        assert m.get("/api/v1/jobs").status_code == 404
        health = c.get("/health").json()
        assert health["role"] == "console" and health["metadata_service"] == console.mds.url
        assert 'overnight_console_jobs{status="in_progress"} 0.0' in c.get("/metrics").text


def test_an_input_dataset_is_checked_at_the_batches_service(console: SplitConsole) -> None:
    console.start(OVERNIGHT_MAX_INPUT_BYTES=str(10 << 20))
    with console.http() as c, console.mds_http() as m:
        # Past the edge's JSON limit and the spool's memory part: streamed, spooled to disk, sent on whole.
        big = make_input_file(console.tmp / "big.jsonl", 58_000, model="tiny").read_bytes()
        assert 8 << 20 < len(big) < 10 << 20
        up = c.post("/api/v1/files/upload", files={"file": ("big.jsonl", big)}, data={"purpose": "batch"})
        assert up.status_code == 200, up.text
        assert up.json()["bytes"] == len(big) and up.json()["filename"] == "big.jsonl"
        assert m.get(f"/v1/files/{up.json()['id']}/content").content == big
        r = c.post("/api/v1/files/upload", files={"file": ("big.jsonl", big + big[:2 << 20])}, data={"purpose": "batch"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "file_too_large"
        assert len(m.get("/v1/files").json()["data"]) == 1  # the refused one never reached MDS
        base = {"endpoint": "/v1/chat/completions", "model_template_name": "tiny"}
        r = c.post("/api/v1/jobs", json={"input_dataset": "file-nope", **base})
        assert r.status_code == 404 and "file-nope" in r.json()["error"]["message"]
        up = c.post("/api/v1/files/upload", files={"file": ("notes.txt", b"hi")}, data={"purpose": "user_data"})
        assert up.status_code == 200 and up.json()["purpose"] == "user_data"
        r = c.post("/api/v1/jobs", json={"input_dataset": up.json()["id"], **base})
        assert r.status_code == 400 and "'batch'" in r.text and r.json()["error"]["param"] == "input_dataset"
        # the proxy's own checks, before anything reaches MDS
        r = c.post("/api/v1/files/upload", files={"file": ("x.jsonl", b"{}")}, data={"purpose": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
        r = c.post("/api/v1/files/upload", data={"purpose": "batch"}, files={"other": ("x", b"1")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "other"
        assert c.get("/api/v1/files/file-nope/content").status_code == 404
        assert c.get("/api/v1/jobs").json()["data"] == []


def test_cancel_while_the_batch_runs_cancels_it_at_the_batches_service(console: SplitConsole) -> None:
    console.start(OVERNIGHT_FAKE_PROVIDER_LATENCY_MS="200")
    with console.http() as c, console.mds_http() as m:
        j = console.job(c, 3000, name="slow")
        console.wait(c, j["id"], {"in_progress"})
        assert c.post(f"/api/v1/jobs/{j['id']}/cancel").status_code == 200
        done = console.wait(c, j["id"])
        assert done["status"] == "cancelled"
        b = m.get(f"/v1/batches/{done['batch_id']}").json()
        assert b["status"] == "cancelled" and b["request_counts"]["completed"] < 3000
        done = console.wait_released(c, j["id"])
        assert types(done).index("cancel_requested") < types(done).index("release_confirmed")


def test_the_console_killed_mid_batch_finishes_the_job_with_one_batch(console: SplitConsole) -> None:
    env = {"OVERNIGHT_FAKE_PROVIDER_LATENCY_MS": "300"}
    proc = console.start(**env)
    with console.http() as c:
        j = console.job(c, 1500)
        console.wait(c, j["id"], {"in_progress"})
    proc.signal(signal.SIGKILL)
    console.start(**env)
    with console.http() as c, console.mds_http() as m:
        done = console.wait(c, j["id"], timeout_s=90)
        assert done["status"] == "completed", done
        assert len(console.batches_of(m, j["id"])) == 1
        ids = [json.loads(x)["custom_id"] for x in
               c.get(f"/api/v1/files/{done['output_dataset']}/content").text.splitlines()]
        assert len(ids) == len(set(ids)) == 1500
        console.wait_released(c, j["id"])
    assert len(list((console.data / "fake-provider").glob("*.json"))) == 1  # one resource, never a second


def test_cancel_while_submitting_cancels_the_batch_at_the_batches_service(console: SplitConsole) -> None:
    e2e.check_cancel_while_submitting(console, console.mds_http)


def test_cancel_while_submitting_to_a_batches_service_that_is_down_creates_no_batch(console: SplitConsole) -> None:
    """The job waits in ``submitting`` for the batches service (down); a cancel then
    ends it once the service answers that no batch was made, without making one."""
    console.start(OVERNIGHT_FAKE_PROVIDER_DELAY_S="3")
    assert console.mds is not None
    with console.http() as c:
        j = console.job(c)
        console.wait(c, j["id"], {"resource_preparing"})
        console.mds.signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "batches_unavailable" not in types(job := c.get(f"/api/v1/jobs/{j['id']}").json()):
            assert time.monotonic() < deadline, job["events"]
            time.sleep(0.2)
        assert job["status"] == "submitting", job
        r = c.post(f"/api/v1/jobs/{j['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "submitting", r.json()
        time.sleep(2)  # the planner cannot tell whether a batch exists: it waits
        assert c.get(f"/api/v1/jobs/{j['id']}").json()["status"] == "submitting"
        console.start_mds()
        done = console.wait(c, j["id"], timeout_s=90)
        assert done["status"] == "cancelled" and done["batch_id"] is None, done
        assert "batch_created" not in types(done)
        with console.mds_http() as m:
            assert console.batches_of(m, j["id"]) == []
        console.wait_released(c, j["id"])
    assert console.live_resources() == []


def test_the_console_killed_while_submitting_finds_its_batch_after_a_restart(console: SplitConsole) -> None:
    e2e.check_killed_while_submitting(console, console.mds_http)


@pytest.mark.parametrize("stage", ["resource_preparing", "in_progress"])
def test_the_batches_service_down_for_a_while_is_waited_for(console: SplitConsole, stage: str) -> None:
    """MDS killed while the job is being provisioned (so the batch create meets it
    down) or while its batch runs (so the follow does): the planner backs off and
    the job completes once MDS is back, with one batch."""
    # Long enough that MDS is down before the batch is created / before it ends, even on a busy machine.
    env = {"OVERNIGHT_FAKE_PROVIDER_DELAY_S": "3"} if stage == "resource_preparing" else \
        {"OVERNIGHT_FAKE_PROVIDER_LATENCY_MS": "300"}
    console.start(**env)
    assert console.mds is not None
    with console.http() as c:
        j = console.job(c, 20 if stage == "resource_preparing" else 1500)
        console.wait(c, j["id"], {stage})
        console.mds.signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "batches_unavailable" not in types(job := c.get(f"/api/v1/jobs/{j['id']}").json()):
            assert time.monotonic() < deadline, job["events"]
            time.sleep(0.2)
        assert job["status"] in ("submitting", "in_progress"), job
        # the console answers what needs MDS with 503, and the rest as usual
        up = c.post("/api/v1/files/upload", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"})
        assert up.status_code == 503 and "unreachable" in up.json()["error"]["message"]
        assert c.get("/api/v1/jobs").status_code == 200
        time.sleep(3)  # a while: several attempts
        job = c.get(f"/api/v1/jobs/{j['id']}").json()
        assert job["status"] not in e2e.TERMINAL, job
        event = [e for e in job["events"] if e["type"] == "batches_unavailable"]
        assert len(event) == 1 and event[0]["attempts"] >= 2 and "unreachable" in event[0]["message"]
        console.start_mds()
        done = console.wait(c, j["id"], timeout_s=90)
        assert done["status"] == "completed", done
        with console.mds_http() as m:
            assert len(console.batches_of(m, j["id"])) == 1
        console.wait_released(c, j["id"])


async def test_a_create_repeated_after_a_crash_returns_the_first_batch(cluster: Cluster, tmp_path: Path) -> None:
    """The planner's exactly-once submit over the API: a console that created the
    batch and died before noting it creates it again and gets the same batch."""
    from overnight.console.remote import RemoteBatches

    mds = cluster.server(engine_url=None, data_dir=tmp_path / "mds", env={"OVERNIGHT_CONSOLE": "false"})
    path = make_input_file(tmp_path / "in.jsonl", 5, model="m")
    fid = httpx.post(mds.url + "/v1/files", files={"file": ("in.jsonl", path.read_bytes())},
                     data={"purpose": "batch"}).json()["id"]
    body = BatchCreate(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h",
                       metadata={"overnight_job_id": "job_1"}, extension={"priority": 1})
    first = RemoteBatches(mds.url, keys={})
    a = await first.create(tenant="anonymous", job_id="job_1", body=body)
    await first.aclose()  # "crashed" before noting a.id
    again = RemoteBatches(mds.url, keys={})
    b = await again.create(tenant="anonymous", job_id="job_1", body=body)
    assert a.id == b.id == batch_id_for_job("anonymous", "job_1")
    assert (await again.find(tenant="anonymous", job_id="job_1")).id == a.id
    assert await again.find(tenant="anonymous", job_id="job_2") is None
    deadline = time.monotonic() + 30
    while (view := await again.get(tenant="anonymous", batch_id=a.id)).status != "completed":
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.1)
    assert (view.total, view.completed) == (5, 5) and view.in_progress_at and view.finalizing_at
    assert view.output_file_id and view.usage and view.usage["total_tokens"] > 0
    with pytest.raises(ConflictError):  # MDS's 409: a completed batch cannot be cancelled
        await again.cancel(tenant="anonymous", batch_id=a.id)
    await again.aclose()
    listed = httpx.get(mds.url + "/v1/batches").json()["data"]
    assert [x["id"] for x in listed] == [a.id]


def test_tenants_are_isolated_and_each_acts_at_the_batches_service_as_itself(console: SplitConsole) -> None:
    # The console's users' keys (ka, kb) are not MDS's (ma, mb): the console acts at
    # MDS with its own key per tenant. carol's MDS key is bob's: a misconfiguration.
    console.start_mds(OVERNIGHT_API_KEYS="ma:alice,mb:bob", OVERNIGHT_ALLOWED_ENDPOINTS="127.0.0.0/8")
    console.start(OVERNIGHT_API_KEYS="ka:alice,kb:bob,kc:carol,kd:dave",
                  OVERNIGHT_CONSOLE_MDS_KEYS="alice:ma,bob:mb,carol:mb,dave:wrong")
    with console.http("ka") as a, console.http("kb") as b:
        j = console.job(a)
        assert b.get(f"/api/v1/jobs/{j['id']}").status_code == 404
        assert b.post(f"/api/v1/jobs/{j['id']}/cancel").status_code == 404
        assert b.get("/api/v1/jobs").json()["data"] == []
        assert b.get(f"/api/v1/files/{j['input_dataset']}/content").status_code == 404
        r = b.post("/api/v1/jobs", json={"input_dataset": j["input_dataset"], "endpoint": "/v1/chat/completions",
                                         "model_template_name": "tiny"})
        assert r.status_code == 404 and j["input_dataset"] in r.text
        for path in ("/api/v1/jobs", "/api/v1/catalog", "/api/v1/models"):
            assert httpx.get(console.server.url + path).status_code == 401
        assert httpx.post(console.server.url + "/api/v1/files/upload", files={"file": ("x", b"1")},
                          headers={"Authorization": "Bearer ma"}).status_code == 401  # an MDS key is not a console key
        assert httpx.get(console.server.url + "/health").status_code == 200
        done = console.wait(a, j["id"])
        assert done["status"] == "completed", done
        console.wait_released(a, j["id"])
        # at MDS the batch is alice's, through the official SDK as alice would see it
        sdk = openai.OpenAI(base_url=console.mds.url + "/v1", api_key="ma")
        batch = sdk.batches.retrieve(done["batch_id"])
        assert batch.metadata["overnight_job_id"] == j["id"] and batch.id == batch_id_for_job("alice", j["id"])
        assert len(sdk.files.content(done["output_dataset"]).text.splitlines()) == 20
        with pytest.raises(openai.NotFoundError):
            openai.OpenAI(base_url=console.mds.url + "/v1", api_key="mb").batches.retrieve(done["batch_id"])
    with console.http("kc") as carol:
        # bob's key for carol: MDS files carol's batch as bob's; the console notices, takes it back, fails the job
        j = console.job(carol)
        done = console.wait(carol, j["id"])
        assert done["status"] == "submit_failed" and "another tenant than 'carol'" in done["error_message"]
        assert "OVERNIGHT_CONSOLE_MDS_KEYS" in done["error_message"]
        console.wait_released(carol, j["id"])
        with console.mds_http("mb") as m:
            [stray] = m.get("/v1/batches").json()["data"]
            assert stray["id"] == batch_id_for_job("bob", j["id"]) and stray["status"] in ("cancelling", "cancelled")
    with console.http("kd") as dave:
        # a key MDS refuses: 503 naming the setting, not a 401 for the user (whose own key is fine)
        r = dave.post("/api/v1/files/upload", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"})
        assert r.status_code == 503 and "OVERNIGHT_CONSOLE_MDS_KEYS" in r.json()["error"]["message"]
        assert "'dave'" in r.json()["error"]["message"]


def _console_cli(*args: str, env: dict[str, str] | None = None, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overnight.cli.main", "console", "--data-dir", str(tmp), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if "METADATA_SERVICE_URL" not in k},
                               **(env or {})})


def test_the_console_refuses_to_start_without_what_it_needs(tmp_path: Path) -> None:
    r = _console_cli(tmp=tmp_path)
    assert r.returncode == 2 and "--metadata-service-url or METADATA_SERVICE_URL" in r.stderr
    r = _console_cli("--metadata-service-url", "ftp://x", tmp=tmp_path)
    assert r.returncode == 2 and "use the http(s) URL" in r.stderr
    r = _console_cli(env={"METADATA_SERVICE_URL": "http://127.0.0.1:1", "OVERNIGHT_API_KEYS": "ka:alice,kb:bob",
                          "OVERNIGHT_CONSOLE_MDS_KEYS": "alice:secret-a"}, tmp=tmp_path)
    assert r.returncode == 2 and "no key for tenant 'bob'" in r.stderr and "secret-a" not in r.stderr
    r = _console_cli(env={"METADATA_SERVICE_URL": "http://127.0.0.1:1",
                          "OVERNIGHT_CONSOLE_MDS_KEYS": "alice:secret-a,bobsecret"}, tmp=tmp_path)
    assert r.returncode == 2 and "is not tenant:key" in r.stderr and "bobsecret" not in r.stderr
    assert "Traceback" not in r.stderr


def test_the_console_without_the_openai_sdk_names_the_extra(tmp_path: Path) -> None:
    proc = _run_without("openai", "console", "--data-dir", str(tmp_path), "--metadata-service-url",
                        "http://127.0.0.1:1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install 'overnight[client]'" in proc.stderr
