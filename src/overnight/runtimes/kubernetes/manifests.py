"""The Kubernetes objects overnight creates, as plain dicts (pure functions, no I/O).

Three shapes, all labelled ``app.kubernetes.io/managed-by: overnight`` and
``overnight.dev/batch-id: <batch id>`` so an orphan sweep can find them by label:

* ``render_job``: the ``kubernetes-job`` runtime. One **Indexed Job** per batch, one
  pod per shard (``completions = parallelism = shards``). Each pod runs the engine
  as a **native sidecar** (an ``initContainers`` entry with ``restartPolicy:
  Always``: its startupProbe on the template's health endpoint gates the worker's
  start, and the Job completes when the worker exits) and the **worker**::

      overnight worker --podinfo-dir /etc/overnight/podinfo

  The worker learns everything about its batch from the pod's own annotations,
  which a downwardAPI volume puts in ``<podinfo-dir>/annotations`` (see
  ``ANNOTATIONS``; parse with ``parse_annotations``, read with ``pod_info``): the
  batch id, the shard count, the engine's port, health path and served model
  name. Its shard is the Job's completion index (env ``JOB_COMPLETION_INDEX``,
  also the ``batch.kubernetes.io/job-completion-index`` annotation). Store and
  storage URLs come as ``OVERNIGHT_STORE_URL`` / ``OVERNIGHT_STORAGE_URL`` from
  the profile. It exits 0 when its shard is done, ``EXIT_UNRECOVERABLE`` (42) for
  an error a retry cannot fix (the index fails at once), anything else to be
  retried (``backoffLimitPerIndex`` times); evictions and preemptions
  (``DisruptionTarget``) are not counted.
* ``render_deployment`` + ``render_service``: the ``kubernetes-deployment``
  runtime. A Deployment of the engine alone (``parallelism.dp`` replicas, each
  with ``tp*pp*ep`` GPUs) behind a ClusterIP Service; overnight's own process
  sends the requests. The runtime sets ``ownerReferences`` (Service ->
  Deployment) itself.

Names are derived from the batch id (``ovn-<suffix>``), so a retried create
asks for the same name and gets a 409, never a duplicate. Nothing here ever
holds a secret value: secrets reach pods as ``secretKeyRef`` references only, and
a profile secret that is an ``{env: VAR}`` reference (a value read from
overnight's own environment) is refused, since it would land in the manifest.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from overnight.errors import InvalidRequestError
from overnight.templates.commands import engine_command
from overnight.templates.resolve import Resolved
from overnight.templates.schema import ModelDeploymentTemplate, Profile, SecretKeyRef

__all__ = [
    "ANNOTATIONS",
    "ANNOTATION_PREFIX",
    "BATCH_LABEL",
    "COMPONENT_ENGINE",
    "COMPONENT_WORKER",
    "ENGINE_CONTAINER",
    "ENGINE_KEY_LABEL",
    "EXIT_UNRECOVERABLE",
    "KUEUE_QUEUE_LABEL",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "PODINFO_DIR",
    "WORKER_CONTAINER",
    "ManifestError",
    "PodInfo",
    "format_annotations",
    "object_name",
    "parse_annotations",
    "pod_info",
    "render_deployment",
    "render_job",
    "render_service",
]

# -- labels ---------------------------------------------------------------------------
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "overnight"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
INSTANCE_LABEL = "app.kubernetes.io/instance"
#: The batch an object belongs to (what the orphan sweep looks up in the store).
BATCH_LABEL = "overnight.dev/batch-id"
#: ``Resolved.key()``: objects serving the same template and profile share it.
ENGINE_KEY_LABEL = "overnight.dev/engine-key"
#: Kueue's queue label; when present Kueue, not overnight, decides when the Job runs.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPONENT_WORKER = "batch-worker"
COMPONENT_ENGINE = "engine"

# -- annotations ----------------------------------------------------------------------
ANNOTATION_PREFIX = "overnight.dev/"
ANN_BATCH_ID = ANNOTATION_PREFIX + "batch-id"
ANN_SHARDS = ANNOTATION_PREFIX + "shards"
ANN_ENGINE_PORT = ANNOTATION_PREFIX + "engine-port"
ANN_HEALTH_PATH = ANNOTATION_PREFIX + "engine-health-path"
ANN_SERVED_MODEL = ANNOTATION_PREFIX + "served-model-name"
ANN_TEMPLATE_NAME = ANNOTATION_PREFIX + "template-name"
ANN_TEMPLATE_VERSION = ANNOTATION_PREFIX + "template-version"
ANN_PROFILE_NAME = ANNOTATION_PREFIX + "profile-name"
ANN_ENGINE_KEY = ANNOTATION_PREFIX + "engine-key"
#: Every annotation overnight writes, and what it means. Ids, never specs: the
#: whole set stays a few hundred bytes (Kubernetes allows 256 KiB per object).
ANNOTATIONS: dict[str, str] = {
    ANN_BATCH_ID: "the batch id (also the overnight.dev/batch-id label)",
    ANN_SHARDS: "Job only: how many shards the batch is split into (= completions); a pod's shard is its "
    "completion index",
    ANN_ENGINE_PORT: "the engine's port inside the pod (the worker calls http://127.0.0.1:<port>)",
    ANN_HEALTH_PATH: "the engine's health path (200 = ready)",
    ANN_SERVED_MODEL: "the model name the engine serves (requests' `model`): the template's name",
    ANN_TEMPLATE_NAME: "the model deployment template's name",
    ANN_TEMPLATE_VERSION: "the model deployment template's version",
    ANN_PROFILE_NAME: "the profile's name (absent without a profile)",
    ANN_ENGINE_KEY: "Resolved.key() of the template and profile (also a label)",
}
#: Set by the Job controller on each pod of an Indexed Job.
JOB_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# -- the pod ----------------------------------------------------------------------------
#: The worker's exit code for an error a retry cannot fix: the pod failure policy fails
#: the index at once instead of retrying it.
EXIT_UNRECOVERABLE = 42
#: Where the downwardAPI volume puts ``annotations``, ``labels``, ``name``, ``namespace``, ``uid``.
PODINFO_DIR = "/etc/overnight/podinfo"
#: The worker's data directory (its spool), an emptyDir: the root filesystem is read-only.
WORKER_DATA_DIR = "/var/lib/overnight"
ENGINE_CONTAINER = "engine"
WORKER_CONTAINER = "worker"
#: The worker's command line; everything else it reads from PODINFO_DIR and its env.
WORKER_COMMAND = ["overnight", "worker", "--podinfo-dir", PODINFO_DIR]
GPU_RESOURCE = "nvidia.com/gpu"
#: Longest object name rendered: 63 (DNS-1123 label) less room for what Kubernetes
#: appends (an Indexed Job's pods get the hostname ``<job>-<index>``).
MAX_NAME = 52
#: An Indexed Job may have at most 100,000 completions.
MAX_SHARDS = 100_000
_NAME_PREFIX = "ovn-"
_WORKER_REQUESTS = {"cpu": "500m", "memory": "512Mi"}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
#: Env names set for the worker from the profile's store and storage.
STORE_ENV = "OVERNIGHT_STORE_URL"
STORAGE_ENV = "OVERNIGHT_STORAGE_URL"


class ManifestError(InvalidRequestError):
    """A template, profile or option cannot be turned into Kubernetes objects;
    ``param`` names the field (``spec.engine.image``, ``profile.secrets.HF_TOKEN``)."""

    code = "invalid_kubernetes_manifest"


# -- names ------------------------------------------------------------------------------
def object_name(batch_id: str, *, suffix: str = "") -> str:
    """``ovn-<batch id suffix><suffix>``: a DNS-1123 label of at most ``MAX_NAME``
    characters, the same for the same id (a retried create is idempotent).

    overnight's ids (``batch_<24 hex>``) map one to one; any other id that needs
    changing (upper case, ``_``, too long) gets a hash of the whole id appended
    so two ids never share a name."""
    if not batch_id:
        raise ManifestError("batch_id: required", param="batch_id")
    if suffix and not re.fullmatch(r"-[a-z0-9]([-a-z0-9]*[a-z0-9])?", suffix):
        raise ValueError(f"suffix {suffix!r} must be '-' and a DNS-1123 label")
    raw = batch_id.removeprefix("batch_")
    core = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    name = f"{_NAME_PREFIX}{core}{suffix}"
    if core != raw or len(name) > MAX_NAME:
        digest = hashlib.sha256(batch_id.encode()).hexdigest()[:10]
        room = MAX_NAME - len(_NAME_PREFIX) - len(suffix) - len(digest) - 1
        core = core[:room].strip("-")
        name = f"{_NAME_PREFIX}{core}-{digest}{suffix}" if core else f"{_NAME_PREFIX}{digest}{suffix}"
    return name


def _check_inputs(batch_id: str, namespace: str) -> None:
    if not _LABEL_VALUE.match(batch_id):
        raise ManifestError(
            f"batch_id {batch_id!r} cannot be a label value (at most 63 letters, digits, '-', '_', '.')",
            param="batch_id",
        )
    if not _DNS_LABEL.match(namespace):
        raise ManifestError(f"namespace {namespace!r} is not a DNS-1123 label", param="namespace")


def _labels(resolved: Resolved, batch_id: str, component: str, instance: str) -> dict[str, str]:
    return {
        NAME_LABEL: "overnight",
        COMPONENT_LABEL: component,
        INSTANCE_LABEL: instance,
        MANAGED_BY_LABEL: MANAGED_BY,
        BATCH_LABEL: batch_id,
        ENGINE_KEY_LABEL: resolved.key(),
    }


def _selector(component: str, instance: str) -> dict[str, str]:
    return {NAME_LABEL: "overnight", COMPONENT_LABEL: component, INSTANCE_LABEL: instance}


def _annotations(resolved: Resolved, batch_id: str, shards: int | None) -> dict[str, str]:
    t = resolved.template
    out = {ANN_BATCH_ID: batch_id}
    if shards is not None:
        out[ANN_SHARDS] = str(shards)
    out |= {
        ANN_ENGINE_PORT: str(t.spec.engine.port),
        ANN_HEALTH_PATH: t.spec.engine.health_endpoint,
        ANN_SERVED_MODEL: t.name,
        ANN_TEMPLATE_NAME: t.name,
        ANN_TEMPLATE_VERSION: t.version,
        ANN_ENGINE_KEY: resolved.key(),
    }
    if resolved.profile is not None:
        out[ANN_PROFILE_NAME] = resolved.profile.name
    return out


# -- environment ------------------------------------------------------------------------
def _secret_env(profile: Profile, var: str, field: str = "secrets") -> dict[str, Any]:
    ref = getattr(profile, field)[var]
    if ref.secret_key_ref is None:
        raise ManifestError(
            f"profile {profile.name!r}: {field}.{var} is an environment reference ({{env: {ref.env}}}); "
            "a pod can only get a secret from a Kubernetes Secret: use {secret_key_ref: {name, key}}",
            param=f"profile.{field}.{var}",
        )
    return _ref_env(var, ref.secret_key_ref)


def _ref_env(var: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _profile_env(profile: Profile | None, *, worker: bool) -> list[dict[str, Any]]:
    """The profile's secrets (as references), the worker's own ones for the worker,
    then its plain env. ``OVERNIGHT_*`` names configure the worker, so the engine
    does not get them, nor ``worker_secrets``."""
    if profile is None:
        return []
    out: list[dict[str, Any]] = []
    for var in profile.secrets:
        if var in (STORE_ENV, STORAGE_ENV) or (not worker and var.startswith("OVERNIGHT_")):
            continue
        out.append(_secret_env(profile, var))
    if worker:
        out.extend(_secret_env(profile, var, "worker_secrets") for var in profile.worker_secrets)
    for var, value in profile.env.items():
        if not worker and var.startswith("OVERNIGHT_"):
            continue
        out.append({"name": var, "value": value})
    return out


def _url_env(
    profile: Profile | None, var: str, field: str, fallback: SecretKeyRef | None
) -> dict[str, Any]:
    """``OVERNIGHT_STORE_URL`` / ``OVERNIGHT_STORAGE_URL`` for the worker: the
    profile's ``secrets.<VAR>`` (a Secret reference), else its plain URL field
    (credential-free by the schema), else the runtime's own Secret reference."""
    plain = getattr(profile, field) if profile is not None else None
    if profile is not None and var in profile.secrets:
        if plain:
            raise ManifestError(
                f"profile {profile.name!r}: both {field} and secrets.{var} are set; give one",
                param=f"profile.{field}",
            )
        return _secret_env(profile, var)
    if plain:
        return {"name": var, "value": plain}
    if fallback is not None:
        return _ref_env(var, fallback)
    where = f"profile {profile.name!r}" if profile is not None else "the batch has no profile, which"
    raise ManifestError(
        f"{where}: a Kubernetes worker needs a shared {field.removesuffix('_url')}: set {field} "
        f"or secrets.{var} in the profile",
        param=f"profile.{field}",
    )


