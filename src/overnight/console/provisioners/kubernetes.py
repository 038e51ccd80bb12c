"""The ``kubernetes`` provider: a job's engine as a Deployment behind a Service in
the cluster ``OVERNIGHT_KUBERNETES`` names.

The objects are the ``kubernetes-deployment`` runtime's (``manifests.render_deployment``
and ``render_service``: replicas = ``parallelism.dp``, probes sized to the
template's ``ready_timeout_seconds``, the profile's placement and secrets as
references), relabelled for the console:

* ``app.kubernetes.io/managed-by: overnight-console`` instead of ``overnight``,
  so the batch runtimes' sweeps (which select ``managed-by=overnight`` and go by
  batch ids) never take a console job's engine for a leftover; the console's
  own sweep goes through ``list_owned``;
* ``overnight.dev/job-id`` and ``overnight.dev/installation`` labels (the ids,
  or a hash of them when they are not valid label values: at most 63 letters,
  digits, ``-_.``), with the full ids in annotations of the same names, which
  ``list_owned`` checks (a hash is never taken for the id);
* no ``overnight.dev/batch-id`` label: the object is not a batch's.

The cluster is the provider's database: the provision id is ``namespace/name``,
the name derived from the idempotency key (``object_name``), so a repeated
``provision`` finds the Deployment it made (and makes the Service if a crash
came between the two); an object of that name that is not this job's is never
adopted. The Service is owned by the Deployment (``ownerReferences``).

``status`` re-reads the Deployment: ``running`` once ``readyReplicas`` reaches
``replicas`` (endpoint: ``OVERNIGHT_KUBERNETES_SERVICE_URL`` formatted with
``name``, ``namespace``, ``port``), else ``provisioning`` with what holds the
pods back in ``error`` (unschedulable, image pulls, a ReplicaFailure condition
such as a quota), ``failed`` when the rollout's progress deadline passed,
``released`` when the Deployment is gone. ``release`` deletes both with
``propagationPolicy: Background`` and is True only once a re-read finds the
Deployment, the Service and every pod gone (it waits ``release_wait_s`` for
that, then says False and the planner asks again). Objects without the console's
labels are never deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from typing import Any, ClassVar

from overnight.console.provisioners.base import ProvisionError, ProvisionRequest, ProvisionState
from overnight.errors import KubernetesError, OvernightError

__all__ = ["INSTALLATION_LABEL", "JOB_LABEL", "KEY_ANNOTATION", "MANAGED_BY_CONSOLE", "KubernetesProvisioner",
           "label_value"]

log = logging.getLogger("overnight.console")

MANAGED_BY_CONSOLE = "overnight-console"
JOB_LABEL = "overnight.dev/job-id"
INSTALLATION_LABEL = "overnight.dev/installation"
KEY_ANNOTATION = "overnight.dev/idempotency-key"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def label_value(text: str) -> str:
    """``text`` when it is a valid label value, else 40 hex digits of its SHA-256."""
    if _LABEL_VALUE.match(text):
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _md(obj: dict[str, Any] | None) -> dict[str, Any]:
    return (obj or {}).get("metadata") or {}


def _ours(obj: dict[str, Any] | None) -> bool:
    """Made by the console (whatever the job or installation)."""
    md = _md(obj)
    return (md.get("labels") or {}).get("app.kubernetes.io/managed-by") == MANAGED_BY_CONSOLE \
        and JOB_LABEL in (md.get("annotations") or {})


class KubernetesProvisioner:
    name: ClassVar[str] = "kubernetes"

    def __init__(self, *, config: Any, namespace: str, image: str,
                 service_url: str = "http://{name}.{namespace}.svc:{port}", templates: Any = None,
                 ready_timeout_s: float = 3600.0, release_wait_s: float = 10.0) -> None:
        self.config, self.namespace, self.image = config, namespace, image
        self.service_url = service_url
        self.templates = templates
        self.ready_timeout_s = ready_timeout_s
        self.release_wait_s = release_wait_s
        from overnight.runtimes.kubernetes.client import LazyKube

        self._kube = LazyKube(self.config)

    async def kube(self) -> Any:
        try:
            return await self._kube.get()
        except KubernetesError as exc:
            raise ProvisionError(f"kubernetes: {exc.message}", retryable=False) from exc

    async def aclose(self) -> None:
        await self._kube.aclose()

    # -- rendering --------------------------------------------------------------------------
    def name_for(self, key: str) -> str:
        from overnight.runtimes.kubernetes.manifests import object_name

        return object_name(label_value(key))

    def render(self, request: ProvisionRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        """The Deployment and Service for the request, labelled for the console."""
        from overnight.runtimes.kubernetes.manifests import (
            ANN_BATCH_ID, BATCH_LABEL, MANAGED_BY_LABEL, render_deployment, render_service,
        )
        from overnight.templates.resolve import Resolved

        try:
            resolved = Resolved.from_record(request.template)
            key = label_value(request.idempotency_key)
            dep = render_deployment(resolved, batch_id=key, namespace=self.namespace, image=self.image)
            svc = render_service(resolved, batch_id=key, namespace=self.namespace)
        except OvernightError as exc:  # ManifestError names the field (spec.engine.image, profile.secrets.X)
            raise ProvisionError(f"kubernetes: {exc.message}", retryable=False) from exc
        labels = {MANAGED_BY_LABEL: MANAGED_BY_CONSOLE, JOB_LABEL: label_value(request.job_id),
                  INSTALLATION_LABEL: label_value(request.installation_id)}
        notes = {JOB_LABEL: request.job_id, INSTALLATION_LABEL: request.installation_id,
                 KEY_ANNOTATION: request.idempotency_key}
        for md in (dep["metadata"], dep["spec"]["template"]["metadata"], svc["metadata"]):
            md["labels"].pop(BATCH_LABEL, None)
            md["labels"].update(labels)
            md["annotations"].pop(ANN_BATCH_ID, None)
            md["annotations"].update(notes)
        return dep, svc

    # -- the API ------------------------------------------------------------------------------
    async def provision(self, request: ProvisionRequest) -> ProvisionState:
        dep, svc = self.render(request)
        ns, name = self.namespace, dep["metadata"]["name"]
        kube = await self.kube()
        try:
            cur = await self._ensure(kube, dep, request)
            svc["metadata"]["ownerReferences"] = [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": _md(cur).get("uid"),
                "controller": True, "blockOwnerDeletion": True,
            }]
            await self._ensure(kube, svc, request)
            log.info("job %s: Deployment and Service %s/%s", request.job_id, ns, name)
            return await self._state(kube, ns, name, cur)
        except KubernetesError as exc:
            raise ProvisionError(f"kubernetes: {exc.message}", retryable=exc.retryable) from exc

    async def _ensure(self, kube: Any, obj: dict[str, Any], request: ProvisionRequest) -> dict[str, Any]:
        """The object of this name, made now or found (this job's, not being deleted)."""
        kind, ns, name = obj["kind"], self.namespace, obj["metadata"]["name"]
        cur = await kube.get_or_none(kind, ns, name)
        if cur is None:
            try:
                return await kube.create(obj, ns)
            except KubernetesError as exc:
                if exc.status != 409:
                    raise
            cur = await kube.get_or_none(kind, ns, name)
            if cur is None:
                raise ProvisionError(f"kubernetes: {kind} {ns}/{name} was taken and freed meanwhile", retryable=True)
        notes = _md(cur).get("annotations") or {}
        if not _ours(cur) or notes.get(JOB_LABEL) != request.job_id \
                or notes.get(INSTALLATION_LABEL) != request.installation_id:
            owner = f"job {notes.get(JOB_LABEL)!r} of installation {notes.get(INSTALLATION_LABEL)!r}" if _ours(cur) \
                else "something overnight's console did not make"
            raise ProvisionError(f"kubernetes: {kind} {ns}/{name} already exists and belongs to {owner}",
                                 retryable=False, code="name_taken")
        if _md(cur).get("deletionTimestamp"):
            raise ProvisionError(f"kubernetes: {kind} {ns}/{name} of this job is being deleted; waiting for it to go",
                                 retryable=True)
        return cur

    def _split(self, provision_id: str) -> tuple[str, str]:
        ns, sep, name = provision_id.partition("/")
        if not sep or not ns or not name or "/" in name:
            raise ProvisionError(f"kubernetes: {provision_id!r} is not a provision id (namespace/name)",
                                 code="not_found")
        return ns, name

    def url_for(self, ns: str, name: str, port: int) -> str:
        return self.service_url.format(name=name, namespace=ns, port=port)

    async def _pods(self, kube: Any, ns: str, name: str) -> list[dict[str, Any]]:
        from overnight.runtimes.kubernetes.manifests import INSTANCE_LABEL, MANAGED_BY_LABEL

        selector = f"{INSTANCE_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY_CONSOLE}"
        return (await kube.list("Pod", ns, label_selector=selector)).items

    async def _state(self, kube: Any, ns: str, name: str, dep: dict[str, Any] | None = None) -> ProvisionState:
        from overnight.runtimes.kubernetes.job import pod_problems

        pid = f"{ns}/{name}"
        if dep is None:
            dep = await kube.get_or_none("Deployment", ns, name)
        if dep is None or not _ours(dep):
            return ProvisionState(provision_id=pid, provider=self.name, status="released",
                                  error=f"its Deployment {pid} does not exist")
        md, spec, st = _md(dep), dep.get("spec") or {}, dep.get("status") or {}
        notes = md.get("annotations") or {}
        replicas, ready = int(spec.get("replicas") or 1), int(st.get("readyReplicas") or 0)
        svc = await kube.get_or_none("Service", ns, name)
        pods = await self._pods(kube, ns, name)
        problems = [p for pod in pods for p in pod_problems(pod)[0]]
        status, endpoint = "provisioning", None
        for c in st.get("conditions") or []:
            if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
                problems.append(f"Deployment {pid}: {c.get('message') or c.get('reason')}")
            if c.get("type") == "Progressing" and c.get("status") == "False" \
                    and c.get("reason") == "ProgressDeadlineExceeded":
                status = "failed"
                problems.insert(0, f"Deployment {pid}: {c.get('message') or 'its progress deadline passed'}")
        if md.get("deletionTimestamp"):
            status, problems = "failed", [f"Deployment {pid} is being deleted", *problems]
        elif status != "failed" and ready >= replicas:
            if svc is not None and _ours(svc):
                port = next((p.get("port") for p in (svc.get("spec") or {}).get("ports") or []), None)
                status, endpoint = "running", self.url_for(ns, name, int(port or 8000))
            else:
                status, problems = "failed", [f"its Service {pid} is gone", *problems]
        return ProvisionState(
            provision_id=pid, provider=self.name, status=status, endpoint=endpoint,
            resource_ids=[f"Deployment/{pid}", *([f"Service/{pid}"] if svc is not None else []),
                          *(f"Pod/{ns}/{_md(p).get('name')}" for p in pods)],
            error="; ".join(problems) or None, job_id=notes.get(JOB_LABEL),
            installation_id=notes.get(INSTALLATION_LABEL),
            raw={"namespace": ns, "name": name, "uid": md.get("uid"), "replicas": replicas, "ready_replicas": ready},
        )

    async def status(self, provision_id: str) -> ProvisionState:
        ns, name = self._split(provision_id)
        kube = await self.kube()
        try:
            return await self._state(kube, ns, name)
        except KubernetesError as exc:
            raise ProvisionError(f"kubernetes: {exc.message}", retryable=exc.retryable) from exc

    async def release(self, provision_id: str) -> bool:
        ns, name = self._split(provision_id)
        kube = await self.kube()
        try:
            for kind in ("Deployment", "Service"):
                obj = await kube.get_or_none(kind, ns, name)
                if obj is not None and _ours(obj) and not _md(obj).get("deletionTimestamp"):
                    await kube.delete(kind, ns, name, propagation="Background", uid=_md(obj).get("uid"))
            deadline = time.monotonic() + self.release_wait_s
            while True:
                left = [f"{k} {ns}/{name}" for k in ("Deployment", "Service")
                        if _ours(await kube.get_or_none(k, ns, name))]
                left += [f"pod {ns}/{_md(p).get('name')}" for p in await self._pods(kube, ns, name)]
                if not left:
                    return True
                if time.monotonic() >= deadline:
                    log.info("release of %s: still there: %s", provision_id, ", ".join(left))
                    return False
                await asyncio.sleep(0.2)
        except KubernetesError as exc:
            raise ProvisionError(f"kubernetes: {exc.message}", retryable=exc.retryable) from exc

    async def list_owned(self, installation_id: str) -> list[ProvisionState]:
        from overnight.runtimes.kubernetes.manifests import MANAGED_BY_LABEL

        kube = await self.kube()
        ns = self.namespace
        selector = {MANAGED_BY_LABEL: MANAGED_BY_CONSOLE, INSTALLATION_LABEL: label_value(installation_id)}

        def mine(obj: dict[str, Any]) -> bool:  # the label may be a hash: the annotation decides
            return _ours(obj) and (_md(obj).get("annotations") or {}).get(INSTALLATION_LABEL) == installation_id

        try:
            out: list[ProvisionState] = []
            for dep in (await kube.list("Deployment", ns, label_selector=selector)).items:
                if mine(dep):
                    out.append(await self._state(kube, ns, _md(dep)["name"], dep))
            listed = {s.provision_id for s in out}
            for svc in (await kube.list("Service", ns, label_selector=selector)).items:
                md = _md(svc)
                if mine(svc) and f"{ns}/{md['name']}" not in listed:  # its Deployment is gone
                    out.append(ProvisionState(
                        provision_id=f"{ns}/{md['name']}", provider=self.name, status="failed",
                        resource_ids=[f"Service/{ns}/{md['name']}"], job_id=md["annotations"].get(JOB_LABEL),
                        installation_id=installation_id, error="its Deployment is gone"))
            return out
        except KubernetesError as exc:
            raise ProvisionError(f"kubernetes: {exc.message}", retryable=exc.retryable) from exc

    async def catalog(self) -> list[dict[str, Any]]:
        """GPU types the templates ask for (the cluster's nodes are not read: what a
        template's profile selects decides where it runs)."""
        types: dict[str, list[str]] = {}
        if self.templates is not None:
            cat = self.templates.catalog()
            for name, versions in sorted(cat.templates.items()):
                for _where, t in versions.values():
                    if t.spec.accelerator.gpus > 0:
                        names = types.setdefault(t.spec.accelerator.type, [])
                        if name not in names:
                            names.append(name)
        if not types:
            return [{"provider": self.name, "gpu_type": None, "gpu_types": [], "region": self.namespace,
                     "price_per_hour": None,
                     "note": "no template here asks for a GPU type; the cluster's GPU types are not read "
                             "(a template's accelerator and its profile's node_selector decide where it runs)"}]
        return [{"provider": self.name, "gpu_type": t, "region": self.namespace, "price_per_hour": None,
                 "templates": names, "note": "from the templates' accelerator type"} for t, names in types.items()]
