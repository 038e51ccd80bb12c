"""The ``kubernetes-job`` runtime: one batch as one Indexed Job, one pod per shard.

Unlike the local runtime, the engine here is not something overnight's own
process sends requests to: each pod runs the engine as a native sidecar and
``overnight worker`` beside it, which executes its shard and checkpoints it in
the shared store (``batches/shards.py``). The service's part (``scheduler/remote.py``)
is to create the Job, watch it and its pods, sum the shard checkpoints into the
batch, and at the end merge them, write the undone lines, and delete the Job.

This module is that part's Kubernetes side:

* ``render``/``check``: the Job for a batch (``manifests.render_job``); ``check``
  runs at batch create, so a bad template, profile or option is a 400 naming it.
* ``submit``: create the Job (idempotent: its name comes from the batch id);
  the handle ``{type, namespace, name, uid, shards}`` is recorded on the batch
  *before* the create, so a process killed half-way leaves a trace.
* ``JobWatch``: list-then-watch of the Job and of its pods (a 410 re-lists), kept
  as a view: completion, failure, and pod problems (unschedulable, image pulls).
* ``release``: delete with ``propagationPolicy: Background`` and return once the
  Job and its pods are gone.
* ``sweep``: delete labelled Jobs, Deployments and Services whose batch is
  terminal or unknown, after a grace period. Objects without the
  ``app.kubernetes.io/managed-by=overnight`` label are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from overnight.errors import KubernetesError
from overnight.runtimes.kubernetes.client import Kube, KubeConfig, LazyKube, list_then_watch
from overnight.runtimes.kubernetes.manifests import (
    BATCH_LABEL, MANAGED_BY, MANAGED_BY_LABEL, WORKER_CONTAINER, object_name, render_job,
)
from overnight.templates.resolve import Resolved
from overnight.templates.schema import SecretKeyRef

__all__ = ["JobView", "JobWatch", "KubernetesJobRuntime", "pod_problems"]

log = logging.getLogger("overnight.runtimes.kubernetes")

#: Container waiting reasons that mean the pod will not start by itself.
_STUCK_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})
#: How long ``release`` waits for the Job and its pods to be gone.
RELEASE_TIMEOUT_S = 180.0


def _secret_ref(text: str | None) -> SecretKeyRef | None:
    """``name:key`` (a Secret and its key) or None."""
    if not text:
        return None
    name, _, key = text.partition(":")
    return SecretKeyRef(name=name, key=key or "url")


def pod_problems(pod: dict[str, Any]) -> tuple[list[str], bool]:
    """What keeps a pod from running, in words, and whether it is unschedulable."""
    md, st = pod.get("metadata") or {}, pod.get("status") or {}
    name = md.get("name", "?")
    out: list[str] = []
    unschedulable = False
    for c in st.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            unschedulable = True
            out.append(f"pod {name} cannot be scheduled: {c.get('message') or 'Unschedulable'}")
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK_REASONS:
            out.append(f"pod {name} container {cs.get('name')}: {waiting['reason']}: {waiting.get('message') or ''}"
                       .rstrip(": "))
    return out, unschedulable


def _worker_exit(pod: dict[str, Any]) -> str | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == WORKER_CONTAINER:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term and term.get("exitCode") not in (None, 0):
                return f"exit code {term['exitCode']}" + (f" ({term['reason']})" if term.get("reason") else "")
    return None


@dataclass
class JobView:
    """What the service knows of a batch's Job, from the watch."""

    exists: bool = False
    complete: bool = False
    failed: bool = False
    #: The Job's failure condition, in words (``BackoffLimitExceeded: ...``).
    reason: str | None = None
    #: Pods per phase (Pending, Running, Succeeded, Failed).
    pods: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unschedulable: bool = False
    #: Failed pods' worker exits, newest last (``pod x: exit code 42``).
    exits: list[str] = field(default_factory=list)
    #: The watch has listed both the Job and its pods at least once.
    synced: bool = False