# -- the engine container -----------------------------------------------------------------
def _engine_image(t: ModelDeploymentTemplate, overnight_image: str | None) -> str:
    image = t.spec.engine.image
    if image:
        return image
    if t.spec.engine.type == "mock" and t.spec.engine.command is None and overnight_image:
        return overnight_image  # the mock engine ships with overnight
    raise ManifestError(
        f"template {t.name!r}: spec.engine.image is required by the Kubernetes runtimes "
        "(the engine runs from a container image)",
        param="spec.engine.image",
    )


def _engine_argv(t: ModelDeploymentTemplate) -> list[str]:
    """The template's command listening on all interfaces at its port."""
    argv = engine_command(t)
    if t.spec.engine.type == "mock" and t.spec.engine.command is None:
        # The local runtime starts the mock with this interpreter; in a container it
        # is overnight's own command.
        prefix = [sys.executable, "-m", "overnight.cli.main"]
        if argv[: len(prefix)] == prefix:
            argv = ["overnight", *argv[len(prefix) :]]
    port = str(t.spec.engine.port)
    return [part.replace("{host}", "0.0.0.0").replace("{port}", port) for part in argv]


def _probes(t: ModelDeploymentTemplate) -> dict[str, Any]:
    """startupProbe sized to ``ready_timeout_seconds`` (failureThreshold x period
    covers it: a model may take that long to load), then a readinessProbe."""
    engine = t.spec.engine
    period = 5 if engine.ready_timeout_seconds <= 600 else 10
    http = {"path": engine.health_endpoint, "port": "http"}
    return {
        "startupProbe": {
            "httpGet": dict(http),
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": max(1, math.ceil(engine.ready_timeout_seconds / period)),
        },
        "readinessProbe": {
            "httpGet": dict(http),
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
    }


def _engine_container(
    t: ModelDeploymentTemplate, profile: Profile | None, overnight_image: str | None, gpus: int
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": _engine_image(t, overnight_image),
        "command": _engine_argv(t),
        "ports": [{"name": "http", "containerPort": t.spec.engine.port, "protocol": "TCP"}],
        **_probes(t),
    }
    env = _profile_env(profile, worker=False)
    if env:
        c["env"] = env
    if gpus > 0:
        c["resources"] = {"limits": {GPU_RESOURCE: str(gpus)}}
        # NCCL and the engines' worker processes share tensors through /dev/shm,
        # which a container runtime caps at 64 MiB.
        c["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    return c


def _placement(profile: Profile | None) -> dict[str, Any]:
    """Pod-spec fields from the profile (service account, node selector,
    tolerations, image pull secrets)."""
    if profile is None:
        return {}
    out: dict[str, Any] = {}
    if profile.service_account:
        out["serviceAccountName"] = profile.service_account
    if profile.node_selector:
        out["nodeSelector"] = dict(profile.node_selector)
    if profile.tolerations:
        out["tolerations"] = [tol.model_dump(exclude_none=True) for tol in profile.tolerations]
    if profile.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in profile.image_pull_secrets]
    return out


def _check_image(image: str | None, param: str) -> None:
    if image is not None and (not image or any(c.isspace() for c in image)):
        raise ManifestError(f"{param}: {image!r} is not an image reference", param=param)


def _count(value: int | None, param: str, *, low: int, high: int | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
        raise ManifestError(f"{param} must be {bound}, not {value!r}", param=param)


# -- the Job -------------------------------------------------------------------------------
def render_job(
    resolved: Resolved,
    *,
    batch_id: str,
    namespace: str,
    image: str,
    shards: int = 1,
    active_deadline_seconds: float | None = None,
    backoff_limit_per_index: int = 2,
    max_failed_indexes: int | None = None,
    ttl_seconds_after_finished: int | None = 3600,
    suspend: bool = False,
    store_url_secret: SecretKeyRef | None = None,
    storage_url_secret: SecretKeyRef | None = None,
) -> dict[str, Any]:
    """The Indexed Job (batch/v1) that runs ``batch_id`` in ``shards`` pods.

    ``image`` is overnight's own image (the worker; also the mock engine when the
    template names none). ``active_deadline_seconds`` is what is left of the
    batch's completion window (rounded up; the Job fails with DeadlineExceeded
    after it). ``ttl_seconds_after_finished`` is a backstop: the runtime deletes
    the Job itself. ``store_url_secret`` / ``storage_url_secret`` are used when the
    profile names no store / storage (the Secrets overnight itself runs with).
    With a Kueue queue in the profile, ``suspend`` is left to Kueue."""
    _check_inputs(batch_id, namespace)
    _check_image(image, "image")
    _count(shards, "shards", low=1, high=MAX_SHARDS)
    _count(backoff_limit_per_index, "backoff_limit_per_index", low=0)
    _count(max_failed_indexes, "max_failed_indexes", low=0, high=shards)
    _count(ttl_seconds_after_finished, "ttl_seconds_after_finished", low=0)
    deadline: int | None = None
    if active_deadline_seconds is not None:
        if not math.isfinite(active_deadline_seconds) or active_deadline_seconds <= 0:
            raise ManifestError(
                f"active_deadline_seconds must be > 0 (the batch's completion window has passed), "
                f"not {active_deadline_seconds!r}",
                param="active_deadline_seconds",
            )
        deadline = math.ceil(active_deadline_seconds)
    t, profile = resolved.template, resolved.profile
    queue = profile.queue_name if profile is not None else None
    if queue and suspend:
        raise ManifestError(
            f"the profile submits to Kueue queue {queue!r}, which suspends and admits the Job itself: "
            "do not suspend it",
            param="suspend",
        )

    name = object_name(batch_id)
    labels = _labels(resolved, batch_id, COMPONENT_WORKER, name)
    annotations = _annotations(resolved, batch_id, shards)

    engine = _engine_container(t, profile, image, t.spec.accelerator.gpus)
    engine["restartPolicy"] = "Always"  # a native sidecar
    worker_env = [
        # The executor's local spool: a scratch volume (it lives as long as the pod;
        # a replacement pod continues from the shard's checkpoint in the store).
        {"name": "OVERNIGHT_DATA_DIR", "value": WORKER_DATA_DIR},
        _url_env(profile, STORE_ENV, "store_url", store_url_secret),
        _url_env(profile, STORAGE_ENV, "storage_url", storage_url_secret),
        *_profile_env(profile, worker=True),
    ]
    worker = {
        "name": WORKER_CONTAINER,
        "image": image,
        "command": list(WORKER_COMMAND),
        "env": worker_env,
        "resources": {"requests": dict(_WORKER_REQUESTS)},
        "volumeMounts": [{"name": "podinfo", "mountPath": PODINFO_DIR, "readOnly": True},
                         {"name": "spool", "mountPath": WORKER_DATA_DIR}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True},
    }
    volumes: list[dict[str, Any]] = [
        {
            "name": "podinfo",
            "downwardAPI": {
                "items": [
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                    {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}},
                    {"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}},
                ]
            },
        }
    ]
    volumes.append({"name": "spool", "emptyDir": {}})
    if t.spec.accelerator.gpus > 0:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "initContainers": [engine],
        "containers": [worker],
        "volumes": volumes,
        # The worker needs no Kubernetes API access (its batch comes by downward API),
        # and service links would put every Service of the namespace into the env.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Time for the worker to store a last checkpoint when the pod is stopped.
        "terminationGracePeriodSeconds": 60,
        **_placement(profile),
    }
    job_labels = dict(labels)
    if queue:
        job_labels[KUEUE_QUEUE_LABEL] = queue
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": shards,
        "parallelism": shards,
        "backoffLimitPerIndex": backoff_limit_per_index,
        "podFailurePolicy": {
            "rules": [
                # Evictions, preemptions, node drains: run the shard again, uncounted.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # The worker's own verdict that retrying cannot help.
                {
                    "action": "FailIndex",
                    "onExitCodes": {
                        "containerName": WORKER_CONTAINER,
                        "operator": "In",
                        "values": [EXIT_UNRECOVERABLE],
                    },
                },
            ]
        },
        "template": {
            "metadata": {"labels": dict(labels), "annotations": dict(annotations)},
            "spec": pod_spec,
        },
    }
    if max_failed_indexes is not None:
        spec["maxFailedIndexes"] = max_failed_indexes
    if ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = ttl_seconds_after_finished
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline
    if suspend:
        spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": job_labels, "annotations": annotations},
        "spec": spec,
    }


