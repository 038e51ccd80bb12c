"""The Kubernetes objects overnight renders: schema-valid for 1.29 and the newest
Kubernetes (kubernetes-validate, strict), and right in what the runtimes rely on."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from overnight.runtimes.kubernetes import manifests as m
from overnight.runtimes.kubernetes.manifests import (
    ANNOTATION_PREFIX,
    ANNOTATIONS,
    BATCH_LABEL,
    EXIT_UNRECOVERABLE,
    MANAGED_BY_LABEL,
    PODINFO_DIR,
    ManifestError,
    format_annotations,
    object_name,
    parse_annotations,
    pod_info,
    render_deployment,
    render_job,
    render_service,
)
from overnight.templates import Resolved, StaticSource, resolve
from overnight.templates.schema import SecretKeyRef, looks_like_secret

VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
BATCH = "batch_0193abcdef0123456789abcd"
NS = "overnight"
IMAGE = "ghcr.io/example/overnight:0.1.0"
# What the test environment holds for the secrets the profiles name: none of it may
# ever reach a manifest.
SECRET_VALUES = {
    "HF_TOKEN": "hf_QbXk29LmPzTr84VnWcYs61JdGhFa",
    "PGPASSWORD": "Zq8#rT2!vLx9Pw4m",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
}

STORE = {
    "store_url": "postgresql://overnight@postgres.batch.svc/overnight",
    "storage_url": "s3://batch-files/overnight",
}


def _template(name: str, engine: dict[str, Any], *, count: int, acc: str = "H100", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "engine": engine,
        "model_source": {"type": "huggingface", "uri": "org/model"},
        "accelerator": {"type": acc, "count": count},
        "supported_endpoints": ["/v1/chat/completions"],
    }
    body.update(spec)
    return {"name": name, "version": "1.2.0", "spec": body}


TEMPLATES = [
    _template("mock-tiny", {"type": "mock", "ready_timeout_seconds": 30, "serve_args": ["--output-tokens", "8"]},
              count=0, acc="cpu", engine_args={"latency_ms": 20}),
    _template("llama-8b", {"type": "vllm", "image": "vllm/vllm-openai:v0.11.0", "ready_timeout_seconds": 1200},
              count=1, engine_args={"max_num_seqs": 256}),
    _template("qwen-tp2", {"type": "sglang", "image": "lmsysorg/sglang:v0.5.3", "port": 30000,
                           "health_endpoint": "/health_generate", "ready_timeout_seconds": 900},
              count=2, parallelism={"tp": 2}),
    _template("llama-dp2", {"type": "vllm", "image": "vllm/vllm-openai:v0.11.0"}, count=4,
              parallelism={"tp": 2, "dp": 2}),
    _template("no-image", {"type": "vllm"}, count=1),
]
PROFILES = [
    {"name": "plain", **STORE},
    {
        "name": "gpu-pool",
        **STORE,
        "secrets": {
            "PGPASSWORD": {"secret_key_ref": {"name": "overnight-db", "key": "password"}},
            "AWS_SECRET_ACCESS_KEY": {"secret_key_ref": {"name": "overnight-s3", "key": "secret_access_key"}},
            "HF_TOKEN": {"secretKeyRef": {"name": "hf", "key": "token"}},
        },
        "service_account": "overnight-worker",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 120},
        ],
        "image_pull_secrets": ["regcred"],
        "env": {"HF_HOME": "/models/hf-cache", "OVERNIGHT_REQUEST_TIMEOUT_S": "900"},
    },
    {"name": "kueue", **STORE, "queue_name": "gpu-queue"},
    {
        "name": "store-in-secrets",
        "secrets": {
            "OVERNIGHT_STORE_URL": {"secret_key_ref": {"name": "overnight-store", "key": "url"}},
            "OVERNIGHT_STORAGE_URL": {"secret_key_ref": {"name": "overnight-storage", "key": "url"}},
        },
    },
    {"name": "env-secret", **STORE, "secrets": {"HF_TOKEN": {"env": "HF_TOKEN"}}},
    {"name": "worker-only", **STORE,
     "secrets": {"HF_TOKEN": {"secret_key_ref": {"name": "hf", "key": "token"}}},
     "worker_secrets": {
         "PGPASSWORD": {"secret_key_ref": {"name": "overnight-db", "key": "password"}},
         "AWS_SECRET_ACCESS_KEY": {"secret_key_ref": {"name": "overnight-s3", "key": "secret_access_key"}},
     }},
    {"name": "worker-env-secret", **STORE, "worker_secrets": {"PGPASSWORD": {"env": "PGPASSWORD"}}},
    {"name": "no-store"},
    {"name": "both-store", **STORE,
     "secrets": {"OVERNIGHT_STORE_URL": {"secret_key_ref": {"name": "overnight-store", "key": "url"}}}},
]
SOURCE = StaticSource(TEMPLATES, PROFILES)


def _r(template: str, profile: str | None = "plain") -> Resolved:
    return resolve(SOURCE, {"name": template}, {"name": profile} if profile else None)


# (template, profile, shards): every shape the tests validate.
VARIANTS = [
    ("mock-tiny", "plain", 1),
    ("mock-tiny", "plain", 16),
    ("llama-8b", "gpu-pool", 1),
    ("llama-8b", "gpu-pool", 16),
    ("qwen-tp2", "kueue", 4),
    ("qwen-tp2", "gpu-pool", 2),
    ("llama-dp2", "store-in-secrets", 3),
    ("llama-8b", "worker-only", 4),
]


def _objects(template: str, profile: str, shards: int) -> list[dict[str, Any]]:
    r = _r(template, profile)
    return [
        render_job(r, batch_id=BATCH, namespace=NS, image=IMAGE, shards=shards, active_deadline_seconds=86399.2),
        render_deployment(r, batch_id=BATCH, namespace=NS, image=IMAGE),
        render_service(r, batch_id=BATCH, namespace=NS),
    ]


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def _engine(pod: dict[str, Any]) -> dict[str, Any]:
    [engine] = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "engine"]
    return engine


# -- schema ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("template", "profile", "shards"), VARIANTS)
def test_every_rendered_object_is_schema_valid(template: str, profile: str, shards: int, version: str) -> None:
    for obj in _objects(template, profile, shards):
        kubernetes_validate.validate(obj, version, strict=True)


def test_validation_is_real_a_bad_field_and_an_old_kubernetes_are_refused() -> None:
    job = render_job(_r("llama-8b", "gpu-pool"), batch_id=BATCH, namespace=NS, image=IMAGE)
    broken = json.loads(json.dumps(job))
    _engine(_pod(broken))["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicyy"):
        kubernetes_validate.validate(broken, "1.29.0", strict=True)
    # 1.28's schema wants onPodConditions in every failure-policy rule ...
    with pytest.raises(kubernetes_validate.ValidationError, match="onPodConditions"):
        kubernetes_validate.validate(job, "1.28.0", strict=True)
    # ... and before 1.28 a container had no restartPolicy (native sidecars: 1.29+, on by default).
    no_policy = json.loads(json.dumps(job))
    del no_policy["spec"]["podFailurePolicy"], no_policy["spec"]["backoffLimitPerIndex"]
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(no_policy, "1.27.0", strict=True)


# -- the Job ----------------------------------------------------------------------------------
def test_job_is_indexed_with_one_pod_per_shard() -> None:
    for shards in (1, 16):
        job = render_job(_r("mock-tiny"), batch_id=BATCH, namespace=NS, image=IMAGE, shards=shards)
        spec = job["spec"]
        assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", shards, shards)
        assert spec["template"]["metadata"]["annotations"]["overnight.dev/shards"] == str(shards)
        assert _pod(job)["restartPolicy"] == "Never"
        assert spec["backoffLimitPerIndex"] == 2 and "maxFailedIndexes" not in spec
        assert spec["ttlSecondsAfterFinished"] == 3600
        assert "suspend" not in spec and "activeDeadlineSeconds" not in spec


def test_engine_is_a_native_sidecar_and_the_worker_the_only_container() -> None:
    job = render_job(_r("llama-8b", "gpu-pool"), batch_id=BATCH, namespace=NS, image=IMAGE)
    pod = _pod(job)
    [engine] = pod["initContainers"]
    [worker] = pod["containers"]
    assert engine["name"] == "engine" and engine["restartPolicy"] == "Always"
    assert engine["image"] == "vllm/vllm-openai:v0.11.0"
    cmd = engine["command"]
    assert cmd[:3] == ["vllm", "serve", "org/model"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    assert cmd[cmd.index("--served-model-name") + 1] == "llama-8b"
    assert not any("{" in part for part in cmd)
    assert engine["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert worker["name"] == "worker" and "restartPolicy" not in worker
    assert worker["image"] == IMAGE
    assert worker["command"] == ["overnight", "worker", "--podinfo-dir", PODINFO_DIR]


@pytest.mark.parametrize(("template", "gpus"), [("mock-tiny", 0), ("llama-8b", 1), ("qwen-tp2", 2), ("llama-dp2", 4)])
def test_gpus_are_limited_on_the_engine_only(template: str, gpus: int) -> None:
    pod = _pod(render_job(_r(template), batch_id=BATCH, namespace=NS, image=IMAGE))
    engine = _engine(pod)
    if gpus:
        assert engine["resources"] == {"limits": {"nvidia.com/gpu": str(gpus)}}
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    else:
        assert "resources" not in engine
        assert all(v["name"] != "dshm" for v in pod["volumes"])
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"])


@pytest.mark.parametrize("template", ["mock-tiny", "llama-8b", "qwen-tp2"])
def test_startup_probe_budget_covers_the_ready_timeout(template: str) -> None:
    r = _r(template)
    for obj in (render_job(r, batch_id=BATCH, namespace=NS, image=IMAGE),
                render_deployment(r, batch_id=BATCH, namespace=NS, image=IMAGE)):
        pod = obj["spec"]["template"]["spec"]
        engine = _engine(pod)
        startup, ready = engine["startupProbe"], engine["readinessProbe"]
        health = r.template.spec.engine.health_endpoint
        assert startup["httpGet"] == ready["httpGet"] == {"path": health, "port": "http"}
        budget = startup["failureThreshold"] * startup["periodSeconds"]
        assert budget >= r.ready_timeout_seconds
        assert budget < r.ready_timeout_seconds + startup["periodSeconds"]  # not wildly more either


def test_sglang_listens_on_the_templates_port() -> None:
    pod = _pod(render_job(_r("qwen-tp2"), batch_id=BATCH, namespace=NS, image=IMAGE))
    engine = _engine(pod)
    cmd = engine["command"]
    assert cmd[:3] == ["python", "-m", "sglang.launch_server"]
    assert cmd[cmd.index("--port") + 1] == "30000" and cmd[cmd.index("--tp-size") + 1] == "2"
    assert engine["ports"][0]["containerPort"] == 30000
    assert engine["startupProbe"]["httpGet"]["path"] == "/health_generate"
    ann = render_job(_r("qwen-tp2"), batch_id=BATCH, namespace=NS, image=IMAGE)["metadata"]["annotations"]
    assert ann["overnight.dev/engine-port"] == "30000"
    assert ann["overnight.dev/engine-health-path"] == "/health_generate"


def test_mock_engine_without_an_image_runs_from_overnights_image() -> None:
    engine = _engine(_pod(render_job(_r("mock-tiny"), batch_id=BATCH, namespace=NS, image=IMAGE)))
    assert engine["image"] == IMAGE
    assert engine["command"][:2] == ["overnight", "mock-engine"]
    assert engine["command"][engine["command"].index("--host") + 1] == "0.0.0.0"
    assert ["--output-tokens", "8"] == engine["command"][-4:-2]


def test_an_engine_without_an_image_is_refused_naming_the_field() -> None:
    for render in (
        lambda r: render_job(r, batch_id=BATCH, namespace=NS, image=IMAGE),
        lambda r: render_deployment(r, batch_id=BATCH, namespace=NS, image=IMAGE),
    ):
        with pytest.raises(ManifestError, match=r"spec\.engine\.image") as e:
            render(_r("no-image"))
        assert e.value.param == "spec.engine.image"
    # A mock template needs overnight's image when it names none.
    with pytest.raises(ManifestError) as e:
        render_deployment(_r("mock-tiny"), batch_id=BATCH, namespace=NS)
    assert e.value.param == "spec.engine.image"


def test_pod_failure_policy_ignores_disruptions_and_fails_the_index_on_the_reserved_exit_code() -> None:
    spec = render_job(_r("mock-tiny"), batch_id=BATCH, namespace=NS, image=IMAGE, max_failed_indexes=3,
                      shards=8, backoff_limit_per_index=5)["spec"]
    ignore, fail = spec["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert fail == {"action": "FailIndex",
                    "onExitCodes": {"containerName": "worker", "operator": "In", "values": [EXIT_UNRECOVERABLE]}}
    assert EXIT_UNRECOVERABLE == 42
    assert spec["backoffLimitPerIndex"] == 5 and spec["maxFailedIndexes"] == 3


def test_worker_reads_annotations_through_a_downward_api_volume() -> None:
    pod = _pod(render_job(_r("mock-tiny"), batch_id=BATCH, namespace=NS, image=IMAGE))
    [worker] = pod["containers"]
    assert {"name": "podinfo", "mountPath": PODINFO_DIR, "readOnly": True} in worker["volumeMounts"]
    [vol] = [v for v in pod["volumes"] if v["name"] == "podinfo"]
    items = {i["path"]: i["fieldRef"]["fieldPath"] for i in vol["downwardAPI"]["items"]}
    assert items["annotations"] == "metadata.annotations" and items["labels"] == "metadata.labels"
    assert pod["automountServiceAccountToken"] is False  # the worker needs no API access


def test_deadline_is_the_rest_of_the_completion_window_rounded_up() -> None:
    r = _r("mock-tiny")
    job = render_job(r, batch_id=BATCH, namespace=NS, image=IMAGE, active_deadline_seconds=3600.01)
    assert job["spec"]["activeDeadlineSeconds"] == 3601
    for bad in (0, -5.0, math.nan, math.inf):
        with pytest.raises(ManifestError) as e:
            render_job(r, batch_id=BATCH, namespace=NS, image=IMAGE, active_deadline_seconds=bad)
        assert e.value.param == "active_deadline_seconds"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"shards": 0}, "shards"),
        ({"shards": 100_001}, "shards"),
        ({"shards": True}, "shards"),
        ({"shards": 4, "max_failed_indexes": 5}, "max_failed_indexes"),
        ({"backoff_limit_per_index": -1}, "backoff_limit_per_index"),
        ({"ttl_seconds_after_finished": -1}, "ttl_seconds_after_finished"),
        ({"image": ""}, "image"),
        ({"image": "bad image"}, "image"),
        ({"namespace": "Not_A_Namespace"}, "namespace"),
        ({"batch_id": "batch with spaces"}, "batch_id"),
        ({"batch_id": "b" * 64}, "batch_id"),
    ],
)
def test_bad_options_are_refused_naming_them(kwargs: dict[str, Any], param: str) -> None:
    args: dict[str, Any] = {"batch_id": BATCH, "namespace": NS, "image": IMAGE} | kwargs
    with pytest.raises(ManifestError) as e:
        render_job(_r("mock-tiny"), **args)
    assert e.value.param == param


def test_kueue_queue_is_a_job_label_and_suspend_is_left_to_kueue() -> None:
    r = _r("qwen-tp2", "kueue")
    job = render_job(r, batch_id=BATCH, namespace=NS, image=IMAGE, shards=4)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    assert "suspend" not in job["spec"]
    with pytest.raises(ManifestError) as e:
        render_job(r, batch_id=BATCH, namespace=NS, image=IMAGE, suspend=True)
    assert e.value.param == "suspend"
    # Without Kueue, overnight may create the Job suspended.
    plain = render_job(_r("qwen-tp2"), batch_id=BATCH, namespace=NS, image=IMAGE, suspend=True)
    assert plain["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def test_profile_placement_reaches_the_pod() -> None:
    for obj in (render_job(_r("llama-8b", "gpu-pool"), batch_id=BATCH, namespace=NS, image=IMAGE),
                render_deployment(_r("llama-8b", "gpu-pool"), batch_id=BATCH, namespace=NS)):
        pod = obj["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "overnight-worker"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 120},
        ]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    bare = _pod(render_job(_r("mock-tiny"), batch_id=BATCH, namespace=NS, image=IMAGE))
    assert not {"serviceAccountName", "nodeSelector", "tolerations", "imagePullSecrets"} & set(bare)


def test_store_and_storage_reach_the_worker_as_values_or_secret_references() -> None:
    def worker_env(r: Resolved, **kw: Any) -> dict[str, Any]:
        [worker] = _pod(render_job(r, batch_id=BATCH, namespace=NS, image=IMAGE, **kw))["containers"]
        return {e["name"]: e for e in worker["env"]}

    plain = worker_env(_r("mock-tiny", "plain"))
    assert plain["OVERNIGHT_STORE_URL"] == {"name": "OVERNIGHT_STORE_URL", "value": STORE["store_url"]}
    assert plain["OVERNIGHT_STORAGE_URL"]["value"] == STORE["storage_url"]
    refs = worker_env(_r("mock-tiny", "store-in-secrets"))
    assert refs["OVERNIGHT_STORE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "overnight-store", "key": "url"}}
    assert refs["OVERNIGHT_STORAGE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "overnight-storage", "key": "url"}}
    fallback = worker_env(_r("mock-tiny", "no-store"), store_url_secret=SecretKeyRef(name="ovn", key="store"),
                          storage_url_secret=SecretKeyRef(name="ovn", key="storage"))
    assert fallback["OVERNIGHT_STORE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "ovn", "key": "store"}
    # No shared store anywhere: a worker pod could not report a line.
    for profile, param in (("no-store", "profile.store_url"), (None, "profile.store_url"),
                           ("both-store", "profile.store_url")):
        with pytest.raises(ManifestError) as e:
            render_job(_r("mock-tiny", profile), batch_id=BATCH, namespace=NS, image=IMAGE)
        assert e.value.param == param


def test_engine_gets_no_overnight_settings_and_the_worker_gets_the_profile_env() -> None:
    pod = _pod(render_job(_r("llama-8b", "gpu-pool"), batch_id=BATCH, namespace=NS, image=IMAGE))
    engine_names = [e["name"] for e in _engine(pod)["env"]]
    worker_names = [e["name"] for e in pod["containers"][0]["env"]]
    assert "HF_TOKEN" in engine_names and "HF_HOME" in engine_names
    assert not [n for n in engine_names if n.startswith("OVERNIGHT_")]
    assert {"OVERNIGHT_STORE_URL", "OVERNIGHT_STORAGE_URL", "OVERNIGHT_REQUEST_TIMEOUT_S", "PGPASSWORD"} <= set(
        worker_names
    )


@pytest.mark.parametrize(("template", "profile", "shards"), VARIANTS)
def test_no_secret_value_anywhere(template: str, profile: str, shards: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SECRET_VALUES.items():
        monkeypatch.setenv(k, v)
    r = _r(template, profile)
    secret_names = set(r.profile.secrets) | set(r.profile.worker_secrets) if r.profile else set()
    for obj in _objects(template, profile, shards):
        text = json.dumps(obj)
        for value in SECRET_VALUES.values():
            assert value not in text
        assert not [s for s in _strings(obj) if looks_like_secret(s)]
        pod = obj["spec"].get("template", {}).get("spec", {})
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            for e in c.get("env", []):
                if e["name"] in secret_names:
                    assert set(e) == {"name", "valueFrom"} and set(e["valueFrom"]) == {"secretKeyRef"}


def test_an_environment_secret_reference_is_refused() -> None:
    with pytest.raises(ManifestError, match=r"secrets\.HF_TOKEN") as e:
        render_job(_r("llama-8b", "env-secret"), batch_id=BATCH, namespace=NS, image=IMAGE)
    assert e.value.param == "profile.secrets.HF_TOKEN"
    with pytest.raises(ManifestError, match=r"worker_secrets\.PGPASSWORD") as e:
        render_job(_r("llama-8b", "worker-env-secret"), batch_id=BATCH, namespace=NS, image=IMAGE)
    assert e.value.param == "profile.worker_secrets.PGPASSWORD"


def test_worker_secrets_reach_the_worker_and_never_the_engine() -> None:
    # The engine runs a model's code; the store's and the storage's credentials are the worker's.
    pod = _pod(render_job(_r("llama-8b", "worker-only"), batch_id=BATCH, namespace=NS, image=IMAGE))
    engine = {e["name"]: e for e in _engine(pod)["env"]}
    worker = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert "HF_TOKEN" in engine and "HF_TOKEN" in worker
    assert not {"PGPASSWORD", "AWS_SECRET_ACCESS_KEY"} & set(engine)
    assert worker["PGPASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "overnight-db", "key": "password"}}
    assert worker["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "overnight-s3"
    # A Deployment has no worker: its engine gets none of them either.
    for obj in render_deployment(_r("llama-8b", "worker-only"), batch_id=BATCH, namespace=NS, image=IMAGE):
        assert "PGPASSWORD" not in json.dumps(obj) and "AWS_SECRET_ACCESS_KEY" not in json.dumps(obj)


@pytest.mark.parametrize(("body", "where", "message"), [
    ({"worker_secrets": {"bad-name": {"env": "X"}}}, "worker_secrets.bad-name", "environment variable name"),
    ({"secrets": {"A": {"env": "A"}}, "worker_secrets": {"A": {"env": "A"}}}, "worker_secrets.A", "also in secrets"),
    ({"worker_secrets": {"OVERNIGHT_STORE_URL": {"env": "U"}}}, "worker_secrets.OVERNIGHT_STORE_URL", "goes in secrets"),
    ({"worker_secrets": {"B": {"env": "B"}}, "env": {"B": "1"}}, "env.B", "also in worker_secrets"),
])
def test_worker_secrets_are_checked_like_secrets(body: dict[str, Any], where: str, message: str) -> None:
    from overnight.templates.schema import TemplateSchemaError, parse_profile

    with pytest.raises(TemplateSchemaError) as e:
        parse_profile({"name": "p", **body})
    assert any(where in line and message in line for line in e.value.issues), e.value.issues


# -- labels, annotations, names ----------------------------------------------------------------
@pytest.mark.parametrize(("template", "profile", "shards"), VARIANTS)
def test_labels_annotations_and_names(template: str, profile: str, shards: int) -> None:
    for obj in _objects(template, profile, shards):
        meta = obj["metadata"]
        name = meta["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
        assert name == object_name(BATCH) == "ovn-0193abcdef0123456789abcd"
        assert meta["namespace"] == NS
        assert meta["labels"][MANAGED_BY_LABEL] == "overnight"
        assert meta["labels"][BATCH_LABEL] == BATCH
        assert meta["labels"]["app.kubernetes.io/name"] == "overnight"
        for value in meta["labels"].values():
            assert len(value) <= 63
        ann = meta["annotations"]
        assert ann["overnight.dev/batch-id"] == BATCH
        assert ann["overnight.dev/template-name"] == template
        assert ann["overnight.dev/template-version"] == "1.2.0"
        assert ann["overnight.dev/served-model-name"] == template
        assert all(k in ANNOTATIONS for k in ann if k.startswith(ANNOTATION_PREFIX))
        assert len(json.dumps(ann)) < 4096  # ids, not specs (the limit is 256 KiB)
        if "template" in obj["spec"]:
            tmeta = obj["spec"]["template"]["metadata"]
            assert tmeta["annotations"] == ann
            assert tmeta["labels"][BATCH_LABEL] == BATCH and tmeta["labels"][MANAGED_BY_LABEL] == "overnight"
    job = _objects(template, profile, shards)[0]
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "batch-worker"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "batch-worker"


def test_object_names_are_deterministic_dns_labels() -> None:
    ids = [BATCH, "batch_X", "Batch_Upper.Case_id", "x" * 200, "batch_" + "a" * 100, "--__--", "batch_a_b", "batch_a-b"]
    names = [object_name(i) for i in ids]
    for i, n in zip(ids, names, strict=True):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n), (i, n)
        assert len(n) <= m.MAX_NAME <= 63
        assert object_name(i) == n
    assert len(set(names)) == len(names)  # ids that normalise alike still differ
    assert object_name(BATCH, suffix="-engine") == "ovn-0193abcdef0123456789abcd-engine"
    with pytest.raises(ManifestError):
        object_name("")


# -- the Deployment and Service ----------------------------------------------------------------
def test_deployment_replicas_are_data_parallel_ranks() -> None:
    r = _r("llama-dp2")
    dep = render_deployment(r, batch_id=BATCH, namespace=NS)
    assert dep["spec"]["replicas"] == 2
    engine = _engine(dep["spec"]["template"]["spec"])
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "2"  # tp=2 per replica
    assert "--data-parallel-size" not in engine["command"]
    assert engine["command"][engine["command"].index("--tensor-parallel-size") + 1] == "2"
    assert "restartPolicy" not in engine  # a plain container here
    assert render_deployment(r, batch_id=BATCH, namespace=NS, replicas=5)["spec"]["replicas"] == 5
    assert render_deployment(_r("llama-8b"), batch_id=BATCH, namespace=NS)["spec"]["replicas"] == 1
    with pytest.raises(ManifestError) as e:
        render_deployment(r, batch_id=BATCH, namespace=NS, replicas=0)
    assert e.value.param == "replicas"
    # The Job keeps the template whole: dp inside one engine.
    job_engine = _engine(_pod(render_job(r, batch_id=BATCH, namespace=NS, image=IMAGE)))
    assert job_engine["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "--data-parallel-size" in job_engine["command"]


@pytest.mark.parametrize("template", ["mock-tiny", "llama-8b", "qwen-tp2"])
def test_service_selects_exactly_its_deployments_pods(template: str) -> None:
    r = _r(template)
    dep = render_deployment(r, batch_id=BATCH, namespace=NS, image=IMAGE)
    svc = render_service(r, batch_id=BATCH, namespace=NS)
    selector = svc["spec"]["selector"]
    assert selector == dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert selector["app.kubernetes.io/instance"] == dep["metadata"]["name"]
    other = render_deployment(r, batch_id="batch_0193abcdef0123456789ffff", namespace=NS, image=IMAGE)
    assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
    [port] = svc["spec"]["ports"]
    engine = _engine(dep["spec"]["template"]["spec"])
    assert port["targetPort"] == engine["ports"][0]["name"] == "http"
    assert port["port"] == r.template.spec.engine.port
    assert svc["spec"]["type"] == "ClusterIP"
    assert "ownerReferences" not in svc["metadata"] and "ownerReferences" not in dep["metadata"]
    assert dep["spec"]["progressDeadlineSeconds"] >= r.ready_timeout_seconds
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


# -- the downward API file ------------------------------------------------------------------------
ROUND_TRIP = {
    "overnight.dev/batch-id": BATCH,
    "quotes": 'say "hi"',
    "backslashes": "C:\\path\\to\\x \\n not a newline",
    "newlines": "line one\nline two\r\n\ttabbed",
    "unicode": "héllo wörld — 日本語 🚀",
    "controls": "\x00\x01\x1b\x7f\a\b\f\v",
    "invisible": "no\u00a0break\u200bzero\u2028sep\U000e0001tag",
    "empty": "",
    "equals": "a=b=c",
    "example.com/last-applied": json.dumps({"spec": {"x": [1, "two"]}}),
}


def test_annotations_file_round_trips() -> None:
    text = format_annotations(ROUND_TRIP)
    assert "\n" not in "".join(text.split("\n"))  # one physical line per key
    assert len(text.split("\n")) == len(ROUND_TRIP)
    assert parse_annotations(text) == ROUND_TRIP
    assert parse_annotations(text + "\n") == ROUND_TRIP
    assert parse_annotations("") == {}


def test_annotations_file_reads_what_the_kubelet_writes() -> None:
    # Written by hand the way Go's fmt %q (strconv.Quote) writes these values.
    text = (
        'a="x\\"y\\\\z"\n'
        'b="one\\ntwo\\ttab"\n'
        'c="é日🚀"\n'
        'd="\\x00\\x1b\\x7f\\a"\n'
        'e="no\\u00a0break\\u200bzero\\U000e0001"\n'
        'f="\\101\\102"'
    )
    assert parse_annotations(text) == {
        "a": 'x"y\\z', "b": "one\ntwo\ttab", "c": "é日🚀", "d": "\x00\x1b\x7f\a",
        "e": "no\u00a0break\u200bzero\U000e0001", "f": "AB",
    }
    assert format_annotations({k: v for k, v in parse_annotations(text).items() if k != "f"}) == text.rsplit("\n", 1)[0]


@pytest.mark.parametrize(
    "text",
    ["novalue", 'k=unquoted', 'k="open', 'k="a"b"', 'k="bad \\q escape"', 'k="\\x4"', 'k="\\u12"',
     'k="\\U00110000"', 'k="trailing\\"', ' k="lead"', '="nokey"', 'k="\\xff"'],
)
def test_malformed_annotation_lines_are_errors_naming_the_line(text: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_annotations('ok="fine"\n' + text)


def test_pod_info_from_a_rendered_pods_annotations() -> None:
    job = render_job(_r("qwen-tp2"), batch_id=BATCH, namespace=NS, image=IMAGE, shards=16)
    ann = dict(job["spec"]["template"]["metadata"]["annotations"])
    ann["batch.kubernetes.io/job-completion-index"] = "7"  # added by the Job controller
    info = pod_info(parse_annotations(format_annotations(ann)))
    assert (info.batch_id, info.shards, info.shard) == (BATCH, 16, 7)
    assert info.engine_url == "http://127.0.0.1:30000" and info.health_path == "/health_generate"
    assert info.served_model_name == "qwen-tp2"
    assert pod_info(ann, shard="3").shard == 3  # JOB_COMPLETION_INDEX wins
    for key, value, match in [
        ("batch.kubernetes.io/job-completion-index", "16", "not below"),
        ("overnight.dev/shards", "zero", "not an integer"),
        ("overnight.dev/engine-port", "70000", "not a port"),
    ]:
        with pytest.raises(ValueError, match=match):
            pod_info(ann | {key: value})
    with pytest.raises(ValueError, match="overnight.dev/batch-id is missing"):
        pod_info({k: v for k, v in ann.items() if k != "overnight.dev/batch-id"})


# -- the profile fields the Kubernetes runtimes read --------------------------------------------
def test_profile_placement_fields_are_checked_naming_the_field() -> None:
    from overnight.templates.schema import TemplateSchemaError, parse_profile

    ok = parse_profile({"name": "p", "image_pull_secrets": ["regcred", "ghcr.io-pull"], "queue_name": "team-a.gpu"})
    assert ok.image_pull_secrets == ["regcred", "ghcr.io-pull"] and ok.queue_name == "team-a.gpu"
    for doc, field in (
        ({"image_pull_secrets": ["Bad_Name"]}, "image_pull_secrets[0]"),
        ({"image_pull_secrets": "regcred"}, "image_pull_secrets"),
        ({"queue_name": "-starts-with-dash"}, "queue_name"),
        ({"queue_name": "q" * 64}, "queue_name"),
    ):
        with pytest.raises(TemplateSchemaError) as e:
            parse_profile({"name": "p", **doc}, where="profiles.yaml")
        assert e.value.issues[0].startswith(f"profiles.yaml: {field}:"), e.value.issues


# -- docs/kubernetes.md shows what is rendered ---------------------------------------------------
DOC = Path(__file__).resolve().parents[2] / "docs" / "kubernetes.md"


def _subset(shown: Any, real: Any, path: str = "") -> None:
    """Everything ``shown`` says is true of ``real``: mappings by key, lists as an
    in-order subsequence, scalars equal."""
    if isinstance(shown, dict):
        assert isinstance(real, dict), path
        for k, v in shown.items():
            assert k in real, f"{path}.{k} is not rendered"
            _subset(v, real[k], f"{path}.{k}")
    elif isinstance(shown, list):
        assert isinstance(real, list), path
        i = 0
        for n, item in enumerate(shown):
            while i < len(real):
                try:
                    _subset(item, real[i], f"{path}[{n}]")
                    break
                except AssertionError:
                    i += 1
            else:
                raise AssertionError(f"{path}[{n}] = {item!r} is not rendered (in this order)")
            i += 1
    else:
        assert shown == real, f"{path}: docs say {shown!r}, rendered {real!r}"


def test_the_docs_job_example_is_what_render_job_writes() -> None:
    text = DOC.read_text()
    example = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    source = StaticSource(
        [_template("llama-3.1-8b-instruct", {"type": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                                             "ready_timeout_seconds": 1200},
                   count=1, engine_args={"max_num_seqs": 256}, model_source={
                       "type": "huggingface", "uri": "meta-llama/Llama-3.1-8B-Instruct"})
         | {"version": "1.0.0"}],
        [{"name": "kubernetes-gpu",
          "secrets": {"OVERNIGHT_STORE_URL": {"secret_key_ref": {"name": "overnight-store", "key": "url"}},
                      "OVERNIGHT_STORAGE_URL": {"secret_key_ref": {"name": "overnight-storage", "key": "url"}},
                      "HF_TOKEN": {"secret_key_ref": {"name": "hf", "key": "token"}}},
          "service_account": "overnight-worker",
          "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}],
    )
    r = resolve(source, {"name": "llama-3.1-8b-instruct"}, {"name": "kubernetes-gpu"})
    job = render_job(r, batch_id=BATCH, namespace="overnight", image="registry.example.com/overnight:0.1.0",
                     shards=4, active_deadline_seconds=86400)
    _subset(example, job)
    for version in VERSIONS:
        kubernetes_validate.validate(example, version, strict=True)
    for key in ANNOTATIONS:
        assert f"`{key}`" in text, f"docs/kubernetes.md does not document {key}"
