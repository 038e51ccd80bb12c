"""A fake Lambda Cloud API for tests: real HTTP on 127.0.0.1, the shapes of Lambda's
public API (spec 1.8.3, ``https://cloud.lambda.ai/api/v1``), instances in memory.

Start it as a context manager (it serves from a background thread, so an async
test in this process and a subprocess such as ``overnight serve`` given
``LAMBDA_CLOUD_BASE_URL=fake.url`` can share it)::

    with FakeLambdaCloud(api_key="k", boot_s=0.5) as fake:
        fake.url                      # "http://127.0.0.1:PORT/api/v1"
        fake.set_capacity("gpu_8x_h100_sxm5", ["us-east-1"])
        fake.inject("/instance-operations/launch", status=429, retry_after=1)
        ...
        fake.live_instances()         # not terminated (booting/active/terminating/...)
        fake.live_for(job_id)         # the same, tagged overnight-job=<job_id>

**Endpoints** (``Authorization: Bearer <key>`` or HTTP Basic with the key as the
user name; anything else is 401 ``global/invalid-api-key``). Success is
``{"data": ...}``, an error ``{"error": {"code", "message", "suggestion"}}``:

- ``GET /instance-types``: ``{"data": {<name>: {"instance_type": {name, description,
  gpu_description, price_cents_per_hour, specs: {vcpus, memory_gib, storage_gib,
  gpus}}, "regions_with_capacity_available": [{name, description}]}}}`` from
  :attr:`instance_types` and the capacity table (:meth:`set_capacity`).
- ``POST /instance-operations/launch``: body ``{region_name, instance_type_name,
  ssh_key_names (exactly one, registered in ssh_keys), name? (<= 64 chars), tags?
  [{key, value}], hostname?, image?, user_data?, file_system_names?, firewall_rulesets?}``;
  an unknown field (``quantity`` included: 1.8.3 has none) or a bad value is 400
  ``global/invalid-parameters``; an unknown type, region or SSH key 404
  ``global/object-does-not-exist``; a type without capacity in that region 400
  ``instance-operations/launch/insufficient-capacity``; more than ``quota`` live
  instances 400 ``global/quota-exceeded``; ``account_inactive`` 403
  ``global/account-inactive``. Answers ``{"data": {"instance_ids": [id]}}``.
- ``GET /instances``: the instances not ``terminated``; ``GET /instances/{id}``: one,
  ``terminated`` ones too unless ``forget_terminated`` (then 404
  ``global/object-does-not-exist``, as for an unknown id).
- ``POST /instance-operations/terminate`` ``{"instance_ids": [...]}``: every id must be
  live (else 404 ``global/object-does-not-exist``, nothing terminated); answers
  ``{"data": {"terminated_instances": [Instance]}}`` with status ``terminating``.

**Lifecycle** (computed from the clock on every read): ``booting`` for ``boot_s``,
then ``active``, with ``ip`` from ``ip_delay_s`` later (``ip`` is the address the
test says: :attr:`instance_ip`, ``127.0.0.1`` by default, so a test can run a
real sshd there and give the provisioner its port); terminate makes it
``terminating`` for ``terminate_s``, then ``terminated``. :meth:`set_status`
forces a status (``unhealthy``, ``preempted``) on one instance.

**Faults**:

- :meth:`inject` ``(path, status, code=..., times=1, retry_after=None,
  method=None, after=False, drop=False)``: the next ``times`` requests whose path
  starts with ``path`` answer that error (with a ``Retry-After`` header when
  given); ``after=True`` does the operation first and then answers the error (a
  launch that made the instance, a terminate that terminated, and answered 500);
  ``drop=True`` closes the connection without an answer.
- :meth:`refuse_capacity` ``(times, type_name=None)``: the next launches answer
  insufficient-capacity although the type is listed with capacity (Lambda's list
  is advisory).
- :attr:`down` = True: every connection is closed without an answer (API down).
- :attr:`quota`, :attr:`account_inactive`, :attr:`forget_terminated`,
  :attr:`boot_s`, :attr:`ip_delay_s`, :attr:`terminate_s`, :attr:`instance_ip`:
  plain attributes, change them at any time.

**Records**: :attr:`requests` (``Recorded(method, path, body, at, status)``, ``at`` =
``time.monotonic()`` when it arrived), :attr:`launch_times`, :meth:`launch_bodies`,
:attr:`terminate_calls` (the id lists asked for).
:meth:`add_instance` puts an instance there directly (untagged, another
installation's...).

Not modelled: file systems, firewall rules, images, restart, SSH key management,
per-request rate limiting (use :meth:`inject` with 429).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes._threaded import FakeServer, Fault, Recorded, ThreadedFake, take_fault

__all__ = ["DEFAULT_INSTANCE_TYPES", "FakeLambdaCloud", "Recorded", "instance_type"]

REGIONS = {
    "us-east-1": "Virginia, USA", "us-east-2": "Washington DC, USA", "us-east-3": "Washington DC, USA",
    "us-west-1": "California, USA", "us-west-2": "Arizona, USA", "us-west-3": "Utah, USA",
    "us-south-1": "Texas, USA", "us-south-2": "North Texas, USA", "us-south-3": "Central Texas, USA",
    "us-midwest-1": "Illinois, USA", "us-midwest-2": "Ohio, USA", "europe-central-1": "Germany",
    "asia-south-1": "India", "asia-northeast-1": "Osaka, Japan", "asia-northeast-2": "Tokyo, Japan",
    "australia-east-1": "Sydney, Australia", "me-west-1": "Israel",
}
STATUSES = ("booting", "active", "unhealthy", "terminated", "terminating", "preempted")
LAUNCH_FIELDS = {"region_name", "instance_type_name", "ssh_key_names", "name", "hostname", "image", "user_data",
                 "file_system_names", "file_system_mounts", "tags", "firewall_rulesets"}


def instance_type(name: str, description: str, gpu_description: str, cents: int, gpus: int, *, vcpus: int = 26,
                  memory_gib: int = 200, storage_gib: int = 1000) -> dict[str, Any]:
    """An ``InstanceType`` object."""
    return {"name": name, "description": description, "gpu_description": gpu_description,
            "price_cents_per_hour": cents,
            "specs": {"vcpus": vcpus, "memory_gib": memory_gib, "storage_gib": storage_gib, "gpus": gpus}}


#: Names and descriptions as Lambda writes them; prices are illustrative.
DEFAULT_INSTANCE_TYPES: dict[str, dict[str, Any]] = {t["name"]: t for t in (
    instance_type("gpu_1x_a10", "1x A10 (24 GB PCIe)", "A10 (24 GB PCIe)", 75, 1),
    instance_type("gpu_1x_a100_sxm4", "1x A100 (40 GB SXM4)", "A100 (40 GB SXM4)", 129, 1),
    instance_type("gpu_8x_a100_80gb_sxm4", "8x A100 (80 GB SXM4)", "A100 (80 GB SXM4)", 1432, 8),
    instance_type("gpu_1x_a6000", "1x RTX A6000 (48 GB)", "RTX A6000 (48 GB)", 80, 1),
    instance_type("gpu_1x_rtx6000", "1x RTX 6000 (24 GB)", "RTX 6000 (24 GB)", 50, 1),
    instance_type("gpu_1x_gh200", "1x GH200 (96 GB)", "GH200 (96 GB)", 149, 1),
    instance_type("gpu_1x_h100_pcie", "1x H100 (80 GB PCIe)", "H100 (80 GB PCIe)", 249, 1),
    instance_type("gpu_1x_h100_sxm5", "1x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 329, 1),
    instance_type("gpu_2x_h100_sxm5", "2x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 638, 2),
    instance_type("gpu_8x_h100_sxm5", "8x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 2392, 8),
)}


@dataclass(kw_only=True)
class _Fault(Fault):
    code: str
    message: str


@dataclass
class _Instance:
    id: str
    name: str | None
    type_name: str
    region: str
    ssh_key_names: list[str]
    tags: list[dict[str, str]]
    created: float
    hostname: str | None = None
    forced: str | None = None  # a status set by the test
    terminate_at: float | None = None  # when terminate was asked
    extra: dict[str, Any] = field(default_factory=dict)


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.suggestion = status, code, message, suggestion


class FakeLambdaCloud(ThreadedFake):
    def __init__(self, *, api_key: str = "test-lambda-key", ssh_keys: tuple[str, ...] = ("overnight",),
                 instance_types: dict[str, dict[str, Any]] | None = None,
                 capacity: dict[str, list[str]] | None = None, boot_s: float = 0.0, ip_delay_s: float = 0.0,
                 terminate_s: float = 0.0, instance_ip: str = "127.0.0.1", quota: int | None = None) -> None:
        self.api_key = api_key
        self.ssh_keys = set(ssh_keys)
        self.instance_types = copy.deepcopy(instance_types if instance_types is not None else DEFAULT_INSTANCE_TYPES)
        #: type name -> regions with capacity (default: every type in us-east-1).
        self.capacity: dict[str, list[str]] = capacity if capacity is not None else {
            name: ["us-east-1"] for name in self.instance_types}
        self.boot_s, self.ip_delay_s, self.terminate_s = boot_s, ip_delay_s, terminate_s
        self.instance_ip = instance_ip
        self.quota = quota
        self.account_inactive = False
        self.forget_terminated = False
        self.down = False
        self.requests: list[Recorded] = []
        self.launch_times: list[float] = []
        self.terminate_calls: list[list[str]] = []
        self._instances: dict[str, _Instance] = {}
        self._faults: list[_Fault] = []
        self._refusals: list[list[Any]] = []  # [times, type_name or None]
        self._lock = threading.RLock()

    # -- where it answers (start/stop/port: tests/fakes/_threaded.py) --------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    # -- knobs ----------------------------------------------------------------------------------
    def set_capacity(self, type_name: str, regions: list[str]) -> None:
        with self._lock:
            self.capacity[type_name] = list(regions)

    def inject(self, path: str, status: int, code: str | None = None, message: str | None = None, *,
               times: int = 1, retry_after: float | None = None, method: str | None = None, after: bool = False,
               drop: bool = False) -> None:
        if code is None:
            code = {429: "global/rate-limited", 401: "global/invalid-api-key",
                    403: "global/account-inactive"}.get(status, "global/internal-error")
        with self._lock:
            self._faults.append(_Fault(path=path, status=status, code=code, message=message or f"injected {status}",
                                       times=times, retry_after=retry_after, method=method, after=after, drop=drop))

    def refuse_capacity(self, times: int = 1, type_name: str | None = None) -> None:
        with self._lock:
            self._refusals.append([times, type_name])

    def set_status(self, instance_id: str, status: str | None) -> None:
        assert status is None or status in STATUSES, status
        with self._lock:
            self._instances[instance_id].forced = status

    def add_instance(self, *, type_name: str = "gpu_1x_a10", region: str = "us-east-1",
                     tags: list[dict[str, str]] | None = None, name: str | None = None) -> str:
        with self._lock:
            inst = _Instance(id=uuid.uuid4().hex, name=name, type_name=type_name, region=region,
                             ssh_key_names=sorted(self.ssh_keys)[:1], tags=list(tags or []), created=time.monotonic())
            self._instances[inst.id] = inst
            return inst.id

    # -- views ------------------------------------------------------------------------------------
    def instance(self, instance_id: str) -> dict[str, Any]:
        with self._lock:
            return self._view(self._instances[instance_id])

    def instances(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._view(i) for i in self._instances.values()]

    def live_instances(self) -> list[dict[str, Any]]:
        return [i for i in self.instances() if i["status"] != "terminated"]

    def live_for(self, job_id: str) -> list[dict[str, Any]]:
        return [i for i in self.live_instances()
                if {"key": "overnight-job", "value": job_id} in (i.get("tags") or [])]

    def launch_bodies(self) -> list[Any]:
        with self._lock:
            return [r.body for r in self.requests if r.method == "POST" and r.path == "/instance-operations/launch"]

    # -- the model ------------------------------------------------------------------------------
    def _status(self, inst: _Instance, now: float) -> str:
        if inst.terminate_at is not None:
            return "terminated" if now >= inst.terminate_at + self.terminate_s else "terminating"
        if inst.forced:
            return inst.forced
        return "active" if now >= inst.created + self.boot_s else "booting"

    def _view(self, inst: _Instance) -> dict[str, Any]:
        now = time.monotonic()
        status = self._status(inst, now)
        t = self.instance_types.get(inst.type_name) or instance_type(inst.type_name, inst.type_name, "", 0, 0)
        out: dict[str, Any] = {
            "id": inst.id, "status": status, "ssh_key_names": list(inst.ssh_key_names), "file_system_names": [],
            "region": {"name": inst.region, "description": REGIONS.get(inst.region, inst.region)},
            "instance_type": copy.deepcopy(t), "hostname": inst.hostname or f"{inst.id[:12]}.lambda.fake",
            "jupyter_token": uuid.uuid5(uuid.NAMESPACE_OID, inst.id).hex, "tags": copy.deepcopy(inst.tags),
            "firewall_rulesets": [], "is_reserved": False,
            "actions": {a: {"available": status == "active"} for a in ("migrate", "rebuild", "restart",
                                                                          "cold_reboot")}
            | {"terminate": {"available": status not in ("terminating", "terminated")}},
        }
        if inst.name is not None:
            out["name"] = inst.name
        booted = status in ("active", "unhealthy", "terminating", "preempted") and \
            now >= inst.created + self.boot_s + self.ip_delay_s
        if booted:
            out["ip"] = self.instance_ip
            out["private_ip"] = "10.0.0." + str(int(inst.id[:2], 16) % 250 + 2)
            out["jupyter_url"] = f"https://jupyter-{inst.id[:12]}.lambdaspaces.fake"
        return out | inst.extra

    def _live_count(self) -> int:
        now = time.monotonic()
        return sum(1 for i in self._instances.values() if self._status(i, now) != "terminated")

    # -- requests -------------------------------------------------------------------------------
    def _fault(self, method: str, path: str) -> _Fault | None:
        return take_fault(self._faults, method, path)

    def handle(self, method: str, path: str, body: Any, auth: str | None) -> tuple[int, Any, dict[str, str]]:
        """One request: (status, JSON body, headers); ``(-1, None, {})`` drops the connection."""
        with self._lock:
            rec = Recorded(method=method, path=path, body=copy.deepcopy(body), at=time.monotonic())
            self.requests.append(rec)
            if method == "POST" and path == "/instance-operations/launch":
                self.launch_times.append(rec.at)
            if self.down:
                rec.status = -1
                return -1, None, {}
            try:
                if not self._authorized(auth):
                    raise _ApiError(401, "global/invalid-api-key", "API key was invalid, expired, or deleted.",
                                    "Check your API key or create a new one, then try again.")
                fault = self._fault(method, path)
                if fault is not None and not fault.after:
                    raise fault_error(fault)
                status, data = self._route(method, path, body)
                if fault is not None:
                    raise fault_error(fault)
                rec.status = status
                return status, {"data": data}, {}
            except _ApiError as exc:
                rec.status = -1 if getattr(exc, "drop", False) else exc.status
                if getattr(exc, "drop", False):
                    return -1, None, {}
                err: dict[str, Any] = {"code": exc.code, "message": exc.message}
                if exc.suggestion:
                    err["suggestion"] = exc.suggestion
                headers = {}
                if getattr(exc, "retry_after", None) is not None:
                    headers["Retry-After"] = f"{exc.retry_after:g}"  # type: ignore[attr-defined]
                return exc.status, {"error": err}, headers

    def _authorized(self, auth: str | None) -> bool:
        if not auth:
            return False
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip() == self.api_key
        if scheme.lower() == "basic":
            try:
                user, _, _pw = base64.b64decode(value.strip()).decode().partition(":")
            except ValueError:
                return False
            return user == self.api_key
        return False

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/instance-types":
            return 200, {name: {"instance_type": copy.deepcopy(t), "regions_with_capacity_available": [
                {"name": r, "description": REGIONS.get(r, r)} for r in self.capacity.get(name, [])]}
                for name, t in self.instance_types.items()}
        if method == "GET" and path == "/instances":
            return 200, [v for v in (self._view(i) for i in self._instances.values()) if v["status"] != "terminated"]
        m = re.fullmatch(r"/instances/([^/]+)", path)
        if method == "GET" and m:
            inst = self._instances.get(m.group(1))
            if inst is None or (self.forget_terminated and self._status(inst, time.monotonic()) == "terminated"):
                raise _not_found()
            return 200, self._view(inst)
        if method == "POST" and path == "/instance-operations/launch":
            return 200, self._launch(body)
        if method == "POST" and path == "/instance-operations/terminate":
            return 200, self._terminate(body)
        raise _ApiError(404, "global/object-does-not-exist", f"no route {method} {path} in the fake")

    def _launch(self, body: Any) -> dict[str, Any]:
        if self.account_inactive:
            raise _ApiError(403, "global/account-inactive", "Your account is inactive.",
                            "Make sure you have verified your email address and have a valid payment method.")
        bad = _invalid_launch(body)
        if bad:
            raise _ApiError(400, "global/invalid-parameters", f"Invalid request data: {bad}")
        tname, region = body["instance_type_name"], body["region_name"]
        if tname not in self.instance_types:
            raise _ApiError(404, "global/object-does-not-exist", "Specified instance type does not exist.")
        if region not in REGIONS:
            raise _ApiError(404, "global/object-does-not-exist", "Specified region does not exist.")
        if body["ssh_key_names"][0] not in self.ssh_keys:
            raise _ApiError(404, "global/object-does-not-exist", "Specified SSH key does not exist.")
        if self.quota is not None and self._live_count() >= self.quota:
            raise _ApiError(400, "global/quota-exceeded", "Quota exceeded.",
                            "Contact Support to increase your quota.")
        for r in self._refusals:
            if r[0] > 0 and (r[1] is None or r[1] == tname):
                r[0] -= 1
                raise _insufficient()
        if region not in self.capacity.get(tname, []):
            raise _insufficient()
        inst = _Instance(id=uuid.uuid4().hex, name=body.get("name"), type_name=tname, region=region,
                         ssh_key_names=list(body["ssh_key_names"]), tags=copy.deepcopy(body.get("tags") or []),
                         created=time.monotonic(), hostname=body.get("hostname"))
        self._instances[inst.id] = inst
        return {"instance_ids": [inst.id]}

    def _terminate(self, body: Any) -> dict[str, Any]:
        ids = body.get("instance_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids) or set(body) - {
                "instance_ids"}:
            raise _ApiError(400, "global/invalid-parameters", "Invalid request data: instance_ids")
        self.terminate_calls.append(list(ids))
        now = time.monotonic()
        for i in ids:
            inst = self._instances.get(i)
            if inst is None or self._status(inst, now) == "terminated":
                raise _not_found()
        out = []
        for i in ids:
            inst = self._instances[i]
            if inst.terminate_at is None:
                inst.terminate_at = now
            v = self._view(inst)
            if v["status"] == "terminated":  # terminate_s == 0: still answered "terminating" (as Lambda does)
                v["status"] = "terminating"
            out.append(v)
        return {"terminated_instances": out}


def fault_error(f: _Fault) -> _ApiError:
    exc = _ApiError(f.status, f.code, f.message)
    exc.retry_after = f.retry_after  # type: ignore[attr-defined]
    exc.drop = f.drop  # type: ignore[attr-defined]
    return exc


def _not_found() -> _ApiError:
    return _ApiError(404, "global/object-does-not-exist", "Specified instance does not exist.")


def _insufficient() -> _ApiError:
    return _ApiError(400, "instance-operations/launch/insufficient-capacity",
                     "Not enough capacity to fulfill launch request.",
                     "Choose an instance type with more availability, or try again later.")


def _invalid_launch(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body is not an object"
    unknown = set(body) - LAUNCH_FIELDS
    if unknown:
        return f"unknown field(s) {sorted(unknown)}"
    for f in ("region_name", "instance_type_name"):
        if not isinstance(body.get(f), str) or not body[f]:
            return f"{f} is required"
    keys = body.get("ssh_key_names")
    if not isinstance(keys, list) or len(keys) != 1 or not isinstance(keys[0], str):
        return "ssh_key_names: exactly one SSH key must be specified"
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 64):
        return "name: at most 64 characters"
    tags = body.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(
            isinstance(t, dict) and set(t) == {"key", "value"} and all(isinstance(v, str) for v in t.values())
            for t in tags)):
        return "tags: a list of {key, value} strings"
    return None


class _Handler(BaseHTTPRequestHandler):
    server: FakeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self, method: str) -> None:
        prefix = "/api/v1"
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not path.startswith(prefix + "/"):
            status, payload, headers = 404, {"error": {"code": "global/object-does-not-exist",
                                                       "message": f"not under {prefix}"}}, {}
        else:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                status, payload, headers = 400, {"error": {"code": "global/invalid-parameters",
                                                           "message": "Invalid request data: not JSON"}}, {}
            else:
                status, payload, headers = self.server.fake.handle(method, path[len(prefix):].rstrip("/") or "/",
                                                                   body, self.headers.get("Authorization"))
        if status < 0:  # dropped: no answer at all
            self.close_connection = True
            return
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")


FakeLambdaCloud.handler = _Handler
FakeLambdaCloud.thread_name = "fake-lambda-cloud"