# -- the Deployment and its Service ------------------------------------------------------------
def _per_replica(t: ModelDeploymentTemplate) -> ModelDeploymentTemplate:
    """The template one Deployment replica runs: data parallelism becomes replicas,
    so each replica runs ``tp*pp*ep`` GPUs without ``--data-parallel-size``."""
    spec = t.spec
    dp = spec.parallelism.dp
    if dp == 1:
        return t
    accelerator = spec.accelerator.model_copy(update={"count": spec.accelerator.count // dp})
    parallelism = spec.parallelism.model_copy(update={"dp": 1})
    one = spec.model_copy(update={"accelerator": accelerator, "parallelism": parallelism})
    return t.model_copy(update={"spec": one})


def render_deployment(
    resolved: Resolved,
    *,
    batch_id: str,
    namespace: str,
    image: str | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    """A Deployment (apps/v1) of the template's engine, for ``batch_id``.

    ``replicas`` defaults to ``spec.parallelism.dp``; ``image`` (overnight's own)
    is needed only for a mock template without ``spec.engine.image``."""
    _check_inputs(batch_id, namespace)
    _check_image(image, "image")
    t, profile = resolved.template, resolved.profile
    count = t.spec.parallelism.dp if replicas is None else replicas
    _count(count, "replicas", low=1)
    one = _per_replica(t)
    name = object_name(batch_id)
    labels = _labels(resolved, batch_id, COMPONENT_ENGINE, name)
    annotations = _annotations(resolved, batch_id, None)
    gpus = one.spec.accelerator.gpus
    engine = _engine_container(one, profile, image, gpus)
    pod_spec: dict[str, Any] = {
        "containers": [engine],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        **_placement(profile),
    }
    if gpus > 0:
        pod_spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "replicas": count,
            "selector": {"matchLabels": _selector(COMPONENT_ENGINE, name)},
            # Replace one replica at a time without a surge: a surge pod would need
            # GPUs the batch does not have.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "revisionHistoryLimit": 1,
            # A model may load for ready_timeout_seconds; the default 600 s would
            # call a slow but healthy start a failed rollout.
            "progressDeadlineSeconds": max(600, math.ceil(t.spec.engine.ready_timeout_seconds) + 60),
            "template": {"metadata": {"labels": dict(labels), "annotations": dict(annotations)}, "spec": pod_spec},
        },
    }


def render_service(resolved: Resolved, *, batch_id: str, namespace: str) -> dict[str, Any]:
    """The ClusterIP Service (v1) in front of ``render_deployment``'s pods for the
    same batch: same name, its selector is exactly the Deployment's."""
    _check_inputs(batch_id, namespace)
    name = object_name(batch_id)
    port = resolved.template.spec.engine.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": _labels(resolved, batch_id, COMPONENT_ENGINE, name),
            "annotations": _annotations(resolved, batch_id, None),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(COMPONENT_ENGINE, name),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


# -- the downward API annotations file ------------------------------------------------------------
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}
_QUOTE = {v: "\\" + k for k, v in _ESCAPES.items()}


