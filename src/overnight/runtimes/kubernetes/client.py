"""The Kubernetes API as overnight's runtimes use it, on ``kubernetes_asyncio``.

Why this layer and not the generated client directly: runtimes need a few
semantics the API does not give as such, and every one of them is a place
where a batch could leak pods or lose track of them:

- :meth:`Kube.create` is idempotent for a batch: a retry after a lost answer
  (or after a restart) finds the object it made, and an object of the same
  name made for another batch is an error, never silently adopted;
- :meth:`Kube.delete` treats "already gone" (404, or a uid precondition that
  no longer matches) as success and always states a propagation policy
  (Jobs orphan their pods by default);
- :meth:`Kube.wait_gone` returns only once a GET confirms the object is gone,
  so "released" is never recorded for something still running;
- :func:`list_then_watch` keeps a consumer's view of a set of objects exact
  across watch timeouts, dropped connections and 410 Gone;
- every failure becomes a :class:`~overnight.errors.KubernetesError` carrying
  the API's status code, reason and message; 429/5xx/connection errors are
  retried with bounded exponential backoff (``Retry-After`` honoured).

Objects go in and come out as plain dicts in the API's own JSON shape
(camelCase, as the manifests are rendered): the generated models are not
used for bodies, so no field the installed client does not know is dropped.
``kubernetes_asyncio`` supplies configuration (kubeconfig, in-cluster service
account with token refresh), authentication, TLS and the request paths; it
makes no discovery calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import aiohttp
    from kubernetes_asyncio import client as k8s
    from kubernetes_asyncio.config import ConfigException
    from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader
    from kubernetes_asyncio.config.kube_config import load_kube_config
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "overnight's Kubernetes runtimes need the 'kubernetes' extra: pip install 'overnight[kubernetes]'"
    ) from exc
import orjson

from overnight.errors import InvalidRequestError, KubernetesError

__all__ = [
    "BATCH_ID_LABEL",
    "KINDS",
    "SERVICE_ACCOUNT_DIR",
    "Kube",
    "KubeConfig",
    "ObjectList",
    "ResolvedConfig",
    "RetryPolicy",
    "WatchEvent",
    "list_then_watch",
    "load_config",
]

#: the label that ties an object to its batch; idempotent create compares it
#: (the same key as ``manifests.BATCH_LABEL``)
BATCH_ID_LABEL = "overnight.dev/batch-id"

#: where a pod's service account token, CA and namespace are mounted
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

Propagation = Literal["Background", "Foreground", "Orphan"]

log = logging.getLogger("overnight.kubernetes")


# ---------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class KubeConfig:
    """Where the API server is and how to authenticate. The first that applies wins:

    1. ``api_url``: that server, with ``token``/``ca_file``/``verify_tls`` (tests,
       or a proxy such as ``kubectl proxy``);
    2. ``kubeconfig``: that kubeconfig file (``context`` picks a context);
    3. ``in_cluster=True``: the pod's service account in ``service_account_dir``
       and ``KUBERNETES_SERVICE_HOST``/``PORT``;
    4. otherwise: ``$KUBECONFIG`` or ``~/.kube/config`` if present, else in-cluster
       if ``KUBERNETES_SERVICE_HOST`` is set, else an error saying so.

    ``namespace`` overrides the default namespace, which otherwise comes from
    the kubeconfig context, the service account's ``namespace`` file, or is
    ``default``.
    """

    api_url: str | None = None
    token: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True
    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool = False
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    namespace: str | None = None


@dataclass(frozen=True)
class ResolvedConfig:
    """A loaded client configuration, its default namespace and where it came from."""

    configuration: k8s.Configuration
    namespace: str
    source: str


def _config_error(message: str) -> KubernetesError:
    return KubernetesError(message, reason="ConfigError")


async def load_config(config: KubeConfig | None = None, *, environ: Mapping[str, str] | None = None) -> ResolvedConfig:
    """Resolve a :class:`KubeConfig` into a client configuration (see its docstring for the order)."""
    config = config or KubeConfig()
    env = os.environ if environ is None else environ
    if config.api_url:
        conf = k8s.Configuration(host=config.api_url.rstrip("/"))
        if config.token:
            conf.api_key = {"BearerToken": config.token}
            conf.api_key_prefix = {"BearerToken": "Bearer"}
        conf.ssl_ca_cert = config.ca_file
        conf.verify_ssl = config.verify_tls
        return ResolvedConfig(conf, config.namespace or "default", f"url {config.api_url}")
    if config.kubeconfig:
        return await _from_kubeconfig(config.kubeconfig, config)
    if config.in_cluster:
        return _from_service_account(config, env)
    path = env.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    if any(Path(p).expanduser().is_file() for p in path.split(os.pathsep) if p):
        return await _from_kubeconfig(path, config)
    if env.get("KUBERNETES_SERVICE_HOST"):
        return _from_service_account(config, env)
    raise _config_error(
        "no Kubernetes configuration found: set KUBECONFIG (or create ~/.kube/config), run in a pod with a "
        "service account, or give an API URL"
    )


async def _from_kubeconfig(path: str, config: KubeConfig) -> ResolvedConfig:
    files = [p for p in path.split(os.pathsep) if p]
    missing = [p for p in files if not Path(p).expanduser().is_file()]
    if not files or len(missing) == len(files):
        raise _config_error(f"kubeconfig: no such file {path!r}")
    conf = k8s.Configuration()
    try:
        loader = await load_kube_config(config_file=path, context=config.context, client_configuration=conf,
                                        persist_config=False)
    except (ConfigException, AssertionError, KeyError, TypeError, ValueError, OSError) as exc:
        raise _config_error(f"kubeconfig {path!r}: {exc or type(exc).__name__}") from exc
    context = (loader.current_context or {}).get("context") or {}
    namespace = config.namespace or context.get("namespace") or "default"
    return ResolvedConfig(conf, namespace, f"kubeconfig {path}")


def _from_service_account(config: KubeConfig, env: Mapping[str, str]) -> ResolvedConfig:
    sa = Path(config.service_account_dir)
    conf = k8s.Configuration()
    try:
        InClusterConfigLoader(token_filename=str(sa / "token"), cert_filename=str(sa / "ca.crt"),
                              environ=dict(env)).load_and_set(conf)
    except ConfigException as exc:
        raise _config_error(f"in-cluster configuration ({sa}): {exc}") from exc
    namespace = config.namespace
    if namespace is None and (sa / "namespace").is_file():
        namespace = (sa / "namespace").read_text().strip() or None
    return ResolvedConfig(conf, namespace or "default", f"in-cluster {sa}")


# ---------------------------------------------------------------------------
# kinds


@dataclass(frozen=True)
class _Kind:
    kind: str
    api_version: str
    api: type
    stem: str  # the generated methods' suffix: create_namespaced_<stem>
    has_status: bool


#: the kinds overnight manages, by ``kind``
KINDS: dict[str, _Kind] = {
    k.kind: k
    for k in (
        _Kind("Job", "batch/v1", k8s.BatchV1Api, "job", True),
        _Kind("Pod", "v1", k8s.CoreV1Api, "pod", True),
        _Kind("Deployment", "apps/v1", k8s.AppsV1Api, "deployment", True),
        _Kind("Service", "v1", k8s.CoreV1Api, "service", True),
        _Kind("ConfigMap", "v1", k8s.CoreV1Api, "config_map", False),
    )
}


def _kind(kind: str) -> _Kind:
    try:
        return KINDS[kind]
    except KeyError:
        raise InvalidRequestError(f"kind {kind!r} is not one of {sorted(KINDS)}", param="kind") from None


# ---------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class ObjectList:
    """A list answer: the items and the resourceVersion to watch from."""

    items: list[dict[str, Any]]
    resource_version: str


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by :func:`list_then_watch`.

    ``type`` is ADDED, MODIFIED or DELETED (``object`` the object as the API
    sent it; for DELETED its last state), or SYNCED: a marker, with an empty
    ``object``, that the consumer's view now equals the server's at
    ``resource_version`` (after the first list and after every re-list).
    """

    type: Literal["ADDED", "MODIFIED", "DELETED", "SYNCED"]
    object: dict[str, Any]
    resource_version: str

    @property
    def name(self) -> str | None:
        return (self.object.get("metadata") or {}).get("name")


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures (429, 5xx, connection errors) are retried: ``attempts`` tries in all,
    the delay doubling from ``base_s`` up to ``max_s`` (with jitter), or the server's Retry-After."""

    attempts: int = 5
    base_s: float = 0.2
    max_s: float = 5.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), max(self.max_s, 1.0) * 6)
        d = min(self.base_s * (2**attempt), self.max_s)
        return d * (0.5 + random.random() / 2)


