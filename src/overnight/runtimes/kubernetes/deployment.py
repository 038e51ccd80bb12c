"""The ``kubernetes-deployment`` runtime: the engine as a Deployment behind a Service.

overnight's own process sends the requests, to the Service, exactly as to an
``endpoint``; so batches on the same template and profile share it (and one
adaptive limit spanning all its replicas) through the engine manager, which
keeps it ``keep_alive_seconds`` after its last batch. A ``Runtime`` like the
local one:

* ``acquire``: render the Deployment (replicas = ``parallelism.dp``) and the
  Service; record the handle, create the Deployment, then the Service owned by
  it (``ownerReferences``), so deleting the Deployment takes the Service along;
* ``wait_ready``: until ``readyReplicas`` reaches the replicas, within the
  template's ``ready_timeout_seconds``, logging why pods are pending as it
  waits (unschedulable, image pulls) and naming it in the error on timeout;
* ``alive``: the Deployment (this incarnation) still exists; Kubernetes replaces
  failed pods itself, and a gap in service is the executor's engine-down case;
* ``release``: delete both with ``propagationPolicy: Background`` and return once
  the Deployment, the Service and the pods are gone;
* ``sweep(live_owners)``: at start-up, what this replica (label
  ``overnight.dev/replica``) created for engines that are not live any more.

The URL the service sends to is ``service_url`` formatted with ``name``,
``namespace`` and ``port``: in a cluster the Service's DNS name (the default);
from outside one (or in tests), whatever reaches it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, ClassVar

from overnight.errors import KubernetesError, OvernightError, RuntimeStartError
from overnight.runtimes.base import Endpoint, RecordHandle, RuntimeHandle, RuntimeSpec
from overnight.runtimes.kubernetes.client import Kube, KubeConfig, LazyKube
from overnight.runtimes.kubernetes.job import RELEASE_TIMEOUT_S, pod_problems
from overnight.runtimes.kubernetes.manifests import (
    MANAGED_BY, MANAGED_BY_LABEL, render_deployment, render_service,
)
from overnight.templates.resolve import Resolved

__all__ = ["DeploymentSpec", "KubernetesDeploymentRuntime", "REPLICA_LABEL"]

log = logging.getLogger("overnight.runtimes.kubernetes")

#: Which overnight replica created an engine Deployment (a hash of its id).
REPLICA_LABEL = "overnight.dev/replica"
OWNER_ANNOTATION = "overnight.dev/owner"
DEFAULT_SERVICE_URL = "http://{name}.{namespace}.svc:{port}"


class DeploymentSpec(RuntimeSpec):
    type: str = "kubernetes-deployment"
    #: The resolved template and profile (``Resolved.to_record()``).
    template: dict[str, Any]
    #: The batch that starts it: names the objects and labels them.
    batch_id: str
    namespace: str | None = None


def _replica_hash(replica_id: str) -> str:
    return hashlib.sha256(replica_id.encode()).hexdigest()[:16]


class KubernetesDeploymentRuntime:
    type: ClassVar[str] = "kubernetes-deployment"
    spec_model: ClassVar[type[RuntimeSpec]] = DeploymentSpec

    def __init__(self, *, config: KubeConfig, namespace: str, image: str, replica_id: str,
                 namespaces: tuple[str, ...] = (), service_url: str = DEFAULT_SERVICE_URL,
                 poll_s: float = 1.0) -> None:
        self.config, self.namespace, self.image = config, namespace, image
        self.namespaces = tuple(dict.fromkeys((namespace, *namespaces)))
        self.replica = _replica_hash(replica_id)
        self.service_url = service_url
        self.poll_s = poll_s
        self._kube = LazyKube(config)

    async def kube(self) -> Kube:
        return await self._kube.get()

    async def aclose(self) -> None:
        await self._kube.aclose()

    # -- rendering ------------------------------------------------------------------
    def render(self, resolved: Resolved, *, batch_id: str, namespace: str | None) -> tuple[dict, dict]:
        ns = namespace or self.namespace
        dep = render_deployment(resolved, batch_id=batch_id, namespace=ns, image=self.image)
        svc = render_service(resolved, batch_id=batch_id, namespace=ns)
        for obj in (dep, svc):
            obj["metadata"]["labels"][REPLICA_LABEL] = self.replica
        return dep, svc

    def check(self, resolved: Resolved, runtime: dict[str, Any]) -> None:
        """At batch create: its Deployment and Service can be rendered here."""
        from overnight.errors import InvalidRequestError

        ns = runtime.get("namespace") or self.namespace
        if ns not in self.namespaces:
            raise InvalidRequestError(
                f"Namespace {ns!r} is not one this server creates engines in ({', '.join(self.namespaces)}; "
                "OVERNIGHT_KUBERNETES_NAMESPACES).", param="overnight.runtime.namespace",
            )
        self.render(resolved, batch_id="batch_" + "0" * 24, namespace=ns)

    # -- the Runtime protocol ---------------------------------------------------------
    async def acquire(self, spec: RuntimeSpec | dict[str, Any], *, owner: str,
                      record: RecordHandle | None = None) -> RuntimeHandle:
        s = spec if isinstance(spec, DeploymentSpec) else DeploymentSpec.model_validate(spec)
        resolved = Resolved.from_record(s.template)
        dep, svc = self.render(resolved, batch_id=s.batch_id, namespace=s.namespace)
        dep["metadata"]["annotations"][OWNER_ANNOTATION] = owner
        md = dep["metadata"]
        handle: RuntimeHandle = {
            "type": self.type, "owner": owner, "namespace": md["namespace"], "name": md["name"],
            "batch_id": s.batch_id, "replicas": dep["spec"]["replicas"],
            "port": resolved.template.spec.engine.port,
        }
        if record is not None:
            await record(dict(handle))
        kube = await self.kube()
        created = await kube.create(dep, md["namespace"])
        handle["uid"] = created["metadata"].get("uid")
        svc["metadata"]["ownerReferences"] = [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": md["name"], "uid": handle["uid"],
            "controller": True, "blockOwnerDeletion": True,
        }]
        await kube.create(svc, md["namespace"])
        if record is not None:
            await record(dict(handle))
        log.info("engine %s: created Deployment and Service %s/%s (%d replicas)", owner, md["namespace"],
                 md["name"], handle["replicas"])
        return handle

    def url_for(self, handle: RuntimeHandle) -> str:
        return self.service_url.format(name=handle["name"], namespace=handle["namespace"], port=handle["port"])

    async def wait_ready(self, handle: RuntimeHandle, *, timeout_s: float) -> Endpoint:
        kube = await self.kube()
        ns, name = handle["namespace"], handle["name"]
        deadline = time.monotonic() + timeout_s
        said: set[str] = set()
        problems: list[str] = []
        while True:
            dep = await kube.get_or_none("Deployment", ns, name)
            if dep is None or (handle.get("uid") and dep["metadata"].get("uid") != handle["uid"]):
                raise RuntimeStartError(f"the engine's Deployment {ns}/{name} was deleted while it started")
            ready = int((dep.get("status") or {}).get("readyReplicas") or 0)
            if ready >= int(handle["replicas"]):
                url = self.url_for(handle)
                log.info("engine %s: %d/%d replicas ready; serving at %s", handle["owner"], ready,
                         handle["replicas"], url)
                return Endpoint(url)
            pods = (await kube.list("Pod", ns, label_selector=f"app.kubernetes.io/instance={name}")).items
            problems = [p for pod in pods for p in pod_problems(pod)[0]]
            for p in problems:
                if p not in said:
                    said.add(p)
                    log.warning("engine %s: %s", handle["owner"], p)
            if time.monotonic() >= deadline:
                why = "; ".join(problems) if problems else "no pod problem reported"
                raise RuntimeStartError(
                    f"the engine's Deployment {ns}/{name} had {ready} of {handle['replicas']} replicas ready "
                    f"after {timeout_s:g} s (ready_timeout_seconds): {why}")
            await asyncio.sleep(self.poll_s)

    async def alive(self, handle: RuntimeHandle) -> bool:
        kube = await self.kube()
        try:
            dep = await kube.get_or_none("Deployment", handle["namespace"], handle["name"])
        except KubernetesError:
            return True  # the API is unreachable, not the engine: do not count a death
        return dep is not None and (not handle.get("uid") or dep["metadata"].get("uid") == handle["uid"])

    def exit_info(self, handle: RuntimeHandle) -> dict[str, Any]:
        return {"exit_code": None, "log_tail": f"its Deployment {handle['namespace']}/{handle['name']} is gone"}

    async def release(self, handle: RuntimeHandle) -> None:
        kube = await self.kube()
        ns, name = handle["namespace"], handle["name"]
        await kube.delete("Deployment", ns, name, propagation="Background", uid=handle.get("uid"))
        await kube.delete("Service", ns, name, propagation="Background")
        await kube.wait_gone("Deployment", ns, name, RELEASE_TIMEOUT_S, uid=handle.get("uid"))
        await kube.wait_gone("Service", ns, name, RELEASE_TIMEOUT_S)
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while (await kube.list("Pod", ns, label_selector=f"app.kubernetes.io/instance={name}")).items:
            if time.monotonic() > deadline:
                raise OvernightError(f"pods of Deployment {ns}/{name} still exist {RELEASE_TIMEOUT_S:g} s after "
                                     "its deletion", code="runtime_stop_failed")
            await asyncio.sleep(0.5)
        log.info("engine %s: Deployment and Service %s/%s deleted", handle.get("owner"), ns, name)

    async def sweep(self, live_owners: set[str]) -> list[RuntimeHandle]:
        """This replica's engine Deployments whose engine is not live (at start-up: all
        of them, left by this replica's previous process)."""
        kube = await self.kube()
        released: list[RuntimeHandle] = []
        for ns in self.namespaces:
            selector = f"{MANAGED_BY_LABEL}={MANAGED_BY},{REPLICA_LABEL}={self.replica}"
            for dep in (await kube.list("Deployment", ns, label_selector=selector)).items:
                md = dep["metadata"]
                owner = (md.get("annotations") or {}).get(OWNER_ANNOTATION, "")
                if owner in live_owners:
                    continue
                handle = {"type": self.type, "owner": owner, "namespace": ns, "name": md["name"],
                          "uid": md.get("uid"), "batch_id": (md.get("labels") or {}).get("overnight.dev/batch-id")}
                await self.release(handle)
                released.append(handle)
        return released
