"""A fake RunPod REST API for tests: real HTTP on a free 127.0.0.1 port, both REST
versions (``/v2/...``, RunPod's current API, and ``/v1/...``, the one retired on
2026-11-15) over one account's pods kept in memory.

It serves from a background thread, so an async test, a sync test and a
subprocess (``overnight serve`` given ``RUNPOD_BASE_URL=fake.url_v2``) can share
one::

    with FakeRunPod(api_key="k", provisioning_s=0.5) as fake:
        fake.url_v2                   # "http://127.0.0.1:PORT/v2"  (RUNPOD_BASE_URL)
        fake.url_v1                   # "http://127.0.0.1:PORT/v1"
        fake.proxy_url_template       # RUNPOD_PROXY_URL_TEMPLATE pointing at this server
        fake.no_capacity(2)           # the next 2 creates answer 400 (RunPod's capacity text)
        fake.inject("/v2/pods", 429, retry_after=1)
        fake.ssh_host, fake.ssh_port = "127.0.0.1", sshd_port   # where RUNNING pods' 22/tcp points
        ...
        fake.live_pods()              # pods not TERMINATED, in the v2 shape
        fake.live_for(job_id)         # the same, whose env OVERNIGHT_JOB_ID is job_id
        fake.requests                 # every request: Recorded(method, path, query, body, status, at)

**Auth**: ``Authorization: Bearer <api_key>`` on every ``/v1`` and ``/v2`` path, else
401 (v2: problem+json; v1: the literal ``{"error": {}}`` a field report saw).

**v2** (errors are RFC 9457 ``application/problem+json`` ``{title, status, detail,
errors?}``; every answer carries ``RateLimit`` / ``RateLimit-Policy`` headers):

- ``POST /v2/pods``: ``CreatePodRequest``: ``name`` and ``image`` required, ``gpu
  {id, count}``, ``cloud`` SECURE|COMMUNITY, ``dataCenterIds``, ``args`` (a
  string), ``env`` (strings), ``ports`` (``"<n>/http|tcp"``), ``disk``,
  ``mounts``, ``startSsh``, ``startJupyter``, ``templateId``, ``globalNetworking``,
  ``registry``. An unknown field or a value of the wrong type is 422 with
  ``errors``; an unknown GPU type, a count over the type's ``maxCount``, a type
  listed in :attr:`unavailable`, or data centers that do not offer the type are
  400 (as RunPod: no machine-readable code, only ``detail``). 201 with the pod
  in ``PROVISIONING``.
- ``GET /v2/pods`` -> ``{"pods": [...]}`` (TERMINATED pods are not listed);
  ``GET /v2/pods/{id}`` -> the pod, 404 once deleted (unless
  :attr:`keep_terminated`: then it answers with status ``TERMINATED``).
- ``DELETE /v2/pods/{id}`` -> 204 (404 when unknown or already deleted).
- ``POST /v2/pods/{id}/action`` ``{"action": "stop"|"start"|"terminate"|"restart"}``.
- ``GET /v2/catalog/gpus?include=AVAILABILITY&product=POD`` -> ``{"gpus": [GpuType]}``
  from :attr:`gpu_types` (``availability`` and ``dataCenters`` only with both
  query parameters, as documented).

**v1** (errors ``{"error": "..."}``, 404 ``{"message": "Pod not found."}``):

- ``POST /v1/pods``: flat ``PodCreateInput`` (``gpuTypeIds``, ``gpuCount``,
  ``cloudType``, ``computeType``, ``dataCenterIds``, ``imageName``, ``ports`` list,
  ``env``, ``volumeInGb`` (default **20** when omitted, as RunPod),
  ``containerDiskInGb`` (default 50), ``supportPublicIp``, ``dockerEntrypoint``,
  ``dockerStartCmd``, ...); an unknown field is 400. 201 with the pod.
- ``GET /v1/pods`` -> a bare array; ``GET /v1/pods/{id}`` -> the pod
  (``desiredStatus`` RUNNING|EXITED|TERMINATED, ``publicIp`` "" and
  ``portMappings`` {} until the pod runs, ``costPerHr``); ``DELETE /v1/pods/{id}``
  -> 204; ``POST /v1/pods/{id}/stop`` -> 200.

Pods made through one version are read through the other (one account).

**Lifecycle**, computed from the clock on each read: ``PROVISIONING`` for
:attr:`provisioning_s`, ``STARTING`` for :attr:`starting_s`, then ``RUNNING``; the
public IP and the 22/tcp mapping (``runtime.ports``, ``ssh.direct``; v1
``publicIp``, ``portMappings``) appear :attr:`ip_delay_s` after RUNNING and
point at :attr:`ssh_host` : :attr:`ssh_port` (read at each answer, so a test can
point them at a real sshd at any time; :meth:`set_ssh` for one pod). ``cost`` is
the GPU type's price per GPU times the count (0 once EXITED or TERMINATED). A
DELETE takes effect after :attr:`delete_s` (the pod is listed as before until
then). :meth:`set_status` forces ``EXITED``/``ERROR`` on one pod.

**The proxy**: ``GET /proxy/<pod id>-<port>/health`` (no auth, as RunPod's public
proxy) answers 200 while the pod is RUNNING and :attr:`engine_ready`, else 502;
:attr:`proxy_url_template` is the ``RUNPOD_PROXY_URL_TEMPLATE`` that reaches it.

**Faults**:

- :meth:`inject` ``(path, status, *, times=1, method=None, retry_after=None,
  after=False, drop=False, delay_s=0, detail=None)``: the next ``times`` requests
  whose path starts with ``path`` (e.g. ``"/v2/pods"``) answer ``status`` (the
  version's error shape, ``Retry-After`` when given); ``after=True`` performs
  the operation first (a DELETE that deleted and answered 500); ``drop=True``
  closes the connection without an answer; ``delay_s`` sleeps before answering.
- :meth:`no_capacity` ``(times)``: the next ``times`` creates answer 400 with RunPod's
  capacity text.
- :attr:`down` = True: every connection is closed without an answer.
- :attr:`unavailable`: GPU type ids every create answers 400 for.

**Records**: :attr:`requests`, :meth:`create_bodies` (``version`` ``"v1"``/``"v2"``),
:attr:`stop_calls` (pod ids a stop was asked for: a provisioner must never stop),
:meth:`pod` (one pod, v2 shape, deleted ones too), :meth:`add_pod` (a pod
placed directly: unmarked, another installation's...).
"""

