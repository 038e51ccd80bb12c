"""RunPod and Lambda Cloud end to end: a console job on ``overnight serve`` rents a
"machine" from a fake provider API (tests/fakes/), whose SSH address is a real
sshd on 127.0.0.1 (tests/sshd.py); the SSH runtime starts the engine there (the
``vllm`` / ``docker`` shims run the mock engine, bound to 127.0.0.1), the batch is
dispatched through a real SSH port-forward, and the machine is terminated and the
termination confirmed. After every test the fake provider holds no live resource
and no engine runs."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Cluster, free_port
from tests.factories import make_input_file
from tests.fakes.lambda_cloud import FakeLambdaCloud
from tests.fakes.runpod import FakeRunPod
from tests.sshd import Sshd

pytestmark = pytest.mark.slow

TERMINAL = {"completed", "failed", "expired", "cancelled", "resource_failed", "submit_failed"}


def template(engine_port: int, accelerator: str, image: str | None = None) -> str:
    img = f", image: {image}" if image else ""
    return f"""\
kind: ModelDeploymentTemplate
name: tiny
version: "1"
spec:
  engine: {{type: vllm, port: {engine_port}, ready_timeout_seconds: 60{img}}}
  model_source: {{type: huggingface, uri: Qwen/Qwen2.5-0.5B-Instruct}}
  accelerator: {{type: "{accelerator}", count: 1}}
  supported_endpoints: [/v1/chat/completions]
