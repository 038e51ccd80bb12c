"""Console jobs on the ``local`` provider through ``overnight serve``: the job's
template engine runs as a process on this host (GPUs from a fake ``nvidia-smi``
on PATH), outlives a SIGKILLed service, and is stopped for good at the end.
After every test no process carries the test installation's marker."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from overnight.console.provisioners.local import MARKER
from overnight.runtimes.local import OWNER_ENV
from tests.conftest import Cluster
from tests.console.test_console_e2e import Console

# Many processes and seconds each: in the slow CI step (.ci/run); the default run keeps the core console tests.
pytestmark = pytest.mark.slow

SLOW = """\
kind: ModelDeploymentTemplate
name: slow
version: "1"
spec:
  engine: {{type: mock, serve_args: ["--latency-ms", "{latency}"], ready_timeout_seconds: 60}}
  model_source: {{type: local, uri: mock}}
  accelerator: {{type: cpu, count: 0}}
  supported_endpoints: [/v1/chat/completions]
"""
SCRIPTED = """\
kind: ModelDeploymentTemplate
name: {name}
version: "1"
spec:
  engine: {{type: mock, command: [{command}], ready_timeout_seconds: 60}}
  model_source: {{type: local, uri: mock}}
  accelerator: {{type: {gpu}, count: {count}}}
  parallelism: {{tp: {tp}}}
  supported_endpoints: [/v1/chat/completions]
"""
# Starts late (a model loading), writes the GPUs it was given, then is the mock engine.
ENGINE = """\
import os, sys, time
port, out, delay, latency = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
with open(out + "." + port, "w") as f:
    f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
time.sleep(delay)
os.execvp(sys.executable, [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--port", port,
                           "--latency-ms", latency])
"""


def _procs(installation: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and \
                    p.environ().get(OWNER_ENV, "").startswith(f"{MARKER}/{installation}/"):
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


class Local(Console):
    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        super().__init__(cluster, tmp)
        self.installation = "test-" + uuid.uuid4().hex[:8]
        self.script = tmp / "engine.py"
        self.script.write_text(ENGINE)
        self.seen = tmp / "seen"

    def template(self, name: str, *, delay: float = 0, gpus: int = 0, latency_ms: int = 5) -> None:
        command = ", ".join(json.dumps(c) for c in (sys.executable, str(self.script), "{port}", str(self.seen),
                                                     str(delay), str(latency_ms)))
        (self.tdir / f"{name}.yaml").write_text(SCRIPTED.format(
            name=name, command=command, gpu="H100" if gpus else "cpu", count=gpus, tp=max(1, gpus)))

    def start(self, **env: str):
        return super().start(OVERNIGHT_INSTALLATION_ID=self.installation, **env)

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.data / "local-provider").glob("local_*.json"))]


@pytest.fixture
def local(cluster: Cluster, tmp_path: Path):
    c = Local(cluster, tmp_path)
    yield c
    cluster.close()
    left = _procs(c.installation)
    for p in left:
        p.kill()
    assert not left, [p.cmdline() for p in left]
    assert all(r["status"] == "released" for r in c.records()), c.records()


def _types(job: dict) -> list[str]:
    return [e["type"] for e in job["events"]]


def test_a_job_runs_its_whole_life_on_an_engine_of_this_host(local: Local) -> None:
    local.start()
    with local.http() as c:
        j = local.job(c, 50, provider="local")
        done = local.wait(c, j["id"])
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
        assert done["provision"]["provider"] == "local" and done["provision"]["endpoint"].startswith("http://127.0.0.1:")
        done = local.wait_released(c, j["id"])
        types = _types(done)
        assert types.index("provision_ready") < types.index("batch_created") < types.index("release_confirmed")
    assert _procs(local.installation) == [] and len(local.records()) == 1


def test_the_service_killed_while_the_batch_runs_finds_the_same_engine_after_a_restart(local: Local) -> None:
    (local.tdir / "slow.yaml").write_text(SLOW.format(latency=300))
    server = local.start()
    with local.http() as c:
        j = local.job(c, 1500, model_template_name="slow", provider="local")
        running = local.wait(c, j["id"], {"in_progress"})
        pid = running["provision"]["raw"]["pid"]
    server.signal(signal.SIGKILL)
    assert [p.pid for p in _procs(local.installation) if p.pid == pid] == [pid]  # it outlived the service
    local.start()
    with local.http() as c:
        done = local.wait(c, j["id"], timeout_s=90)
        assert done["status"] == "completed", done
        out = c.get(f"/api/v1/files/{done['output_dataset']}/content").text.splitlines()
        ids = [json.loads(x)["custom_id"] for x in out]
        assert len(ids) == len(set(ids)) == done["request_counts"]["total"] == 1500
        local.wait_released(c, j["id"])
    assert len(local.records()) == 1 and local.records()[0]["handle"]["pid"] == pid  # one engine, never a second
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_cancel_while_the_engine_starts_stops_it(local: Local) -> None:
    local.template("late", delay=30)
    local.start()
    with local.http() as c:
        j = local.job(c, model_template_name="late", provider="local")
        local.wait(c, j["id"], {"resource_preparing"})
        deadline = time.monotonic() + 20
        while not _procs(local.installation) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _procs(local.installation)
        assert c.post(f"/api/v1/jobs/{j['id']}/cancel").status_code == 200
        done = local.wait(c, j["id"])
        assert done["status"] == "cancelled" and done["batch_id"] is None
        local.wait_released(c, j["id"])
    assert _procs(local.installation) == []


def test_jobs_share_the_hosts_gpus_one_waits_for_the_other(local: Local) -> None:
    fake = local.tmp / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 81559'\n")
    (fake / "nvidia-smi").chmod(0o755)
    local.template("g1", gpus=1, latency_ms=300)
    local.template("g2", gpus=1)
    local.template("g4", gpus=4)
    local.start(PATH=f"{fake}:{os.environ['PATH']}")
    with local.http() as c:
        cat = [d for d in c.get("/api/v1/catalog").json()["data"] if d["provider"] == "local"]
        assert [(d["gpu_type"], d["count"], d["free"]) for d in cat] == [("NVIDIA H100 80GB HBM3", 1, 1)]
        a = local.job(c, 600, model_template_name="g1", provider="local")
        local.wait(c, a["id"], {"in_progress"})
        b = local.job(c, 30, model_template_name="g2", provider="local")
        never = local.job(c, 5, model_template_name="g4", provider="local")
        done_a, done_b = local.wait(c, a["id"], timeout_s=90), local.wait(c, b["id"], timeout_s=90)
        assert done_a["status"] == done_b["status"] == "completed", (done_a, done_b)
        retries = [e["message"] for e in done_b["events"] if e["type"] == "provision_retry"]
        assert retries and "no capacity" in retries[0] and "0 of 1 are free" in retries[0]
        # b got its GPU only once a's engine was stopped
        assert done_b["submitting_at"] >= done_a["completed_at"]
        n = local.wait(c, never["id"])
        assert n["status"] == "resource_failed" and "needs 4 GPUs but this host has 1" in n["error_message"]
        for j in (a, b):
            local.wait_released(c, j["id"])
    assert sorted(p.read_text() for p in local.tmp.glob("seen.*")) == ["0", "0"]