# ---------------------------------------------------------------------------
# errors


def _error_from_response(status: int, body: bytes, headers: Mapping[str, str] | None, what: str) -> KubernetesError:
    """A KubernetesError from an error answer (a Status object when the server sent one)."""
    reason, message = None, None
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("kind") == "Status":
        reason, message = parsed.get("reason"), parsed.get("message")
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        message = text[:500] if text else f"HTTP {status}"
    retry_after = None
    if headers is not None and (ra := headers.get("Retry-After")):
        try:
            retry_after = float(ra)
        except ValueError:
            retry_after = None
    return KubernetesError(f"{what}: {message}", status=status, reason=reason, retry_after_s=retry_after)


def _error_from_status(status: Mapping[str, Any], what: str) -> KubernetesError:
    """A KubernetesError from a Status object carried by a watch ERROR event."""
    code = status.get("code")
    return KubernetesError(f"{what}: {status.get('message') or status}", status=code if isinstance(code, int) else None,
                           reason=status.get("reason"))


def _connection_error(exc: BaseException, what: str) -> KubernetesError:
    detail = str(exc) or type(exc).__name__
    return KubernetesError(f"{what}: cannot reach the API server: {detail}", reason="ConnectionError")


_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


# ---------------------------------------------------------------------------
# the client


