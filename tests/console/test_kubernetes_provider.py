"""The ``kubernetes`` provider against the fake API server (real HTTP, the real
client), in process: labels, idempotent provisioning, status in words, verified
release, and list_owned / the planner's sweep never touching what is not this
installation's."""

from __future__ import annotations

import time
from typing import Any

import pytest

from overnight.console import jobs
from overnight.console.planner import Planner, PlannerConfig
from overnight.console.provisioners.base import ProvisionError, ProvisionRequest
from overnight.console.provisioners.kubernetes import (
    INSTALLATION_LABEL, JOB_LABEL, MANAGED_BY_CONSOLE, KubernetesProvisioner, label_value,
)
from overnight.runtimes.kubernetes.client import KubeConfig
from overnight.store.memory import MemoryStore
from overnight.templates.resolve import resolve
from overnight.templates.source import StaticSource
from tests.kubernetes.controller import PROBLEMS
from tests.kubernetes.fake_apiserver import FakeApiServer

TEMPLATE = {"kind": "ModelDeploymentTemplate", "name": "tiny", "version": "1", "spec": {
    "engine": {"type": "mock", "port": 8123}, "model_source": {"type": "local", "uri": "mock"},
    "accelerator": {"type": "cpu", "count": 0}, "supported_endpoints": ["/v1/chat/completions"]}}
GPU_TEMPLATE = {"kind": "ModelDeploymentTemplate", "name": "big", "version": "1", "spec": {
    "engine": {"type": "vllm", "image": "vllm/vllm-openai:v0.9.0"},
    "model_source": {"type": "huggingface", "uri": "Qwen/Qwen2.5-7B-Instruct"},
    "accelerator": {"type": "H100", "count": 2}, "parallelism": {"dp": 2},
    "supported_endpoints": ["/v1/chat/completions"]}}
NS = "default"


@pytest.fixture
def api():
    with FakeApiServer(pod_grace_s=0.0) as server:
        yield server


def _provider(api: FakeApiServer, **kw: Any) -> KubernetesProvisioner:
    return KubernetesProvisioner(config=KubeConfig(api_url=api.url), namespace=NS, image="overnight:test",
                                 service_url="http://{name}.{namespace}.test:{port}", release_wait_s=1.0, **kw)


def _request(job_id: str = "job_0000000000000000000000a1", installation: str = "inst-a",
             template: dict | None = None) -> ProvisionRequest:
    resolved = resolve(StaticSource([template or TEMPLATE]), {"name": (template or TEMPLATE)["name"]}, None)
    return ProvisionRequest(job_id=job_id, tenant="t", installation_id=installation, idempotency_key=job_id,
                            template=resolved.to_record())


def _ready(api: FakeApiServer, name: str) -> None:
    d = api.get("Deployment", NS, name)
    api.set_status("Deployment", NS, name, {"replicas": d["spec"]["replicas"],
                                            "readyReplicas": d["spec"]["replicas"]})


def _pod(api: FakeApiServer, name: str, status: dict | None = None, **meta: Any) -> dict:
    d = api.get("Deployment", NS, name)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name + "-p1", "namespace": NS, "labels": d["spec"]["template"]["metadata"]["labels"],
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                                             "uid": d["metadata"]["uid"], "controller": True}], **meta},
           "spec": d["spec"]["template"]["spec"], "status": status or {"phase": "Pending"}}
    return api.create(pod)


async def test_objects_are_labelled_for_the_console_with_the_job_and_installation(api) -> None:
    p = _provider(api)
    long_inst = "installation/" + "x" * 80  # not a label value: hashed in the label, whole in the annotation
    state = await p.provision(_request(installation=long_inst))
    ns, name = state.provision_id.split("/")
    for kind in ("Deployment", "Service"):
        obj = api.get(kind, ns, name)
        labels, notes = obj["metadata"]["labels"], obj["metadata"]["annotations"]
        assert labels["app.kubernetes.io/managed-by"] == MANAGED_BY_CONSOLE
        assert labels[JOB_LABEL] == "job_0000000000000000000000a1"
        assert labels[INSTALLATION_LABEL] == label_value(long_inst) and len(labels[INSTALLATION_LABEL]) <= 63
        assert notes[INSTALLATION_LABEL] == long_inst and notes[JOB_LABEL] == "job_0000000000000000000000a1"
        assert "overnight.dev/batch-id" not in labels and "overnight.dev/batch-id" not in notes
    pod_labels = api.get("Deployment", ns, name)["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[INSTALLATION_LABEL] == label_value(long_inst)
    svc = api.get("Service", ns, name)
    assert svc["metadata"]["ownerReferences"][0]["uid"] == api.get("Deployment", ns, name)["metadata"]["uid"]
    await p.release(state.provision_id)
    await p.aclose()


async def test_provision_is_idempotent_and_completes_after_a_crash_between_the_objects(api) -> None:
    p = _provider(api)
    req = _request()
    dep, _svc = p.render(req)
    api.create(dep)  # a crash came after the Deployment, before the Service
    a = await p.provision(req)
    b = await p.provision(req)
    assert a.provision_id == b.provision_id == f"{NS}/{dep['metadata']['name']}"
    assert len(api.objects("Deployment")) == 1 and len(api.objects("Service")) == 1
    posts = [r for r in api.requests if r.method == "POST" and r.path.endswith("/deployments")]
    assert posts == []  # found, never created again
    assert a.status == "provisioning" and a.job_id == req.job_id and a.installation_id == "inst-a"
    assert await p.release(a.provision_id)
    await p.aclose()


async def test_a_same_named_object_that_is_not_this_jobs_is_never_adopted(api) -> None:
    p = _provider(api)
    req = _request()
    name = p.name_for(req.idempotency_key)
    api.create({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": NS, "labels": {"app": "someone-else"}},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "x"}},
                         "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": []}}}})
    with pytest.raises(ProvisionError) as err:
        await p.provision(req)
    assert not err.value.retryable and "something overnight's console did not make" in err.value.message
    # releasing that provision id never deletes what the console did not make
    assert await p.release(f"{NS}/{name}") is True
    assert api.get("Deployment", NS, name)["metadata"]["labels"] == {"app": "someone-else"}
    assert api.deletions == [] and api.objects("Service") == []
    # another installation's job of the same id: refused too
    api.delete("Deployment", NS, name)
    other = _provider(api)
    await other.provision(_request(installation="inst-b"))
    with pytest.raises(ProvisionError) as err:
        await p.provision(req)
    assert not err.value.retryable and "installation 'inst-b'" in err.value.message
    assert await other.release(f"{NS}/{name}")
    await p.aclose()
    await other.aclose()


