"""A fake Kubernetes API server for tests: real HTTP on 127.0.0.1, the real API's shapes.

Why a fake and not mocks: overnight's Kubernetes code runs the real
``kubernetes_asyncio`` client (config loading, auth headers, URL building,
aiohttp streaming) against this server, so what the tests exercise is what
talks to a cluster. It runs in a background thread, so an in-process async
test and a subprocess (``overnight serve`` given :meth:`write_kubeconfig`)
can share one.

What it serves, for Jobs (batch/v1), Pods, Services, ConfigMaps (v1) and
Deployments (apps/v1), per namespace:

- create (409 ``AlreadyExists``; 422 ``Invalid`` for bad names/labels), get
  (404 ``NotFound``), list with ``labelSelector`` (``k=v``, ``k==v``,
  ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``) and
  ``fieldSelector`` (``metadata.name``, ``metadata.namespace``, and
  ``status.phase`` for pods), the list carrying ``metadata.resourceVersion``;
- watch (``?watch=1&resourceVersion=&timeoutSeconds=&allowWatchBookmarks=``):
  newline-delimited JSON events from a bounded history; a resourceVersion
  older than the history gets HTTP 200 and one ``ERROR`` event whose object is
  a ``Status`` with code 410 / reason ``Expired`` (what the real server sends),
  or an HTTP 410 when ``expired_as_http`` is set; an object that stops (starts)
  matching the selector is sent as DELETED (ADDED), as the watch cache does;
- merge-patch and strategic-merge-patch (maps merged, ``conditions`` and
  container/env/volume lists merged by key, ``finalizers`` unioned with
  ``$deleteFromPrimitiveList``), ``metadata.resourceVersion`` in a patch as a
  precondition (409 ``Conflict``), the ``/status`` subresource (only status
  changes; the main resource ignores status changes), no-op patches write
  nothing;
- delete with ``propagationPolicy`` (body ``DeleteOptions`` or query):
  Background/Foreground delete dependents (``ownerReferences`` and, for a
  Job, pods labelled with its controller-uid / job-name), Orphan strips the
  owner reference; a Job's default is Orphan, like batch/v1's; finalizers keep
  an object (with ``deletionTimestamp``) until they are patched away;
  ``preconditions.uid``; every deletion is recorded (:attr:`deletions`);
- ``pods/{name}/log`` returning the text set with :meth:`set_log`.

Every write takes the next value of one global resourceVersion counter, and
sets ``uid``, ``creationTimestamp`` and ``generation`` (bumped on spec
changes). Errors are ``Status`` objects with ``kind: Status``, ``reason`` and
``code`` as the real server sends them. Discovery (``/api``, ``/apis``) is not
served: :attr:`requests` lets a test assert the client never asked.

Not modelled: controllers (nothing creates a Job's pods unless a test calls
:meth:`add_job_pod`), pagination (``limit`` is ignored), server-side apply,
JSON patch, PUT.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import ipaddress
import re
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson
import yaml

# ---------------------------------------------------------------------------
# resources


@dataclass(frozen=True)
class Resource:
    """One served resource type."""

    kind: str
    plural: str
    api_version: str
    has_status: bool
    has_generation: bool
    dns1035_name: bool = False  # Services: names must be DNS-1035 labels

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"

    @property
    def qualified(self) -> str:
        """``jobs.batch`` / ``pods``: how the server names the resource in messages."""
        group = self.group.split(".")[0] if self.group else ""
        return f"{self.plural}.{group}" if group else self.plural


RESOURCES: tuple[Resource, ...] = (
    Resource("Job", "jobs", "batch/v1", has_status=True, has_generation=True),
    Resource("Pod", "pods", "v1", has_status=True, has_generation=True),
    Resource("Deployment", "deployments", "apps/v1", has_status=True, has_generation=True),
    Resource("Service", "services", "v1", has_status=True, has_generation=False, dns1035_name=True),
    Resource("ConfigMap", "configmaps", "v1", has_status=False, has_generation=False),
)
_BY_KIND = {r.kind: r for r in RESOURCES}
_BY_ROUTE = {(r.prefix, r.plural): r for r in RESOURCES}


def resource(kind: str) -> Resource:
    """The resource for a kind (``Job``) or plural (``jobs``)."""
    for r in RESOURCES:
        if kind in (r.kind, r.plural) or kind.lower() in (r.kind.lower(), r.plural):
            return r
    raise KeyError(f"the fake API server does not serve {kind!r}")


# ---------------------------------------------------------------------------
# errors as the API sends them


class ApiError(Exception):
    """An error answer: becomes a ``Status`` body with this code and reason."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _details(res: Resource, name: str) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "kind": res.plural}
    if res.group:
        d["group"] = res.group
    return d


def _not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{res.qualified} "{name}" not found', _details(res, name))


def _invalid(res: Resource, name: str, field_path: str, value: Any, why: str) -> ApiError:
    kind = f"{res.kind}.{res.group.split('.')[0]}" if res.group else res.kind
    cause = {"reason": "FieldValueInvalid", "message": f"Invalid value: {value!r}: {why}", "field": field_path}
    details = _details(res, name) | {"causes": [cause]}
    return ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {field_path}: Invalid value: {value!r}: {why}', details)


# ---------------------------------------------------------------------------
# selectors