class Kube:
    """An async Kubernetes client for the kinds in :data:`KINDS`. Use ``async with Kube(config) as kube``.

    ``config`` is a :class:`KubeConfig` (resolved on entry) or a :class:`ResolvedConfig`.
    ``request_timeout_s`` bounds each non-watch request.
    """

    def __init__(
        self,
        config: KubeConfig | ResolvedConfig | None = None,
        *,
        retry: RetryPolicy = RetryPolicy(),
        request_timeout_s: float = 30.0,
    ) -> None:
        self._config = config
        self.retry = retry
        self.request_timeout_s = request_timeout_s
        self._resolved: ResolvedConfig | None = None
        self._client: k8s.ApiClient | None = None
        self._apis: dict[type, Any] = {}

    async def __aenter__(self) -> Kube:
        cfg = self._config
        self._resolved = cfg if isinstance(cfg, ResolvedConfig) else await load_config(cfg)
        self._client = k8s.ApiClient(self._resolved.configuration)
        self._client.user_agent = "overnight"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._apis.clear()

    @property
    def namespace(self) -> str:
        """The default namespace of the configuration."""
        return self._need().namespace

    @property
    def source(self) -> str:
        """Where the configuration came from (kubeconfig path, in-cluster, URL)."""
        return self._need().source

    def _need(self) -> ResolvedConfig:
        if self._resolved is None or self._client is None:
            raise RuntimeError("use 'async with Kube(...) as kube' before calling it")
        return self._resolved

    def _method(self, kind: _Kind, verb: str) -> Callable[..., Any]:
        self._need()
        api = self._apis.get(kind.api)
        if api is None:
            api = self._apis[kind.api] = kind.api(self._client)
        return getattr(api, verb.format(kind.stem))

    # -- transport

    async def _request(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        """One API call with retries; returns (status, body) of a 2xx answer, raises KubernetesError otherwise."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        attempt = 0
        while True:
            try:
                resp = await method(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
                try:
                    body = await resp.read()
                finally:
                    resp.release()
            except _TRANSPORT_ERRORS as exc:
                err = _connection_error(exc, what)
            else:
                if 200 <= resp.status < 300:
                    return resp.status, body
                err = _error_from_response(resp.status, body, resp.headers, what)
            attempt += 1
            if not err.retryable or attempt >= self.retry.attempts:
                raise err
            delay = self.retry.delay(attempt - 1, err.retry_after_s)
            log.info("%s; retrying in %.2fs (attempt %d of %d)", err, delay, attempt + 1, self.retry.attempts)
            await asyncio.sleep(delay)

    async def _json(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        _, body = await self._request(what, method, *args, **kwargs)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise KubernetesError(f"{what}: the API server's answer is not JSON: {exc}", reason="BadResponse") from exc
        if not isinstance(data, dict):
            raise KubernetesError(f"{what}: the API server's answer is not an object", reason="BadResponse")
        return data

    # -- operations

    async def create(self, obj: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create ``obj`` (its ``kind`` picks the API); idempotent for a batch.

        On 409 AlreadyExists the existing object is returned when it carries the
        same ``overnight.dev/batch-id`` label as ``obj`` and is not being
        deleted; otherwise the conflict is raised (status 409), naming the owner.
        """
        kind = _kind(str(obj.get("kind")))
        md = obj.get("metadata") or {}
        name = md.get("name")
        if not name:
            raise InvalidRequestError("metadata.name is required (overnight names every object)", param="metadata.name")
        ns = namespace or md.get("namespace") or self.namespace
        if md.get("namespace") not in (None, ns):
            raise InvalidRequestError(f"metadata.namespace {md['namespace']!r} is not the namespace {ns!r} asked for",
                                      param="metadata.namespace")
        body = {**obj, "apiVersion": obj.get("apiVersion") or kind.api_version}
        want = (md.get("labels") or {}).get(BATCH_ID_LABEL)
        what = f"create {kind.kind} {ns}/{name}"
        for _ in range(3):
            try:
                return await self._json(what, self._method(kind, "create_namespaced_{}"), ns, body)
            except KubernetesError as err:
                if not err.already_exists:
                    raise
                conflict = err
            existing = await self.get_or_none(kind.kind, ns, name)
            if existing is None:
                continue  # deleted between the two calls: create again
            emd = existing.get("metadata") or {}
            have = (emd.get("labels") or {}).get(BATCH_ID_LABEL)
            if want is not None and have == want:
                if emd.get("deletionTimestamp"):
                    raise KubernetesError(f"{what}: an object of this batch with this name is being deleted "
                                          f"(since {emd['deletionTimestamp']}); wait for it to go",
                                          status=409, reason="AlreadyExists")
                return existing
            owner = f"batch {have!r}" if have is not None else f"no {BATCH_ID_LABEL} label"
            raise KubernetesError(f"{conflict.message} (it belongs to {owner}, not batch {want!r})",
                                  status=409, reason="AlreadyExists")
        raise KubernetesError(f"{what}: the name keeps being taken and freed", status=409, reason="AlreadyExists")

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """The object; KubernetesError with status 404 when there is none."""
        k = _kind(kind)
        return await self._json(f"get {k.kind} {namespace}/{name}", self._method(k, "read_namespaced_{}"), name, namespace)

    async def get_or_none(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.get(kind, namespace, name)
        except KubernetesError as err:
            if err.not_found:
                return None
            raise

    async def list(
        self,
        kind: str,
        namespace: str | None,
        *,
        label_selector: str | Mapping[str, str] | None = None,
        field_selector: str | None = None,
    ) -> ObjectList:
        """Objects of a kind in a namespace (None: all namespaces), filtered by label/field selectors.

        A dict selector means equality on every pair. Items get their ``kind``
        and ``apiVersion`` back (list answers omit them).
        """
        k = _kind(kind)
        data = await self._json(
            f"list {k.kind} in {namespace or 'all namespaces'}", *self._list_call(k, namespace),
            **_selectors(label_selector, field_selector),
        )
        items = [{"kind": k.kind, "apiVersion": k.api_version, **item} for item in data.get("items") or []]
        return ObjectList(items, str((data.get("metadata") or {}).get("resourceVersion") or ""))

    def _list_call(self, k: _Kind, namespace: str | None) -> tuple[Any, ...]:
        if namespace is None:
            return (self._method(k, "list_{}_for_all_namespaces"),)
        return (self._method(k, "list_namespaced_{}"), namespace)

    async def patch(
        self,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        status: bool = False,
        strategy: Literal["merge", "strategic"] = "merge",
    ) -> dict[str, Any]:
        """Patch an object (``status=True``: its ``/status`` subresource).

        ``merge`` is a JSON merge patch (RFC 7386: lists are replaced, null
        deletes); ``strategic`` is Kubernetes' strategic merge patch (lists such
        as conditions and containers merged by key). A ``metadata.resourceVersion``
        in the patch makes it conditional (409 Conflict if the object moved on).
        """
        k = _kind(kind)
        if status and not k.has_status:
            raise InvalidRequestError(f"{k.kind} has no status subresource", param="status")
        content_type = "application/merge-patch+json" if strategy == "merge" else "application/strategic-merge-patch+json"
        verb = "patch_namespaced_{}_status" if status else "patch_namespaced_{}"
        return await self._json(f"patch {k.kind} {namespace}/{name}{'/status' if status else ''}",
                                self._method(k, verb), name, namespace, dict(patch), _content_type=content_type)

    async def delete(
        self,
        kind: str,
        namespace: str,
        name: str,
        *,
        propagation: Propagation = "Background",
        uid: str | None = None,
        grace_period_s: int | None = None,
    ) -> bool:
        """Ask for the object's deletion; True if a deletion was asked for, False if it was already gone.

        The propagation policy is always sent (a Job's default orphans its
        pods). With ``uid`` the delete applies only to that incarnation: a
        same-named object created since is left alone (and counts as gone).
        Deletion may finish later (finalizers, pod grace): :meth:`wait_gone`.
        """
        k = _kind(kind)
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        if grace_period_s is not None:
            options["gracePeriodSeconds"] = grace_period_s
        try:
            await self._request(f"delete {k.kind} {namespace}/{name}", self._method(k, "delete_namespaced_{}"),
                                name, namespace, body=options)
        except KubernetesError as err:
            if err.not_found or (uid is not None and err.status == 409 and err.reason == "Conflict"):
                return False
            raise
        return True

    async def wait_gone(
        self, kind: str, namespace: str, name: str, timeout_s: float, *, uid: str | None = None, poll_s: float = 0.2
    ) -> None:
        """Return once a GET finds no such object (or, with ``uid``, only a newer incarnation).

        Raises KubernetesError (reason ``Timeout``, no status) when it is still
        there after ``timeout_s``, saying what holds it (finalizers).
        """
        k = _kind(kind)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = poll_s
        while True:
            obj = await self.get_or_none(k.kind, namespace, name)
            if obj is None or (uid is not None and (obj.get("metadata") or {}).get("uid") != uid):
                return
            left = deadline - loop.time()
            if left <= 0:
                md = obj.get("metadata") or {}
                held = f"; finalizers {md['finalizers']}" if md.get("finalizers") else ""
                since = f" (deletion asked at {md['deletionTimestamp']})" if md.get("deletionTimestamp") else ""
                raise KubernetesError(f"{k.kind} {namespace}/{name} still exists after {timeout_s:g}s{since}{held}",
                                      reason="Timeout")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, 2.0)

    async def logs(self, namespace: str, pod: str, *, container: str | None = None, tail_lines: int | None = None) -> str:
        """A pod's log text (``container`` is needed when the pod has several)."""
        kwargs: dict[str, Any] = {}
        if container is not None:
            kwargs["container"] = container
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        method = self._method(KINDS["Pod"], "read_namespaced_{}_log")
        _, body = await self._request(f"logs of pod {namespace}/{pod}", method, pod, namespace, **kwargs)
        return body.decode("utf-8", "replace")

    # -- watch

    async def _watch(
        self,
        k: _Kind,
        namespace: str | None,
        resource_version: str,
        selectors: Mapping[str, str],
        timeout_s: int,
    ) -> AsyncIterator[dict[str, Any]]:
        """One watch request: yields raw events until the server ends the stream.

        Raises KubernetesError for an error answer (status 410 included) and
        for a broken stream (reason ConnectionError).
        """
        what = f"watch {k.kind} in {namespace or 'all namespaces'}"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout_s,
                                        sock_read=timeout_s + max(30.0, self.request_timeout_s))
        method, *args = self._list_call(k, namespace)
        try:
            resp = await method(*args, watch=True, allow_watch_bookmarks=True, resource_version=resource_version,
                                timeout_seconds=timeout_s, _preload_content=False, _request_timeout=timeout,
                                **selectors)
        except _TRANSPORT_ERRORS as exc:
            raise _connection_error(exc, what) from exc
        try:
            if resp.status != 200:
                try:
                    body = await resp.read()
                except _TRANSPORT_ERRORS as exc:
                    raise _connection_error(exc, what) from exc
                raise _error_from_response(resp.status, body, resp.headers, what)
            while True:
                try:
                    line = await resp.content.readline()
                except _TRANSPORT_ERRORS as exc:
                    raise _connection_error(exc, what) from exc
                except ValueError as exc:  # a line beyond the read buffer
                    raise KubernetesError(f"{what}: {exc}", reason="BadResponse") from exc
                if not line:
                    return
                line = line.strip()
                if not line:
                    continue
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise KubernetesError(f"{what}: a watch event is not JSON: {exc}", reason="ConnectionError") from exc
                if isinstance(event, dict):
                    yield event
        finally:
            resp.close()


