"""Console jobs on the ``kubernetes`` provider through ``overnight serve``: the
planner has the job's engine Deployment and Service made in the fake API server
(the test plays the Deployment controller and kubelet, ``tests/kubernetes/controller.py``),
submits the batch to the Service URL, and deletes both at the end. After every
test nothing the console labelled is left in the cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from overnight.console.provisioners.kubernetes import MANAGED_BY_CONSOLE
from tests.conftest import Cluster, free_port
from tests.console.test_console_e2e import Console
from tests.kubernetes.controller import Controller
from tests.kubernetes.fake_apiserver import FakeApiServer
from tests.kubernetes.kubelet import wait_until

# Many processes and seconds each: in the slow CI step (.ci/run); the default run keeps the core console tests.
pytestmark = pytest.mark.slow

CONSOLE = {"app.kubernetes.io/managed-by": MANAGED_BY_CONSOLE}


def _left(api: FakeApiServer) -> list[str]:
    return [f"{k} {o['metadata']['name']}" for k in ("Deployment", "Service", "Pod")
            for o in api.objects(k, selector=CONSOLE)]


@pytest.fixture
def kube(cluster: Cluster, tmp_path: Path):
    api = FakeApiServer().start()
    port = free_port()
    ctl = Controller(api, port, tmp_path).start()
    console = Console(cluster, tmp_path)
    env = {"OVERNIGHT_KUBERNETES": f"kubeconfig:{api.write_kubeconfig(tmp_path / 'kubeconfig')}",
           "OVERNIGHT_KUBERNETES_SERVICE_URL": f"http://127.0.0.1:{port}"}
    try:
        yield api, ctl, console, env, port
    finally:
        left = _left(api)
        ctl.stop()
        cluster.close()
        api.stop()
        assert not left, left


def _types(job: dict) -> list[str]:
    return [e["type"] for e in job["events"]]


def test_a_job_runs_its_whole_life_on_a_deployment_that_is_deleted_after(kube) -> None:
    api, ctl, console, env, port = kube
    console.start(**env)
    with console.http() as c:
        j = console.job(c, 40, provider="kubernetes")
        assert j["provider"] == "kubernetes"
        done = console.wait(c, j["id"])
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
        assert done["provision"]["endpoint"] == f"http://127.0.0.1:{port}"
        done = console.wait_released(c, j["id"])
        types = _types(done)
        assert types.index("provision_ready") < types.index("batch_created") < types.index("release_confirmed")
        assert done["provision"]["provider"] == "kubernetes" and done["provision"]["status"] == "released"
        out = c.get(f"/api/v1/files/{done['output_dataset']}/content")
        assert out.status_code == 200 and len(out.text.splitlines()) == 40
    assert _left(api) == []
    assert [(d.kind, d.policy) for d in api.deletions if d.kind == "Deployment"] == [("Deployment", "Background")]
    created = [r for r in api.requests if r.method == "POST" and r.path.endswith("/deployments")]
    assert len(created) == 1
    assert b'"overnight.dev/job-id":"' + j["id"].encode() in created[0].body.replace(b" ", b"")


def test_pods_held_back_show_why_in_the_jobs_events_then_the_job_runs(kube) -> None:
    api, ctl, console, env, _port = kube
    ctl.problem = "unschedulable"
    console.start(**env)
    with console.http() as c:
        j = console.job(c, 10, provider="kubernetes")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cur = c.get(f"/api/v1/jobs/{j['id']}").json()
            waits = [e for e in cur["events"] if e["type"] == "provision_waiting"]
            if waits:
                break
            time.sleep(0.1)
        assert cur["status"] == "resource_preparing", cur
        assert "cannot be scheduled" in waits[0]["message"] and "Insufficient nvidia.com/gpu" in waits[0]["message"]
        ctl.problem = None  # a node frees up
        done = console.wait(c, j["id"])
        assert done["status"] == "completed", done
        assert _types(done).count("provision_waiting") == 1  # once per reason, not once per poll
        console.wait_released(c, j["id"])


def test_cancel_while_the_image_cannot_be_pulled_deletes_everything(kube) -> None:
    api, ctl, console, env, _port = kube
    ctl.problem = "image_pull"
    console.start(**env)
    with console.http() as c:
        j = console.job(c, 10, provider="kubernetes")
        wait_until(lambda: any(e["type"] == "provision_waiting" and "ImagePullBackOff" in e["message"]
                               for e in c.get(f"/api/v1/jobs/{j['id']}").json()["events"]), 30,
                   what="the image pull problem in the job's events")
        assert api.objects("Deployment", selector=CONSOLE) and api.objects("Pod", selector=CONSOLE)
        assert c.post(f"/api/v1/jobs/{j['id']}/cancel").status_code == 200
        done = console.wait(c, j["id"])
        assert done["status"] == "cancelled" and done["batch_id"] is None
        done = console.wait_released(c, j["id"])
        assert _types(done).index("cancel_requested") < _types(done).index("release_confirmed")
    assert _left(api) == []


def test_the_catalog_lists_the_kubernetes_and_local_providers(kube) -> None:
    _api, _ctl, console, env, _port = kube
    console.start(**env)
    with console.http() as c:
        data = c.get("/api/v1/catalog").json()["data"]
    providers = {d["provider"] for d in data}
    assert {"fake", "local", "kubernetes"} <= providers, data
    k8s = [d for d in data if d["provider"] == "kubernetes"]
    assert k8s[0]["gpu_types"] == [] and k8s[0]["note"]  # the test template is cpu-only
