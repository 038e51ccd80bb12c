"""Creating a kubernetes-job batch: everything that would stop its Job from being
created is a 400 at create, naming the field; a good one is frozen with its shards."""

from __future__ import annotations

import pytest

from overnight.batches import service
from overnight.batches.service import BatchCreate, RuntimeRules, create_batch
from overnight.batches.validation import ValidationLimits
from overnight.errors import InvalidRequestError
from overnight.files.service import create_file
from overnight.runtimes.kubernetes.client import KubeConfig
from overnight.runtimes.kubernetes.job import KubernetesJobRuntime
from overnight.storage.memory import MemoryStorage
from overnight.store.memory import MemoryStore
from overnight.templates import DirectorySource
from tests.templates._yaml import template_yaml

LIMITS = ValidationLimits(max_requests=1000, max_bytes=10**7)

PROFILES = """\
kind: Profile
name: pool
store_url: postgresql://overnight@db/overnight
storage_url: s3://bucket/overnight
---
kind: Profile
name: env-secret
store_url: postgresql://overnight@db/overnight
storage_url: s3://bucket/overnight
secrets:
  HF_TOKEN: {env: HF_TOKEN}
"""


@pytest.fixture
def rules(tmp_path) -> RuntimeRules:
    d = tmp_path / "templates"
    d.mkdir()
    (d / "t.yaml").write_text(
        template_yaml("noimage", "1", count=1) + "---\n"
        + template_yaml("vllm", "1", count=1).replace("    type: vllm\n", "    type: vllm\n    image: vllm/vllm-openai:v0.11\n")
        + "---\n" + template_yaml("mock2", "1", engine="mock", count=0).replace("    tp: 1\n", "    tp: 1\n    dp: 2\n")
        + "---\n" + PROFILES
    )
    rt = KubernetesJobRuntime(config=KubeConfig(api_url="http://127.0.0.1:9"), namespace="batch",
                              namespaces=("team-a",), image="overnight:test")
    return RuntimeRules(allowed=frozenset(service.RUNTIME_TYPES), templates=DirectorySource(d, reload_s=0),
                        kubernetes_check=rt.check)


async def _create(rules: RuntimeRules, **ext):
    store, storage = MemoryStore(), MemoryStorage()

    async def chunks():
        yield b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "x"}}\n'

    f = await create_file(store=store, storage=storage, tenant="t", filename="in.jsonl", purpose="batch",
                          chunks=chunks())
    body = BatchCreate(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                       extension={"model_template": {"name": ext.pop("template", "vllm")},
                                  "profile": {"name": ext.pop("profile", "pool")},
                                  "runtime": {"type": "kubernetes-job", **ext}})
    return await create_batch(store=store, storage=storage, tenant="t", body=body, limits=LIMITS, rules=rules)


async def test_a_good_batch_is_frozen_with_its_shards(rules) -> None:
    rec = await _create(rules, shards=8)
    assert rec.options["runtime"] == {"type": "kubernetes-job", "shards": 8}
    assert rec.options["template"]["template"]["name"] == "vllm"
    # shards default to the template's parallelism.dp
    rec = await _create(rules, template="mock2")
    assert rec.options["runtime"]["shards"] == 2


@pytest.mark.parametrize(("ext", "param", "text"), [
    ({"shards": 0}, "overnight.runtime.shards", "from 1 to"),
    ({"shards": "4"}, "overnight.runtime.shards", "integer"),
    ({"namespace": "Bad_NS"}, "overnight.runtime.namespace", "namespace name"),
    ({"namespace": "elsewhere"}, "overnight.runtime.namespace", "not one this server"),
    ({"args": ["--x"]}, "overnight.runtime.args", "does not apply"),
    ({"template": "noimage"}, "spec.engine.image", "image is required"),
    ({"profile": "env-secret"}, "profile.secrets.HF_TOKEN", "Kubernetes Secret"),
])
async def test_what_would_break_the_job_is_a_400_naming_the_field(rules, ext, param, text) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await _create(rules, **ext)
    assert err.value.param == param and text in err.value.message, (err.value.param, err.value.message)


async def test_an_allowed_other_namespace_is_kept(rules) -> None:
    rec = await _create(rules, namespace="team-a", shards=2)
    assert rec.options["runtime"]["namespace"] == "team-a"


async def test_the_runtime_must_be_enabled(rules) -> None:
    off = RuntimeRules(allowed=frozenset({"endpoint", "local"}), templates=rules.templates,
                       kubernetes_check=rules.kubernetes_check)
    with pytest.raises(InvalidRequestError) as err:
        await _create(off, shards=2)
    assert err.value.code == "runtime_not_allowed" and "kubernetes-job" in err.value.message


async def test_a_server_without_kubernetes_says_so(rules) -> None:
    plain = RuntimeRules(allowed=frozenset({"endpoint", "mock", "local"}), templates=rules.templates)
    with pytest.raises(InvalidRequestError) as err:
        await _create(plain, shards=2)
    assert err.value.code == "runtime_not_allowed" and "OVERNIGHT_KUBERNETES" in err.value.message


def test_serve_refuses_a_kubernetes_runtime_without_a_cluster(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OVERNIGHT_RUNTIMES": "endpoint,kubernetes-job"}
    env.pop("OVERNIGHT_KUBERNETES", None)
    p = subprocess.run([sys.executable, "-m", "overnight.cli.main", "serve", "--data-dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "OVERNIGHT_KUBERNETES" in p.stderr, p.stderr


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_what_the_runtimes_send_is_valid_kubernetes(rules, version) -> None:
    # The runtimes add to the renderer's objects (a replica label, the Service's
    # owner reference): validate what is sent, strictly.
    import kubernetes_validate

    from overnight.runtimes.kubernetes.deployment import KubernetesDeploymentRuntime
    from overnight.templates.resolve import resolve

    v = kubernetes_validate.latest_version() if version == "latest" else version
    resolved = resolve(rules.templates, {"name": "vllm"}, {"name": "pool"})
    job_rt = KubernetesJobRuntime(config=KubeConfig(api_url="http://127.0.0.1:9"), namespace="batch",
                                  image="overnight:test")
    job = job_rt.render(resolved, batch_id="batch_" + "a" * 24, runtime={"shards": 16}, deadline_s=3600.5)
    dep_rt = KubernetesDeploymentRuntime(config=KubeConfig(api_url="http://127.0.0.1:9"), namespace="batch",
                                         image="overnight:test", replica_id="host:1234")
    dep, svc = dep_rt.render(resolved, batch_id="batch_" + "b" * 24, namespace=None)
    svc["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "Deployment",
                                           "name": dep["metadata"]["name"], "uid": "0f0e", "controller": True,
                                           "blockOwnerDeletion": True}]
    for obj in (job, dep, svc):
        kubernetes_validate.validate(obj, v, strict=True)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 16
    assert job["spec"]["activeDeadlineSeconds"] == 3601
    assert dep["metadata"]["labels"]["overnight.dev/replica"] == svc["metadata"]["labels"]["overnight.dev/replica"]