def _selectors(label_selector: str | Mapping[str, str] | None, field_selector: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(label_selector, Mapping):
        label_selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
    if label_selector:
        out["label_selector"] = label_selector
    if field_selector:
        out["field_selector"] = field_selector
    return out


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return md.get("namespace") or "", md.get("name") or ""


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _uid(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("uid")


async def list_then_watch(
    kube: Kube,
    kind: str,
    namespace: str | None,
    *,
    label_selector: str | Mapping[str, str] | None = None,
    field_selector: str | None = None,
    timeout_s: int = 300,
) -> AsyncIterator[WatchEvent]:
    """An exact, never-ending view of a set of objects: list, then watch from the list's resourceVersion.

    Emits the listed objects as ADDED, then SYNCED; then each change. The last
    resourceVersion seen (BOOKMARK events included; they are not emitted) is
    where the next watch starts when one ends (``timeout_s`` is each watch's
    server-side timeout) or breaks. On 410 Gone (an HTTP 410 or an ERROR event
    with code 410) it lists again and emits the difference from what it had
    emitted: DELETED (last known state) for objects that vanished, MODIFIED for
    changed ones, ADDED for new ones (an object re-created under the same name
    is DELETED then ADDED), then SYNCED. Transient failures are retried with
    the kube's retry policy; more consecutive failures than it allows, or any
    other error, are raised as KubernetesError.

    Close it (``aclose()``, or ``contextlib.aclosing``) to end the watch.
    """
    k = _kind(kind)
    selectors = _selectors(label_selector, field_selector)
    known: dict[tuple[str, str], dict[str, Any]] = {}
    failures = 0

    async def relist() -> tuple[list[WatchEvent], str]:
        listed = await kube.list(k.kind, namespace, label_selector=label_selector, field_selector=field_selector)
        fresh = {_key(o): o for o in listed.items}
        rv = listed.resource_version
        events: list[WatchEvent] = []
        for key in sorted(known):
            old, new = known[key], fresh.get(key)
            if new is None or _uid(new) != _uid(old):
                events.append(WatchEvent("DELETED", old, rv))
        for key in sorted(fresh):
            old, new = known.get(key), fresh[key]
            if old is None or _uid(new) != _uid(old):
                events.append(WatchEvent("ADDED", new, rv))
            elif _rv(new) != _rv(old):
                events.append(WatchEvent("MODIFIED", new, rv))
        known.clear()
        known.update(fresh)
        events.append(WatchEvent("SYNCED", {}, rv))
        return events, rv

    events, rv = await relist()
    for event in events:
        yield event
    loop = asyncio.get_running_loop()
    while True:
        started, delivered, expired = loop.time(), False, False
        try:
            async with contextlib.aclosing(kube._watch(k, namespace, rv, selectors, timeout_s)) as stream:
                async for raw in stream:
                    etype, obj = raw.get("type"), raw.get("object") or {}
                    if etype == "ERROR":
                        err = _error_from_status(obj, f"watch {k.kind}")
                        if err.gone:
                            expired = True
                            break
                        raise err
                    if etype == "BOOKMARK":
                        rv = _rv(obj) or rv
                        failures = 0
                        continue
                    if etype not in ("ADDED", "MODIFIED", "DELETED"):
                        continue
                    obj = {"kind": k.kind, "apiVersion": k.api_version, **obj}
                    rv = _rv(obj) or rv
                    if etype == "DELETED":
                        known.pop(_key(obj), None)
                    else:
                        known[_key(obj)] = obj
                    delivered, failures = True, 0
                    yield WatchEvent(etype, obj, rv)
                else:
                    failures = 0  # the server answered and ended the watch cleanly
        except KubernetesError as err:
            if err.gone:
                expired = True
            elif not err.retryable:
                raise
            else:
                failures += 1
                if failures >= kube.retry.attempts:
                    raise
                delay = kube.retry.delay(failures - 1, err.retry_after_s)
                log.info("%s; watching again from resourceVersion %s in %.2fs", err, rv, delay)
                await asyncio.sleep(delay)
                continue
        if expired:
            log.info("watch %s in %s: resourceVersion %s expired (410); listing again",
                     k.kind, namespace or "all namespaces", rv)
            events, rv = await relist()
            for event in events:
                yield event
            continue
        if not delivered and loop.time() - started < 1.0:
            # the server ended an empty watch at once: do not spin on it
            await asyncio.sleep(kube.retry.base_s)


class LazyKube:
    """A :class:`Kube` connected on first use and shared by its callers: a service
    that never runs a Kubernetes batch never needs a cluster."""

    def __init__(self, config: KubeConfig | ResolvedConfig | None) -> None:
        self.config = config
        self._kube: Kube | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Kube:
        async with self._lock:
            if self._kube is None:
                k = Kube(self.config)
                await k.__aenter__()
                self._kube = k
            return self._kube

    async def aclose(self) -> None:
        if self._kube is not None:
            await self._kube.close()
            self._kube = None
