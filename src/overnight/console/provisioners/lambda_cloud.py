"""The ``lambdaCloud`` provider: one Lambda Cloud GPU instance per job, reached over SSH.

A job gets **one machine** whose GPU count is the job's whole need
(``replicas * gpus_per_replica``); the engine the batch's SSH runtime starts on it
already carries ``--data-parallel-size`` for the replicas, so it never spans
machines. Lambda's public API (``LAMBDA_CLOUD_BASE_URL``, default
``https://cloud.lambda.ai/api/v1``; Bearer key; ``{"data": ...}`` answers;
errors ``{"error": {"code", "message", "suggestion"}}``, told apart by ``code``
only, never by their text):

* **Capacity** comes from ``GET /instance-types``: the types of the template's GPU
  family (:func:`gpu_family`: ``H100``, ``NVIDIA H100``, ``H100-SXM5`` and ``NVIDIA
  H100 80GB HBM3`` are one family, ``A10`` is never ``A100``) with exactly that
  many GPUs; the cheapest with capacity wins, only in ``LAMBDA_CLOUD_REGION`` when
  it is set. No type of that family and count: :class:`NoGpuType` (not retryable,
  names what exists). The family exists but no region has it now:
  :class:`NoCapacity` (retryable). A (type, region) Lambda refused for capacity
  is passed over for ``capacity_cooldown_s`` while another option exists, since
  the list is advisory.
* **Launch** is ``POST /instance-operations/launch`` with one SSH key (the first of
  ``LAMBDA_CLOUD_SSH_KEYS``), ``name`` ``overnight-<job id>`` (at most 64 characters)
  and the tags ``overnight-job`` = job id and ``overnight-installation`` =
  installation id (and ``overnight-key`` when the idempotency key is not the job
  id). One call makes one instance (the API has no quantity).
* **Idempotent**: before launching, ``GET /instances`` is read and an instance
  tagged with this installation and key is adopted, so a crash or a lost answer
  after the launch never makes a second one. A launch whose answer was lost (a
  5xx, a dropped connection) is not tried again for ``launch_grace_s`` unless the
  instance shows up meanwhile.
* **Pacing**, process-wide per account (base URL + key): at most one launch per
  ``launch_interval_s`` (Lambda: 12 s) and one request per ``request_interval_s``
  (Lambda: about 1 s); a 429 holds every call of the account back for its
  ``Retry-After`` (else an exponential backoff from ``backoff_s``), up to
  ``max_retries`` times, then a retryable error.
* The **provision id** is the instance id. ``status`` re-reads ``GET
  /instances/{id}``: ``booting`` -> provisioning; ``active`` with an ``ip`` and sshd
  answering our key (``probe``; the host key it saw is pinned in the runtime spec)
  -> running, with ``ssh`` and the ``ssh`` runtime spec (``launch: docker``, the
  template's image or ``LAMBDA_CLOUD_IMAGE``); ``active`` without an ``ip`` or sshd
  not answering yet -> provisioning with the reason; ``unhealthy`` / ``preempted``
  -> failed; ``terminating`` -> provisioning (not running); ``terminated`` or 404
  -> released. The runtime spec is built from the job's template: the planner
  passes it (``status_takes_template``: ``status(..., template=)``), so a restart
  loses nothing; without it, the one ``provision`` saw in this process is used.
* **Release** asks ``POST /instance-operations/terminate`` for the instance (and any
  other live instance tagged with the same installation and key), then re-reads
  each one until ``terminated`` or 404, for up to ``release_wait_s``: True only
  then, False while one is still ``terminating``; an id already gone is success;
  a terminate answering a 5xx is checked by the re-read (it may have
  terminated). Nothing without this installation's tag is ever terminated.
* ``list_owned`` lists the instances tagged with the installation (never one
  without the tag); ``catalog`` is ``/instance-types`` with USD prices
  (``price_cents_per_hour / 100``) and the regions with capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from overnight.console.provisioners.base import (
    ProvisionError,
    ProvisionRequest,
    ProvisionState,
)
from overnight.errors import OvernightError

__all__ = ["DEFAULT_BASE_URL", "INSTALLATION_TAG", "JOB_TAG", "KEY_TAG", "LambdaApiError", "LambdaCloudProvisioner",
           "NoCapacity", "NoGpuType", "gpu_family"]

log = logging.getLogger("overnight.console")

DEFAULT_BASE_URL = "https://cloud.lambda.ai/api/v1"
JOB_TAG = "overnight-job"
INSTALLATION_TAG = "overnight-installation"
#: Only when the idempotency key is not the job id.
KEY_TAG = "overnight-key"
INSUFFICIENT_CAPACITY = "instance-operations/launch/insufficient-capacity"
NOT_FOUND = "global/object-does-not-exist"

#: Lambda error code -> (overnight error code, retryable).
_CODES: dict[str, tuple[str, bool]] = {
    INSUFFICIENT_CAPACITY: ("no_capacity", True),
    "global/quota-exceeded": ("quota_exceeded", False),
    "global/invalid-parameters": ("invalid_parameters", False),
    "global/invalid-api-key": ("invalid_api_key", False),
    "global/account-inactive": ("account_inactive", False),
    "global/invalid-address": ("invalid_address", False),
    NOT_FOUND: ("not_found", False),
    "instance-operations/launch/file-system-in-wrong-region": ("invalid_parameters", False),
    "global/internal-error": ("provider_error", True),
}

# -- GPU families ------------------------------------------------------------------------------
_VENDOR = {"NVIDIA", "TESLA", "GPU", "QUADRO", "GEFORCE", "AMD", "INSTINCT"}
#: Form factor, memory, interconnect and count tokens: not part of the family.
_NOT_FAMILY = re.compile(r"^(SXM\d*|PCIE\d*|HBM\d*E?|NVL\d*|NVLINK|GDDR\d*X?|\d+X|X\d+|\d+GI?B?|GI?B)$")
_MEMORY = re.compile(r"\d+(\.\d+)?\s*GI?B(?![A-Z0-9])")


def gpu_family(text: str | None) -> str | None:
    """The GPU model a type name or description names, upper-case without vendor,
    memory or form factor: ``"NVIDIA H100 80GB HBM3"``, ``"H100-SXM5"``,
    ``"gpu_8x_h100_sxm5"`` and ``"H100 (80 GB SXM5)"`` are all ``H100``;
    ``"RTX A6000"`` is ``A6000``, ``"Quadro RTX 6000"`` and ``gpu_1x_rtx6000`` are
    ``RTX6000``. None when nothing in it looks like a model (``cpu``,
    ``nvidia.com/gpu``)."""
    if not text:
        return None
    s = _MEMORY.sub(" ", text.upper())
    toks = [t for t in re.split(r"[^A-Z0-9]+", s) if t and t not in _VENDOR and not _NOT_FAMILY.match(t)]
    merged: list[str] = []
    i = 0
    while i < len(toks):
        if toks[i].isalpha() and i + 1 < len(toks) and toks[i + 1].isdigit():  # "RTX 6000" -> RTX6000
            merged.append(toks[i] + toks[i + 1])
            i += 2
        else:
            merged.append(toks[i])
            i += 1
    for t in merged:
        if any(c.isdigit() for c in t) and any(c.isalpha() for c in t):
            return t
    return None


def _type_families(t: dict[str, Any]) -> set[str]:
    return {f for f in (gpu_family(t.get("name")), gpu_family(t.get("gpu_description"))) if f}


# -- errors ----------------------------------------------------------------------------------------
class NoGpuType(ProvisionError):
    """Lambda offers no instance type of that GPU family and count (asking again will not help)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False, code="no_gpu_type")


