"""The console as one object: what ``/api/v1`` needs (create a job, the providers,
the planner), built by the composition root from the settings."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from overnight.console.jobs import JobCreate, create_job
from overnight.console.models import MODEL
from overnight.console.planner import Planner, PlannerConfig
from overnight.console.provisioners.base import Provisioner
from overnight.console.templates import StoreTemplates, resolve_job_template
from overnight.errors import InvalidRequestError, NotFoundError, StoreError
from overnight.store.base import Store
from overnight.store.records import DocRecord
from overnight.webhooks.config import WebhookConfig, check_batch_webhook
from overnight.webhooks.jobs import JobWebhooks

__all__ = ["Console", "build_provisioners", "installation_id"]

META = "meta"


async def installation_id(store: Store, configured: str | None) -> str:
    """``OVERNIGHT_INSTALLATION_ID``, else one kept in the store (made on first use):
    the same for every replica on that store, different for another installation
    sharing a provider account."""
    if configured:
        return configured
    rec = await store.get_doc(META, "installation")
    if rec is None:
        new = DocRecord(kind=META, id="installation", tenant="", created_at=time.time(),
                        body={"id": "ovn-" + os.urandom(6).hex()})
        try:
            await store.insert_doc(new)
            rec = new
        except StoreError:
            rec = await store.get_doc(META, "installation")
            if rec is None:
                raise
    return str(rec.body["id"])


def build_provisioners(settings: Any, *, gpus: Any = None, templates: Any = None) -> dict[str, Provisioner]:
    """The providers this server offers: ``fake`` always; ``local`` (this host's
    GPUs, from ``gpus``: the pool the service's own engines use) unless
    ``OVERNIGHT_RUNTIMES`` leaves out the local runtime; ``kubernetes`` when a
    cluster is configured (``OVERNIGHT_KUBERNETES``; ``templates`` give its catalog);
    ``runpod`` / ``lambdaCloud`` when their API key is set or ``PROVISIONER`` names
    them (a missing required setting stops start-up with its name)."""
    from overnight.console.provisioners.fake import FakeProvisioner

    out: dict[str, Provisioner] = {
        "fake": FakeProvisioner(Path(settings.data_dir) / "fake-provider", delay_s=settings.fake_provider_delay_s,
                                price_per_hour=settings.fake_provider_price_per_hour,
                                engine_args=("--latency-ms", str(settings.fake_provider_latency_ms)),
                                engine_url=settings.fake_provider_engine_url),
    }
    if "local" in settings.allowed_runtimes():
        from overnight.console.provisioners.local import LocalProvisioner

        out["local"] = LocalProvisioner(Path(settings.data_dir) / "local-provider", gpus=gpus)
    if settings.runpod_api_key or settings.provisioner == "runpod":
        from overnight.console.provisioners.runpod import RunPodProvisioner

        out["runpod"] = RunPodProvisioner.from_settings(settings)
    if settings.lambda_cloud_api_key or settings.provisioner == "lambdaCloud":
        from overnight.console.provisioners.lambda_cloud import LambdaCloudProvisioner

        out["lambdaCloud"] = LambdaCloudProvisioner.from_settings(settings)
    if settings.kubernetes:
        from overnight.console.provisioners.kubernetes import KubernetesProvisioner

        out["kubernetes"] = KubernetesProvisioner(
            config=settings.kube_config(), namespace=settings.kubernetes_namespace, image=settings.kubernetes_image,
            service_url=settings.kubernetes_service_url, templates=templates)
    return out


class Console:
    def __init__(self, *, store: Store, storage: Any, settings: Any, rules: Any, provisioners: dict[str, Provisioner],
                 installation: str, limits: Any, on_batch: Any = None, batches: Any = None,
                 webhooks: WebhookConfig | None = None, secrets: Any = None) -> None:
        self.store, self.storage, self.settings, self.rules = store, storage, settings, rules
        #: The server's webhook settings (a job's own webhook_url is checked against them)
        #: and the box its webhook_secret is sealed with.
        self.webhooks, self.secrets = webhooks, secrets
        #: The job.* events terminal jobs owe (``webhooks/jobs.py``); its ``on_event``
        #: is set to the delivery loop's wake-up by whoever runs that loop.
        self.job_webhooks = JobWebhooks(webhooks)
        self.provisioners = provisioners
        self.installation_id = installation
        #: Each tenant's stored deployment templates, as template sources (console/templates.py).
        self.templates = StoreTemplates(store)
        self.planner = Planner(
            store=store, storage=storage, provisioners=provisioners, limits=limits, rules=rules, on_batch=on_batch,
            batches=batches, webhooks=self.job_webhooks,
            config=PlannerConfig(
                installation_id=installation, workers=settings.planner_worker_count,
                policy=settings.planning_policy, tick_s=settings.planner_tick_s, poll_s=settings.planner_poll_s,
                provision_timeout_s=settings.provision_timeout_s,
                max_provisioning=settings.planner_max_provisioning,
                job_retention_s=settings.console_job_retention_s,
                # Often enough for a short retention, at least every 5 minutes for a long one.
                retention_interval_s=min(300.0, max(settings.planner_tick_s, settings.console_job_retention_s / 4)),
            ),
        )
        self.planner.secrets = secrets

    def start(self) -> None:
        self.planner.start()

    async def aclose(self) -> None:
        await self.planner.aclose()
        for p in self.provisioners.values():
            await p.aclose()

    async def create_job(self, *, tenant: str, body: Any) -> DocRecord:
        req = JobCreate(body)
        if req.model_id is not None:
            m = await self.store.get_doc(MODEL, req.model_id)
            if m is None or m.tenant != tenant:
                raise NotFoundError(f"No such model: {req.model_id}", code="model_not_found")
        from overnight.templates.resolve import check_endpoint

        # The tenant's stored templates and the server's (directory/ConfigMaps); the
        # model's own when the job names only a model; the server's default otherwise.
        resolved = await resolve_job_template(
            templates=self.templates, server=self.rules.templates if self.rules is not None else None,
            tenant=tenant, name=req.template, version=req.template_version, model_id=req.model_id,
            default=self.settings.default_batch_model_deployment_template, profile=req.profile)
        check_endpoint(resolved, req.endpoint)
        provider = req.provider or self.settings.provisioner
        if provider not in self.provisioners:
            raise InvalidRequestError(
                f"Provider {provider!r} is not configured on this server (configured: "
                f"{', '.join(sorted(self.provisioners))}).", param="provider")
        # Where the batch will be created: this process's store, or the metadata
        # service over its API (``console/remote.py``).
        purpose = await self.planner.batches.input_file(tenant=tenant, file_id=req.input_dataset)
        if purpose != "batch":
            raise InvalidRequestError(f"File {req.input_dataset} has purpose {purpose!r}; a job's input_dataset "
                                      "must be uploaded with purpose 'batch'.", param="input_dataset")
        hook = None
        if req.webhook is not None:
            hook = await check_batch_webhook(req.webhook, key="", config=self.webhooks, secrets=self.secrets)
        rec = await create_job(store=self.store, tenant=tenant, req=req, resolved=resolved.to_record(),
                               provider=provider, installation_id=self.installation_id, webhook=hook)
        self.planner.kick(rec.id, queued=True)
        return rec