def _go_quote(value: str) -> str:
    """Go's ``strconv.Quote`` (what the kubelet writes with ``%q``): printable
    characters as they are, ``\\n``-style escapes, ``\\xNN`` below space and for
    DEL, ``\\uNNNN`` / ``\\UNNNNNNNN`` for other non-printable characters."""
    out = ['"']
    for ch in value:
        if ch in _QUOTE:
            out.append(_QUOTE[ch])
        elif ch.isprintable():  # Go's IsPrint: letters, marks, numbers, punctuation, symbols, ' '
            out.append(ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def format_annotations(annotations: Mapping[str, str]) -> str:
    """The file a downwardAPI volume holds for ``metadata.annotations`` (or
    ``labels``): ``key="value"`` lines sorted by key, values quoted as Go's ``%q``,
    no final newline."""
    return "\n".join(f"{k}={_go_quote(annotations[k])}" for k in sorted(annotations))


def _go_unquote(text: str, lineno: int) -> str:
    """Read one Go double-quoted string (all of ``text``)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ValueError(f"line {lineno}: value is not a double-quoted string")
    body = text[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == '"':
            raise ValueError(f"line {lineno}: unescaped '\"' inside the value")
        if ch != "\\":
            out += ch.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError(f"line {lineno}: value ends in a lone backslash")
        esc = body[i + 1]
        if esc in _ESCAPES:
            out += _ESCAPES[esc].encode()
            i += 2
        elif esc in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"line {lineno}: bad \\{esc} escape")
            code = int(digits, 16)
            if esc == "x":
                out.append(code)  # a byte, as in Go
            else:
                if code > 0x10FFFF:
                    raise ValueError(f"line {lineno}: \\{esc}{digits} is not a Unicode code point")
                out += chr(code).encode("utf-8", "surrogatepass")
            i += 2 + width
        elif esc in "01234567":
            digits = body[i + 1 : i + 4]
            if len(digits) != 3 or not all(c in "01234567" for c in digits) or int(digits, 8) > 255:
                raise ValueError(f"line {lineno}: bad octal escape")
            out.append(int(digits, 8))
            i += 4
        else:
            raise ValueError(f"line {lineno}: unknown escape \\{esc}")
    try:
        return out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise ValueError(f"line {lineno}: value is not UTF-8") from None


def parse_annotations(text: str) -> dict[str, str]:
    """Parse a downwardAPI ``annotations`` (or ``labels``) file: one
    ``key="value"`` line each, the value quoted as Go's ``%q``. A ``ValueError``
    names the line of anything else."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line:
            continue  # a final newline, or an empty file
        key, sep, value = line.partition("=")
        if not sep or not key or key != key.strip():
            raise ValueError(f"line {lineno}: expected key=\"value\"")
        out[key] = _go_unquote(value, lineno)
    return out


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What a Job pod's worker reads from its annotations."""

    batch_id: str
    shards: int
    #: This pod's shard: the Job completion index.
    shard: int
    engine_port: int
    health_path: str
    served_model_name: str

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"


def pod_info(annotations: Mapping[str, str], *, shard: int | str | None = None) -> PodInfo:
    """The worker's view of its pod. ``shard`` (from env ``JOB_COMPLETION_INDEX``)
    wins over the ``batch.kubernetes.io/job-completion-index`` annotation. A
    missing or bad annotation is a ``ValueError`` naming it."""

    def get(key: str) -> str:
        if key not in annotations:
            raise ValueError(f"annotation {key} is missing")
        return annotations[key]

    def integer(key: str, value: str | int, low: int) -> int:
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: {value!r} is not an integer") from None
        if n < low:
            raise ValueError(f"{key}: {n} is below {low}")
        return n

    shards = integer(ANN_SHARDS, get(ANN_SHARDS), 1)
    raw_index: str | int = shard if shard is not None else get(JOB_INDEX_ANNOTATION)
    index = integer(JOB_INDEX_ANNOTATION if shard is None else "JOB_COMPLETION_INDEX", raw_index, 0)
    if index >= shards:
        raise ValueError(f"shard index {index} is not below {ANN_SHARDS} = {shards}")
    port = integer(ANN_ENGINE_PORT, get(ANN_ENGINE_PORT), 1)
    if port > 65535:
        raise ValueError(f"{ANN_ENGINE_PORT}: {port} is not a port")
    return PodInfo(
        batch_id=get(ANN_BATCH_ID),
        shards=shards,
        shard=index,
        engine_port=port,
        health_path=get(ANN_HEALTH_PATH),
        served_model_name=get(ANN_SERVED_MODEL),
    )
