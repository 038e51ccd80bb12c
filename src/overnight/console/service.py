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
from overnight.errors import InvalidRequestError, NotFoundError, StoreError
from overnight.files.service import get_file
from overnight.store.base import Store
from overnight.store.records import DocRecord

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


def build_provisioners(settings: Any) -> dict[str, Provisioner]:
    from overnight.console.provisioners.fake import FakeProvisioner

    out: dict[str, Provisioner] = {
        "fake": FakeProvisioner(Path(settings.data_dir) / "fake-provider", delay_s=settings.fake_provider_delay_s,
                                price_per_hour=settings.fake_provider_price_per_hour,
                                engine_args=("--latency-ms", str(settings.fake_provider_latency_ms)),
                                engine_url=settings.fake_provider_engine_url),
    }
    return out


class Console:
    def __init__(self, *, store: Store, storage: Any, settings: Any, rules: Any, provisioners: dict[str, Provisioner],
                 installation: str, limits: Any, on_batch: Any = None) -> None:
        self.store, self.storage, self.settings, self.rules = store, storage, settings, rules
        self.provisioners = provisioners
        self.installation_id = installation
        self.planner = Planner(
            store=store, storage=storage, provisioners=provisioners, limits=limits, rules=rules, on_batch=on_batch,
            config=PlannerConfig(
                installation_id=installation, workers=settings.planner_worker_count,
                policy=settings.planning_policy, tick_s=settings.planner_tick_s, poll_s=settings.planner_poll_s,
                provision_timeout_s=settings.provision_timeout_s,
            ),
        )

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
        name = req.template or self.settings.default_batch_model_deployment_template
        if not name:
            raise InvalidRequestError("Name a model_template_name (this server has no "
                                      "DEFAULT_BATCH_MODEL_DEPLOYMENT_TEMPLATE).", param="model_template_name")
        if self.rules is None or self.rules.templates is None:
            raise InvalidRequestError("This server has no model deployment templates (--templates-dir).",
                                      param="model_template_name")
        from overnight.templates.resolve import check_endpoint, resolve

        ref: dict[str, Any] = {"name": name}
        if req.template_version:
            ref["version"] = req.template_version
        resolved = resolve(self.rules.templates, ref, {"name": req.profile} if req.profile else None,
                           template_param="model_template_name", profile_param="profile")
        check_endpoint(resolved, req.endpoint)
        provider = req.provider or self.settings.provisioner
        if provider not in self.provisioners:
            raise InvalidRequestError(
                f"Provider {provider!r} is not configured on this server (configured: "
                f"{', '.join(sorted(self.provisioners))}).", param="provider")
        try:
            f = await get_file(store=self.store, tenant=tenant, file_id=req.input_dataset)
        except NotFoundError:
            raise NotFoundError(f"No such File object: {req.input_dataset}", code="file_not_found") from None
        if f.purpose != "batch":
            raise InvalidRequestError(f"File {f.id} has purpose {f.purpose!r}; a job's input_dataset must be "
                                      "uploaded with purpose 'batch'.", param="input_dataset")
        rec = await create_job(store=self.store, tenant=tenant, req=req, resolved=resolved.to_record(),
                               provider=provider, installation_id=self.installation_id)
        self.planner.wake()
        return rec
