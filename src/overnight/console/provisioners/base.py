"""The provisioner interface: how the console's planner gets, watches and gives back
the GPUs a job runs on.

A provisioner is one provider (``fake``, ``local``, ``kubernetes``, later RunPod and
Lambda Cloud). Its contract, which the planner relies on to never leak a resource:

* ``provision(request)`` is **idempotent on** ``request.idempotency_key``: asking
  again (after a crash, or a retry of a call whose answer was lost) returns the
  resource already made for that key, never a second one. It returns as soon as
  the provider has accepted the request, with the provider's id.
* Every resource is **tagged** at creation with the job id and the installation id,
  so ``list_owned(installation_id)`` finds everything this installation holds
  (and never another installation's, sharing the account).
* ``status(provision_id)`` re-reads the provider (reconcile on read): ``pending``,
  ``provisioning``, ``running`` (with the endpoint, or the runtime spec the batch
  starts its engine with), ``failed`` or ``released``. A provider whose runtime
  spec is built from the job's template (the SSH providers) sets the class
  attribute ``status_takes_template = True``; the planner then calls
  ``status(provision_id, template=<the job's resolved template record>)``, so
  nothing needs keeping on the provider's side across a restart.
* ``release(provision_id)`` asks for deletion and returns True only once a re-read
  shows the resource gone (or terminated); False while it is still there (the
  planner asks again later). Releasing something already gone is True.
* Errors are ``ProvisionError`` with ``retryable`` (no capacity now, a 5xx, a
  timeout) or not (a bad request, no such GPU type): the planner retries the first
  kind with backoff until the job's provisioning timeout or deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from overnight.errors import OvernightError

__all__ = ["ProvisionError", "ProvisionRequest", "ProvisionState", "Provisioner"]


class ProvisionError(OvernightError):
    """A provider refused or failed; ``retryable`` says whether asking again may help."""

    code = "provision_failed"

    def __init__(self, message: str, *, retryable: bool = False, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable


@dataclass(frozen=True, kw_only=True)
class ProvisionRequest:
    job_id: str
    tenant: str
    installation_id: str
    #: The provider deduplicates on this (the job id: one resource per job).
    idempotency_key: str
    #: The resolved model template and profile (``Resolved.to_record()``).
    template: dict[str, Any]
    replicas: int = 1
    gpus_per_replica: int = 0
    gpu_type: str = "cpu"
    #: Unix seconds after which the resource is of no use (the job's deadline).
    deadline: float | None = None


@dataclass(kw_only=True)
class ProvisionState:
    provision_id: str
    provider: str
    #: pending | provisioning | running | failed | released
    status: str
    #: The OpenAI-compatible engine URL once running (providers whose engine the
    #: provision itself starts: fake, local, kubernetes, RunPod's proxy mode).
    endpoint: str | None = None
    #: Or, for a machine whose engine the batch's runtime starts (the SSH providers),
    #: the batch's runtime spec once running (``runtimes/ssh_common.py`` ``SshSpec``).
    runtime: dict[str, Any] | None = None
    #: Provider ids of what was made (pods, instances, objects).
    resource_ids: list[str] = field(default_factory=list)
    ssh: dict[str, Any] | None = None
    error: str | None = None
    job_id: str | None = None
    installation_id: str | None = None
    #: USD per hour while it runs, when the provider gives a price.
    price_per_hour: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "provision_id": self.provision_id, "provider": self.provider, "status": self.status,
            "endpoint": self.endpoint, "runtime": self.runtime, "resource_ids": list(self.resource_ids), "ssh": self.ssh,
            "error": self.error, "price_per_hour": self.price_per_hour, "raw": dict(self.raw),
        }


class Provisioner(Protocol):
    #: The provider's name in ``provider`` / ``PROVISIONER``.
    name: ClassVar[str]
    #: How long a provision may take to run (per provider; the planner's default).
    ready_timeout_s: float

    async def provision(self, request: ProvisionRequest) -> ProvisionState: ...

    async def status(self, provision_id: str) -> ProvisionState: ...

    async def release(self, provision_id: str) -> bool: ...

    async def list_owned(self, installation_id: str) -> list[ProvisionState]: ...

    async def catalog(self) -> list[dict[str, Any]]: ...

    async def aclose(self) -> None: ...