from __future__ import annotations

import copy
import json
import random
import re
import string
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes._threaded import FakeServer, Fault, Recorded, ThreadedFake, take_fault

__all__ = ["CAPACITY_MESSAGE", "DEFAULT_GPU_TYPES", "FakeRunPod", "Recorded", "gpu_type"]

#: What RunPod users see when a GPU type has no capacity (runpodctl / GraphQL text).
CAPACITY_MESSAGE = ("There are no longer any instances available with the requested specifications. "
                    "Please refresh and try again.")
STATUSES = ("PROVISIONING", "STARTING", "RUNNING", "EXITED", "ERROR", "TERMINATED")
_PORT_RE = re.compile(r"^\d{1,5}/(http|tcp)$")
V2_CREATE_FIELDS = {"name", "cloud", "cpu", "gpu", "dataCenterIds", "globalNetworking", "mounts", "startJupyter",
                    "startSsh", "templateId", "args", "disk", "env", "image", "ports", "registry"}
V1_CREATE_FIELDS = {"name", "imageName", "gpuTypeIds", "gpuTypePriority", "gpuCount", "computeType", "cloudType",
                    "dataCenterIds", "dataCenterPriority", "ports", "env", "containerDiskInGb", "volumeInGb",
                    "volumeMountPath", "supportPublicIp", "dockerEntrypoint", "dockerStartCmd", "interruptible",
                    "allowedCudaVersions", "countryCodes", "minRAMPerGPU", "minVCPUPerGPU", "minDownloadMbps",
                    "minUploadMbps", "minDiskBandwidthMBps", "networkVolumeId", "templateId",
                    "containerRegistryAuthId", "locked", "globalNetworking", "cpuFlavorIds", "vcpuCount"}