"""


class Neocloud:
    """One ``overnight serve`` with a neocloud provider, the fake API and the sshd."""

    def __init__(self, cluster: Cluster, tmp: Path, sshd: Sshd) -> None:
        self.cluster, self.tmp, self.sshd = cluster, tmp, sshd
        self.data = tmp / "data"
        self.tdir = tmp / "templates"
        self.tdir.mkdir(exist_ok=True)
        self.engine_port = free_port()
        self.server = None
        self.env: dict[str, str] = {}

    def start(self, provider: str, accelerator: str, image: str | None = None, **env: str):
        (self.tdir / "t.yaml").write_text(template(self.engine_port, accelerator, image))
        self.env = {"OVERNIGHT_PLANNER_TICK_S": "0.2", "OVERNIGHT_PLANNER_POLL_S": "0.2", "PROVISIONER": provider,
                    "OVERNIGHT_SSH_KEY_FILE": str(self.sshd.client_key_path), **env}
        return self.restart()

    def restart(self):
        self.server = self.cluster.server(engine_url=None, data_dir=self.data,
                                          extra=("--templates-dir", str(self.tdir)), env=self.env)
        return self.server

    def http(self) -> httpx.Client:
        assert self.server is not None
        return httpx.Client(base_url=self.server.url, timeout=30)

    def job(self, c: httpx.Client, n: int) -> dict:
        path = make_input_file(self.tmp / f"in-{n}.jsonl", n, model="tiny")
        r = c.post("/api/v1/files/upload", files={"file": ("in.jsonl", path.read_bytes())}, data={"purpose": "batch"})
        assert r.status_code == 200, r.text
        r = c.post("/api/v1/jobs", json={"input_dataset": r.json()["id"], "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h", "model_template_name": "tiny"})
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, c: httpx.Client, job_id: str, pred, timeout_s: float = 90) -> dict:
        deadline = time.monotonic() + timeout_s
        j: dict = {}
        while time.monotonic() < deadline:
            j = c.get(f"/api/v1/jobs/{job_id}").json()
            if pred(j):
                return j
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still {j.get('status')}: {json.dumps(j.get('events'), indent=1)}")

    def wait_status(self, c: httpx.Client, job_id: str, statuses=TERMINAL, timeout_s: float = 90) -> dict:
        return self.wait(c, job_id, lambda j: j["status"] in statuses, timeout_s)

    def wait_released(self, c: httpx.Client, job_id: str, timeout_s: float = 60) -> dict:
        return self.wait(c, job_id, lambda j: "release_confirmed" in types(j), timeout_s)

    def output_ids(self, c: httpx.Client, job: dict) -> list[str]:
        text = c.get(f"/api/v1/files/{job['output_dataset']}/content").text
        return [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]


def types(job: dict) -> list[str]:
    return [e["type"] for e in job["events"]]


@pytest.fixture
def neo(cluster: Cluster, tmp_path: Path, sshd: Sshd) -> Iterator[Neocloud]:
    n = Neocloud(cluster, tmp_path, sshd)
    yield n
    cluster.close()


@pytest.fixture
def runpod(sshd: Sshd) -> Iterator[FakeRunPod]:
    with FakeRunPod(api_key="rp-key", provisioning_s=0.3, starting_s=0.3) as fake:
        fake.ssh_host, fake.ssh_port = sshd.host, sshd.port
        yield fake
        assert _settled(fake.live_pods) == [], "the fake RunPod still holds pods after the test"


@pytest.fixture
def lambda_cloud(sshd: Sshd) -> Iterator[FakeLambdaCloud]:
    with FakeLambdaCloud(api_key="lc-key", boot_s=0.5, terminate_s=0.3, instance_ip=sshd.host) as fake:
        yield fake
        assert _settled(fake.live_instances) == [], "the fake Lambda Cloud still holds instances after the test"


def _settled(live, timeout_s: float = 30.0) -> list:
    """What the provider still holds once the service (still running here) has had
    time to finish a release it started (a terminate answers ``terminating`` first)."""
    deadline = time.monotonic() + timeout_s
    while (left := live()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def runpod_env(fake: FakeRunPod, sshd: Sshd, version: str = "v2", **extra: str) -> dict[str, str]:
    return {"RUNPOD_API_KEY": "rp-key", "RUNPOD_BASE_URL": fake.url_v2 if version == "v2" else fake.url_v1,
            "RUNPOD_SSH_PUBLIC_KEY": Path(str(sshd.client_key_path) + ".pub").read_text().strip(),
            "RUNPOD_IMAGE": "example/vllm-sshd:0.11", "RUNPOD_SSH_USER": sshd.user, **extra}


def lambda_env(fake: FakeLambdaCloud, sshd: Sshd, **extra: str) -> dict[str, str]:
    return {"LAMBDA_CLOUD_API_KEY": "lc-key", "LAMBDA_CLOUD_BASE_URL": fake.url, "LAMBDA_CLOUD_SSH_KEYS": "overnight",
            "LAMBDA_CLOUD_SSH_USER": sshd.user, "LAMBDA_CLOUD_SSH_PORT": str(sshd.port), **extra}


def assert_finished_clean(neo: Neocloud, c: httpx.Client, job: dict, n: int) -> dict:
    done = neo.wait_status(c, job["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}
    ids = neo.output_ids(c, done)
    assert sorted(ids) == sorted(f"req-{i}" for i in range(n)), "a line lost or duplicated"
    done = neo.wait_released(c, job["id"])
    for t in ("provision_requested", "provision_ready", "batch_created", "completed", "release_requested",
              "release_confirmed"):
        assert t in types(done), (t, types(done))
    # Nothing runs on the machine once the batch is over (the runtime stopped it
    # before the machine went).
    deadline = time.monotonic() + 10
    while neo.sshd.engines_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert neo.sshd.engines_running() == []
    return done


def test_runpod_v2_job_runs_over_ssh_and_the_pod_is_terminated(neo: Neocloud, runpod: FakeRunPod, sshd: Sshd) -> None:
    neo.start("runpod", "NVIDIA H100 80GB HBM3", **runpod_env(runpod, sshd))
    with neo.http() as c:
        job = neo.job(c, 30)
        done = assert_finished_clean(neo, c, job, 30)
        assert done["provider"] == "runpod"
        assert done["provision"]["resource_ids"], done["provision"]
        assert done["cost"]["gpu_seconds"] > 0 and done["cost"]["usd"] is not None, done["cost"]
        # The engine was started over SSH bound to 127.0.0.1, on the template's port.
        starts = sshd.calls("vllm")
        assert len(starts) == 1, starts
        argv = starts[0]
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert argv[argv.index("--port") + 1] == str(neo.engine_port)
        # The pod asked for what the template says, and was deleted (never stopped).
        body = next(r.body for r in runpod.requests if r.method == "POST" and r.path == "/v2/pods")
        assert body["gpu"] == {"id": "NVIDIA H100 80GB HBM3", "count": 1}
        assert body["env"]["OVERNIGHT_JOB_ID"] == job["id"]
        assert not [r for r in runpod.requests if r.path.endswith("/stop") or "stop" in json.dumps(r.body or {})]
        # The batch's engine log shows the engine's own output, streamed over SSH.
        logs = c.get(f"/v1/batches/{done['batch_id']}/engine/logs").json()
        assert logs["object"] == "engine.log" and logs["lines"], logs
        # The catalog lists RunPod's GPU types with their prices, from its API.
        items = [i for i in c.get("/api/v1/catalog").json()["data"] if i.get("provider") == "runpod"]
        assert any("H100" in json.dumps(i) for i in items) and not any("error" in i for i in items), items


def test_runpod_v1_root_still_works(neo: Neocloud, runpod: FakeRunPod, sshd: Sshd) -> None:
    neo.start("runpod", "NVIDIA H100 80GB HBM3", **runpod_env(runpod, sshd, "v1"))
    with neo.http() as c:
        job = neo.job(c, 10)
        assert_finished_clean(neo, c, job, 10)
        body = next(r.body for r in runpod.requests if r.method == "POST" and r.path == "/v1/pods")
        assert body["volumeInGb"] == 0 and body["gpuTypeIds"] == ["NVIDIA H100 80GB HBM3"]


def test_lambda_job_runs_in_docker_over_ssh_and_the_instance_is_terminated(
        neo: Neocloud, lambda_cloud: FakeLambdaCloud, sshd: Sshd) -> None:
    neo.start("lambdaCloud", "H100", image="vllm/vllm-openai:v0.11.0", **lambda_env(lambda_cloud, sshd))
    with neo.http() as c:
        job = neo.job(c, 30)
        done = assert_finished_clean(neo, c, job, 30)
        assert done["provider"] == "lambdaCloud"
        assert done["cost"]["usd"] is not None
        run = next(a for a in sshd.calls("docker") if a[:1] == ["run"])
        joined = " ".join(run)
        assert "--gpus all" in joined and "--ipc=host" in joined, run
        assert f"127.0.0.1:{neo.engine_port}:{neo.engine_port}" in joined, run
        assert "vllm/vllm-openai:v0.11.0" in run
        assert sshd.calls("nvidia-smi"), "the GPU is checked before the engine starts"
        items = [i for i in c.get("/api/v1/catalog").json()["data"] if i.get("provider") == "lambdaCloud"]
        assert any("H100" in json.dumps(i) for i in items) and not any("error" in i for i in items), items
        launch = lambda_cloud.launch_bodies()[0]
        assert {"key": "overnight-job", "value": job["id"]} in launch["tags"]


def test_cancel_while_the_pod_is_provisioning_deletes_it(neo: Neocloud, runpod: FakeRunPod, sshd: Sshd) -> None:
    runpod.provisioning_s = 60.0
    neo.start("runpod", "NVIDIA H100 80GB HBM3", **runpod_env(runpod, sshd))
    with neo.http() as c:
        job = neo.job(c, 10)
        neo.wait(c, job["id"], lambda j: j["status"] == "resource_preparing" and j["provision"]["resource_ids"])
        assert c.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200
        done = neo.wait_status(c, job["id"])
        assert done["status"] == "cancelled" and not done["batch_id"], done
        neo.wait_released(c, job["id"])
        assert sshd.calls("vllm") == [], "no engine is started for a cancelled job"


def test_cancel_while_the_batch_runs_stops_the_engine_and_terminates(
        neo: Neocloud, lambda_cloud: FakeLambdaCloud, sshd: Sshd) -> None:
    neo.start("lambdaCloud", "H100", image="vllm/vllm-openai:v0.11.0", **lambda_env(lambda_cloud, sshd))
    with neo.http() as c:
        job = neo.job(c, 20000)  # enough that a loaded machine cannot finish it before the cancel
        neo.wait(c, job["id"], lambda j: j["status"] == "in_progress" and (j["request_counts"] or {}).get("completed"))
        assert c.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200
        done = neo.wait_status(c, job["id"])
        assert done["status"] == "cancelled", done
        neo.wait_released(c, job["id"])
        deadline = time.monotonic() + 10
        while sshd.engines_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sshd.engines_running() == []


def test_sigkill_mid_batch_then_restart_finishes_exactly_once(neo: Neocloud, runpod: FakeRunPod, sshd: Sshd) -> None:
    n = 3000
    neo.start("runpod", "NVIDIA H100 80GB HBM3", **runpod_env(runpod, sshd))
    with neo.http() as c:
        job = neo.job(c, n)
        neo.wait(c, job["id"], lambda j: j["status"] == "in_progress" and (j["request_counts"] or {}).get("completed"))
    assert neo.server is not None
    neo.server.signal(signal.SIGKILL)
    # The machine and its engine outlive the service, as a rented GPU would.
    assert len(runpod.live_pods()) == 1
    neo.restart()
    with neo.http() as c:
        done = assert_finished_clean(neo, c, job, n)
        assert done["status"] == "completed"
    # One pod and one engine for the job, however often the service started.
    assert len([r for r in runpod.requests if r.method == "POST" and r.path == "/v2/pods"]) == 1
    assert len(sshd.calls("vllm")) == 1, sshd.calls("vllm")


def test_provider_api_down_at_release_shows_it_pending_then_confirms(
        neo: Neocloud, runpod: FakeRunPod, sshd: Sshd) -> None:
    neo.start("runpod", "NVIDIA H100 80GB HBM3", **runpod_env(runpod, sshd))
    with neo.http() as c:
        job = neo.job(c, 10)
        neo.wait(c, job["id"], lambda j: j["status"] in ("in_progress", "finalizing", "completed"))
        runpod.down = True
        done = neo.wait(c, job["id"], lambda j: j["status"] == "completed" and "release_failed" in types(j))
        assert "release_confirmed" not in types(done)
        assert len(runpod.live_pods()) == 1  # still there, and the job says so
        runpod.down = False
        neo.wait_released(c, job["id"])


def test_cancel_while_queued_never_rents_a_machine(neo: Neocloud, runpod: FakeRunPod, sshd: Sshd) -> None:
    runpod.provisioning_s = 60.0
    neo.start("runpod", "NVIDIA H100 80GB HBM3", PLANNER_MAX_PROVISIONING="1", **runpod_env(runpod, sshd))
    with neo.http() as c:
        first = neo.job(c, 10)
        neo.wait(c, first["id"], lambda j: j["status"] == "resource_preparing")
        second = neo.job(c, 10)
        time.sleep(1.0)  # several planner ticks: it waits its turn
        assert c.get(f"/api/v1/jobs/{second['id']}").json()["status"] == "queued"
        assert c.post(f"/api/v1/jobs/{second['id']}/cancel").status_code == 200
        done = neo.wait_status(c, second["id"])
        assert done["status"] == "cancelled" and not (done["provision"] or {}).get("resource_ids"), done
        assert runpod.live_for(second["id"]) == []
        assert len([r for r in runpod.requests if r.method == "POST" and r.path == "/v2/pods"]) == 1
        assert c.post(f"/api/v1/jobs/{first['id']}/cancel").status_code == 200
        neo.wait_status(c, first["id"])
        neo.wait_released(c, first["id"])


def test_a_console_process_rents_machines_for_a_keyed_batches_service_that_trusts_its_key(
        cluster: Cluster, tmp_path: Path, runpod: FakeRunPod, sshd: Sshd) -> None:
    # `overnight console` as its own process; the batches service is keyed, and the
    # console acts there for alice with the key "mc". The machine the console rents
    # is taken only once the service lists "mc" in OVERNIGHT_TRUSTED_CONSOLE_KEYS.
    from tests.console.test_console_process import start_console

    neo = Neocloud(cluster, tmp_path, sshd)
    (neo.tdir / "t.yaml").write_text(template(neo.engine_port, "NVIDIA H100 80GB HBM3"))
    ssh_key = {"OVERNIGHT_SSH_KEY_FILE": str(sshd.client_key_path)}
    mds_port = free_port()

    def batches_service(**env: str):
        return cluster.server(engine_url=None, data_dir=tmp_path / "mds", port=mds_port, env={
            "OVERNIGHT_CONSOLE": "false", "OVERNIGHT_API_KEYS": "mc:alice,ma:alice", "OVERNIGHT_RUNTIMES": "endpoint,ssh",
            **ssh_key, **env})

    mds = batches_service()
    neo.server = start_console(cluster, mds_url=mds.url, data_dir=tmp_path / "console", templates_dir=neo.tdir,
                               env={"PROVISIONER": "runpod", **runpod_env(runpod, sshd), **ssh_key,
                                    "OVERNIGHT_API_KEYS": "ka:alice", "OVERNIGHT_CONSOLE_MDS_KEYS": "alice:mc"})
    with httpx.Client(base_url=neo.server.url, headers={"Authorization": "Bearer ka"}, timeout=30) as c:
        job = neo.job(c, 10)
        done = neo.wait_status(c, job["id"])
        assert done["status"] == "submit_failed", done
        assert "did not provision" in done["error_message"] and "ssh://" in done["error_message"], done
        assert "OVERNIGHT_TRUSTED_CONSOLE_KEYS" in done["error_message"], done
        neo.wait_released(c, job["id"])  # the pod goes all the same
        assert sshd.calls("vllm") == []
        mds.stop()
        batches_service(OVERNIGHT_TRUSTED_CONSOLE_KEYS="mc")
        job = neo.job(c, 30)
        done = assert_finished_clean(neo, c, job, 30)
        assert len(sshd.calls("vllm")) == 1
        # alice's own key there still may not name a machine
        spec = {"type": "ssh", "host": sshd.host, "port": sshd.port, "user": sshd.user, "provision_id": "p",
                "host_key": sshd.host_key_line(), "engine_port": neo.engine_port, "command": ["vllm", "{port}"]}
        with httpx.Client(base_url=mds.url, headers={"Authorization": "Bearer ma"}) as alice:
            r = alice.post("/v1/batches", json={"input_file_id": done["input_dataset"], "completion_window": "24h",
                                                "endpoint": "/v1/chat/completions", "overnight": {"runtime": spec}})
            assert r.status_code == 400 and r.json()["error"]["code"] == "endpoint_not_allowed", r.text
