"""The ``runpod`` provider: one RunPod GPU pod per console job (``docs/runpod.md``).

**API versions.** RunPod retired REST v1 on 2026-11-15; overnight speaks REST v2
(``https://api.runpod.io/v2``, the default ``RUNPOD_BASE_URL``). The URL's last
path segment picks the client: ``/v2`` or ``/v1`` (``https://rest.runpod.io/v1``
keeps working through a v1 client, for as long as something answers it). Both
clients give the provisioner the same five calls: create, get, list, delete,
catalog; both send ``Authorization: Bearer RUNPOD_API_KEY``.

**One pod per job**, named ``overnight-<job id>-0``. A template with ``dp`` > 1
gets *one* pod with ``replicas * gpus_per_replica`` GPUs: the engine command of
the template already carries ``--data-parallel-size``, so one engine process
spreads the replicas over the pod's GPUs (a pod is one machine: at most the
GPU type's ``maxCount``, usually 8). The GPU type id is the template's
``accelerator.type`` exactly (``NVIDIA H100 80GB HBM3``); ports ``22/tcp`` and
``<engine port>/http``; no volume disk (v1: an explicit ``volumeInGb: 0``, since
RunPod's default is 20 GB, billed even while stopped); ``RUNPOD_CLOUD_TYPE``,
``RUNPOD_DATA_CENTERS``, ``RUNPOD_IMAGE``, ``RUNPOD_CONTAINER_DISK_GB``.

**Markers.** RunPod pods have no labels, so every pod carries environment
variables that a read returns: ``OVERNIGHT_JOB_ID``, ``OVERNIGHT_INSTALLATION_ID``
and ``OVERNIGHT_PROVISION_KEY`` (the idempotency key). ``list_owned`` lists
every pod and keeps those whose installation marker is this installation's;
a pod without the marker is never touched.

**Idempotent provision.** Before creating, the account's pods are listed and a
live pod with this installation's marker and this key is adopted (a crash after
the create call, before the planner stored the id, does not make a second pod;
if a race made two, the one with the lowest id is kept and the others deleted).
The provision id is ``<pod id>/<job id>/<installation id>``: ``status`` reads the
pod by id; ``release`` deletes it and any other live pod carrying the same job
and installation markers.

**Endpoint modes** (``RUNPOD_ENDPOINT_MODE``):

* ``ssh`` (default): the pod runs sshd with ``RUNPOD_SSH_PUBLIC_KEY``; the batch's
  ``ssh`` runtime starts the engine over SSH bound to 127.0.0.1 and dispatches
  through a port-forward (``runtimes/ssh_common.py``). v1 overrides the image's
  entrypoint with a script that installs and starts sshd (so the default
  ``vllm/vllm-openai`` image works); v2 cannot override the entrypoint, so
  ``RUNPOD_IMAGE`` must be an image whose entrypoint starts sshd from
  ``PUBLIC_KEY`` and that has the engine installed: v2 + ssh + a
  ``vllm/vllm-openai`` image is refused at start. ``running`` once the pod is
  RUNNING with a public IP and a mapped 22/tcp, *and* sshd accepts our key (the
  ``probe``, which records the host key every later connect requires).
* ``proxy``: the pod's entrypoint starts the engine itself (v2 ``args``; v1
  ``dockerStartCmd``) with ``--host 0.0.0.0 --port <port>`` and a random
  ``--api-key``; the endpoint is RunPod's public HTTP proxy
  (``RUNPOD_PROXY_URL_TEMPLATE``), ``running`` once ``/health`` answers 200 there.
  The proxy cuts a request at 100 s (Cloudflare 524): the runtime carries
  ``request_timeout_s: 100`` and such a request ends as a ``proxy_timeout`` error
  line. vLLM's ``--api-key`` guards only ``/v1`` paths; the rest of the engine's
  routes are public through the proxy.

**Status**: ``PROVISIONING``/``STARTING`` -> ``provisioning``; ``RUNNING`` ->
``provisioning`` until ready (what is awaited in ``error``), then ``running``;
``EXITED``/``ERROR`` -> ``failed``; ``TERMINATED`` or 404 -> ``released``.
``price_per_hour`` is the pod's ``cost`` (v1 ``costPerHr``).

**Release** is DELETE (terminate), never stop: a stopped pod still bills its
disk. It is True only once a re-read shows every pod of the provision
``TERMINATED`` or gone (a DELETE that answered 500 but deleted ends released on
the re-read); while the API fails it raises a retryable error.

**Errors** (``ProvisionError``), decided on the HTTP status: 400 on create is
``no_capacity``, retryable (RunPod gives no machine-readable reason: no capacity
or a rule the request breaks); 401/402/403/422 are not retryable and say which
(bad key, balance, no access, invalid body); 429 is waited out per
``Retry-After`` twice inside the client, then retryable; 5xx, timeouts and
refused connections are retryable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx

from overnight.console.provisioners.base import (
    ProvisionError,
    ProvisionRequest,
    ProvisionState,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "ENGINE_KEY_ENV",
    "INSTALLATION_ENV",
    "JOB_ENV",
    "KEY_ENV",
    "PROXY_REQUEST_TIMEOUT_S",
    "Pod",
    "PodSpec",
    "RunPodProvisioner",
    "sshd_script",
]

log = logging.getLogger("overnight.console")

DEFAULT_BASE_URL = "https://api.runpod.io/v2"
DEFAULT_PROXY_URL_TEMPLATE = "https://{pod_id}-{port}.proxy.runpod.net"
#: The pod's env markers (RunPod has no labels).
JOB_ENV = "OVERNIGHT_JOB_ID"
INSTALLATION_ENV = "OVERNIGHT_INSTALLATION_ID"
KEY_ENV = "OVERNIGHT_PROVISION_KEY"
#: Proxy mode: the engine's random API key, kept on the pod so a restarted console finds it.
ENGINE_KEY_ENV = "OVERNIGHT_ENGINE_API_KEY"
_MARKERS = (JOB_ENV, INSTALLATION_ENV, KEY_ENV)
#: RunPod's HTTP proxy (Cloudflare) ends a request after 100 s with HTTP 524.
PROXY_REQUEST_TIMEOUT_S = 100.0
_STATUSES = ("PROVISIONING", "STARTING", "RUNNING", "EXITED", "ERROR", "TERMINATED")
_PUBLIC_KEY_RE = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+=*( .*)?$")
_API_KEY_ARG = re.compile(r"(--api-key(?:=|\s+))(\S+)")
_REDACTED = "<redacted>"

#: ``probe(host, port, user, client_key) -> host key line``: raises while sshd does not accept the key.
Probe = Callable[[str, int, str, Any], Awaitable[str]]


_SSHD_SCRIPT = r"""set -eu
export DEBIAN_FRONTEND=noninteractive
if [ ! -x /usr/sbin/sshd ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openssh-server >/dev/null
fi
mkdir -p /run/sshd "$HOME/.ssh"
chmod 700 "$HOME/.ssh"
printf '%s\n' "${PUBLIC_KEY:-${SSH_PUBLIC_KEY:-}}" >> "$HOME/.ssh/authorized_keys"
chmod 600 "$HOME/.ssh/authorized_keys"
env | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' | grep -vE '^(PUBLIC_KEY|SSH_PUBLIC_KEY|HOME|PWD|SHLVL|_)=' \
  > "$HOME/.ssh/environment" || true
chmod 600 "$HOME/.ssh/environment"
ssh-keygen -A >/dev/null
exec /usr/sbin/sshd -D -e -o PermitUserEnvironment=yes -o PasswordAuthentication=no \
  -o KbdInteractiveAuthentication=no -o AllowTcpForwarding=yes -o PermitRootLogin=prohibit-password
"""


def sshd_script() -> str:
    """The v1 start command (``bash -c``) of an ssh-mode pod: install sshd when the
    image lacks it (``vllm/vllm-openai`` does), authorize ``$PUBLIC_KEY``, hand the
    container's environment to SSH sessions (PATH, CUDA and HF variables the
    engine started over SSH needs), then run sshd in the foreground as PID 1's
    child so the pod lives as long as sshd does."""
    return _SSHD_SCRIPT


@dataclass
class PodSpec:
    """What to create, in words both API versions understand."""

    name: str
    gpu_type: str
    gpu_count: int
    cloud: str
    data_centers: list[str]
    image: str
    env: dict[str, str]
    ports: list[str]
    container_disk_gb: int
    #: Proxy mode: the engine's argv (started by the image's entrypoint); None: ssh mode.
    engine_argv: list[str] | None = None


@dataclass
class Pod:
    """A pod as read, in one shape whatever the API version."""

    id: str
    name: str
    #: PROVISIONING | STARTING | RUNNING | EXITED | ERROR | TERMINATED
    status: str
    env: dict[str, str]
    #: The public address of its 22/tcp, once mapped.
    ssh_host: str | None
    ssh_port: int | None
    cost: float | None
    raw: dict[str, Any] = field(default_factory=dict)
    #: What RunPod says about its last change (v1 ``lastStatusChange``), if anything.
    note: str | None = None

    @property
    def job_id(self) -> str | None:
        return self.env.get(JOB_ENV)

    @property
    def installation_id(self) -> str | None:
        return self.env.get(INSTALLATION_ENV)


# -- HTTP, errors ---------------------------------------------------------------------------------
def _message(resp: httpx.Response) -> str:
    """RunPod's words for an error: problem+json ``detail`` (+ ``errors``), v1
    ``message`` or ``error`` (a string or an object), or the raw text."""
    text = resp.text.strip()
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        parts: list[str] = []
        for key in ("detail", "message", "error", "title"):
            v = body.get(key)
            if isinstance(v, dict):
                v = v.get("message") or v.get("detail") or (json.dumps(v) if v else None)
            if isinstance(v, str) and v.strip():
                parts.append(v.strip())
                break
        errs = body.get("errors")
        if isinstance(errs, list) and errs:
            parts.append("; ".join(str(e) for e in errs[:5]))
        if parts:
            return ": ".join(parts)[:500]
    return (text[:300] or f"HTTP {resp.status_code} with an empty body").replace("\n", " ")


def _error(status: int, message: str, action: str) -> ProvisionError:
    where = f"runpod: {action}"
    if status == 400 and action.startswith("create"):
        return ProvisionError(
            f"{where}: RunPod could not place the pod (HTTP 400: {message}). RunPod gives no machine-readable "
            "reason: no capacity for this GPU type in these data centers right now, or a rule the request breaks",
            retryable=True, code="no_capacity")
    if status == 401:
        return ProvisionError(f"{where}: RunPod refused RUNPOD_API_KEY (HTTP 401: {message}); check the key",
                              retryable=False, code="unauthorized")
    if status == 402:
        return ProvisionError(f"{where}: the RunPod account's balance is too low (HTTP 402: {message}); add credit",
                              retryable=False, code="insufficient_balance")
    if status == 403:
        return ProvisionError(
            f"{where}: RUNPOD_API_KEY has no access to this (HTTP 403: {message}); the key needs read/write "
            "access to pods, or the account cannot use this GPU pool", retryable=False, code="forbidden")
    if status == 422:
        return ProvisionError(f"{where}: RunPod rejected the request as invalid (HTTP 422: {message})",
                              retryable=False, code="invalid_request")
    if status == 429:
        return ProvisionError(f"{where}: RunPod's rate limit (HTTP 429: {message})", retryable=True,
                              code="rate_limited")
    if status >= 500:
        return ProvisionError(f"{where}: RunPod's API failed (HTTP {status}: {message})", retryable=True,
                              code="provider_unavailable")
    return ProvisionError(f"{where}: HTTP {status}: {message}", retryable=False, code="provider_refused")


def _retry_after(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


class _Http:
    """Bearer auth, 429 waited out per ``Retry-After`` (``retries_429`` times, each
    at most ``max_retry_after_s``), every failure a ``ProvisionError``."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float, max_retry_after_s: float,
                 retries_429: int = 2, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.max_retry_after_s, self.retries_429 = max_retry_after_s, retries_429
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", timeout=timeout_s,
                                        headers={"Authorization": f"Bearer {api_key}",
                                                 "Accept": "application/json"}, transport=transport)

    async def call(self, method: str, path: str, *, action: str, body: Any = None,
                   params: dict[str, str] | None = None, missing_ok: bool = False) -> Any:
        """The answer's JSON (None for an empty body, or for a 404 when ``missing_ok``)."""
        for attempt in range(self.retries_429 + 1):
            try:
                resp = await self.client.request(method, path.lstrip("/"), json=body, params=params)
            except httpx.TimeoutException as exc:
                raise ProvisionError(f"runpod: {action}: RunPod's API did not answer in time ({type(exc).__name__})",
                                     retryable=True, code="provider_unavailable") from None
            except httpx.HTTPError as exc:
                raise ProvisionError(f"runpod: {action}: RunPod's API cannot be reached: {exc or type(exc).__name__}",
                                     retryable=True, code="provider_unavailable") from None
            if resp.status_code == 404 and missing_ok:
                return None
            if resp.status_code == 429 and attempt < self.retries_429:
                wait = _retry_after(resp)
                if wait <= self.max_retry_after_s:
                    log.info("runpod: %s: rate limited; trying again in %g s (Retry-After)", action, wait)
                    await asyncio.sleep(wait)
                    continue
            if resp.status_code >= 400:
                msg = _message(resp)
                if resp.status_code == 429:
                    msg += f"; RunPod asks to wait {_retry_after(resp):g} s"
                raise _error(resp.status_code, msg, action)
            if not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise ProvisionError(f"runpod: {action}: RunPod answered HTTP {resp.status_code} with something that "
                                     f"is not JSON: {resp.text[:200]!r}", retryable=True,
                                     code="provider_unavailable") from None
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.client.aclose()