def gpu_type(id: str, name: str, memory: int, secure: float, community: float, *, max_count: int = 8,
             availability: str = "HIGH", data_centers: dict[str, str] | None = None) -> dict[str, Any]:
    """A v2 ``GpuType`` with its availability (``data_centers``: id -> NONE|LOW|MEDIUM|HIGH)."""
    return {"id": id, "name": name, "pool": None, "manufacturer": "NVIDIA", "memory": memory,
            "secure": True, "community": True, "price": {"secure": secure, "community": community},
            "maxCount": {"secure": max_count, "community": max_count}, "availability": availability,
            "dataCenters": [{"id": dc, "name": dc, "availability": level}
                            for dc, level in (data_centers or {"US-KS-2": "HIGH", "EU-RO-1": "LOW"}).items()]}


#: GPU type ids as RunPod spells them; prices are illustrative.
DEFAULT_GPU_TYPES: list[dict[str, Any]] = [
    gpu_type("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.69, 2.39),
    gpu_type("NVIDIA H100 PCIe", "H100 PCIe", 80, 2.39, 1.99, availability="LOW",
             data_centers={"US-KS-2": "LOW"}),
    gpu_type("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.64, 1.19, availability="MEDIUM",
             data_centers={"EU-RO-1": "MEDIUM", "CA-MTL-1": "LOW"}),
    gpu_type("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, 0.34, max_count=4),
]


@dataclass(kw_only=True)
class _Fault(Fault):
    delay_s: float = 0.0
    detail: str | None = None


@dataclass
class _Pod:
    id: str
    name: str
    made_by: str  # "v1" | "v2"
    gpu_id: str
    gpu_count: int
    cloud: str
    data_center: str
    image: str
    env: dict[str, str]
    ports: list[str]
    disk: int
    volume: int
    created: float
    args: str = ""
    entrypoint: list[str] = field(default_factory=list)
    start_cmd: list[str] = field(default_factory=list)
    forced: str | None = None
    delete_at: float | None = None
    ssh: tuple[str, int] | None = None
    created_wall: float = field(default_factory=time.time)


class _Answer(Exception):
    def __init__(self, status: int, detail: str, errors: list[str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors


_TITLES = {400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
           409: "Conflict", 422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable"}


class FakeRunPod(ThreadedFake):
    def __init__(self, *, api_key: str = "test-runpod-key", gpu_types: list[dict[str, Any]] | None = None,
                 provisioning_s: float = 0.0, starting_s: float = 0.0, ip_delay_s: float = 0.0,
                 delete_s: float = 0.0, ssh_host: str = "127.0.0.1", ssh_port: int = 22) -> None:
        self.api_key = api_key
        self.gpu_types = copy.deepcopy(gpu_types if gpu_types is not None else DEFAULT_GPU_TYPES)
        self.provisioning_s, self.starting_s, self.ip_delay_s = provisioning_s, starting_s, ip_delay_s
        self.delete_s = delete_s
        self.ssh_host, self.ssh_port = ssh_host, ssh_port
        self.keep_terminated = False
        self.engine_ready = True
        self.down = False
        self.unavailable: set[str] = set()
        self.requests: list[Recorded] = []
        self.stop_calls: list[str] = []
        self._pods: dict[str, _Pod] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()

    # -- where it answers (start/stop/port: tests/fakes/_threaded.py) --------------------------
    @property
    def url_v2(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2"

    @property
    def url_v1(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def proxy_url_template(self) -> str:
        return f"http://127.0.0.1:{self.port}/proxy/{{pod_id}}-{{port}}"

    # -- knobs ----------------------------------------------------------------------------------
    def inject(self, path: str, status: int, *, times: int = 1, method: str | None = None,
               retry_after: float | None = None, after: bool = False, drop: bool = False, delay_s: float = 0.0,
               detail: str | None = None) -> None:
        with self._lock:
            self._faults.append(_Fault(path=path, status=status, times=times,
                                       method=method.upper() if method else None, retry_after=retry_after,
                                       after=after, drop=drop, delay_s=delay_s, detail=detail))

    def no_capacity(self, times: int = 1) -> None:
        with self._lock:
            self._faults.append(_CreateFault(times))

    def set_status(self, pod_id: str, status: str | None) -> None:
        """Force ``EXITED`` / ``ERROR`` (None: back to the clock's status)."""
        assert status is None or status in ("EXITED", "ERROR"), status
        with self._lock:
            self._pods[pod_id].forced = status

    def set_ssh(self, pod_id: str, host: str, port: int) -> None:
        """Where this pod's 22/tcp mapping points (default: :attr:`ssh_host`, :attr:`ssh_port`)."""
        with self._lock:
            self._pods[pod_id].ssh = (host, port)

    def add_pod(self, *, name: str = "someone-else", env: dict[str, str] | None = None,
                gpu_id: str = "NVIDIA GeForce RTX 4090", gpu_count: int = 1, image: str = "runpod/pytorch:latest",
                running: bool = True) -> str:
        """A pod that was there already (made by hand, by another installation...)."""
        with self._lock:
            pod = _Pod(id=self._new_id(), name=name, made_by="v2", gpu_id=gpu_id, gpu_count=gpu_count,
                       cloud="SECURE", data_center="US-KS-2", image=image, env=dict(env or {}),
                       ports=["22/tcp"], disk=20, volume=0,
                       created=time.monotonic() - (0 if not running else 1e6))
            self._pods[pod.id] = pod
            return pod.id

    # -- records --------------------------------------------------------------------------------
    def pod(self, pod_id: str) -> dict[str, Any]:
        with self._lock:
            return self._v2(self._pods[pod_id], time.monotonic())

    def pods(self) -> list[dict[str, Any]]:
        with self._lock:
            now = time.monotonic()
            return [self._v2(p, now) for p in self._pods.values()]

    def live_pods(self) -> list[dict[str, Any]]:
        return [p for p in self.pods() if p["status"] != "TERMINATED"]

    def live_for(self, job_id: str) -> list[dict[str, Any]]:
        return [p for p in self.live_pods() if p["env"].get("OVERNIGHT_JOB_ID") == job_id]

    def create_bodies(self, version: str | None = None) -> list[Any]:
        with self._lock:
            return [copy.deepcopy(r.body) for r in self.requests if r.method == "POST"
                    and (r.path in ("/v2/pods", "/v1/pods")) and (version is None or r.path.startswith(f"/{version}/"))]

    # -- the model ------------------------------------------------------------------------------
    @staticmethod
    def _new_id() -> str:
        return "".join(random.choices(string.ascii_lowercase + string.digits, k=14))

    def _status(self, pod: _Pod, now: float) -> str:
        if pod.delete_at is not None and now >= pod.delete_at:
            return "TERMINATED"
        if pod.forced:
            return pod.forced
        age = now - pod.created
        if age < self.provisioning_s:
            return "PROVISIONING"
        if age < self.provisioning_s + self.starting_s:
            return "STARTING"
        return "RUNNING"

    def _address(self, pod: _Pod, now: float) -> tuple[str, int] | None:
        """The public IP and the port 22 is mapped to, once the pod runs (and ip_delay_s later)."""
        if self._status(pod, now) != "RUNNING" or "22/tcp" not in pod.ports:
            return None
        if now - pod.created < self.provisioning_s + self.starting_s + self.ip_delay_s:
            return None
        return pod.ssh or (self.ssh_host, self.ssh_port)

    def _price(self, pod: _Pod, status: str) -> float:
        if status in ("EXITED", "TERMINATED"):
            return 0.0
        t = next((g for g in self.gpu_types if g["id"] == pod.gpu_id), None)
        per = t["price"]["secure" if pod.cloud == "SECURE" else "community"] if t else 0.5
        return round(per * pod.gpu_count, 4)

    def _v2(self, pod: _Pod, now: float) -> dict[str, Any]:
        status = self._status(pod, now)
        addr = self._address(pod, now)
        ports: list[dict[str, Any]] = []
        for spec in pod.ports:
            private, kind = spec.split("/")
            if kind == "tcp":
                ports.append({"private": int(private), "public": addr[1] if addr else None, "type": "tcp",
                              "ip": addr[0] if addr else None})
            else:
                ports.append({"private": int(private), "public": None, "type": "http", "ip": None})
        running = status == "RUNNING"
        return {
            "id": pod.id, "name": pod.name, "status": status,
            "actions": {"PROVISIONING": ["terminate"], "STARTING": ["stop", "restart", "terminate"],
                        "RUNNING": ["stop", "restart", "terminate"], "EXITED": ["start", "terminate"],
                        "ERROR": ["terminate"], "TERMINATED": []}[status],
            "image": pod.image, "args": pod.args, "disk": pod.disk,
            "mounts": {"persistent": {"size": pod.volume, "path": "/workspace"}} if pod.volume else {},
            "ports": list(pod.ports), "env": dict(pod.env), "registry": None,
            "gpu": {"id": pod.gpu_id, "count": pod.gpu_count}, "cloud": pod.cloud, "dataCenterId": pod.data_center,
            "cudaVersion": "12.8",
            "ssh": {"proxy": {"host": "ssh.runpod.io", "port": 22, "username": f"{pod.id}-64411eb2",
                              "command": f"ssh {pod.id}-64411eb2@ssh.runpod.io"} if status != "PROVISIONING" else None,
                    "direct": {"host": addr[0], "port": addr[1], "username": "root",
                               "command": f"ssh root@{addr[0]} -p {addr[1]}"} if addr else None},
            "template": None, "cost": self._price(pod, status), "locked": False,
            "globalNetworking": {"enabled": False},
            "runtime": {"uptime": int(now - pod.created), "gpus": [], "ports": ports} if running else None,
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pod.created_wall)),
            "startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pod.created_wall)) if running else None,
        }

    def _v1(self, pod: _Pod, now: float) -> dict[str, Any]:
        status = self._status(pod, now)
        addr = self._address(pod, now)
        desired = {"PROVISIONING": "RUNNING", "STARTING": "RUNNING", "RUNNING": "RUNNING", "EXITED": "EXITED",
                   "ERROR": "EXITED", "TERMINATED": "TERMINATED"}[status]
        t = next((g for g in self.gpu_types if g["id"] == pod.gpu_id), None)
        return {
            "id": pod.id, "name": pod.name, "desiredStatus": desired, "image": pod.image,
            "publicIp": addr[0] if addr else "", "portMappings": {"22": addr[1]} if addr else {},
            "costPerHr": self._price(pod, status), "adjustedCostPerHr": self._price(pod, status),
            "env": dict(pod.env), "ports": list(pod.ports),
            "gpu": {"id": pod.gpu_id, "count": pod.gpu_count, "displayName": t["name"] if t else pod.gpu_id},
            "containerDiskInGb": pod.disk, "volumeInGb": pod.volume, "dockerEntrypoint": list(pod.entrypoint),
            "dockerStartCmd": list(pod.start_cmd), "machineId": f"m-{pod.id[:6]}", "interruptible": False,
            "lastStatusChange": {"ERROR": "Exited with error: container crashed", "EXITED": "Exited by user"}
            .get(status, f"Rented by User: {time.ctime(pod.created_wall)}"),
        }

    def _place(self, gpu_id: str, count: int, cloud: str, data_centers: list[str]) -> str:
        """The data center a new pod lands in, or a 400 as RunPod answers it."""
        t = next((g for g in self.gpu_types if g["id"] == gpu_id), None)
        if t is None:
            raise _Answer(400, f"GPU type {gpu_id!r} is not available")
        if count > t["maxCount"]["secure" if cloud == "SECURE" else "community"]:
            raise _Answer(400, f"{count} GPUs of type {gpu_id!r} do not fit on one machine")
        if gpu_id in self.unavailable:
            raise _Answer(400, CAPACITY_MESSAGE)
        offered = [d["id"] for d in t["dataCenters"] if d["availability"] != "NONE"]
        where = [d for d in data_centers if d in offered] if data_centers else offered
        if not where:
            raise _Answer(400, CAPACITY_MESSAGE)
        return where[0]

    def _create_v2(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _Answer(422, "validation failed", ["$: expected an object"])
        errors = [f"$: additional properties '{k}' not allowed" for k in sorted(set(body) - V2_CREATE_FIELDS)]
        if not isinstance(body.get("name"), str) or not body["name"]:
            errors.append("$: missing property 'name'")
        if not isinstance(body.get("image"), str) or not body["image"]:
            errors.append("$: missing property 'image'")
        gpu = body.get("gpu")
        if not isinstance(gpu, dict) or not isinstance(gpu.get("id"), str) \
                or not isinstance(gpu.get("count", 1), int) or gpu.get("count", 1) < 1 \
                or set(gpu) - {"id", "count", "allowedCudaVersions", "minCudaVersion"}:
            errors.append("$.gpu: expected {id: string, count: integer >= 1}")
        if body.get("cloud", "SECURE") not in ("SECURE", "COMMUNITY"):
            errors.append("$.cloud: value must be one of 'SECURE', 'COMMUNITY'")
        if "args" in body and not isinstance(body["args"], str):
            errors.append("$.args: expected string")
        env = body.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            errors.append("$.env: values must be strings")
        ports = body.get("ports", [])
        if not isinstance(ports, list) or not all(isinstance(p, str) and _PORT_RE.match(p) for p in ports):
            errors.append("$.ports: items must look like '8000/http' or '22/tcp'")
        dcs = body.get("dataCenterIds", [])
        if not isinstance(dcs, list) or not all(isinstance(d, str) for d in dcs):
            errors.append("$.dataCenterIds: expected an array of strings")
        if "disk" in body and (not isinstance(body["disk"], int) or body["disk"] < 1):
            errors.append("$.disk: expected an integer >= 1")
        if errors:
            raise _Answer(422, "validation failed", errors)
        cloud = body.get("cloud", "SECURE")
        dc = self._place(gpu["id"], gpu.get("count", 1), cloud, dcs)
        mounts = body.get("mounts") or {}
        pod = _Pod(id=self._new_id(), name=body["name"], made_by="v2", gpu_id=gpu["id"],
                   gpu_count=gpu.get("count", 1), cloud=cloud, data_center=dc, image=body["image"],
                   env=dict(env), ports=list(ports), disk=body.get("disk", 50),
                   volume=int((mounts.get("persistent") or {}).get("size") or 0), created=time.monotonic(),
                   args=body.get("args", ""))
        self._pods[pod.id] = pod
        return self._v2(pod, time.monotonic())

    def _create_v1(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _Answer(400, "Invalid input: expected an object")
        unknown = sorted(set(body) - V1_CREATE_FIELDS)
        if unknown:
            raise _Answer(400, f"Invalid input: unknown field {unknown[0]!r}")
        ids = body.get("gpuTypeIds")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _Answer(400, "Invalid input: gpuTypeIds must be a non-empty list of GPU type ids")
        if not isinstance(body.get("imageName"), str) or not body["imageName"]:
            raise _Answer(400, "Invalid input: imageName is required")
        cloud = body.get("cloudType", "SECURE")
        if cloud not in ("SECURE", "COMMUNITY"):
            raise _Answer(400, f"Invalid input: cloudType {cloud!r}")
        ports = body.get("ports", ["8888/http", "22/tcp"])
        if isinstance(ports, str):
            ports = [p.strip() for p in ports.split(",") if p.strip()]
        if not isinstance(ports, list) or not all(isinstance(p, str) and _PORT_RE.match(p) for p in ports):
            raise _Answer(400, "Invalid input: ports must look like '8000/http' or '22/tcp'")
        for key in ("dockerEntrypoint", "dockerStartCmd"):
            v = body.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise _Answer(400, f"Invalid input: {key} must be a list of strings")
        env = body.get("env", {})
        if not isinstance(env, dict):
            raise _Answer(400, "Invalid input: env must be an object")
        count = body.get("gpuCount", 1)
        last: _Answer | None = None
        for gpu_id in ids:  # in order (gpuTypePriority custom / availability: same here)
            try:
                dc = self._place(gpu_id, count, cloud, body.get("dataCenterIds") or [])
                break
            except _Answer as exc:
                last = exc
        else:
            assert last is not None
            raise last
        pod = _Pod(id=self._new_id(), name=body.get("name", "my pod"), made_by="v1", gpu_id=gpu_id, gpu_count=count,
                   cloud=cloud, data_center=dc, image=body["imageName"], env={k: str(v) for k, v in env.items()},
                   ports=ports, disk=body.get("containerDiskInGb", 50), volume=body.get("volumeInGb", 20),
                   created=time.monotonic(), entrypoint=list(body.get("dockerEntrypoint", [])),
                   start_cmd=list(body.get("dockerStartCmd", [])))
        self._pods[pod.id] = pod
        return self._v1(pod, time.monotonic())

    def _delete(self, pod_id: str) -> None:
        now = time.monotonic()
        pod = self._pods.get(pod_id)
        if pod is None or self._status(pod, now) == "TERMINATED":
            raise _Answer(404, "pod not found")
        if pod.delete_at is None:
            pod.delete_at = now + self.delete_s

    def _visible(self, pod_id: str, now: float) -> _Pod:
        pod = self._pods.get(pod_id)
        if pod is None or (self._status(pod, now) == "TERMINATED" and not self.keep_terminated):
            raise _Answer(404, "pod not found")
        return pod

    # -- HTTP -----------------------------------------------------------------------------------
    def _fault(self, method: str, path: str) -> _Fault | None:
        def applies(f: _Fault, method: str, path: str) -> bool:  # a capacity fault meets only creates
            return not isinstance(f, _CreateFault) or (method == "POST" and path in ("/v2/pods", "/v1/pods"))

        return take_fault(self._faults, method, path, applies)

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any,
               auth: str | None) -> tuple[int, Any, dict[str, str], float]:
        """(status, payload, headers, delay_s); status -1: close without answering."""
        with self._lock:
            rec = Recorded(method=method, path=path, query=query, body=copy.deepcopy(body), at=time.monotonic())
            self.requests.append(rec)
            if self.down:
                rec.status = -1
                return -1, None, {}, 0.0
            version = "v2" if path.startswith("/v2/") else "v1" if path.startswith("/v1/") else None
            if path.startswith("/proxy/"):
                status, payload = self._proxy(path)
                rec.status = status
                return status, payload, {}, 0.0
            headers: dict[str, str] = {}
            if version == "v2":
                headers = {"RateLimit": '"minute";r=59;t=60', "RateLimit-Policy": '"minute";q=60;w=60'}
            if version is None:
                rec.status = 404
                return 404, {"message": "not found"}, {}, 0.0
            if auth != f"Bearer {self.api_key}":
                rec.status = 401
                if version == "v2":
                    return 401, _problem(401, "invalid or missing API key"), headers, 0.0
                return 401, {"error": {}}, {}, 0.0
            fault = self._fault(method, path)
            delay = fault.delay_s if fault else 0.0
            if fault is not None and fault.drop:
                rec.status = -1
                return -1, None, {}, delay
            try:
                if fault is not None and not fault.after:
                    raise _Answer(fault.status, fault.detail or _TITLES.get(fault.status, "error"))
                status, payload = self._route(version, method, path[3:], query, body)
                if fault is not None:  # after=True: done, then the error
                    raise _Answer(fault.status, fault.detail or _TITLES.get(fault.status, "error"))
            except _Answer as exc:
                status = exc.status
                payload = _problem(exc.status, exc.detail, exc.errors) if version == "v2" else \
                    ({"message": "Pod not found."} if exc.status == 404 else {"error": exc.detail})
                if fault is not None and fault.retry_after is not None:
                    headers["Retry-After"] = f"{fault.retry_after:g}"
                elif exc.status == 429:
                    headers["Retry-After"] = "1"
            rec.status = status
            return status, payload, headers, delay

    def _route(self, version: str, method: str, path: str, query: dict[str, list[str]],
               body: Any) -> tuple[int, Any]:
        now = time.monotonic()
        view = self._v2 if version == "v2" else self._v1
        parts = [p for p in path.split("/") if p]
        if parts == ["pods"] and method == "GET":
            pods = [view(p, now) for p in self._pods.values() if self._status(p, now) != "TERMINATED"]
            return 200, ({"pods": pods} if version == "v2" else pods)
        if parts == ["pods"] and method == "POST":
            return 201, (self._create_v2(body) if version == "v2" else self._create_v1(body))
        if len(parts) == 2 and parts[0] == "pods":
            if method == "GET":
                return 200, view(self._visible(parts[1], now), now)
            if method == "DELETE":
                self._delete(parts[1])
                return 204, None
        if len(parts) == 3 and parts[0] == "pods" and method == "POST":
            pod = self._visible(parts[1], now)
            action = (body or {}).get("action") if version == "v2" and parts[2] == "action" else parts[2]
            if action == "stop":
                self.stop_calls.append(pod.id)
                pod.forced = "EXITED"
            elif action == "start":
                pod.forced = None
            elif action == "terminate":
                self._delete(pod.id)
                return 204, None
            elif action != "restart":
                raise _Answer(422 if version == "v2" else 400, f"unknown action {action!r}")
            return 200, view(pod, now)
        if version == "v2" and parts == ["catalog", "gpus"] and method == "GET":
            with_availability = "AVAILABILITY" in ",".join(query.get("include", [])).upper() \
                and query.get("product")
            gpus = []
            for g in self.gpu_types:
                g = copy.deepcopy(g)
                if not with_availability:
                    g.pop("availability", None)
                    g.pop("dataCenters", None)
                gpus.append(g)
            return 200, {"gpus": gpus}
        raise _Answer(404 if method in ("GET", "DELETE", "POST") else 405, f"no route {method} /{version}{path}")

    def _proxy(self, path: str) -> tuple[int, Any]:
        m = re.match(r"^/proxy/([a-z0-9]+)-(\d+)(/.*)?$", path)
        if not m:
            return 404, {"message": "no such proxy route"}
        pod = self._pods.get(m.group(1))
        if pod is None or self._status(pod, time.monotonic()) != "RUNNING" or not self.engine_ready:
            return 502, {"message": "Bad Gateway"}
        if (m.group(3) or "/") == "/health":
            return 200, {}
        return 404, {"message": "not found"}


class _CreateFault(_Fault):
    """``no_capacity``: the next creates (either version) answer 400 with RunPod's text."""

    def __init__(self, times: int) -> None:
        super().__init__(path="/v", status=400, times=times, method="POST", detail=CAPACITY_MESSAGE)


def _problem(status: int, detail: str, errors: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"title": _TITLES.get(status, "Error"), "status": status, "detail": detail}
    if errors:
        out["errors"] = errors
    return out


class _Handler(BaseHTTPRequestHandler):
    server: FakeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = {"__not_json__": raw.decode("utf-8", "replace")}
        status, payload, headers, delay = self.server.fake.handle(
            method, url.path.rstrip("/") or "/", parse_qs(url.query), body, self.headers.get("Authorization"))
        if delay:
            time.sleep(delay)
        if status < 0:  # no answer at all
            self.close_connection = True
            return
        data = b"" if payload is None or status == 204 else json.dumps(payload).encode()
        self.send_response(status)
        if data:
            problem = isinstance(payload, dict) and "title" in payload and "detail" in payload
            self.send_header("Content-Type", "application/problem+json" if problem else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")


FakeRunPod.handler = _Handler
FakeRunPod.thread_name = "fake-runpod"