class NoCapacity(ProvisionError):
    """The type exists but no region (or not the configured one) has capacity now."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True, code="no_capacity")


class LambdaApiError(Exception):
    """An answer of Lambda's API other than success (``status`` None: no answer)."""

    def __init__(self, status: int | None, code: str, message: str, suggestion: str | None = None, *,
                 ambiguous: bool = False) -> None:
        super().__init__(f"{message} ({code})")
        self.status, self.code, self.message, self.suggestion = status, code, message, suggestion
        #: The request may have been carried out (no answer, or a 5xx): a launch must be
        #: checked for before it is made again.
        self.ambiguous = ambiguous

    @property
    def retryable(self) -> bool:
        if self.code in _CODES:
            return _CODES[self.code][1]
        return self.status is None or self.status == 429 or self.status >= 500 or self.code == "bad-answer" \
            or self.code.startswith("provider/")

    @property
    def not_found(self) -> bool:
        return self.status == 404 or self.code == NOT_FOUND

    def describe(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no answer"
        out = f"{self.message} ({self.code}, {where})"
        return f"{out}; Lambda suggests: {self.suggestion}" if self.suggestion else out

    def to_provision_error(self, what: str) -> ProvisionError:
        code = _CODES.get(self.code, ("provider_error", self.retryable))[0]
        return ProvisionError(f"Lambda Cloud: {what}: {self.describe()}", retryable=self.retryable, code=code)


# -- pacing ----------------------------------------------------------------------------------------
class _Pacer:
    """Slots handed out under a thread lock (planners in several threads or event
    loops of one process share an account's limits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}

    def reserve(self, intervals: dict[str, float]) -> float:
        """Seconds to wait before a call counted under each of ``intervals``' kinds may
        go; the next call of each kind then waits its interval after this one."""
        with self._lock:
            now = time.monotonic()
            at = max([now, *(self._next.get(kind, 0.0) for kind in intervals)])
            for kind, interval in intervals.items():
                self._next[kind] = at + max(0.0, interval)
            return at - now

    def hold(self, until: float) -> None:
        """A 429: nothing of this account before ``until``."""
        with self._lock:
            for kind in ("any", "launch"):
                self._next[kind] = max(self._next.get(kind, 0.0), until)


_PACERS: dict[str, _Pacer] = {}
_PACERS_LOCK = threading.Lock()


def _pacer_for(base_url: str, api_key: str) -> _Pacer:
    key = base_url.rstrip("/") + "#" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
    with _PACERS_LOCK:
        return _PACERS.setdefault(key, _Pacer())


def _retry_after(resp: httpx.Response) -> float | None:
    v = resp.headers.get("Retry-After")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _tags(inst: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in inst.get("tags") or []:
        if isinstance(t, dict) and isinstance(t.get("key"), str):
            out[t["key"]] = str(t.get("value"))
    return out


def _key_of(tags: dict[str, str]) -> str | None:
    return tags.get(KEY_TAG) or tags.get(JOB_TAG)


Probe = Callable[[str, int, str, Any], Awaitable[str]]


async def _default_probe(host: str, port: int, user: str, key: Any) -> str:
    from overnight.runtimes.ssh_common import probe_host_key

    return await probe_host_key(host, port, user, key)


class LambdaCloudProvisioner:
    name: ClassVar[str] = "lambdaCloud"
    #: The planner passes the job's template to ``status`` (the runtime spec is built from it).
    status_takes_template: ClassVar[bool] = True

    def __init__(self, *, api_key: str, ssh_key_names: list[str] | str, ssh_key_file: str | None = None,
                 base_url: str = DEFAULT_BASE_URL, region: str | None = None, ssh_user: str = "ubuntu",
                 ssh_port: int = 22, image: str = "vllm/vllm-openai:latest", ready_timeout_s: float = 1800.0,
                 probe: Probe | None = None, launch_interval_s: float = 12.0, request_interval_s: float = 1.0,
                 backoff_s: float = 10.0, backoff_max_s: float = 120.0, max_retries: int = 5,
                 timeout_s: float = 30.0, release_wait_s: float = 10.0, release_poll_s: float = 1.0,
                 launch_grace_s: float = 60.0, capacity_cooldown_s: float = 120.0) -> None:
        keys = [k.strip() for k in ssh_key_names.split(",")] if isinstance(ssh_key_names, str) else list(ssh_key_names)
        keys = [k for k in keys if k]
        if not api_key:
            raise ValueError("lambdaCloud: the API key (LAMBDA_CLOUD_API_KEY) is empty")
        if not keys:
            raise ValueError("lambdaCloud: no SSH key name (LAMBDA_CLOUD_SSH_KEYS) is given")
        self.api_key = api_key
        self.ssh_key_name = keys[0]  # the launch API takes exactly one
        self.ssh_key_file = ssh_key_file
        self.base_url = base_url.rstrip("/")
        self.region = region or None
        self.ssh_user, self.ssh_port, self.image = ssh_user, ssh_port, image
        self.ready_timeout_s = ready_timeout_s
        self.probe: Probe = probe or _default_probe
        self.launch_interval_s, self.request_interval_s = launch_interval_s, request_interval_s
        self.backoff_s, self.backoff_max_s, self.max_retries = backoff_s, backoff_max_s, max_retries
        self.release_wait_s, self.release_poll_s = release_wait_s, release_poll_s
        self.launch_grace_s, self.capacity_cooldown_s = launch_grace_s, capacity_cooldown_s
        self._pacer = _pacer_for(self.base_url, api_key)
        self._http = httpx.AsyncClient(timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}",
                                                                   "Accept": "application/json"})
        self._client_key: Any = None
        #: instance id -> the job's template (``status`` needs it for the runtime spec).
        self._templates: dict[str, dict[str, Any]] = {}
        #: idempotency key -> when a launch of it got no clear answer.
        self._uncertain: dict[str, float] = {}
        #: (type, region) -> when Lambda refused it for capacity.
        self._refused: dict[tuple[str, str], float] = {}
        #: idempotency key -> [its lock, callers holding or waiting for it]; an entry
        #: goes with its last caller, so the map holds only provisions under way.
        self._key_locks: dict[str, list[Any]] = {}

    @classmethod
    def from_settings(cls, settings: Any, **kw: Any) -> LambdaCloudProvisioner:
        """From ``LAMBDA_CLOUD_*`` and ``OVERNIGHT_SSH_KEY_FILE``; a missing one is a
        ``ValueError`` naming it (start-up stops)."""
        keys = [k.strip() for k in (settings.lambda_cloud_ssh_keys or "").split(",") if k.strip()]
        missing = [name for name, value in (("LAMBDA_CLOUD_API_KEY", settings.lambda_cloud_api_key),
                                            ("LAMBDA_CLOUD_SSH_KEYS", keys),
                                            ("OVERNIGHT_SSH_KEY_FILE", settings.ssh_key_file)) if not value]
        if missing:
            raise ValueError(
                f"the lambdaCloud provider needs {', '.join(missing)} (the API key; the name of the SSH key "
                "registered with Lambda; the matching private key file overnight connects with)")
        if "probe" not in kw:
            try:
                from overnight.runtimes.ssh_common import load_client_key

                load_client_key(settings.ssh_key_file)
            except ImportError:
                raise ValueError("the lambdaCloud provider connects over SSH: pip install 'overnight[ssh]' "
                                 "(asyncssh)") from None
            except OvernightError as exc:
                raise ValueError(f"OVERNIGHT_SSH_KEY_FILE: {exc.message}") from None
        return cls(api_key=settings.lambda_cloud_api_key, ssh_key_names=keys, ssh_key_file=settings.ssh_key_file,
                   base_url=settings.lambda_cloud_base_url, region=settings.lambda_cloud_region,
                   ssh_user=settings.lambda_cloud_ssh_user, ssh_port=settings.lambda_cloud_ssh_port,
                   image=settings.lambda_cloud_image, ready_timeout_s=settings.lambda_cloud_ready_timeout_s, **kw)

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the API -----------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: Any = None, *, launch: bool = False) -> Any:
        """One API call, paced; 429s waited out. Returns ``data``; raises LambdaApiError."""
        attempt = 0
        while True:
            attempt += 1
            kinds = {"any": self.request_interval_s}
            if launch:
                kinds["launch"] = self.launch_interval_s
            await asyncio.sleep(self._pacer.reserve(kinds))
            try:
                resp = await self._http.request(method, self.base_url + path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise LambdaApiError(None, "network", f"cannot reach {self.base_url}: {exc or type(exc).__name__}")
            except httpx.HTTPError as exc:
                raise LambdaApiError(None, "network", f"no answer from {self.base_url}: {exc or type(exc).__name__}",
                                     ambiguous=True)
            try:
                payload = resp.json()
            except ValueError:
                payload = None
            if resp.status_code == 429:
                delay = _retry_after(resp)
                if delay is None:
                    delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                self._pacer.hold(time.monotonic() + delay)
                if attempt > self.max_retries:
                    err = (payload or {}).get("error") if isinstance(payload, dict) else None
                    raise LambdaApiError(429, (err or {}).get("code") or "rate-limited",
                                         f"rate limited {attempt} times in a row (last wait asked: {delay:g} s)")
                log.info("lambdaCloud: 429 on %s %s; waiting %.3g s", method, path, delay)
                continue
            if 200 <= resp.status_code < 300:
                if not isinstance(payload, dict) or "data" not in payload:
                    raise LambdaApiError(resp.status_code, "bad-answer",
                                         f"{method} {path} answered without a data envelope: {resp.text[:200]!r}",
                                         ambiguous=True)
                return payload["data"]
            err = payload.get("error") if isinstance(payload, dict) else None
            if not isinstance(err, dict):
                err = {}
            raise LambdaApiError(resp.status_code, str(err.get("code") or f"http/{resp.status_code}"),
                                 str(err.get("message") or resp.text[:200] or resp.reason_phrase),
                                 err.get("suggestion"), ambiguous=resp.status_code >= 500)

    async def _instance(self, instance_id: str) -> dict[str, Any] | None:
        """The instance, or None when Lambda says it does not exist."""
        try:
            inst = await self._call("GET", f"/instances/{quote(instance_id, safe='')}")
        except LambdaApiError as exc:
            if exc.not_found:
                return None
            raise
        if not isinstance(inst, dict) or "status" not in inst:
            raise LambdaApiError(200, "bad-answer", f"instance {instance_id}: not an instance: {inst!r:.200}")
        return inst

    async def _instances(self) -> list[dict[str, Any]]:
        data = await self._call("GET", "/instances")
        if not isinstance(data, list):
            raise LambdaApiError(200, "bad-answer", f"GET /instances: not a list: {data!r:.200}")
        return [i for i in data if isinstance(i, dict) and i.get("id")]

    async def _instance_types(self) -> dict[str, dict[str, Any]]:
        data = await self._call("GET", "/instance-types")
        if not isinstance(data, dict):
            raise LambdaApiError(200, "bad-answer", f"GET /instance-types: not an object: {data!r:.200}")
        return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("instance_type"), dict)}

    # -- choosing a type -----------------------------------------------------------------------
    def choose(self, types: dict[str, dict[str, Any]], gpu_type: str, gpus: int,
               ) -> tuple[str, str, dict[str, Any]]:
        """(type name, region, InstanceType) for ``gpus`` GPUs of ``gpu_type``'s family:
        the cheapest with capacity (in ``region`` when set)."""
        family = gpu_family(gpu_type)
        offered = sorted({f for v in types.values() for f in _type_families(v["instance_type"])})
        if family is None:
            raise NoGpuType(f"Lambda Cloud: accelerator.type {gpu_type!r} names no GPU model Lambda could offer "
                            f"(families offered: {', '.join(offered) or 'none'})")
        fam = [(n, v) for n, v in types.items() if family in _type_families(v["instance_type"])]
        exact = [(n, v) for n, v in fam if int((v["instance_type"].get("specs") or {}).get("gpus") or 0) == gpus]
        if not exact:
            if fam:
                have = ", ".join(f"{n} ({(v['instance_type'].get('specs') or {}).get('gpus')} GPUs)"
                                 for n, v in sorted(fam))
                raise NoGpuType(f"Lambda Cloud has no instance type with {gpus}x {family} (asked: accelerator.type "
                                f"{gpu_type!r}, {gpus} GPUs on one machine); {family} types: {have}")
            raise NoGpuType(f"Lambda Cloud has no {family} instance type (asked: accelerator.type {gpu_type!r}, "
                            f"{gpus} GPUs); GPU families offered: {', '.join(offered) or 'none'}")
        now = time.monotonic()
        options: list[tuple[int, str, int, str]] = []
        for n, v in exact:
            regions = [r.get("name") for r in v.get("regions_with_capacity_available") or [] if isinstance(r, dict)]
            for order, r in enumerate(regions):
                if r and (self.region is None or r == self.region):
                    options.append((int(v["instance_type"].get("price_cents_per_hour") or 0), n, order, r))
        if not options:
            def where(v: dict[str, Any]) -> str:
                rs = [r.get("name") for r in v.get("regions_with_capacity_available") or [] if isinstance(r, dict)]
                return ", ".join(str(r) for r in rs) or "no region"

            listing = "; ".join(
                f"{n} ({v['instance_type'].get('description') or v['instance_type'].get('gpu_description')}, "
                f"${int(v['instance_type'].get('price_cents_per_hour') or 0) / 100:.2f}/h): capacity in {where(v)}"
                for n, v in sorted(exact))
            scope = f" in region {self.region} (LAMBDA_CLOUD_REGION)" if self.region else ""
            raise NoCapacity(f"Lambda Cloud: no capacity now for {gpus}x {family}{scope} (asked: accelerator.type "
                             f"{gpu_type!r}); {listing}")
        options.sort()
        fresh = [o for o in options if now - self._refused.get((o[1], o[3]), -1e18) >= self.capacity_cooldown_s]
        _price, name, _order, region = (fresh or options)[0]
        return name, region, types[name]["instance_type"]

    # -- provision ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lock(self, key: str) -> AsyncIterator[None]:
        """One provision call per key at a time (a retry never races its original)."""
        entry = self._key_locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._key_locks[key]

    def _launch_body(self, request: ProvisionRequest, type_name: str, region: str) -> dict[str, Any]:
        tags = [{"key": JOB_TAG, "value": request.job_id},
                {"key": INSTALLATION_TAG, "value": request.installation_id}]
        if request.idempotency_key != request.job_id:
            tags.append({"key": KEY_TAG, "value": request.idempotency_key})
        return {"region_name": region, "instance_type_name": type_name, "ssh_key_names": [self.ssh_key_name],
                "name": f"overnight-{request.job_id}"[:64], "tags": tags}

    async def provision(self, request: ProvisionRequest) -> ProvisionState:
        gpus = max(1, request.replicas) * request.gpus_per_replica
        if gpus <= 0:
            raise NoGpuType(f"Lambda Cloud rents GPU machines; the template asks for no GPU "
                            f"(accelerator.type {request.gpu_type!r})")
        key = request.idempotency_key
        async with self._lock(key):
            try:
                mine = [i for i in await self._instances() if self._is(i, request.installation_id, key)
                        and i.get("status") not in ("terminating", "terminated")]
            except LambdaApiError as exc:
                raise exc.to_provision_error("listing instances (to find one already made for this job)") from None
            if mine:
                inst = min(mine, key=lambda i: str(i["id"]))
                self._uncertain.pop(key, None)
                self._templates[str(inst["id"])] = request.template
                log.info("lambdaCloud: job %s: adopting instance %s (made before)", request.job_id, inst["id"])
                return await self._state(inst, request.template)
            lost = self._uncertain.get(key)
            if lost is not None and time.monotonic() - lost < self.launch_grace_s:
                raise ProvisionError(
                    "Lambda Cloud: the last launch for this job got no clear answer and its instance is not listed "
                    f"yet; waiting up to {self.launch_grace_s:g} s for it before launching again", retryable=True,
                    code="launch_unconfirmed")
            try:
                types = await self._instance_types()
            except LambdaApiError as exc:
                raise exc.to_provision_error("reading instance types") from None
            type_name, region, itype = self.choose(types, request.gpu_type, gpus)
            body = self._launch_body(request, type_name, region)
            try:
                data = await self._call("POST", "/instance-operations/launch", body, launch=True)
            except LambdaApiError as exc:
                what = f"launching {type_name} in {region}"
                if exc.code == INSUFFICIENT_CAPACITY:
                    self._refused[(type_name, region)] = time.monotonic()
                    raise NoCapacity(f"Lambda Cloud: {what}: {exc.describe()}") from None
                if exc.ambiguous:
                    self._uncertain[key] = time.monotonic()
                    raise ProvisionError(f"Lambda Cloud: {what}: {exc.describe()}; the instance may have been made: "
                                         "the next attempt looks for it first", retryable=True,
                                         code="launch_unconfirmed") from None
                raise exc.to_provision_error(what) from None
            ids = data.get("instance_ids") if isinstance(data, dict) else None
            if not isinstance(ids, list) or not ids:
                self._uncertain[key] = time.monotonic()
                raise ProvisionError(f"Lambda Cloud: launching {type_name} in {region}: no instance id in the answer "
                                     f"({data!r:.200})", retryable=True, code="launch_unconfirmed")
            self._uncertain.pop(key, None)
            iid = str(ids[0])
            self._templates[iid] = request.template
            log.info("lambdaCloud: job %s: launched %s (%s in %s)", request.job_id, iid, type_name, region)
            return ProvisionState(
                provision_id=iid, provider=self.name, status="provisioning", resource_ids=[str(i) for i in ids],
                error=f"instance {iid} ({type_name} in {region}) launched; booting", job_id=request.job_id,
                installation_id=request.installation_id,
                price_per_hour=int(itype.get("price_cents_per_hour") or 0) / 100,
                raw={"id": iid, "status": "booting", "instance_type": itype,
                     "region": {"name": region}, "tags": body["tags"], "name": body["name"]})

    @staticmethod
    def _is(inst: dict[str, Any], installation_id: str, key: str | None = None) -> bool:
        tags = _tags(inst)
        return tags.get(INSTALLATION_TAG) == installation_id and (key is None or _key_of(tags) == key)

    # -- status ------------------------------------------------------------------------------------
    def _key(self) -> Any:
        if self._client_key is None and self.ssh_key_file:
            from overnight.runtimes.ssh_common import load_client_key

            try:
                self._client_key = load_client_key(self.ssh_key_file)
            except OvernightError as exc:
                raise ProvisionError(f"Lambda Cloud: OVERNIGHT_SSH_KEY_FILE: {exc.message}", retryable=False,
                                     code="ssh_key_invalid") from None
        if self._client_key is None and self.probe is _default_probe:
            raise ProvisionError("Lambda Cloud: OVERNIGHT_SSH_KEY_FILE is not set; overnight cannot connect",
                                 retryable=False, code="ssh_key_invalid")
        return self._client_key

    async def _state(self, inst: dict[str, Any], template: dict[str, Any] | None, *,
                     probe: bool = True) -> ProvisionState:
        iid, st, ip = str(inst["id"]), str(inst.get("status")), inst.get("ip")
        tags = _tags(inst)
        itype = inst.get("instance_type") if isinstance(inst.get("instance_type"), dict) else {}
        cents = itype.get("price_cents_per_hour")
        region = (inst.get("region") or {}).get("name") if isinstance(inst.get("region"), dict) else None
        state = ProvisionState(provision_id=iid, provider=self.name, status="provisioning", resource_ids=[iid],
                               job_id=tags.get(JOB_TAG), installation_id=tags.get(INSTALLATION_TAG),
                               price_per_hour=int(cents) / 100 if cents is not None else None, raw=dict(inst))
        what = f"instance {iid} ({itype.get('name', '?')} in {region or '?'})"
        if st == "terminated":
            state.status, state.error = "released", f"{what} is terminated"
        elif st in ("unhealthy", "preempted"):
            state.status, state.error = "failed", f"Lambda reports {what} {st}"
        elif st == "terminating":
            state.error = f"{what} is terminating"
        elif st == "booting":
            state.error = f"{what} is booting"
        elif st != "active":
            state.error = f"{what} is {st!r}"
        elif not ip:
            state.error = f"{what} is active but has no IP address yet"
        elif not probe:
            state.status = "running"  # listed, not checked (list_owned)
        elif template is None:
            state.error = (f"{what} is up, but this process does not have the job's template to start its engine "
                           "with (status() was not given template= and provision() ran in another process)")
        else:
            key = self._key()
            try:
                host_key = await self.probe(str(ip), self.ssh_port, self.ssh_user, key)
            except ProvisionError:
                raise
            except Exception as exc:  # noqa: BLE001 - sshd not up yet, our key refused, a timeout: wait
                state.error = (f"{what} is active; sshd at {self.ssh_user}@{ip}:{self.ssh_port} does not accept "
                               f"our key yet: {type(exc).__name__}: {exc}")
                return state
            from overnight.runtimes.ssh_common import ssh_runtime_spec
            from overnight.templates.resolve import Resolved

            try:
                image = Resolved.from_record(template).template.spec.engine.image or self.image
                state.runtime = ssh_runtime_spec(template, host=str(ip), port=self.ssh_port, user=self.ssh_user,
                                                 host_key=host_key, launch="docker", provision_id=iid,
                                                 provider=self.name, image=image)
            except OvernightError as exc:
                raise ProvisionError(f"Lambda Cloud: {exc.message}", retryable=False, code=exc.code) from None
            state.status = "running"
            state.ssh = {"host": str(ip), "port": self.ssh_port, "user": self.ssh_user, "host_key": host_key}
        return state

    async def status(self, provision_id: str, *, template: dict[str, Any] | None = None) -> ProvisionState:
        if template is not None:
            self._templates[provision_id] = template
        try:
            inst = await self._instance(provision_id)
        except LambdaApiError as exc:
            raise exc.to_provision_error(f"reading instance {provision_id}") from None
        if inst is None:
            return ProvisionState(provision_id=provision_id, provider=self.name, status="released",
                                  resource_ids=[provision_id], error=f"instance {provision_id} does not exist")
        return await self._state(inst, template or self._templates.get(provision_id))

    # -- release -----------------------------------------------------------------------------------
    async def _terminate(self, ids: list[str]) -> LambdaApiError | None:
        """Ask for termination; an id already gone is fine. The error a retry may fix, if any."""
        try:
            await self._call("POST", "/instance-operations/terminate", {"instance_ids": ids})
            return None
        except LambdaApiError as exc:
            if exc.not_found and len(ids) > 1:  # one of them is gone: the others one by one
                errors = [e for e in [await self._terminate([i]) for i in ids] if e is not None]
                return errors[0] if errors else None
            if exc.not_found:
                return None
            return exc

    async def release(self, provision_id: str) -> bool:
        try:
            inst = await self._instance(provision_id)
            if inst is None or inst.get("status") == "terminated":
                self._templates.pop(provision_id, None)
                return True
            tags = _tags(inst)
            installation, key = tags.get(INSTALLATION_TAG), _key_of(tags)
            if not installation or not key:
                raise ProvisionError(f"Lambda Cloud: instance {provision_id} has no {INSTALLATION_TAG}/{JOB_TAG} "
                                     "tag: overnight did not make it and will not terminate it", retryable=False,
                                     code="not_ours")
            targets = {provision_id: inst}
            for other in await self._instances():  # another of this job's (a launch whose answer was lost)
                if self._is(other, installation, key) and other.get("status") != "terminated":
                    targets.setdefault(str(other["id"]), other)
            ask = [i for i, x in targets.items() if x.get("status") not in ("terminating", "terminated")]
            failure = await self._terminate(ask) if ask else None
            deadline = time.monotonic() + self.release_wait_s
            while True:
                left: list[str] = []
                for i in list(targets):
                    cur = await self._instance(i)
                    if cur is None or cur.get("status") == "terminated":
                        targets.pop(i)
                    else:
                        left.append(f"{i} {cur.get('status')}")
                        targets[i] = cur
                if not left:
                    self._templates.pop(provision_id, None)
                    return True
                if failure is not None and any(x.get("status") != "terminating" for x in targets.values()):
                    # the terminate was refused or failed and did not happen: say why
                    raise failure.to_provision_error(f"terminating {', '.join(targets)}")
                if time.monotonic() >= deadline:
                    log.info("lambdaCloud: release of %s: still there: %s", provision_id, ", ".join(left))
                    return False
                await asyncio.sleep(self.release_poll_s)
        except LambdaApiError as exc:
            err = exc.to_provision_error(f"releasing instance {provision_id}")
            err.retryable = True  # the planner asks again (the instance may be billing)
            raise err from None

    # -- listing -----------------------------------------------------------------------------------
    async def list_owned(self, installation_id: str) -> list[ProvisionState]:
        try:
            insts = await self._instances()
        except LambdaApiError as exc:
            raise exc.to_provision_error("listing instances") from None
        return [await self._state(i, None, probe=False) for i in insts
                if self._is(i, installation_id) and i.get("status") != "terminated"]

    async def catalog(self) -> list[dict[str, Any]]:
        try:
            types = await self._instance_types()
        except LambdaApiError as exc:
            raise exc.to_provision_error("reading instance types") from None
        out = []
        for n, v in types.items():
            t = v["instance_type"]
            regions = [r.get("name") for r in v.get("regions_with_capacity_available") or [] if isinstance(r, dict)]
            cents = t.get("price_cents_per_hour")
            out.append({"provider": self.name, "instance_type": n, "gpu_type": t.get("gpu_description"),
                        "gpu_family": gpu_family(n) or gpu_family(t.get("gpu_description")),
                        "gpus": int((t.get("specs") or {}).get("gpus") or 0), "description": t.get("description"),
                        "price_per_hour": int(cents) / 100 if cents is not None else None,
                        "regions": [r for r in regions if r],
                        # Where a launch would go now (LAMBDA_CLOUD_REGION only, when set).
                        "region": (self.region if self.region in regions else None) if self.region
                        else (regions[0] if regions else None)})
        out.sort(key=lambda c: (c["gpu_family"] or "", c["gpus"], c["price_per_hour"] or 0, c["instance_type"]))
        return out