def _str_env(env: Any) -> dict[str, str]:
    if isinstance(env, dict):
        return {str(k): str(v) for k, v in env.items() if v is not None}
    if isinstance(env, list):  # [{"key": .., "value": ..}] or ["K=V"]: tolerated
        out: dict[str, str] = {}
        for item in env:
            if isinstance(item, dict) and "key" in item:
                out[str(item["key"])] = str(item.get("value", ""))
            elif isinstance(item, str) and "=" in item:
                k, _, v = item.partition("=")
                out[k] = v
        return out
    return {}


def _float(v: Any) -> float | None:
    try:
        return None if v is None or isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        return None


class _V2:
    """RunPod REST v2 (``https://api.runpod.io/v2``)."""

    version = "v2"

    def __init__(self, http: _Http) -> None:
        self.http = http

    @staticmethod
    def body(spec: PodSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": spec.name, "cloud": spec.cloud, "gpu": {"id": spec.gpu_type, "count": spec.gpu_count},
            "image": spec.image, "env": dict(spec.env), "ports": list(spec.ports), "disk": spec.container_disk_gb,
        }
        if spec.data_centers:
            body["dataCenterIds"] = list(spec.data_centers)
        if spec.engine_argv is not None:
            # Appended to the image's entrypoint (v2 has no entrypoint override):
            # ``vllm serve`` for the vllm/vllm-openai image.
            argv = spec.engine_argv
            body["args"] = shlex.join(argv[2:] if argv[:2] == ["vllm", "serve"] else argv)
        return body  # no ``mounts``: no volume disk

    @staticmethod
    def pod(raw: dict[str, Any]) -> Pod:
        status = str(raw.get("status") or "").upper()
        host = port = None
        direct = (raw.get("ssh") or {}).get("direct") if isinstance(raw.get("ssh"), dict) else None
        if isinstance(direct, dict) and direct.get("host") and direct.get("port"):
            host, port = str(direct["host"]), int(direct["port"])
        else:
            for p in ((raw.get("runtime") or {}).get("ports") or []) if isinstance(raw.get("runtime"), dict) else []:
                if isinstance(p, dict) and p.get("private") == 22 and p.get("type") == "tcp" and p.get("ip") \
                        and p.get("public"):
                    host, port = str(p["ip"]), int(p["public"])
        return Pod(id=str(raw.get("id")), name=str(raw.get("name") or ""),
                   status=status if status in _STATUSES else status or "PROVISIONING", env=_str_env(raw.get("env")),
                   ssh_host=host, ssh_port=port, cost=_float(raw.get("cost")), raw=raw)

    async def create(self, spec: PodSpec) -> Pod:
        return self.pod(await self.http.call("POST", "pods", action=f"create pod {spec.name}", body=self.body(spec)))

    async def get(self, pod_id: str) -> Pod | None:
        raw = await self.http.call("GET", f"pods/{pod_id}", action=f"read pod {pod_id}", missing_ok=True)
        return None if raw is None else self.pod(raw)

    async def list(self) -> list[Pod]:
        raw = await self.http.call("GET", "pods", action="list pods")
        pods = raw.get("pods") if isinstance(raw, dict) else None
        if not isinstance(pods, list):
            raise ProvisionError("runpod: list pods: the answer has no 'pods' list (is RUNPOD_BASE_URL a v2 URL?)",
                                 retryable=True, code="provider_unavailable")
        return [self.pod(p) for p in pods if isinstance(p, dict)]

    async def delete(self, pod_id: str) -> None:
        await self.http.call("DELETE", f"pods/{pod_id}", action=f"terminate pod {pod_id}", missing_ok=True)

    async def catalog(self) -> list[dict[str, Any]]:
        raw = await self.http.call("GET", "catalog/gpus", action="read the GPU catalog",
                                   params={"include": "AVAILABILITY", "product": "POD"})
        gpus = raw.get("gpus") if isinstance(raw, dict) else None
        return [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []


class _V1:
    """RunPod REST v1 (``https://rest.runpod.io/v1``, retired 2026-11-15)."""

    version = "v1"

    def __init__(self, http: _Http) -> None:
        self.http = http

    @staticmethod
    def body(spec: PodSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": spec.name, "imageName": spec.image, "computeType": "GPU", "gpuTypeIds": [spec.gpu_type],
            "gpuCount": spec.gpu_count, "cloudType": spec.cloud, "ports": list(spec.ports), "env": dict(spec.env),
            # Explicit 0: RunPod's default is a 20 GB volume, billed even while stopped.
            "volumeInGb": 0, "containerDiskInGb": spec.container_disk_gb, "supportPublicIp": True,
        }
        if spec.data_centers:
            body["dataCenterIds"] = list(spec.data_centers)
        argv = spec.engine_argv
        if argv is None:  # ssh mode: the container runs sshd (the image's entrypoint is replaced)
            body["dockerEntrypoint"] = ["/bin/bash", "-c"]
            body["dockerStartCmd"] = [sshd_script()]
        elif argv[:2] == ["vllm", "serve"]:  # the vllm/vllm-openai entrypoint is ``vllm serve``
            body["dockerStartCmd"] = argv[2:]
        else:
            body["dockerEntrypoint"] = argv[:1]
            body["dockerStartCmd"] = argv[1:]
        return body

    @staticmethod
    def pod(raw: dict[str, Any]) -> Pod:
        desired = str(raw.get("desiredStatus") or "").upper()
        host = str(raw.get("publicIp") or "") or None
        mappings = raw.get("portMappings") if isinstance(raw.get("portMappings"), dict) else {}
        port = mappings.get("22") if mappings else None
        try:
            port = int(port) if port else None
        except (TypeError, ValueError):
            port = None
        # v1 has no runtime state, only the desired one: RUNNING before it has an address is "STARTING".
        status = desired if desired in ("EXITED", "TERMINATED") else \
            "RUNNING" if desired == "RUNNING" and (host or port) else "STARTING" if desired == "RUNNING" else \
            desired or "PROVISIONING"
        note = raw.get("lastStatusChange")
        return Pod(id=str(raw.get("id")), name=str(raw.get("name") or ""), status=status,
                   env=_str_env(raw.get("env")), ssh_host=host, ssh_port=port,
                   cost=_float(raw.get("costPerHr")), raw=raw, note=note if isinstance(note, str) else None)

    async def create(self, spec: PodSpec) -> Pod:
        return self.pod(await self.http.call("POST", "pods", action=f"create pod {spec.name}", body=self.body(spec)))

    async def get(self, pod_id: str) -> Pod | None:
        raw = await self.http.call("GET", f"pods/{pod_id}", action=f"read pod {pod_id}", missing_ok=True)
        return None if raw is None else self.pod(raw)

    async def list(self) -> list[Pod]:
        raw = await self.http.call("GET", "pods", action="list pods")
        if not isinstance(raw, list):
            raise ProvisionError("runpod: list pods: the answer is not a list (is RUNPOD_BASE_URL a v1 URL?)",
                                 retryable=True, code="provider_unavailable")
        return [self.pod(p) for p in raw if isinstance(p, dict)]

    async def delete(self, pod_id: str) -> None:
        await self.http.call("DELETE", f"pods/{pod_id}", action=f"terminate pod {pod_id}", missing_ok=True)

    async def catalog(self) -> list[dict[str, Any]]:
        return []


def _redact(raw: dict[str, Any]) -> dict[str, Any]:
    """The pod as read, without secrets: env values other than the markers, and
    the engine's ``--api-key`` in ``args`` / ``dockerStartCmd``."""
    out = json.loads(json.dumps(raw, default=str))
    if isinstance(out.get("env"), dict):
        out["env"] = {k: (v if k in _MARKERS else _REDACTED) for k, v in out["env"].items()}
    if isinstance(out.get("args"), str):
        out["args"] = _API_KEY_ARG.sub(lambda m: m.group(1) + _REDACTED, out["args"])
    for key in ("dockerStartCmd", "dockerEntrypoint"):
        argv = out.get(key)
        if isinstance(argv, list):
            out[key] = [_REDACTED if i > 0 and argv[i - 1] == "--api-key" else
                        _API_KEY_ARG.sub(lambda m: m.group(1) + _REDACTED, a) if isinstance(a, str) else a
                        for i, a in enumerate(argv)]
    return out


class RunPodProvisioner:
    name: ClassVar[str] = "runpod"
    #: ``status`` builds the batch's ssh runtime spec from the job's template (planner.py).
    status_takes_template: ClassVar[bool] = True

    def __init__(self, *, api_key: str, ssh_public_key: str, base_url: str = DEFAULT_BASE_URL,
                 cloud_type: str = "SECURE", data_centers: list[str] | tuple[str, ...] = (),
                 image: str = "vllm/vllm-openai:latest", ssh_user: str = "root", endpoint_mode: str = "ssh",
                 proxy_url_template: str = DEFAULT_PROXY_URL_TEMPLATE, client_key: Any = None,
                 ready_timeout_s: float = 1800.0, container_disk_gb: int = 100, probe: Probe | None = None,
                 release_wait_s: float = 5.0, http_timeout_s: float = 30.0, max_retry_after_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not api_key:
            raise ValueError("RUNPOD_API_KEY is not set: the runpod provider needs a RunPod API key")
        if not ssh_public_key or not _PUBLIC_KEY_RE.match(ssh_public_key.strip()):
            raise ValueError("RUNPOD_SSH_PUBLIC_KEY must be an OpenSSH public key line (ssh-ed25519 AAAA... ); "
                             + ("it is not set" if not ssh_public_key else "it does not look like one"))
        self.endpoint_mode = endpoint_mode.strip().lower()
        if self.endpoint_mode not in ("ssh", "proxy"):
            raise ValueError(f"RUNPOD_ENDPOINT_MODE must be ssh or proxy, not {endpoint_mode!r}")
        self.cloud_type = cloud_type.strip().upper()
        if self.cloud_type not in ("SECURE", "COMMUNITY"):
            raise ValueError(f"RUNPOD_CLOUD_TYPE must be SECURE or COMMUNITY, not {cloud_type!r}")
        parts = urlsplit(base_url)
        version = parts.path.rstrip("/").rsplit("/", 1)[-1]
        if parts.scheme not in ("http", "https") or not parts.netloc or version not in ("v1", "v2"):
            raise ValueError(f"RUNPOD_BASE_URL must be an http(s) URL ending in /v2 (REST v2, default "
                             f"{DEFAULT_BASE_URL}) or /v1 (REST v1, retired 2026-11-15), not {base_url!r}")
        self.api_version = version
        self.image = image.strip()
        if not self.image:
            raise ValueError("RUNPOD_IMAGE is empty")
        if version == "v2" and self.endpoint_mode == "ssh" and self.image.split(":")[0].split("@")[0] \
                in ("vllm/vllm-openai", "docker.io/vllm/vllm-openai"):
            raise ValueError(
                f"RUNPOD_IMAGE={self.image} cannot run in RUNPOD_ENDPOINT_MODE=ssh over RunPod's REST v2: v2 cannot "
                "override an image's entrypoint, and this image's entrypoint is 'vllm serve' with no sshd. Use an "
                "image whose entrypoint starts sshd from PUBLIC_KEY and has vllm installed, or "
                "RUNPOD_ENDPOINT_MODE=proxy (vLLM started by the image, RunPod's 100 s proxy), or a v1 "
                "RUNPOD_BASE_URL (https://rest.runpod.io/v1, retired 2026-11-15)")
        if self.endpoint_mode == "ssh" and client_key is None:
            raise ValueError("OVERNIGHT_SSH_KEY_FILE is not set: in RUNPOD_ENDPOINT_MODE=ssh overnight connects to "
                             "each pod with this private key (RUNPOD_SSH_PUBLIC_KEY is its public half)")
        if "{pod_id}" not in proxy_url_template and self.endpoint_mode == "proxy":
            raise ValueError(f"RUNPOD_PROXY_URL_TEMPLATE must contain {{pod_id}} (and {{port}}), "
                             f"not {proxy_url_template!r}")
        if container_disk_gb < 1:
            raise ValueError(f"RUNPOD_CONTAINER_DISK_GB must be at least 1, not {container_disk_gb}")
        self.ssh_public_key = ssh_public_key.strip()
        self.data_centers = [d.strip() for d in data_centers if d.strip()]
        self.ssh_user = ssh_user
        self.proxy_url_template = proxy_url_template
        self.client_key = client_key
        self.ready_timeout_s = ready_timeout_s
        self.container_disk_gb = int(container_disk_gb)
        self.release_wait_s = release_wait_s
        self._probe: Probe = probe or _default_probe
        http = _Http(base_url, api_key, timeout_s=http_timeout_s, max_retry_after_s=max_retry_after_s,
                     transport=transport)
        self._http = http
        self.api: _V2 | _V1 = _V2(http) if version == "v2" else _V1(http)
        #: The proxy's /health is probed without RunPod's key (it is public).
        self._engine_http = httpx.AsyncClient(timeout=10.0, transport=transport)
        #: Per idempotency key: one provision at a time in this process.
        self._locks: dict[str, asyncio.Lock] = {}
        #: pod id -> the template its provision asked for (``status`` also gets it from the planner).
        self._templates: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> RunPodProvisioner:
        """From ``RUNPOD_*``, ``OVERNIGHT_SSH_KEY_FILE`` and ``OVERNIGHT_SECRET_KEY``;
        ValueError naming the setting that is missing or wrong."""
        if not settings.runpod_api_key:
            raise ValueError("RUNPOD_API_KEY is not set: the runpod provider (PROVISIONER=runpod) needs a RunPod "
                             "API key with read/write access to pods")
        if not settings.runpod_ssh_public_key:
            raise ValueError("RUNPOD_SSH_PUBLIC_KEY is not set: every pod authorizes this OpenSSH public key "
                             "(the public half of OVERNIGHT_SSH_KEY_FILE)")
        mode = str(settings.runpod_endpoint_mode or "").strip().lower()
        client_key = None
        if mode == "ssh":
            if not settings.ssh_key_file:
                raise ValueError("OVERNIGHT_SSH_KEY_FILE is not set: in RUNPOD_ENDPOINT_MODE=ssh overnight connects "
                                 "to each pod with this private key (RUNPOD_SSH_PUBLIC_KEY is its public half)")
            from overnight.runtimes.ssh_common import SshKeyError, load_client_key

            try:
                client_key = load_client_key(settings.ssh_key_file)
            except SshKeyError as exc:
                raise ValueError(f"OVERNIGHT_SSH_KEY_FILE: {exc.message}") from None
            mine = client_key.export_public_key("openssh").decode().split()[:2]
            if settings.runpod_ssh_public_key.split()[:2] != mine:
                raise ValueError("RUNPOD_SSH_PUBLIC_KEY is not the public half of OVERNIGHT_SSH_KEY_FILE "
                                 f"({settings.ssh_key_file}): no pod would accept overnight's connections")
        elif mode == "proxy" and not settings.secret_key:
            if getattr(settings, "metadata_service_url", None):
                log.warning("RUNPOD_ENDPOINT_MODE=proxy: each batch carries its engine's API key, which the batches "
                            "service at %s seals with its OVERNIGHT_SECRET_KEY; without one there, every job's "
                            "batch is refused", settings.metadata_service_url)
            else:
                raise ValueError(
                    "RUNPOD_ENDPOINT_MODE=proxy needs OVERNIGHT_SECRET_KEY: each batch carries the random API key "
                    "of its pod's engine (RunPod's proxy is public), and the batches service stores it only "
                    "encrypted with that key")
        return cls(
            api_key=settings.runpod_api_key, ssh_public_key=settings.runpod_ssh_public_key,
            base_url=settings.runpod_base_url, cloud_type=settings.runpod_cloud_type,
            data_centers=[d for d in str(settings.runpod_data_centers or "").split(",") if d.strip()],
            image=settings.runpod_image, ssh_user=settings.runpod_ssh_user, endpoint_mode=mode or "ssh",
            proxy_url_template=settings.runpod_proxy_url_template, client_key=client_key,
            ready_timeout_s=float(settings.runpod_ready_timeout_s), container_disk_gb=int(settings.runpod_container_disk_gb),
        )

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._engine_http.aclose()

    # -- what a pod is made of --------------------------------------------------------------------
    def spec_for(self, request: ProvisionRequest, *, engine_api_key: str | None = None) -> PodSpec:
        """The pod of ``request`` (ProvisionError, not retryable, when the template cannot run here)."""
        from overnight.errors import OvernightError
        from overnight.templates.commands import engine_command
        from overnight.templates.resolve import Resolved

        try:
            resolved = Resolved.from_record(request.template)
        except OvernightError as exc:
            raise ProvisionError(f"runpod: the job's template cannot be read: {exc.message}",
                                 code="invalid_template") from None
        t = resolved.template
        gpu_type = (request.gpu_type or t.spec.accelerator.type or "").strip()
        gpus = request.replicas * request.gpus_per_replica if request.gpus_per_replica else resolved.gpus
        if not gpus or gpu_type.lower() in ("", "cpu"):
            raise ProvisionError(
                f"runpod: template {t.name!r} asks for no GPU (accelerator type {gpu_type!r}, {gpus} GPUs); RunPod "
                "pods here are GPU pods: give the template a RunPod GPU type id (e.g. 'NVIDIA H100 80GB HBM3')",
                code="no_gpu_type")
        port = t.spec.engine.port
        env = {JOB_ENV: request.job_id, INSTALLATION_ENV: request.installation_id, KEY_ENV: request.idempotency_key,
               "PUBLIC_KEY": self.ssh_public_key, "SSH_PUBLIC_KEY": self.ssh_public_key}
        argv: list[str] | None = None
        if self.endpoint_mode == "proxy":
            assert engine_api_key
            argv = [a.replace("{host}", "0.0.0.0").replace("{port}", str(port)) for a in engine_command(t)]
            argv += ["--api-key", engine_api_key]
            env[ENGINE_KEY_ENV] = engine_api_key
            if resolved.profile is not None:  # the engine runs on the pod: its environment goes with it
                env.update(resolved.profile.env)
                for var, ref in resolved.profile.secrets.items():
                    if ref.env is None:
                        raise ProvisionError(
                            f"runpod: profile {resolved.profile.name!r}: secrets.{var} is a Kubernetes Secret "
                            "reference; a RunPod pod gets only values from this server's environment ({env: VAR})",
                            code="invalid_template")
                    if ref.env not in os.environ:
                        raise ProvisionError(
                            f"runpod: profile {resolved.profile.name!r}: secrets.{var} names ${ref.env}, which is "
                            "not set in this server's environment", code="invalid_template")
                    env[var] = os.environ[ref.env]
        return PodSpec(name=f"overnight-{request.job_id}-0", gpu_type=gpu_type, gpu_count=int(gpus),
                       cloud=self.cloud_type, data_centers=list(self.data_centers), image=self.image, env=env,
                       ports=["22/tcp", f"{port}/http"], container_disk_gb=self.container_disk_gb, engine_argv=argv)

    # -- provision ids ----------------------------------------------------------------------------
    @staticmethod
    def provision_id_for(pod: Pod) -> str:
        return f"{pod.id}/{pod.job_id or ''}/{pod.installation_id or ''}"

    @staticmethod
    def _split(provision_id: str) -> tuple[str, str, str]:
        pod_id, _, rest = provision_id.partition("/")
        job, _, installation = rest.partition("/")
        if not pod_id or not job or not installation:
            raise ProvisionError(f"runpod: {provision_id!r} is not a provision id (<pod id>/<job id>/<installation>)",
                                 code="not_found")
        return pod_id, job, installation

    # -- the API ------------------------------------------------------------------------------
    async def provision(self, request: ProvisionRequest) -> ProvisionState:
        lock = self._locks.setdefault(request.idempotency_key, asyncio.Lock())
        async with lock:
            mine = [p for p in await self.api.list() if p.status != "TERMINATED"
                    and p.installation_id == request.installation_id
                    and p.env.get(KEY_ENV, p.job_id) == request.idempotency_key]
            if mine:
                mine.sort(key=lambda p: p.id)
                pod = mine[0]
                for extra in mine[1:]:  # a race between two planners made two: keep one
                    log.warning("runpod: job %s has a second pod %s; terminating it (keeping %s)",
                                request.job_id, extra.id, pod.id)
                    try:
                        await self.api.delete(extra.id)
                    except ProvisionError as exc:
                        log.warning("runpod: terminating %s failed (the sweep retries): %s", extra.id, exc.message)
                log.info("runpod: job %s: adopting its pod %s (%s)", request.job_id, pod.id, pod.status)
            else:
                key = secrets.token_urlsafe(32) if self.endpoint_mode == "proxy" else None
                spec = self.spec_for(request, engine_api_key=key)
                pod = await self.api.create(spec)
                log.info("runpod: job %s: pod %s created (%s x %d, %s, REST %s)", request.job_id, pod.id,
                         spec.gpu_type, spec.gpu_count, spec.cloud, self.api.version)
            self._templates[pod.id] = request.template
            return await self._state(pod, request.template)

    async def status(self, provision_id: str, *, template: dict[str, Any] | None = None) -> ProvisionState:
        pod_id, job, installation = self._split(provision_id)
        pod = await self.api.get(pod_id)
        if pod is None:
            return ProvisionState(provision_id=provision_id, provider=self.name, status="released",
                                  resource_ids=[pod_id], job_id=job, installation_id=installation,
                                  error=f"pod {pod_id} no longer exists")
        if pod.installation_id != installation or pod.job_id != job:
            raise ProvisionError(f"runpod: pod {pod_id} does not carry the markers of job {job} of installation "
                                 f"{installation}", code="not_found")
        return await self._state(pod, template or self._templates.get(pod_id))

    def proxy_url(self, pod_id: str, port: int) -> str:
        return self.proxy_url_template.format(pod_id=pod_id, port=port).rstrip("/")

    async def _state(self, pod: Pod, template: dict[str, Any] | None, *, probe: bool = True) -> ProvisionState:
        state = ProvisionState(provision_id=self.provision_id_for(pod), provider=self.name, status="provisioning",
                               resource_ids=[pod.id], job_id=pod.job_id, installation_id=pod.installation_id,
                               price_per_hour=pod.cost, raw=_redact(pod.raw))
        if pod.status == "TERMINATED":
            state.status, state.error, state.price_per_hour = "released", f"pod {pod.id} is TERMINATED", None
            return state
        if pod.status in ("EXITED", "ERROR"):
            state.status = "failed"
            state.error = f"pod {pod.id} is {pod.status}" + (f": {pod.note}" if pod.note else "") + \
                (" (its container stopped: the image's entrypoint ended or crashed)" if pod.status == "EXITED" else "")
            return state
        if pod.status != "RUNNING":
            state.error = f"pod {pod.id} is {pod.status}" + (
                " (RunPod is finding a machine)" if pod.status == "PROVISIONING" else
                " (RunPod is pulling the image and starting the container)")
            return state
        if not probe:
            state.status = "running"
            return state
        if self.endpoint_mode == "proxy":
            return await self._proxy_ready(pod, template, state)
        if not pod.ssh_host or not pod.ssh_port:
            state.error = f"pod {pod.id} is RUNNING; waiting for its public IP and its 22/tcp port mapping"
            return state
        try:
            host_key = await self._probe(pod.ssh_host, pod.ssh_port, self.ssh_user, self.client_key)
        except Exception as exc:  # noqa: BLE001 - not up yet, our key refused, a timeout: all "not ready"
            state.error = (f"pod {pod.id} is RUNNING; sshd at {pod.ssh_host}:{pod.ssh_port} does not accept "
                           f"overnight's key yet: {str(exc) or type(exc).__name__}")
            return state
        state.ssh = {"host": pod.ssh_host, "port": pod.ssh_port, "user": self.ssh_user, "host_key": host_key}
        if template is None:
            state.error = f"pod {pod.id} is ready, but its job's template is not known here to start the engine"
            return state
        from overnight.runtimes.ssh_common import ssh_runtime_spec

        state.runtime = ssh_runtime_spec(template, host=pod.ssh_host, port=pod.ssh_port, user=self.ssh_user,
                                         host_key=host_key, launch="process", provision_id=state.provision_id,
                                         provider=self.name)
        state.status = "running"
        return state

    async def _proxy_ready(self, pod: Pod, template: dict[str, Any] | None, state: ProvisionState) -> ProvisionState:
        port, health = 8000, "/health"
        if template is not None:
            from overnight.templates.resolve import Resolved

            engine = Resolved.from_record(template).template.spec.engine
            port, health = engine.port, engine.health_endpoint
        url = self.proxy_url(pod.id, port)
        key = pod.env.get(ENGINE_KEY_ENV)
        if not key:
            state.status = "failed"
            state.error = f"pod {pod.id} has no {ENGINE_KEY_ENV}: it was not made in proxy mode"
            return state
        try:
            code = (await self._engine_http.get(url + health)).status_code
        except httpx.HTTPError as exc:
            state.error = f"pod {pod.id} is RUNNING; its engine at {url} does not answer yet ({type(exc).__name__})"
            return state
        if code != 200:
            state.error = f"pod {pod.id} is RUNNING; its engine at {url}{health} answers HTTP {code} (loading?)"
            return state
        state.status, state.endpoint = "running", url
        state.runtime = {"endpoint": url, "api_key": key, "request_timeout_s": PROXY_REQUEST_TIMEOUT_S}
        return state

    async def release(self, provision_id: str) -> bool:
        pod_id, job, installation = self._split(provision_id)
        ids = {pod_id}
        for p in await self.api.list():  # any other pod of this job (a race made two)
            if p.status != "TERMINATED" and p.job_id == job and p.installation_id == installation:
                ids.add(p.id)
            elif p.id == pod_id and (p.job_id != job or p.installation_id != installation):
                raise ProvisionError(f"runpod: pod {pod_id} does not carry the markers of job {job} of "
                                     f"installation {installation}; it is not released", code="not_ours")
        failures: list[ProvisionError] = []
        for pid in sorted(ids):
            try:
                await self.api.delete(pid)  # terminate; never stop (a stopped pod bills its disk)
            except ProvisionError as exc:  # it may have happened all the same: the re-read decides
                failures.append(exc)
        deadline = time.monotonic() + self.release_wait_s
        while True:
            left = []
            for pid in sorted(ids):
                pod = await self.api.get(pid)
                if pod is not None and pod.status != "TERMINATED":
                    left.append(f"{pid} ({pod.status})")
            if not left:
                for pid in ids:
                    self._templates.pop(pid, None)
                log.info("runpod: job %s: pod(s) %s terminated", job, ", ".join(sorted(ids)))
                return True
            if time.monotonic() >= deadline:
                if failures:
                    raise ProvisionError(f"{failures[0].message}; still there: {', '.join(left)}",
                                         retryable=True, code=failures[0].code)
                log.info("runpod: job %s: still there after terminate: %s", job, ", ".join(left))
                return False
            await asyncio.sleep(min(1.0, max(0.05, self.release_wait_s / 10)))

    async def list_owned(self, installation_id: str) -> list[ProvisionState]:
        return [await self._state(p, None, probe=False) for p in await self.api.list()
                if p.installation_id == installation_id and p.status != "TERMINATED"]

    async def catalog(self) -> list[dict[str, Any]]:
        if self.api.version == "v1":
            return [{"provider": self.name, "gpu_type": None, "region": None, "price_per_hour": None,
                     "note": "RunPod's REST v1 has no GPU catalog; point RUNPOD_BASE_URL at REST v2 "
                             f"({DEFAULT_BASE_URL}) to list GPU types with availability and price"}]
        cloud = "secure" if self.cloud_type == "SECURE" else "community"
        out = []
        for g in await self.api.catalog():
            if g.get(cloud) is False:
                continue  # not offered in this cloud
            dcs = [d for d in g.get("dataCenters") or [] if isinstance(d, dict)]
            if self.data_centers:
                dcs = [d for d in dcs if d.get("id") in self.data_centers]
            price = (g.get("price") or {}).get(cloud)
            out.append({
                "provider": self.name, "gpu_type": g.get("id"), "name": g.get("name"), "memory_gb": g.get("memory"),
                "cloud": self.cloud_type, "price_per_hour": _float(price), "price_is": "per GPU (list price)",
                "max_gpus": (g.get("maxCount") or {}).get(cloud),
                "availability": (max((d.get("availability") for d in dcs), key=_level, default="NONE")
                                 if self.data_centers else g.get("availability")),
                "region": ",".join(d["id"] for d in dcs if d.get("availability") not in (None, "NONE")) or None,
                "data_centers": [{"id": d.get("id"), "availability": d.get("availability")} for d in dcs],
            })
        return out


def _level(availability: Any) -> int:
    return {"LOW": 1, "MEDIUM": 2, "HIGH": 3}.get(str(availability), 0)


async def _default_probe(host: str, port: int, user: str, client_key: Any) -> str:
    from overnight.runtimes.ssh_common import probe_host_key

    return await probe_host_key(host, port, user, client_key, timeout_s=10.0)