class JobWatch:
    """A live view of one batch's Job and pods: list, then watch (a 410 re-lists)."""

    def __init__(self, kube: Kube, handle: dict[str, Any]) -> None:
        self.kube, self.handle = kube, handle
        self.job: dict[str, Any] | None = None
        self.pods: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Event()
        self.error: KubernetesError | None = None
        self._synced = {"Job": False, "Pod": False}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> JobWatch:
        ns, name = self.handle["namespace"], self.handle["name"]
        self._tasks = [
            asyncio.create_task(self._follow("Job", field_selector=f"metadata.name={name}"), name=f"watch-job-{name}"),
            asyncio.create_task(self._follow("Pod", label_selector=f"{BATCH_LABEL}={self.handle['batch_id']}"),
                                name=f"watch-pods-{name}"),
        ]
        log.debug("watching Job %s/%s and its pods", ns, name)
        return self

    async def _follow(self, kind: str, *, label_selector: str | None = None, field_selector: str | None = None) -> None:
        ns = self.handle["namespace"]
        while True:
            try:
                stream = list_then_watch(self.kube, kind, ns, label_selector=label_selector,
                                         field_selector=field_selector)
                async with contextlib.aclosing(stream):
                    async for ev in stream:
                        self._apply(kind, ev.type, ev.object)
                        self.error = None
            except KubernetesError as exc:
                # The API is down or refusing: the view goes stale, say so, try again.
                self.error = exc
                self.changed.set()
                log.warning("watching %s of %s/%s failed: %s; retrying", kind, ns, self.handle["name"], exc)
                await asyncio.sleep(2.0)

    def _apply(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        if type_ == "SYNCED":
            self._synced[kind] = True
        elif kind == "Job":
            uid = self.handle.get("uid")
            if uid and (obj.get("metadata") or {}).get("uid") not in (None, uid):
                return  # another incarnation under the same name
            self.job = None if type_ == "DELETED" else obj
        else:
            name = (obj.get("metadata") or {}).get("name", "")
            if type_ == "DELETED":
                self.pods.pop(name, None)
            else:
                self.pods[name] = obj
        self.changed.set()

    def view(self) -> JobView:
        v = JobView(exists=self.job is not None, synced=all(self._synced.values()))
        if self.job is not None:
            for c in (self.job.get("status") or {}).get("conditions") or []:
                if c.get("status") != "True":
                    continue
                if c.get("type") == "Complete":
                    v.complete = True
                elif c.get("type") == "Failed":
                    v.failed = True
                    v.reason = f"{c.get('reason') or 'Failed'}: {c.get('message') or ''}".rstrip(": ")
        for pod in self.pods.values():
            phase = (pod.get("status") or {}).get("phase") or "Pending"
            v.pods[phase] = v.pods.get(phase, 0) + 1
            if phase == "Pending":
                problems, unsched = pod_problems(pod)
                v.problems += problems
                v.unschedulable = v.unschedulable or unsched
            elif phase == "Failed":
                why = _worker_exit(pod)
                if why:
                    v.exits.append(f"pod {pod['metadata'].get('name')}: {why}")
        return v

    async def wait(self, timeout_s: float) -> None:
        """Until something changed or ``timeout_s`` passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.changed.wait()
        self.changed.clear()

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t


class KubernetesJobRuntime:
    """Creates, watches and deletes batches' Indexed Jobs (see the module docstring)."""

    type = "kubernetes-job"

    def __init__(
        self, *, config: KubeConfig, namespace: str, image: str, namespaces: tuple[str, ...] = (),
        store_secret: str | None = None, storage_secret: str | None = None, backoff_limit_per_index: int = 2,
    ) -> None:
        self.config = config
        self.namespace = namespace
        #: Namespaces batches may name and the sweep looks in.
        self.namespaces = tuple(dict.fromkeys((namespace, *namespaces)))
        self.image = image
        self.store_secret, self.storage_secret = _secret_ref(store_secret), _secret_ref(storage_secret)
        self.backoff_limit_per_index = backoff_limit_per_index
        self._kube = LazyKube(config)

    async def kube(self) -> Kube:
        return await self._kube.get()

    async def aclose(self) -> None:
        await self._kube.aclose()

    # -- rendering ------------------------------------------------------------------
    def namespace_for(self, runtime: dict[str, Any]) -> str:
        return runtime.get("namespace") or self.namespace

    def render(self, resolved: Resolved, *, batch_id: str, runtime: dict[str, Any], deadline_s: float | None,
               ) -> dict[str, Any]:
        return render_job(
            resolved, batch_id=batch_id, namespace=self.namespace_for(runtime), image=self.image,
            shards=int(runtime.get("shards") or 1), active_deadline_seconds=deadline_s,
            backoff_limit_per_index=self.backoff_limit_per_index,
            store_url_secret=self.store_secret, storage_url_secret=self.storage_secret,
        )

    def check(self, resolved: Resolved, runtime: dict[str, Any]) -> None:
        """At batch create: the Job this batch would get can be rendered, in an
        allowed namespace (an error names the field)."""
        from overnight.errors import InvalidRequestError

        ns = self.namespace_for(runtime)
        if ns not in self.namespaces:
            raise InvalidRequestError(
                f"Namespace {ns!r} is not one this server creates Jobs in ({', '.join(self.namespaces)}; "
                "OVERNIGHT_KUBERNETES_NAMESPACES).", param="overnight.runtime.namespace",
            )
        self.render(resolved, batch_id="batch_" + "0" * 24, runtime=runtime, deadline_s=86400)

    # -- life cycle -----------------------------------------------------------------
    @staticmethod
    def handle_for(job: dict[str, Any], batch_id: str) -> dict[str, Any]:
        md = job["metadata"]
        return {"type": "kubernetes-job", "namespace": md["namespace"], "name": md["name"], "batch_id": batch_id,
                "shards": job["spec"]["completions"], "uid": md.get("uid")}

    async def submit(self, job: dict[str, Any], *, batch_id: str,
                     record: Callable[[dict[str, Any]], Awaitable[None]]) -> dict[str, Any]:
        """Create the Job; ``record`` gets the handle before the create and again
        with the Job's uid after it."""
        handle = self.handle_for(job, batch_id)
        await record(handle)
        kube = await self.kube()
        created = await kube.create(job, handle["namespace"])
        handle["uid"] = (created.get("metadata") or {}).get("uid")
        await record(handle)
        log.info("batch %s: created Job %s/%s (%d shards)", batch_id, handle["namespace"], handle["name"],
                 handle["shards"])
        return handle

    async def exists(self, handle: dict[str, Any]) -> bool:
        kube = await self.kube()
        job = await kube.get_or_none("Job", handle["namespace"], handle["name"])
        if job is None:
            return False
        uid = handle.get("uid")
        return not uid or (job.get("metadata") or {}).get("uid") == uid

    async def watch(self, handle: dict[str, Any]) -> JobWatch:
        return JobWatch(await self.kube(), handle).start()

    async def release(self, handle: dict[str, Any], *, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
        """Delete the Job (its pods with it) and return once both are gone."""
        kube = await self.kube()
        ns, name = handle["namespace"], handle["name"]
        await kube.delete("Job", ns, name, propagation="Background", uid=handle.get("uid"))
        await kube.wait_gone("Job", ns, name, timeout_s, uid=handle.get("uid"))
        deadline = time.monotonic() + timeout_s
        selector = f"{BATCH_LABEL}={handle['batch_id']}"
        while True:
            pods = (await kube.list("Pod", ns, label_selector=selector)).items
            if not pods:
                break
            if time.monotonic() > deadline:
                raise KubernetesError(f"pods of Job {ns}/{name} still exist {timeout_s:g} s after its deletion: "
                                      f"{[p['metadata']['name'] for p in pods]}", reason="Timeout")
            await asyncio.sleep(0.5)
        log.info("batch %s: Job %s/%s deleted", handle["batch_id"], ns, name)

    async def sweep(self, is_live: Callable[[str, dict[str, str]], Awaitable[bool]], *, grace_s: float,
                    now: float | None = None) -> list[dict[str, Any]]:
        """Delete labelled Jobs, Deployments and Services in our namespaces that are
        not live (``is_live(batch id, labels)``: for a Job, its batch is not terminal)
        and are older than ``grace_s``."""
        kube = await self.kube()
        now = time.time() if now is None else now
        released: list[dict[str, Any]] = []
        for ns in self.namespaces:
            for kind in ("Job", "Deployment", "Service"):
                try:
                    items = (await kube.list(kind, ns, label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}")).items
                except KubernetesError as exc:
                    log.warning("sweep: listing %s in %s failed: %s", kind, ns, exc)
                    continue
                for obj in items:
                    md = obj.get("metadata") or {}
                    if (md.get("labels") or {}).get(MANAGED_BY_LABEL) != MANAGED_BY:
                        continue  # never touch what we did not label
                    labels = md.get("labels") or {}
                    batch_id = labels.get(BATCH_LABEL)
                    if await is_live(batch_id or "", labels):
                        continue
                    if now - _created(md) < grace_s:
                        continue
                    try:
                        await kube.delete(kind, ns, md["name"], propagation="Background", uid=md.get("uid"))
                    except KubernetesError as exc:
                        log.warning("sweep: deleting %s %s/%s failed: %s", kind, ns, md["name"], exc)
                        continue
                    log.warning("sweep: deleted leftover %s %s/%s (batch %s)", kind, ns, md["name"], batch_id)
                    released.append({"kind": kind, "namespace": ns, "name": md["name"], "batch_id": batch_id})
        return released


def _created(md: dict[str, Any]) -> float:
    ts = md.get("creationTimestamp")
    if not ts:
        return 0.0
    try:
        return datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def job_name(batch_id: str) -> str:
    return object_name(batch_id)