@dataclass(frozen=True)
class Requirement:
    """One clause of a label or field selector."""

    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        return not present or value not in self.values  # "!=", "notin"


_KEY = r"[A-Za-z0-9](?:[-A-Za-z0-9_./]*[A-Za-z0-9])?"
_SET_RE = re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^()]*)\)$")
_EQ_RE = re.compile(rf"^({_KEY})\s*(==|!=|=)\s*([-A-Za-z0-9_.]*)$")
_EXISTS_RE = re.compile(rf"^(!?)\s*({_KEY})$")


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse the selector syntax clients send; ValueError names the bad clause."""
    if not text or not text.strip():
        return []
    out: list[Requirement] = []
    for raw in _split_top(text):
        term = raw.strip()
        if m := _SET_RE.match(term):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            if not values:
                raise ValueError(f"unable to parse requirement: {term!r}: values set can't be empty")
            out.append(Requirement(m.group(1), m.group(2), values))
        elif m := _EQ_RE.match(term):
            op = "!=" if m.group(2) == "!=" else "="
            out.append(Requirement(m.group(1), op, frozenset({m.group(3)})))
        elif m := _EXISTS_RE.match(term):
            out.append(Requirement(m.group(2), "!" if m.group(1) else "exists"))
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")
    return out


_FIELD_RE = re.compile(r"^([a-zA-Z.]+)\s*(==|!=|=)\s*(.*)$")


def parse_field_selector(text: str | None, res: Resource) -> list[Requirement]:
    """Field selectors the fake supports: metadata.name/namespace, and status.phase for pods."""
    if not text or not text.strip():
        return []
    allowed = {"metadata.name", "metadata.namespace"} | ({"status.phase"} if res.kind == "Pod" else set())
    out = []
    for raw in text.split(","):
        m = _FIELD_RE.match(raw.strip())
        if not m:
            raise ValueError(f"invalid selector: {raw!r}; can't understand")
        key, op, value = m.groups()
        if key not in allowed:
            raise ValueError(f'field label not supported: {key}')
        out.append(Requirement(key, "!=" if op == "!=" else "=", frozenset({value})))
    return out


def _field_values(obj: Mapping[str, Any]) -> dict[str, str]:
    md = obj.get("metadata") or {}
    out = {"metadata.name": md.get("name", ""), "metadata.namespace": md.get("namespace", "")}
    phase = (obj.get("status") or {}).get("phase")
    if phase is not None:
        out["status.phase"] = phase
    return out


@dataclass(frozen=True)
class Selector:
    labels: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()

    def matches(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        fields = _field_values(obj) if self.fields else {}
        return all(r.matches(fields) for r in self.fields)


# ---------------------------------------------------------------------------
# validation


_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_DNS1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ANNOTATIONS_LIMIT = 256 * 1024


def _validate(res: Resource, obj: dict) -> None:
    md = obj["metadata"]
    name = md["name"]
    if res.dns1035_name:
        if len(name) > 63 or not _DNS1035_RE.match(name):
            raise _invalid(res, name, "metadata.name", name, "a DNS-1035 label must consist of lower case "
                           "alphanumeric characters or '-', start with an alphabetic character, and end with an "
                           "alphanumeric character (at most 63 characters)")
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN_RE.match(name):
        raise _invalid(res, name, "metadata.name", name, "a lowercase RFC 1123 subdomain must consist of lower "
                       "case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character")
    if res.kind == "Job" and len(name) > 63:
        raise _invalid(res, name, "metadata.name", name, "must be no more than 63 characters")
    for key, value in (md.get("labels") or {}).items():
        prefix, _, short = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN_RE.match(prefix))) or len(short) > 63 or not _LABEL_NAME_RE.match(short):
            raise _invalid(res, name, "metadata.labels", key, "name part must consist of alphanumeric characters, "
                           "'-', '_' or '.' (at most 63), with an optional DNS subdomain prefix")
        if not isinstance(value, str):
            raise ApiError(400, "BadRequest", f"label {key!r}: value must be a string")
        if len(value) > 63:
            raise _invalid(res, name, "metadata.labels", value, "must be no more than 63 characters")
        if value and not _LABEL_NAME_RE.match(value):
            raise _invalid(res, name, "metadata.labels", value, "a valid label must be an empty string or consist "
                           "of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")
    annotations = md.get("annotations") or {}
    if any(not isinstance(v, str) for v in annotations.values()):
        raise ApiError(400, "BadRequest", "annotation values must be strings")
    size = sum(len(k) + len(v) for k, v in annotations.items())
    if size > _ANNOTATIONS_LIMIT:
        raise _invalid(res, name, "metadata.annotations", "<omitted>", f"may not be more than {_ANNOTATIONS_LIMIT} bytes")


# ---------------------------------------------------------------------------
# patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


#: lists the real server merges by a key under strategic merge patch (the ones overnight touches)
_SMP_MERGE_KEYS = {
    "conditions": "type",
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}
#: primitive lists with patchStrategy=merge (union)
_SMP_SET_LISTS = {"finalizers"}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch, good enough for labels, status and the lists above."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    deletes: list[tuple[str, list]] = []
    for key, value in patch.items():
        if key == "$patch":
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            deletes.append((key.split("/", 1)[1], value))
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in _SMP_MERGE_KEYS and all(isinstance(i, dict) for i in value):
            result[key] = _merge_list(result.get(key) or [], value, _SMP_MERGE_KEYS[key])
        elif isinstance(value, list) and key in _SMP_SET_LISTS:
            current = list(result.get(key) or [])
            result[key] = current + [v for v in value if v not in current]
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    for key, values in deletes:
        result[key] = [v for v in result.get(key) or [] if v not in values]
    return result


def _merge_list(current: list, patch: list, key: str) -> list:
    out = [copy.deepcopy(i) for i in current]
    for item in patch:
        idx = next((n for n, c in enumerate(out) if isinstance(c, dict) and c.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
        elif idx is None:
            out.append({k: copy.deepcopy(v) for k, v in item.items() if k != "$patch"})
        else:
            out[idx] = strategic_merge_patch(out[idx], item)
    return out


_PATCHERS = {
    "application/merge-patch+json": merge_patch,
    "application/strategic-merge-patch+json": strategic_merge_patch,
}


# ---------------------------------------------------------------------------
# the store


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    authorization: str | None
    body: bytes


@dataclass(frozen=True)
class Deletion:
    """One DELETE: the policy the client asked for (None = server default) and the one applied."""

    kind: str
    namespace: str
    name: str
    policy: str | None
    effective: str


@dataclass
class _Fault:
    status: int
    times: int
    method: str | None
    path_contains: str | None
    retry_after: int | None
    message: str
    watch: bool | None
    after_apply: bool


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    res: Resource
    namespace: str
    obj: dict
    prev: dict | None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


class FakeApiServer:
    """The fake API server. Use as a context manager or call :meth:`start`/:meth:`stop`.

    ``history`` bounds the watch history (older resourceVersions get 410);
    ``token`` makes every request need ``Authorization: Bearer <token>``;
    ``tls`` serves HTTPS with a fresh CA (:attr:`ca_path`);
    ``bookmark_interval_s`` paces BOOKMARK events on watches that allow them;
    ``watch_timeout_cap_s`` caps every watch like the server's request timeout;
    ``pod_grace_s`` > 0 keeps deleted pods (with ``deletionTimestamp``) that
    long, as a kubelet's graceful termination does.
    """

    def __init__(
        self,
        *,
        history: int = 1000,
        token: str | None = None,
        tls: bool = False,
        bookmark_interval_s: float = 60.0,
        watch_timeout_cap_s: float = 1800.0,
        pod_grace_s: float = 0.0,
        expired_as_http: bool = False,
    ) -> None:
        self.token = token
        self.tls = tls
        self.bookmark_interval_s = bookmark_interval_s
        self.watch_timeout_cap_s = watch_timeout_cap_s
        self.pod_grace_s = pod_grace_s
        self.expired_as_http = expired_as_http
        self._cond = threading.Condition(threading.RLock())
        self._objects: dict[tuple[str, str, str], dict] = {}  # (plural, ns, name) -> object
        self._rv = 0
        self._history: deque[_Event] = deque(maxlen=max(history, 1))
        self._compacted_rv = 0  # watches from an older RV get 410
        self._requests: list[RecordedRequest] = []
        self._deletions: list[Deletion] = []
        self._logs: dict[tuple[str, str, str | None], str] = {}
        self._faults: list[_Fault] = []
        self._pending_policy: dict[str, str] = {}  # uid -> propagation to apply when finally removed
        self._watch_epoch = 0
        self._bookmark_epoch = 0
        self._closing = False
        self._open_watches = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-apiserver-")
        self.ca_path: Path | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timers: list[threading.Timer] = []

    # ---- lifecycle ----------------------------------------------------------

    def start(self) -> FakeApiServer:
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        if self.tls:
            httpd.ssl_context = self._make_tls()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            timers, self._timers = self._timers, []
        for t in timers:
            t.cancel()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_connections()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._tmp.cleanup()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() the server first"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _make_tls(self) -> ssl.SSLContext:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = dt.datetime.now(dt.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-apiserver-ca")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
            # As a cluster's CA signs (Python 3.13 verifies strictly: no AKI, no trust).
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        d = Path(self._tmp.name)
        self.ca_path = d / "ca.crt"
        self.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        (d / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "server.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(d / "server.crt", d / "server.key")
        return ctx

    def write_kubeconfig(
        self, path: str | Path, *, namespace: str = "default", context: str = "fake", token: str | None = None
    ) -> Path:
        """A kubeconfig file that points at this server (with its CA and token when set)."""
        cluster: dict[str, Any] = {"server": self.url}
        if self.ca_path is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_path.read_bytes()).decode()
        user: dict[str, Any] = {}
        if (token := token or self.token) is not None:
            user["token"] = token
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake-cluster", "cluster": cluster}],
            "users": [{"name": "fake-user", "user": user}],
            "contexts": [{"name": context, "context": {"cluster": "fake-cluster", "user": "fake-user",
                                                       "namespace": namespace}}],
            "current-context": context,
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config))
        return path

    # ---- the test API (thread-safe) ----------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    @property
    def deletions(self) -> list[Deletion]:
        with self._cond:
            return list(self._deletions)

    def create(self, obj: Mapping[str, Any], *, keep_status: bool = True) -> dict:
        """Create an object as a controller would (status kept unless told otherwise)."""
        res = resource(obj["kind"])
        ns = (obj.get("metadata") or {}).get("namespace") or "default"
        with self._cond:
            return copy.deepcopy(self._create(res, ns, copy.deepcopy(dict(obj)), keep_status=keep_status))

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._cond:
            obj = self._objects.get((resource(kind).plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind: str, namespace: str | None = None, selector: str | Mapping[str, str] | None = None) -> list[dict]:
        """Objects of a kind (in a namespace, matching a label selector string or an equality dict)."""
        if isinstance(selector, Mapping):
            selector = ",".join(f"{k}={v}" for k, v in selector.items())
        sel = Selector(tuple(parse_label_selector(selector)))
        res = resource(kind)
        with self._cond:
            return [copy.deepcopy(o) for (p, ns, _), o in sorted(self._objects.items())
                    if p == res.plural and (namespace is None or ns == namespace) and sel.matches(o)]

    def set_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any], *, merge: bool = False) -> dict:
        """Replace (or merge-patch) an object's status, as its controller would."""
        res = resource(kind)
        with self._cond:
            obj = self._require(res, namespace, name)
            new = copy.deepcopy(obj)
            new["status"] = merge_patch(obj.get("status") or {}, dict(status)) if merge else copy.deepcopy(dict(status))
            return copy.deepcopy(self._write(res, namespace, new, prev=obj))

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict:
        """Merge-patch an object (metadata/spec; status too), bypassing the subresource rules."""
        res = resource(kind)
        with self._cond:
            obj = self._require(res, namespace, name)
            new = merge_patch(obj, dict(patch))
            written = self._write(res, namespace, new, prev=obj)
            self._maybe_finish_deletion(res, namespace, written)
            return copy.deepcopy(written)

    def remove_finalizers(self, kind: str, namespace: str, name: str) -> None:
        """Drop every finalizer (an object being deleted then goes away)."""
        self.patch(kind, namespace, name, {"metadata": {"finalizers": None}})

    def delete(self, kind: str, namespace: str, name: str, propagation: str | None = "Background") -> None:
        with self._cond:
            self._delete(resource(kind), namespace, name, {"propagationPolicy": propagation} if propagation else {})

    def add_job_pod(self, namespace: str, job_name: str, *, phase: str = "Running", index: int | None = None,
                    containers: tuple[str, ...] = ("worker",)) -> dict:
        """A pod as the Job controller would make it (labels, ownerReference), for tests of owners."""
        with self._cond:
            job = self._require(resource("Job"), namespace, job_name)
            labels = dict(((job.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {})
            suffix = uuid.uuid4().hex[:5]
            annotations = {}
            if index is not None:
                labels["batch.kubernetes.io/job-completion-index"] = str(index)
                annotations["batch.kubernetes.io/job-completion-index"] = str(index)
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{job_name}-{index if index is not None else ''}{'-' if index is not None else ''}{suffix}",
                    "namespace": namespace,
                    "labels": labels,
                    "annotations": annotations,
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                         "uid": job["metadata"]["uid"], "controller": True,
                                         "blockOwnerDeletion": True}],
                },
                "spec": {"restartPolicy": "Never", "containers": [{"name": c, "image": "x"} for c in containers]},
                "status": {"phase": phase},
            }
            return copy.deepcopy(self._create(resource("Pod"), namespace, pod, keep_status=True))

    def set_log(self, namespace: str, pod: str, text: str, container: str | None = None) -> None:
        with self._cond:
            self._logs[(namespace, pod, container)] = text

    def compact(self, keep: int = 0) -> None:
        """Forget all but the last ``keep`` events: watches from older resourceVersions get 410."""
        with self._cond:
            while len(self._history) > keep:
                self._compacted_rv = self._history.popleft().rv
            if not self._history:
                self._compacted_rv = self._rv
            self._cond.notify_all()

    def expire_history(self) -> None:
        """Every resourceVersion before now is too old (the next watch from one gets 410)."""
        self.compact(0)

    def close_watches(self) -> None:
        """End every open watch cleanly, as the server does when a watch times out."""
        with self._cond:
            self._watch_epoch += 1
            self._cond.notify_all()

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK now on every watch that allows them."""
        with self._cond:
            self._bookmark_epoch += 1
            self._cond.notify_all()

    def fail_next(
        self,
        status: int = 500,
        times: int = 1,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        retry_after: int | None = None,
        message: str = "injected fault",
        watch: bool | None = None,
        after_apply: bool = False,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (0: drop the connection unanswered).

        ``watch`` True/False limits the fault to watch / non-watch requests;
        ``after_apply`` carries the request out first and then answers the
        fault (a lost answer: the create or delete did happen).
        """
        with self._cond:
            self._faults.append(_Fault(status, times, method, path_contains, retry_after, message, watch, after_apply))

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def watches_open(self) -> int:
        """Watch streams being served (one whose client left counts until the server next writes to it)."""
        with self._cond:
            return self._open_watches

    def atomically(self) -> threading.Condition:
        """``with fake.atomically():`` no watch delivers anything until the block ends.

        Test API calls made inside are applied together, e.g. close the watches,
        change objects and expire the history, so a client's next watch starts
        from a resourceVersion the server has forgotten.
        """
        return self._cond

    # ---- internals (callers hold self._cond) --------------------------------

    def _require(self, res: Resource, ns: str, name: str) -> dict:
        obj = self._objects.get((res.plural, ns, name))
        if obj is None:
            raise _not_found(res, name)
        return obj

    def _record(self, ev_type: str, res: Resource, ns: str, obj: dict, prev: dict | None) -> None:
        if len(self._history) == self._history.maxlen:
            self._compacted_rv = self._history[0].rv
        self._history.append(_Event(self._rv, ev_type, res, ns, copy.deepcopy(obj), copy.deepcopy(prev)))
        self._cond.notify_all()

    def _write(self, res: Resource, ns: str, obj: dict, *, prev: dict | None) -> dict:
        """Store a new version of an object (ADDED when prev is None)."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[(res.plural, ns, obj["metadata"]["name"])] = obj
        self._record("ADDED" if prev is None else "MODIFIED", res, ns, obj, prev)
        return obj

    def _create(self, res: Resource, ns: str, obj: dict, *, keep_status: bool) -> dict:
        if obj.get("kind") not in (None, res.kind) or obj.get("apiVersion") not in (None, res.api_version):
            raise ApiError(400, "BadRequest", f"the API version in the data ({obj.get('apiVersion')}) does not match "
                           f"the expected API version ({res.api_version}) or kind ({obj.get('kind')} != {res.kind})")
        md = obj.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if md.get("namespace") not in (None, "", ns):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                           "sent on the request")
        if not md.get("name"):
            if md.get("generateName"):
                md["name"] = md["generateName"] + uuid.uuid4().hex[:5]
            else:
                raise ApiError(422, "Invalid", f"{res.kind} \"\" is invalid: metadata.name: Required value: name or "
                               "generateName is required",
                               {"kind": res.plural, "causes": [{"reason": "FieldValueRequired",
                                                                 "message": "Required value: name or generateName is required",
                                                                 "field": "metadata.name"}]})
        _validate(res, obj)
        if (res.plural, ns, md["name"]) in self._objects:
            raise ApiError(409, "AlreadyExists", f'{res.qualified} "{md["name"]}" already exists',
                           _details(res, md["name"]))
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        md["namespace"] = ns
        md["uid"] = str(uuid.uuid4())
        md["creationTimestamp"] = _now()
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            md.pop(k, None)
        if res.has_generation:
            md["generation"] = 1
        else:
            md.pop("generation", None)
        if res.has_status and (not keep_status or "status" not in obj):
            obj["status"] = {"phase": "Pending"} if res.kind == "Pod" else ({"loadBalancer": {}} if res.kind == "Service" else {})
        if res.kind == "Job":
            self._default_job(obj)
        elif res.kind == "Deployment":
            obj.setdefault("spec", {}).setdefault("replicas", 1)
        return self._write(res, ns, obj, prev=None)

    @staticmethod
    def _default_job(job: dict) -> None:
        """What the API server adds to a Job: selector + pod labels from its uid, and spec defaults."""
        md, spec = job["metadata"], job.setdefault("spec", {})
        uid, name = md["uid"], md["name"]
        if not spec.get("manualSelector"):
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            tmd = spec.setdefault("template", {}).setdefault("metadata", {})
            tmd["labels"] = {**(tmd.get("labels") or {}), "batch.kubernetes.io/controller-uid": uid,
                             "batch.kubernetes.io/job-name": name, "controller-uid": uid, "job-name": name}
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", 1 if spec.get("completionMode") != "Indexed" else spec["parallelism"])
        spec.setdefault("backoffLimit", 2147483647 if "backoffLimitPerIndex" in spec else 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)

    def _patch(self, res: Resource, ns: str, name: str, patch: Any, content_type: str, *, status: bool) -> dict:
        patcher = _PATCHERS.get(content_type)
        if patcher is None:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted "
                           f"media types include: {', '.join(_PATCHERS)}")
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        obj = self._require(res, ns, name)
        want_rv = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch.get("metadata"), dict) else None
        if want_rv is not None and str(want_rv) != obj["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.qualified} "{name}": the object has '
                           "been modified; please apply your changes to the latest version and try again",
                           _details(res, name))
        patched = patcher(obj, patch)
        if not isinstance(patched.get("metadata"), dict) or patched["metadata"].get("name") != name:
            raise _invalid(res, name, "metadata.name", (patched.get("metadata") or {}).get("name"), "field is immutable")
        if status:
            new = copy.deepcopy(obj)
            new["status"] = patched.get("status") or {}
        else:
            new = patched
            for key in ("uid", "creationTimestamp", "namespace", "deletionTimestamp", "generation", "resourceVersion"):
                if key in obj["metadata"]:
                    new["metadata"][key] = obj["metadata"][key]
                else:
                    new["metadata"].pop(key, None)
            new["kind"], new["apiVersion"] = res.kind, res.api_version
            if res.has_status:
                if "status" in obj:
                    new["status"] = copy.deepcopy(obj["status"])
                else:
                    new.pop("status", None)
            _validate(res, new)
            if res.has_generation and new.get("spec") != obj.get("spec"):
                new["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
        if new == obj:
            return obj  # nothing changed: no new resourceVersion, no event
        written = self._write(res, ns, new, prev=obj)
        return self._maybe_finish_deletion(res, ns, written) or written

    def _maybe_finish_deletion(self, res: Resource, ns: str, obj: dict) -> dict | None:
        """An object being deleted goes once its last finalizer is gone. Returns it if it stays."""
        md = obj["metadata"]
        if md.get("deletionTimestamp") and not md.get("finalizers"):
            self._remove(res, ns, md["name"])
            return None
        return obj

    def _delete(self, res: Resource, ns: str, name: str, options: Mapping[str, Any], *, record: bool = True) -> dict:
        """A deletion; ``record`` False for the garbage collector's own (not in :attr:`deletions`)."""
        obj = self._require(res, ns, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
            raise ApiError(409, "Conflict", f"Operation cannot be fulfilled on {res.qualified} \"{name}\": Precondition "
                           f"failed: UID in precondition: {pre['uid']}, UID in object meta: {obj['metadata']['uid']}",
                           _details(res, name))
        if pre.get("resourceVersion") and str(pre["resourceVersion"]) != obj["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f"Operation cannot be fulfilled on {res.qualified} \"{name}\": Precondition "
                           f"failed: ResourceVersion in precondition: {pre['resourceVersion']}, ResourceVersion in "
                           f"object meta: {obj['metadata']['resourceVersion']}", _details(res, name))
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        if policy not in (None, "Background", "Foreground", "Orphan"):
            raise ApiError(400, "BadRequest", f"propagationPolicy: Unsupported value: {policy!r}: supported values: "
                           '"Foreground", "Background", "Orphan"')
        effective = policy or ("Orphan" if res.kind == "Job" else "Background")
        if record:
            self._deletions.append(Deletion(res.kind, ns, name, policy, effective))
        uid = obj["metadata"]["uid"]
        if obj["metadata"].get("deletionTimestamp"):
            return copy.deepcopy(obj)  # already being deleted
        self._pending_policy[uid] = effective
        finalizers = list(obj["metadata"].get("finalizers") or [])
        if effective == "Foreground" and self._dependents(res, obj):
            finalizers.append("foregroundDeletion")
        grace = self.pod_grace_s if res.kind == "Pod" else 0
        if not finalizers and grace <= 0:
            self._remove(res, ns, name)
            return self._success(res, name, uid)
        new = copy.deepcopy(obj)
        if finalizers:
            new["metadata"]["finalizers"] = finalizers
        new["metadata"]["deletionTimestamp"] = _now()
        new["metadata"]["deletionGracePeriodSeconds"] = int(grace)
        self._write(res, ns, new, prev=obj)
        if "foregroundDeletion" in finalizers:
            for dres, dns, dname in self._dependents(res, obj):
                if not self._objects[(dres.plural, dns, dname)]["metadata"].get("deletionTimestamp"):
                    self._delete(dres, dns, dname, {"propagationPolicy": "Background"}, record=False)
            self._finish_foreground()
        if grace > 0 and not finalizers:
            timer = threading.Timer(grace, self._grace_expired, (res, ns, name, uid))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        current = self._objects.get((res.plural, ns, name))
        return copy.deepcopy(current) if current is not None else self._success(res, name, uid)

    def _grace_expired(self, res: Resource, ns: str, name: str, uid: str) -> None:
        with self._cond:
            obj = self._objects.get((res.plural, ns, name))
            if obj is not None and obj["metadata"]["uid"] == uid and not obj["metadata"].get("finalizers"):
                self._remove(res, ns, name)

    @staticmethod
    def _success(res: Resource, name: str, uid: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": _details(res, name) | {"uid": uid}}

    def _remove(self, res: Resource, ns: str, name: str) -> None:
        obj = self._objects.pop((res.plural, ns, name))
        self._rv += 1
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._record("DELETED", res, ns, gone, obj)
        policy = self._pending_policy.pop(obj["metadata"]["uid"], "Background")
        for dres, dns, dname in self._dependents(res, obj):
            dep = self._objects.get((dres.plural, dns, dname))
            if dep is None:
                continue
            if policy == "Orphan":
                refs = [r for r in dep["metadata"].get("ownerReferences") or [] if r.get("uid") != obj["metadata"]["uid"]]
                new = copy.deepcopy(dep)
                if refs:
                    new["metadata"]["ownerReferences"] = refs
                else:
                    new["metadata"].pop("ownerReferences", None)
                if new != dep:
                    self._write(dres, dns, new, prev=dep)
            elif not dep["metadata"].get("deletionTimestamp"):
                self._delete(dres, dns, dname, {"propagationPolicy": "Background"}, record=False)
        self._finish_foreground()

    def _finish_foreground(self) -> None:
        """Owners in foreground deletion whose dependents are all gone lose the finalizer (and go)."""
        for (plural, ns, name), obj in list(self._objects.items()):
            fins = obj["metadata"].get("finalizers") or []
            if "foregroundDeletion" in fins and obj["metadata"].get("deletionTimestamp"):
                res = resource(plural)
                if not self._dependents(res, obj):
                    new = copy.deepcopy(obj)
                    rest = [f for f in fins if f != "foregroundDeletion"]
                    if rest:
                        new["metadata"]["finalizers"] = rest
                    else:
                        new["metadata"].pop("finalizers")
                    written = self._write(res, ns, new, prev=obj)
                    self._maybe_finish_deletion(res, ns, written)

    def _dependents(self, res: Resource, owner: dict) -> list[tuple[Resource, str, str]]:
        """Objects owned by ``owner``: ownerReferences, and a Job's pods by its labels."""
        uid, name, ns = owner["metadata"]["uid"], owner["metadata"]["name"], owner["metadata"]["namespace"]
        out = []
        for (plural, ons, oname), obj in self._objects.items():
            if ons != ns or (plural == res.plural and oname == name):
                continue
            md = obj["metadata"]
            owned = any(r.get("uid") == uid for r in md.get("ownerReferences") or [])
            if not owned and res.kind == "Job" and plural == "pods":
                labels = md.get("labels") or {}
                cuid = labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")
                jname = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
                owned = cuid == uid if cuid else jname == name
            if owned:
                out.append((resource(plural), ons, oname))
        return out

    # ---- HTTP-facing operations (each takes the lock) -----------------------

    def _take_fault(self, method: str, path: str, is_watch: bool) -> _Fault | None:
        with self._cond:
            for fault in self._faults:
                if fault.method and fault.method != method:
                    continue
                if fault.path_contains and fault.path_contains not in path:
                    continue
                if fault.watch is not None and fault.watch != is_watch:
                    continue
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _list(self, res: Resource, ns: str | None, selector: Selector) -> dict:
        with self._cond:
            items = []
            for (plural, ons, _), obj in sorted(self._objects.items()):
                if plural == res.plural and (ns is None or ons == ns) and selector.matches(obj):
                    item = copy.deepcopy(obj)
                    item.pop("kind", None)  # list items come without kind/apiVersion
                    item.pop("apiVersion", None)
                    items.append(item)
            return {"kind": f"{res.kind}List", "apiVersion": res.api_version,
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _open_watch(self, res: Resource, ns: str | None, selector: Selector, query: Mapping[str, str]) -> Iterator[dict]:
        """Validate a watch request (raising ApiError before any byte is sent) and return its event stream."""
        rv_text = query.get("resourceVersion") or ""
        timeout = min(float(query.get("timeoutSeconds") or self.watch_timeout_cap_s), self.watch_timeout_cap_s)
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        with self._cond:
            if rv_text in ("", "0"):
                start = self._rv
                initial = [{"type": "ADDED", "object": copy.deepcopy(o)}
                           for (p, ons, _), o in sorted(self._objects.items())
                           if p == res.plural and (ns is None or ons == ns) and selector.matches(o)]
            else:
                try:
                    start = int(rv_text)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resource version: {rv_text!r}") from None
                initial = []
                if start < self._compacted_rv:
                    expired = ApiError(410, "Expired", f"too old resource version: {start} ({self._compacted_rv + 1})")
                    if self.expired_as_http:
                        raise expired
                    return iter([{"type": "ERROR", "object": expired.status()}])
            epoch = self._watch_epoch
        return self._stream(res, ns, selector, start, initial, timeout, bookmarks, epoch)

    def _stream(self, res: Resource, ns: str | None, selector: Selector, pos: int, initial: list[dict],
                timeout: float, bookmarks: bool, epoch: int) -> Iterator[dict]:
        yield from initial
        deadline = time.monotonic() + timeout
        last_bookmark = time.monotonic()
        with self._cond:
            bookmark_epoch = self._bookmark_epoch
            self._open_watches += 1
        try:
            while True:
                out: list[dict] = []
                with self._cond:
                    while True:
                        if self._closing or self._watch_epoch != epoch or time.monotonic() >= deadline:
                            return
                        if pos < self._compacted_rv:
                            err = ApiError(410, "Expired", f"too old resource version: {pos} ({self._compacted_rv + 1})")
                            out.append({"type": "ERROR", "object": err.status()})
                            break
                        if self._rv > pos:
                            for ev in self._history:
                                if ev.rv > pos and (sent := self._translate(ev, res, ns, selector)) is not None:
                                    out.append(sent)
                            pos = self._rv
                        due = bookmarks and (self._bookmark_epoch != bookmark_epoch
                                             or time.monotonic() - last_bookmark >= self.bookmark_interval_s)
                        if due:
                            bookmark_epoch = self._bookmark_epoch
                            last_bookmark = time.monotonic()
                            out.append({"type": "BOOKMARK", "object": {
                                "kind": res.kind, "apiVersion": res.api_version,
                                "metadata": {"resourceVersion": str(pos)}}})
                        if out:
                            break
                        wait = deadline - time.monotonic()
                        if bookmarks:
                            wait = min(wait, self.bookmark_interval_s - (time.monotonic() - last_bookmark))
                        self._cond.wait(max(0.0, min(wait, 1.0)))
                yield from out
                if out and out[-1]["type"] == "ERROR":
                    return
        finally:
            with self._cond:
                self._open_watches -= 1

    @staticmethod
    def _translate(ev: _Event, res: Resource, ns: str | None, selector: Selector) -> dict | None:
        if ev.res != res or (ns is not None and ev.namespace != ns):
            return None
        now = selector.matches(ev.obj)
        if ev.type == "MODIFIED":
            before = selector.matches(ev.prev)
            if before and not now:
                return {"type": "DELETED", "object": copy.deepcopy(ev.obj)}
            if now and not before:
                return {"type": "ADDED", "object": copy.deepcopy(ev.obj)}
        if ev.type == "DELETED":
            now = selector.matches(ev.prev)
        return {"type": ev.type, "object": copy.deepcopy(ev.obj)} if now else None

    def _log_text(self, ns: str, name: str, query: Mapping[str, str]) -> str:
        with self._cond:
            pod = self._require(resource("Pod"), ns, name)
            containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
            others = [c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []]
            container = query.get("container")
            if container is None:
                if len(containers) != 1:
                    raise ApiError(400, "BadRequest", f"a container name must be specified for pod {name}, choose one "
                                   f"of: [{' '.join(containers)}] or one of the init containers: [{' '.join(others)}]")
                container = containers[0]
            elif container not in containers + others:
                raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
            text = self._logs.get((ns, name, container), self._logs.get((ns, name, None), ""))
        if tail := query.get("tailLines"):
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail):]) if int(tail) > 0 else ""
        return text