async def test_status_says_what_holds_the_pods_back_then_running_with_the_service_url(api) -> None:
    p = _provider(api)
    state = await p.provision(_request())
    ns, name = state.provision_id.split("/")
    pod = _pod(api, name, PROBLEMS["unschedulable"])
    s = await p.status(state.provision_id)
    assert s.status == "provisioning" and "cannot be scheduled" in s.error and "Insufficient nvidia.com/gpu" in s.error
    api.set_status("Pod", ns, pod["metadata"]["name"], PROBLEMS["image_pull"])
    s = await p.status(state.provision_id)
    assert s.status == "provisioning" and "ImagePullBackOff" in s.error
    api.set_status("Deployment", ns, name, {"conditions": [{
        "type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
        "message": 'pods "x" is forbidden: exceeded quota: gpu-quota'}]})
    s = await p.status(state.provision_id)
    assert s.status == "provisioning" and "exceeded quota" in s.error
    api.set_status("Pod", ns, pod["metadata"]["name"], {"phase": "Running"})
    _ready(api, name)
    s = await p.status(state.provision_id)
    assert s.status == "running" and s.error is None
    assert s.endpoint == f"http://{name}.{ns}.test:8123"
    assert await p.release(state.provision_id)
    s = await p.status(state.provision_id)
    assert s.status == "released" and "does not exist" in s.error
    await p.aclose()


