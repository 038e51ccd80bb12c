"""Templates and profiles from Kubernetes ConfigMaps, kept current by a watch.

Why a watch and not a mounted volume: a mounted ConfigMap reaches the pod only
after the kubelet's sync period (a minute or more), only in the pod's own
namespace, and one volume per ConfigMap; a watch sees every labelled ConfigMap
of the configured namespaces within a second, and new ConfigMaps without a
restart.

Every ConfigMap in the namespaces that matches the label selector (default
``overnight.dev/templates=true``) is read: each of its data keys that ends in
``.yaml`` or ``.yml`` (AIBrix's ``templates.yaml`` / ``profiles.yaml`` included;
keys starting with ``.`` are skipped, as hidden files are) is parsed exactly
like a file of a templates directory. Problems name
``configmap <namespace>/<name> key <key>: document N (<name>): <field>: ...``.
A broken key does not take the others down, and a key that stops parsing makes
what it defined fail with its error (the directory's rules, shared through
``source.names_after`` / ``source.effective``).

Life cycle::

    source = ConfigMapSource(KubeConfig(), ["batch"])   # or an open Kube
    await source.start()           # one list-then-watch per namespace, in the background
    await source.ready(timeout_s=30)  # the first list of every namespace is in
    source.get_template("llama")   # synchronous: the current catalog
    await source.aclose()

When the API fails, the last catalog read is kept and served; ``errors()``
says which namespace is stale, since when and why, and a warning is logged.
The watch is retried with backoff and, once back, replaces what it had with
what is there now.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from overnight.errors import KubernetesError
from overnight.runtimes.kubernetes.client import Kube, KubeConfig, ResolvedConfig, RetryPolicy, list_then_watch
from overnight.templates.source import (
    Catalog,
    CombinedSource,
    Loaded,
    Names,
    TemplateSource,
    TemplateSourceError,
    effective,
    load_text,
    names_after,
)

__all__ = ["DEFAULT_SELECTOR", "CombinedSource", "ConfigMapRead", "ConfigMapSource", "read_config_map"]

#: the label a ConfigMap carries to be read for templates and profiles
DEFAULT_SELECTOR = "overnight.dev/templates=true"

log = logging.getLogger("overnight.templates")

_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _readable(key: str) -> bool:
    return not key.startswith(".") and key.endswith((".yaml", ".yml"))


@dataclass(frozen=True)
class _KeyState:
    text: str | None  # None: the value could not be read as text
    loaded: Loaded
    known: Names


@dataclass(frozen=True)
class ConfigMapRead:
    """What one ConfigMap yielded: its readable keys, parsed, and problems of the ConfigMap as a whole."""

    namespace: str
    name: str
    keys: dict[str, _KeyState] = field(default_factory=dict)
    issues: tuple[str, ...] = ()

    def loads(self) -> list[Loaded]:
        out = [Loaded(issues=self.issues)] if self.issues else []
        return out + [effective(state.loaded, state.known) for _, state in sorted(self.keys.items())]


def read_config_map(obj: Mapping[str, Any], previous: ConfigMapRead | None = None) -> ConfigMapRead:
    """Parse every readable key of a ConfigMap (as the API sends it).

    ``previous`` is the last read of the same ConfigMap: unchanged keys are not
    parsed again, and a key that stops parsing keeps failing the names it defined."""
    md = obj.get("metadata") or {}
    namespace, name = str(md.get("namespace") or ""), str(md.get("name") or "")
    label = f"configmap {namespace}/{name}"
    data = obj.get("data") or {}
    binary = obj.get("binaryData") or {}
    texts: dict[str, tuple[str | None, str]] = {}  # key -> (text, why not)
    for key, value in data.items():
        if _readable(key):
            texts[key] = (value, "") if isinstance(value, str) else (None, "the value is not a string")
    for key, value in binary.items():
        if _readable(key):
            # kubectl puts a file that is not valid UTF-8 under binaryData
            try:
                texts[key] = (base64.b64decode(str(value), validate=True).decode("utf-8"), "")
            except ValueError as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
                texts[key] = (None, f"cannot be read: binaryData is not UTF-8 text: {exc}")
    keys: dict[str, _KeyState] = {}
    for key in sorted(texts):
        text, why = texts[key]
        old = previous.keys.get(key) if previous is not None else None
        if old is not None and text is not None and old.text == text:
            keys[key] = old
            continue
        where = f"{label} key {key}"
        loaded = load_text(text, where) if text is not None else Loaded(issues=(f"{where}: {why}",), failed=True)
        keys[key] = _KeyState(text, loaded, names_after(loaded, old.known if old is not None else []))
    issues: tuple[str, ...] = ()
    if not texts:
        present = ", ".join(sorted({*data, *binary})) or "none"
        issues = (f"{label}: no key ends in .yaml or .yml (keys: {present}); nothing read from it",)
    return ConfigMapRead(namespace, name, keys, issues)


@dataclass(frozen=True)
class _Failure:
    since: dt.datetime
    message: str
    #: retrying will not help by itself (forbidden, bad selector, no configuration)
    permanent: bool


def _namespaces(namespaces: str | Iterable[str]) -> tuple[str, ...]:
    items = namespaces.split(",") if isinstance(namespaces, str) else list(namespaces)
    out: list[str] = []
    for raw in items:
        ns = str(raw).strip()
        if not ns:
            continue
        if len(ns) > 63 or not _NAMESPACE_RE.match(ns):
            raise TemplateSourceError(
                f"templates ConfigMap namespaces: {ns!r} is not a namespace name (lower case letters, digits and "
                "'-', at most 63 characters)"
            )
        if ns not in out:
            out.append(ns)
    if not out:
        raise TemplateSourceError("templates ConfigMap namespaces: give at least one namespace")
    return tuple(out)


class ConfigMapSource(TemplateSource):
    """Templates and profiles from the ConfigMaps matching ``selector`` in ``namespaces``.

    ``kube`` is an open :class:`Kube` (left open by :meth:`aclose`), or a
    :class:`KubeConfig` / ``ResolvedConfig`` that :meth:`start` opens (with
    ``retry``) and :meth:`aclose` closes. ``namespaces`` is one or more names
    (a string is split on commas). ``watch_timeout_s`` is each watch request's
    server-side timeout; after a failure the watch is started again after
    ``retry_s``, doubling up to ``max_retry_s``.
    """

    def __init__(
        self,
        kube: Kube | KubeConfig | ResolvedConfig,
        namespaces: str | Iterable[str],
        *,
        selector: str = DEFAULT_SELECTOR,
        retry: RetryPolicy | None = None,
        watch_timeout_s: int = 300,
        retry_s: float = 1.0,
        max_retry_s: float = 30.0,
    ) -> None:
        self.namespaces = _namespaces(namespaces)
        self.selector = selector.strip()
        if not self.selector:
            raise TemplateSourceError(
                "templates ConfigMap selector: empty (it would read every ConfigMap in the namespaces); "
                f"the default is {DEFAULT_SELECTOR!r}"
            )
        if isinstance(kube, Kube):
            self._kube, self._owns_kube = kube, False
        else:
            self._kube, self._owns_kube = Kube(kube, retry=retry or RetryPolicy()), True
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._maps: dict[str, dict[str, ConfigMapRead]] = {ns: {} for ns in self.namespaces}
        self._synced: dict[str, dt.datetime] = {}  # namespace -> when its view last matched the server
        self._failures: dict[str, _Failure] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._catalog = Catalog.build([], self._status_issues())

    # -- life cycle

    async def start(self) -> None:
        """Open the client (when given a configuration) and start watching every namespace.

        Raises KubernetesError when the configuration cannot be loaded, RuntimeError when
        a given Kube is not open or the source was started already."""
        if self._tasks:
            raise RuntimeError("this ConfigMapSource is started already")
        if self._owns_kube:
            await self._kube.__aenter__()
        else:
            _ = self._kube.source  # RuntimeError now, not in the background, when it is not open
        self._wake = asyncio.Event()  # bound to the running loop
        self._tasks = [
            asyncio.create_task(self._run(ns), name=f"overnight-templates-configmaps-{ns}") for ns in self.namespaces
        ]

    async def ready(self, timeout_s: float | None = None) -> None:
        """Return once every namespace has been listed (the catalog is complete).

        Raises TemplateSourceError after ``timeout_s``, or at once when a namespace
        that was never listed fails in a way retrying will not fix (forbidden, a bad
        selector); the error names the namespaces and the API's message."""
        if not self._tasks:
            raise RuntimeError("call start() before ready()")
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            pending = [ns for ns in self.namespaces if ns not in self._synced]
            if not pending:
                return
            fatal = [ns for ns in pending if ns in self._failures and self._failures[ns].permanent]
            if fatal:
                raise TemplateSourceError(f"templates ConfigMaps cannot be listed: {self._why(fatal)}")
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TemplateSourceError(
                    f"templates ConfigMaps not listed after {timeout_s:g}s: {self._why(pending)}"
                )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    def _why(self, namespaces: list[str]) -> str:
        parts = []
        for ns in namespaces:
            failure = self._failures.get(ns)
            parts.append(f"namespace {ns}: {failure.message if failure else 'no answer yet'}")
        return "; ".join(parts)

    async def aclose(self) -> None:
        """Stop the watches (and close the client this source opened)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_kube:
            await self._kube.close()

    async def __aenter__(self) -> ConfigMapSource:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the catalog

    def catalog(self) -> Catalog:
        return self._catalog

    def synced(self) -> dict[str, dt.datetime]:
        """When each namespace's view last matched the server (absent: never listed)."""
        return dict(self._synced)

    def _status_issues(self) -> list[str]:
        out = []
        for ns in self.namespaces:
            where = f"configmaps in namespace {ns} ({self.selector})"
            failure = self._failures.get(ns)
            if failure is None:
                if ns not in self._synced:
                    out.append(f"{where}: not listed yet")
                continue
            since = failure.since.isoformat(timespec="seconds")
            if ns in self._synced:
                out.append(f"{where}: cannot be read since {since}: {failure.message}; serving what was read before")
            else:
                out.append(f"{where}: cannot be listed since {since}: {failure.message}")
        return out

    def _rebuild(self) -> None:
        loads = [load for ns in self.namespaces for name in sorted(self._maps[ns]) for load in self._maps[ns][name].loads()]
        self._catalog = Catalog.build(loads, self._status_issues())

    # -- the watch

    async def _run(self, ns: str) -> None:
        delay = self.retry_s
        while True:
            synced_before = self._synced.get(ns)
            message, permanent = "the watch ended", False  # list_then_watch never ends by itself
            try:
                await self._watch(ns)
            except asyncio.CancelledError:
                raise
            except KubernetesError as exc:
                message, permanent = exc.message, not exc.retryable
            except Exception as exc:  # a bug must not end the watch for good
                log.exception("templates from ConfigMaps in namespace %s: unexpected error", ns)
                message, permanent = f"{type(exc).__name__}: {exc}", True
            if self._synced.get(ns) is not synced_before:
                delay = self.retry_s  # it worked for a while: start the backoff again
            previous = self._failures.get(ns)
            if previous is None or previous.message != message:
                log.warning(
                    "templates from ConfigMaps in namespace %s (%s): %s; %s, retrying in %.3gs",
                    ns, self.selector, message,
                    "keeping what was read before" if ns in self._synced else "nothing read yet", delay,
                )
            since = previous.since if previous is not None else dt.datetime.now(dt.timezone.utc)
            self._failures[ns] = _Failure(since, message, permanent)
            self._rebuild()
            self._wake.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_retry_s)

    async def _watch(self, ns: str) -> None:
        # Until this watch's first SYNCED, what it lists goes into `staging`, which then
        # replaces the namespace's view whole: ConfigMaps deleted while the API was
        # unreachable go, and the catalog never shows half a list.
        staging: dict[str, ConfigMapRead] | None = {}
        events = list_then_watch(self._kube, "ConfigMap", ns, label_selector=self.selector,
                                 timeout_s=self.watch_timeout_s)
        async with contextlib.aclosing(events):
            async for event in events:
                if event.type == "SYNCED":
                    if staging is not None:
                        self._maps[ns], staging = staging, None
                    self._synced[ns] = dt.datetime.now(dt.timezone.utc)
                    if self._failures.pop(ns, None) is not None:
                        log.info("templates from ConfigMaps in namespace %s: read again", ns)
                    self._rebuild()
                    self._wake.set()
                    continue
                name = event.name or ""
                view = staging if staging is not None else self._maps[ns]
                if event.type == "DELETED":
                    view.pop(name, None)
                else:
                    view[name] = read_config_map(event.object, view.get(name) or self._maps[ns].get(name))
                if staging is None:
                    self._rebuild()
