"""deploy/kubernetes/: every overlay built with a real kustomize, every document
schema-valid (kubernetes-validate, strict, 1.29 and the newest), and what the
overlays promise (RBAC, replicas, store, secrets by reference) checked."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from overnight.config import Settings
from overnight.runtimes.kubernetes.manifests import render_deployment, render_job, render_service
from overnight.templates import DirectorySource, resolve
from overnight.templates.schema import looks_like_secret

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["single-sqlite", "replicas-postgres-s3"]
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
NAMESPACE = "overnight"

# Exactly what the runtimes do: nothing more may be granted.
RBAC = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("apps", "deployments"): {"create", "get", "list", "watch", "delete", "patch"},
    ("", "services"): {"create", "get", "list", "watch", "delete", "patch"},
    ("", "configmaps"): {"get", "list", "watch"},
}


def _kustomize() -> list[str]:
    """``kustomize build`` or ``kubectl kustomize`` (kustomize v4+; .ci/run says where it comes from)."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    message = "no kustomize: install kubectl (kustomize v5 built in) or kustomize to build deploy/kubernetes"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@cache
def _build(path: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([*_kustomize(), path], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, f"kustomize {path} failed:\n{out.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    assert docs, f"kustomize {path} gave no documents"
    return docs


def build(overlay: str) -> tuple[dict[str, Any], ...]:
    return _build(str(DEPLOY / "overlays" / overlay))


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [(d["kind"], d["metadata"]["name"]) for d in docs])
    return found[0]


def server(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "Deployment", "overnight")


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (k, *_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


# -- schema ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_document_is_schema_valid(target: str, version: str) -> None:
    docs = _build(str(DEPLOY / target))
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_holds_what_overnight_needs(overlay: str) -> None:
    docs = build(overlay)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    expected = [
        ("ConfigMap", "overnight-templates"),
        ("Deployment", "overnight"),
        ("PodDisruptionBudget", "overnight"),
        ("Role", "overnight"),
        ("RoleBinding", "overnight"),
        ("Service", "overnight"),
        ("ServiceAccount", "overnight"),
        ("ServiceAccount", "overnight-worker"),
    ]
    if overlay == "single-sqlite":
        expected.append(("PersistentVolumeClaim", "overnight-data"))
    assert kinds == sorted(expected)
    for d in docs:
        assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "overnight"


# -- RBAC -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_role_grants_exactly_what_the_runtimes_use(overlay: str) -> None:
    docs = build(overlay)
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in one(docs, "Role", "overnight")["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == RBAC
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    binding = one(docs, "RoleBinding", "overnight")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "overnight"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "overnight", "namespace": NAMESPACE}]
    assert server(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "overnight"
    # Batch pods' identity: no binding, no token.
    worker = one(docs, "ServiceAccount", "overnight-worker")
    assert worker["automountServiceAccountToken"] is False


# -- the server Deployment --------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_wiring(overlay: str) -> None:
    docs = build(overlay)
    dep = server(docs)
    pod = dep["spec"]["template"]
    [main] = pod["spec"]["containers"]
    assert main["command"] == ["overnight", "serve"]
    env = env_of(main)
    # Every OVERNIGHT_* variable is a setting overnight reads (a typo would be ignored silently).
    settings = {f"OVERNIGHT_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in env if n.startswith("OVERNIGHT_")} <= settings
    assert env["OVERNIGHT_HOST"]["value"] == "0.0.0.0"
    port = int(env["OVERNIGHT_PORT"]["value"])
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in main["ports"]
    # Service and PDB select exactly these pods; the Service reaches the named port.
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = one(docs, "Service", "overnight")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert one(docs, "PodDisruptionBudget", "overnight")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Templates: the ConfigMap is mounted where OVERNIGHT_TEMPLATES_DIR points.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {v["mountPath"]: v["name"] for v in main["volumeMounts"]}
    tvol = volumes[mounts[env["OVERNIGHT_TEMPLATES_DIR"]["value"]]]
    assert tvol["configMap"]["name"] == "overnight-templates"
    assert env["OVERNIGHT_DATA_DIR"]["value"] in mounts
    assert all(p["httpGet"]["path"] == "/health" for p in (main["readinessProbe"], main["livenessProbe"]))
    # The API is never left open: the keys come from a required Secret.
    assert env["OVERNIGHT_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "overnight-api-keys", "key": "keys"}


def test_single_sqlite_is_one_replica_on_a_volume() -> None:
    docs = build("single-sqlite")
    dep = server(docs)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    [main] = dep["spec"]["template"]["spec"]["containers"]
    env = env_of(main)
    data_dir = env["OVERNIGHT_DATA_DIR"]["value"]
    assert env["OVERNIGHT_STORE_URL"] == {"name": "OVERNIGHT_STORE_URL", "value": f"sqlite:///{data_dir}/overnight.db"}
    assert env["OVERNIGHT_STORAGE_URL"] == {"name": "OVERNIGHT_STORAGE_URL", "value": f"file://{data_dir}/files"}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    data = volumes[next(m["name"] for m in main["volumeMounts"] if m["mountPath"] == data_dir)]
    assert set(data) == {"name", "persistentVolumeClaim"}
    pvc = one(docs, "PersistentVolumeClaim", data["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The pod may write its database: fsGroup owns the volume.
    assert dep["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001


def test_replicas_postgres_s3_share_a_store_from_secrets() -> None:
    docs = build("replicas-postgres-s3")
    dep = server(docs)
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"].get("strategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    spec = dep["spec"]["template"]["spec"]
    [main] = spec["containers"]
    env = env_of(main)
    assert env["OVERNIGHT_STORE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "overnight-store", "key": "url"}
    assert env["OVERNIGHT_STORAGE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "overnight-storage", "key": "url"}
    assert env["OVERNIGHT_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "overnight-s3"
    [upgrade] = spec["initContainers"]
    assert upgrade["command"] == ["overnight", "db", "upgrade"]
    assert upgrade["image"] == main["image"]
    assert env_of(upgrade)["OVERNIGHT_STORE_URL"] == env["OVERNIGHT_STORE_URL"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_only_references(overlay: str) -> None:
    docs = build(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert not [s for s in _strings(list(docs)) if looks_like_secret(s)]
    credential = ("KEY", "SECRET", "PASSWORD", "TOKEN")
    pod = server(docs)["spec"]["template"]["spec"]
    for c in pod.get("initContainers", []) + pod["containers"]:
        for name, e in env_of(c).items():
            if any(w in name for w in credential):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], name


# -- the shipped templates and profiles ---------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_templates_configmap_loads_and_renders_valid_batch_objects(overlay: str, tmp_path: Path) -> None:
    cm = one(build(overlay), "ConfigMap", "overnight-templates")
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    source = DirectorySource(tmp_path)
    docs = [d for text in cm["data"].values() for d in yaml.safe_load_all(text) if d]
    template_names = [d["name"] for d in docs if d.get("kind") == "ModelDeploymentTemplate"]
    profile_names = [d["name"] for d in docs if d.get("kind") == "Profile"]
    assert "mock-tiny" in template_names and "kubernetes" in profile_names
    for t in template_names:
        for p in profile_names:
            r = resolve(source, {"name": t}, {"name": p})
            objs = [
                render_job(r, batch_id="batch_0193abcdef0123456789abcd", namespace=NAMESPACE,
                           image="overnight:0.1.0", shards=2),
                render_deployment(r, batch_id="batch_0193abcdef0123456789abcd", namespace=NAMESPACE,
                                  image="overnight:0.1.0"),
                render_service(r, batch_id="batch_0193abcdef0123456789abcd", namespace=NAMESPACE),
            ]
            for obj in objs:
                for version in VERSIONS:
                    kubernetes_validate.validate(obj, version, strict=True)
            pod = objs[0]["spec"]["template"]["spec"]
            assert pod["serviceAccountName"] == "overnight-worker"