async def test_a_rollout_past_its_progress_deadline_is_failed(api) -> None:
    p = _provider(api)
    state = await p.provision(_request())
    api.set_status("Deployment", *state.provision_id.split("/"), {"conditions": [{
        "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "x" has timed out progressing.'}]})
    s = await p.status(state.provision_id)
    assert s.status == "failed" and "timed out progressing" in s.error
    assert await p.release(state.provision_id)
    await p.aclose()


async def test_release_is_confirmed_only_once_deployment_service_and_pods_are_gone(api) -> None:
    p = _provider(api)
    state = await p.provision(_request())
    ns, name = state.provision_id.split("/")
    pod = _pod(api, name, {"phase": "Running"}, finalizers=["test.example/hold"])
    assert await p.release(state.provision_id) is False  # the pod is still terminating
    # Background: the pods (and the Service it owns) go with the Deployment
    assert {(d.kind, d.policy) for d in api.deletions if d.kind == "Deployment"} == {("Deployment", "Background")}
    assert api.get("Deployment", ns, name) is None and api.get("Service", ns, name) is None
    api.remove_finalizers("Pod", ns, pod["metadata"]["name"])
    assert await p.release(state.provision_id) is True
    assert await p.release(state.provision_id) is True  # already gone: still True
    await p.aclose()


async def test_a_template_that_cannot_be_rendered_is_refused_naming_the_field(api) -> None:
    p = _provider(api)
    bad = {**GPU_TEMPLATE, "spec": {**GPU_TEMPLATE["spec"], "engine": {"type": "vllm"}}}
    with pytest.raises(ProvisionError) as err:
        await p.provision(_request(template=bad))
    assert not err.value.retryable and "spec.engine.image" in err.value.message
    assert api.objects("Deployment") == []
    await p.aclose()


async def test_an_unreachable_api_server_is_a_retryable_error() -> None:
    from overnight.runtimes.kubernetes.client import RetryPolicy  # noqa: F401  (the client retries first)
    from tests.conftest import free_port

    p = KubernetesProvisioner(config=KubeConfig(api_url=f"http://127.0.0.1:{free_port()}"), namespace=NS,
                              image="overnight:test")
    k = await p.kube()
    k.retry = type(k.retry)(attempts=1)
    with pytest.raises(ProvisionError) as err:
        await p.provision(_request())
    assert err.value.retryable and "cannot reach the API server" in err.value.message
    await p.aclose()


async def test_list_owned_and_the_sweep_touch_only_this_installations_objects(api) -> None:
    a, b = _provider(api), _provider(api)
    store = MemoryStore()
    planner = Planner(store=store, storage=None, provisioners={"kubernetes": a}, limits=None,
                      config=PlannerConfig(installation_id="inst-a", poll_s=0, retry_base_s=0))
    mine = await a.provision(_request("job_0000000000000000000000a1"))
    theirs = await b.provision(_request("job_0000000000000000000000b1", installation="inst-b"))
    # unlabelled objects, and objects labelled like ours by hand but without the console's mark
    api.create({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "unlabelled", "namespace": NS, "labels": {INSTALLATION_LABEL: "inst-a"}},
                "spec": {"ports": [{"port": 80}]}})
    api.create({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "plain", "namespace": NS, "labels": {"app": "plain"}},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "plain"}},
                         "template": {"metadata": {"labels": {"app": "plain"}}, "spec": {"containers": []}}}})
    owned = await a.list_owned("inst-a")
    assert [s.provision_id for s in owned] == [mine.provision_id]
    assert owned[0].job_id == "job_0000000000000000000000a1"
    assert [s.provision_id for s in await b.list_owned("inst-b")] == [theirs.provision_id]
    # the job is unknown to this installation's store: the sweep releases it, nothing else
    released = await planner.sweep()
    assert released == [mine.provision_id]
    deleted = {(d.kind, d.name) for d in api.deletions}
    name_a, name_b = mine.provision_id.split("/")[1], theirs.provision_id.split("/")[1]
    assert ("Deployment", name_a) in deleted
    assert api.get("Deployment", NS, name_a) is None and api.get("Service", NS, name_a) is None
    assert not {n for _, n in deleted} & {name_b, "unlabelled", "plain"}
    assert api.get("Deployment", NS, name_b) and api.get("Service", NS, "unlabelled") and api.get("Deployment", NS,
                                                                                                  "plain")
    assert await a.list_owned("inst-a") == []
    assert await b.release(theirs.provision_id)
    for p in (a, b):
        await p.aclose()


async def test_a_live_jobs_objects_survive_the_sweep_and_the_batch_runtimes_sweep(api) -> None:
    from overnight.runtimes.kubernetes.job import KubernetesJobRuntime

    p = _provider(api)
    store = MemoryStore()
    resolved = resolve(StaticSource([TEMPLATE]), {"name": "tiny"}, None)
    job = await jobs.create_job(store=store, tenant="t", req=jobs.JobCreate(
        {"input_dataset": "file-x", "endpoint": "/v1/chat/completions"}), resolved=resolved.to_record(),
        provider="kubernetes", installation_id="inst-a")
    state = await p.provision(_request(job.id))
    planner = Planner(store=store, storage=None, provisioners={"kubernetes": p}, limits=None,
                      config=PlannerConfig(installation_id="inst-a"))
    assert await planner.sweep() == []
    # The kubernetes-job runtime's orphan sweep (managed-by=overnight, by batch id) leaves it alone,
    # even with every batch dead and no grace period.
    rt = KubernetesJobRuntime(config=KubeConfig(api_url=api.url), namespace=NS, image="overnight:test")

    async def dead(_batch: str, _labels: dict) -> bool:
        return False

    assert await rt.sweep(dead, grace_s=0, now=time.time() + 3600) == []
    await rt.aclose()
    assert api.deletions == [] and api.get("Deployment", *state.provision_id.split("/"))
    assert await p.release(state.provision_id)
    await p.aclose()


async def test_the_catalog_lists_the_templates_gpu_types_or_says_it_knows_none(api) -> None:
    p = _provider(api, templates=StaticSource([TEMPLATE, GPU_TEMPLATE]))
    cat = await p.catalog()
    assert cat == [{"provider": "kubernetes", "gpu_type": "H100", "region": NS, "price_per_hour": None,
                    "templates": ["big"], "note": "from the templates' accelerator type"}]
    none = await _provider(api, templates=StaticSource([TEMPLATE])).catalog()
    assert none[0]["gpu_types"] == [] and "not read" in none[0]["note"]
    await p.aclose()


async def test_a_service_whose_deployment_is_gone_is_listed_and_released(api) -> None:
    p = _provider(api)
    req = _request()
    _dep, svc = p.render(req)
    api.create(svc)  # no Deployment (and no owner): left by a crash or deleted by hand
    owned = await p.list_owned("inst-a")
    assert [(s.status, s.job_id) for s in owned] == [("failed", req.job_id)]
    assert "Deployment is gone" in owned[0].error
    assert await p.release(owned[0].provision_id)
    assert api.objects("Service") == [] and await p.list_owned("inst-a") == []
    await p.aclose()