# ---------------------------------------------------------------------------
# HTTP


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeApiServer
    ssl_context: ssl.SSLContext | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            request = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_ROUTE_RE = re.compile(
    r"^(?P<prefix>/api/v1|/apis/[a-z0-9.-]+/v[0-9a-z]+)"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>status|log))?)?$"
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # -- plumbing

    _discard = False

    def _send(self, code: int, body: bytes, content_type: str = "application/json", headers: Mapping | None = None) -> None:
        if self._discard:
            return
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, code: int, obj: Any) -> None:
        self._send(code, orjson.dumps(obj))

    def _send_error(self, err: ApiError) -> None:
        self._send(err.code, orjson.dumps(err.status()), headers=err.headers)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _handle(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        path = url.path
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip() or None
        with fake._cond:
            fake._requests.append(RecordedRequest(method, path, query, content_type,
                                                  self.headers.get("Authorization"), body))
        is_watch = method == "GET" and _truthy(query.get("watch"))
        try:
            fault = fake._take_fault(method, path, is_watch)
            if fault is not None and fault.after_apply and not is_watch:
                self._discard = True
                try:
                    self._route(method, path, query, body, content_type, is_watch)
                except ApiError:
                    pass
                finally:
                    self._discard = False
            if fault is not None:
                if fault.status == 0:
                    self.close_connection = True
                    return
                raise ApiError(fault.status, _REASONS.get(fault.status, "InternalError"), fault.message,
                               headers={"Retry-After": fault.retry_after} if fault.retry_after is not None else None)
            if fake.token is not None and self.headers.get("Authorization") != f"Bearer {fake.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            self._route(method, path, query, body, content_type, is_watch)
        except ApiError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes,
               content_type: str | None, is_watch: bool) -> None:
        fake = self.server.fake
        m = _ROUTE_RE.match(path)
        res = _BY_ROUTE.get((m.group("prefix"), m.group("plural"))) if m else None
        if m is None or res is None or (m.group("ns") is None and (m.group("name") or method != "GET")):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        ns, name, sub = unquote(m.group("ns") or "") or None, m.group("name"), m.group("sub")
        if name is not None:
            name = unquote(name)
        if sub == "log" and res.kind != "Pod" or sub == "status" and not res.has_status:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")

        def parsed_body() -> Any:
            try:
                return orjson.loads(body) if body else None
            except orjson.JSONDecodeError as exc:
                raise ApiError(400, "BadRequest", f"error decoding request body: {exc}") from None

        if name is None:
            if method == "GET":
                try:
                    selector = Selector(tuple(parse_label_selector(query.get("labelSelector"))),
                                        tuple(parse_field_selector(query.get("fieldSelector"), res)))
                except ValueError as exc:
                    raise ApiError(400, "BadRequest", str(exc)) from None
                if is_watch:
                    self._watch(fake._open_watch(res, ns, selector, query))
                else:
                    self._send_json(200, fake._list(res, ns, selector))
                return
            if method == "POST":
                obj = parsed_body()
                if not isinstance(obj, dict):
                    raise ApiError(400, "BadRequest", "the request body must be a JSON object")
                with fake._cond:
                    created = copy.deepcopy(fake._create(res, ns, obj, keep_status=False))
                self._send_json(201, created)
                return
            raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource")
        assert ns is not None
        if sub == "log":
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            self._send(200, fake._log_text(ns, name, query).encode(), "text/plain")
            return
        with fake._cond:
            if method == "GET":
                result, code = copy.deepcopy(fake._require(res, ns, name)), 200
            elif method == "PATCH":
                result = copy.deepcopy(fake._patch(res, ns, name, parsed_body(), content_type or "",
                                                   status=sub == "status"))
                code = 200
            elif method == "DELETE" and sub is None:
                options = parsed_body() or {}
                if not isinstance(options, dict):
                    raise ApiError(400, "BadRequest", "DeleteOptions must be a JSON object")
                if "propagationPolicy" in query:
                    options.setdefault("propagationPolicy", query["propagationPolicy"])
                if "orphanDependents" in query:
                    options.setdefault("orphanDependents", _truthy(query["orphanDependents"]))
                result, code = fake._delete(res, ns, name, options), 200
            else:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        self._send_json(code, result)

    def _watch(self, events: Iterator[dict]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                self._chunk(orjson.dumps(event) + b"\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()


def main() -> None:  # pragma: no cover - manual use
    """Run a fake API server and write a kubeconfig for it: ``python -m tests.kubernetes.fake_apiserver PATH``."""
    import sys

    with FakeApiServer() as fake:
        fake.write_kubeconfig(sys.argv[1] if len(sys.argv) > 1 else "kubeconfig.fake")
        print(fake.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    main()
