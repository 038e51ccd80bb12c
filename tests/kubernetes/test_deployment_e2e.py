"""The kubernetes-deployment runtime end to end: ``overnight serve`` creates the
engine's Deployment and Service in the fake API server (real HTTP, the real
client), waits for its replicas, sends the batch's requests to the Service URL
(here a mock engine the test starts when the Deployment appears: the test plays
the Deployment controller and the kubelet), and deletes both at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cluster, free_port
from tests.e2e.helpers import assert_exactly_once, client_for, results, wait_status
from tests.factories import make_input_file
from tests.kubernetes.controller import Controller
from tests.kubernetes.fake_apiserver import FakeApiServer
from tests.kubernetes.kubelet import wait_until

TEMPLATE = """\
kind: ModelDeploymentTemplate
name: tiny
version: "1"
spec:
  engine:
    type: mock
    ready_timeout_seconds: {ready}
  model_source: {{type: local, uri: mock}}
  accelerator: {{type: cpu, count: 0}}
  supported_endpoints: [/v1/chat/completions]
  keep_alive_seconds: {keep}
"""


@pytest.fixture
def env(cluster: Cluster, tmp_path: Path):
    api = FakeApiServer().start()
    port = free_port()
    ctl = Controller(api, port, tmp_path).start()

    def server(ready: int = 60, keep: float = 0, configmap: bool = False):
        env = {
            "OVERNIGHT_KUBERNETES": f"kubeconfig:{api.write_kubeconfig(tmp_path / 'kubeconfig')}",
            "OVERNIGHT_KUBERNETES_SERVICE_URL": f"http://127.0.0.1:{port}",
        }
        text = TEMPLATE.format(ready=ready, keep=keep)
        if configmap:  # the template lives in a labelled ConfigMap, read through the API
            api.create({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "templates", "namespace": "default",
                                     "labels": {"overnight.dev/templates": "true"}},
                        "data": {"tiny.yaml": text}})
            return cluster.server(engine_url=None, env={**env, "OVERNIGHT_TEMPLATES_CONFIGMAPS": "default"})
        tdir = tmp_path / "templates"
        tdir.mkdir(exist_ok=True)
        (tdir / "t.yaml").write_text(text)
        return cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)), env=env)

    try:
        yield api, ctl, server
    finally:
        ctl.stop()
        cluster.close()
        api.stop()


def _create(client, tmp_path: Path, n: int, name: str = "in.jsonl"):
    with make_input_file(tmp_path / name, n, model="tiny").open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    return client.batches.create(
        input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="24h",
        extra_body={"overnight": {"model_template": {"name": "tiny"}, "runtime": {"type": "kubernetes-deployment"}}})


def test_a_batch_runs_on_a_deployment_and_service_that_are_deleted_after(env, tmp_path) -> None:
    api, ctl, server = env
    client = client_for(server().url)
    b = wait_status(client, _create(client, tmp_path, 300).id, timeout_s=60)
    assert b.status == "completed", b.errors
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(300)})
    assert b.model_extra["overnight"]["runtime"]["type"] == "kubernetes-deployment"
    wait_until(lambda: not api.objects("Deployment") and not api.objects("Service"), 30, what="deletion")
    kinds = {(d.kind, d.policy) for d in api.deletions}
    assert ("Deployment", "Background") in kinds
    # the Service was owned by the Deployment
    creates = [r for r in api.requests if r.method == "POST" and r.path.endswith("/services")]
    assert creates and b'"ownerReferences"' in creates[0].body


def test_two_batches_on_one_template_share_one_deployment(env, tmp_path) -> None:
    api, ctl, server = env
    client = client_for(server(keep=30).url)
    a = _create(client, tmp_path, 200, "a.jsonl")
    b = _create(client, tmp_path, 200, "b.jsonl")
    a, b = wait_status(client, a.id, timeout_s=60), wait_status(client, b.id, timeout_s=60)
    assert a.status == b.status == "completed"
    # keep-alive: a third batch later still finds it
    c = wait_status(client, _create(client, tmp_path, 50, "c.jsonl").id, timeout_s=60)
    assert c.status == "completed"
    creates = [r for r in api.requests if r.method == "POST" and r.path.endswith("/deployments")]
    assert len(creates) == 1
    assert len(api.objects("Deployment")) == 1  # kept alive for 30 s


def test_a_deployment_that_never_gets_ready_fails_the_batch_saying_why(env, tmp_path) -> None:
    api, ctl, server = env
    ctl.unschedulable = True
    client = client_for(server(ready=3).url)
    b = wait_status(client, _create(client, tmp_path, 20).id, timeout_s=60)
    assert b.status == "failed"
    msg = b.errors.data[0].message
    assert "cannot be scheduled" in msg and "Insufficient nvidia.com/gpu" in msg, msg
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(20)})
    wait_until(lambda: not api.objects("Deployment") and not api.objects("Service"), 30, what="deletion")


def test_templates_can_come_from_a_configmap(env, tmp_path) -> None:
    api, ctl, server = env
    client = client_for(server(configmap=True).url)
    b = wait_status(client, _create(client, tmp_path, 50).id, timeout_s=60)
    assert b.status == "completed", b.errors
    assert b.model_extra["overnight"]["model_template"]["template"] == "tiny"
