"""Engines that overnight starts itself, shared by the batches that need them.

Batches that resolve to the same template and profile (``Resolved.key()``) share
one engine, and so one adaptive limit. ``EngineManager.attach(batch)`` returns
the URL of a ready engine for the batch, starting it through its runtime when
none runs (or the one that ran has died: a restart, counted; after
``max_restarts`` the batch gets an error naming the exit code and the log tail).
``detach`` gives the batch's reference back; the engine is released
``keep_alive_seconds`` after its last batch (a template/profile setting;
default 0). ``aclose`` releases everything (service shutdown), and ``start``
sweeps what an earlier process of this installation left behind.

The handle is recorded on the batch (``record``) before the engine is waited on,
so after a SIGKILL the next process can release what the record names (the
guard of a local engine usually beats it to that: it dies with the service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from overnight.errors import OvernightError, RuntimeStartError
from overnight.runtimes.base import Runtime, RuntimeHandle
from overnight.templates.commands import local_spec
from overnight.templates.resolve import Resolved

__all__ = ["EngineManager", "EngineFailed", "mock_spec"]

log = logging.getLogger("overnight.runtimes")

#: Restarts of one engine after it died, before batches on it fail.
MAX_RESTARTS = 3
#: An engine up this long has its earlier crashes forgiven.
STABLE_AFTER_S = 300.0


class EngineFailed(OvernightError):
    """The engine could not be started, or died too often: the batch fails with this."""

    code = "engine_failed"


def mock_spec(options: dict[str, Any]) -> dict[str, Any]:
    """The ``mock`` runtime: the built-in mock engine as a local process."""
    import sys

    args = [str(a) for a in options.get("args") or []]
    return {
        "type": "local", "name": "mock",
        "command": [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--host", "{host}",
                    "--port", "{port}", *args],
        "health_endpoint": "/health", "ready_timeout_seconds": 60, "gpus": 0,
    }


@dataclass
class _Engine:
    key: str
    runtime: Runtime
    handle: RuntimeHandle | None = None
    kind: str = "local"
    url: str | None = None
    refs: set[str] = field(default_factory=set)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    keep_alive_s: float = 0.0
    starting: asyncio.Task[str] | None = None
    release_timer: asyncio.TimerHandle | None = None
    releasing: asyncio.Task[None] | None = None
    up_since: float = 0.0
    #: GPUs its current handle holds, and since when (monotonic; None: no handle).
    gpus: int = 0
    held_since: float | None = None


RecordHandle = Callable[[RuntimeHandle], Awaitable[None]]


class EngineManager:
    def __init__(self, runtimes: dict[str, Runtime], *, max_restarts: int = MAX_RESTARTS,
                 watch_interval_s: float = 1.0) -> None:
        self.runtimes = runtimes
        self.max_restarts = max_restarts
        self.watch_interval_s = watch_interval_s
        #: Called with the ids of the batches on an engine that just died (the
        #: scheduler makes them give their slots up and come back, which restarts it).
        self.on_engine_died: Callable[[set[str], str], None] | None = None
        self._engines: dict[str, _Engine] = {}
        self._lock = asyncio.Lock()
        #: (engine key, runtime type) -> GPU-seconds of handles already given back.
        self._gpu_seconds: dict[tuple[str, str], float] = {}
        self._watch: asyncio.Task[None] | None = None

    def _ensure_watch(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watchdog(), name="overnight-engine-watch")

    async def _watchdog(self) -> None:
        """Notice an engine that died under its batches (a crash, an OOM kill)."""
        while self._engines:
            await asyncio.sleep(self.watch_interval_s)
            for e in list(self._engines.values()):
                if e.starting is not None or e.handle is None or e.url is None or not e.refs:
                    continue
                async with self._lock:
                    if e.starting is not None or e.handle is None or await self._usable(e):
                        if e.restarts and time.monotonic() - e.up_since > STABLE_AFTER_S:
                            e.restarts.clear()  # up long enough: earlier crashes are forgiven
                        continue
                    refs = set(e.refs)
                last = e.restarts[-1] if e.restarts else {}
                why = f"its engine died (exit code {last.get('exit_code')}); restarting it"
                if self.on_engine_died is not None:
                    self.on_engine_died(refs, why)

    # -- what a batch asks for ----------------------------------------------------
    @staticmethod
    def key_for(options: dict[str, Any]) -> str | None:
        """The shared-engine key of a batch's options, or None when overnight does
        not start its engine (an endpoint)."""
        rt = options.get("runtime") or {}
        kind = rt.get("type")
        if kind == "local" and options.get("template"):
            return "local-" + Resolved.from_record(options["template"]).key()
        if kind == "kubernetes-deployment" and options.get("template"):
            ns = rt.get("namespace") or ""
            return "k8s-" + Resolved.from_record(options["template"]).key() + (f"-{ns}" if ns else "")
        if kind == "mock":
            import hashlib
            import json

            return "mock-" + hashlib.sha256(json.dumps(rt.get("args") or []).encode()).hexdigest()[:16]
        if kind == "ssh":
            import hashlib
            import json

            # One engine per machine (provision) and engine command.
            what = json.dumps([rt.get("command"), rt.get("engine_port"), rt.get("launch"), rt.get("image")])
            return f"ssh-{rt.get('provision_id')}-" + hashlib.sha256(what.encode()).hexdigest()[:16]
        return None

    def _spec_for(self, options: dict[str, Any], batch_id: str = "") -> tuple[str, dict[str, Any], float, float]:
        """(runtime type, spec, ready timeout, keep-alive)."""
        rt = options.get("runtime") or {}
        if rt.get("type") == "mock":
            return "local", mock_spec(rt), 60.0, float(rt.get("keep_alive_seconds") or 0.0)
        if rt.get("type") == "ssh":
            # The machine is the job's: the engine goes when its batch does (keep-alive 0).
            return "ssh", dict(rt), float(rt.get("ready_timeout_seconds") or 1800.0), 0.0
        resolved = Resolved.from_record(options["template"])
        if rt.get("type") == "kubernetes-deployment":
            spec = {"type": "kubernetes-deployment", "template": options["template"], "batch_id": batch_id,
                    "namespace": rt.get("namespace")}
            return "kubernetes-deployment", spec, resolved.ready_timeout_seconds, resolved.keep_alive_seconds
        # Secrets are read from the environment now and never stored.
        return "local", local_spec(resolved), resolved.ready_timeout_seconds, resolved.keep_alive_seconds

    def engines(self) -> dict[str, dict[str, Any]]:
        """What runs now, for logs and tests."""
        return {k: {"url": e.url, "batches": sorted(e.refs), "restarts": len(e.restarts), "handle": e.handle}
                for k, e in self._engines.items()}

    def gpu_seconds(self) -> dict[tuple[str, str], float]:
        """GPU-seconds held by each engine overnight started, (key, runtime type) ->
        GPUs x seconds from the engine's start to its release, live ones up to now
        (only handles that say which GPUs they hold: the local runtime's). Never
        decreases, so ``/metrics`` can export it as a counter."""
        out = dict(self._gpu_seconds)
        now = time.monotonic()
        for e in list(self._engines.values()):
            if e.held_since is not None and e.handle is not None and "gpus" in e.handle:
                k = (e.key, e.kind)
                out[k] = out.get(k, 0.0) + e.gpus * (now - e.held_since)
        return out

    def _held(self, e: _Engine, handle: RuntimeHandle) -> None:
        """``e`` holds ``handle`` from now: its GPUs count from here."""
        e.handle = handle
        if e.held_since is None:
            e.gpus, e.held_since = len(handle.get("gpus") or []), time.monotonic()

    def _given_back(self, e: _Engine, handle: RuntimeHandle | None) -> None:
        """``e``'s handle is released: add what its GPUs held to the finished total."""
        if e.held_since is not None and handle is not None and "gpus" in handle:
            k = (e.key, e.kind)
            self._gpu_seconds[k] = self._gpu_seconds.get(k, 0.0) + e.gpus * (time.monotonic() - e.held_since)
        e.gpus, e.held_since = 0, None

    def log_tail(self, key: str, lines: int = 100) -> str | None:
        e = self._engines.get(key)
        if e is None or e.handle is None:
            return None
        tail = getattr(e.runtime, "log_tail", None)
        return tail(e.handle, lines) if tail is not None else None

    # -- life cycle -----------------------------------------------------------------
    async def start(self) -> list[RuntimeHandle]:
        """Release what an earlier process of this installation left running."""
        released: list[RuntimeHandle] = []
        for rt in self.runtimes.values():
            with contextlib.suppress(Exception):
                released += await rt.sweep(set())
        for h in released:
            log.warning("released a leftover engine (pid %s, owner %s)", h.get("pid"), h.get("owner"))
        return released

    async def attach(self, batch_id: str, options: dict[str, Any], *, record: RecordHandle) -> str:
        """A ready engine's URL for the batch (started, reused or restarted)."""
        key = self.key_for(options)
        if key is None:
            raise ValueError("this batch's engine is not started by overnight")
        async with self._lock:
            e = self._engines.get(key)
            if e is None:
                kind, _, _, keep = self._spec_for(options)
                if kind not in self.runtimes:
                    raise EngineFailed(f"this server does not run the {kind!r} runtime (OVERNIGHT_RUNTIMES)")
                e = self._engines[key] = _Engine(key, self.runtimes[kind], kind=kind, keep_alive_s=keep)
            if e.release_timer is not None:
                e.release_timer.cancel()
                e.release_timer = None
            if e.releasing is not None:
                await e.releasing
                e.releasing = None
            e.refs.add(batch_id)
            if e.starting is None and not await self._usable(e):
                e.starting = asyncio.get_running_loop().create_task(self._bring_up(e, options, record, batch_id))
            starting = e.starting
        try:
            if starting is not None:
                await asyncio.shield(starting)
        except BaseException:
            async with self._lock:
                if e.starting is starting and starting.done():
                    e.starting = None
            await self.detach(batch_id, options)
            raise
        async with self._lock:
            if e.starting is starting:
                e.starting = None
        assert e.url is not None
        if e.handle is not None:
            await record(dict(e.handle, restarts=len(e.restarts)))
        self._ensure_watch()
        return e.url

    async def _usable(self, e: _Engine) -> bool:
        if e.handle is None or e.url is None:
            return False
        if await e.runtime.alive(e.handle):
            return True
        self._record_death(e, e.handle)
        with contextlib.suppress(Exception):
            await e.runtime.release(e.handle)
        self._given_back(e, e.handle)
        e.handle = e.url = None
        return False

    @staticmethod
    def _record_death(e: _Engine, handle: RuntimeHandle) -> None:
        """Count a death of ``e`` (its exit code and last log lines) towards its restarts."""
        info = getattr(e.runtime, "exit_info", lambda h: {})(handle)
        tail = (info.get("log_tail") or "").strip().splitlines()[-10:]
        e.restarts.append({"at": time.time(), "exit_code": info.get("exit_code"), "log_tail": "\n".join(tail)})
        log.error("engine %s died (exit code %s); %d restart(s) so far", e.key, info.get("exit_code"),
                  len(e.restarts))

    async def _bring_up(self, e: _Engine, options: dict[str, Any], record: RecordHandle, batch_id: str = "") -> str:
        if len(e.restarts) > self.max_restarts:
            last = e.restarts[-1]
            raise EngineFailed(
                f"The engine died {len(e.restarts)} times; the last exit code was {last.get('exit_code')}. "
                f"Last lines of its log:\n{last.get('log_tail') or '(empty)'}"
            )
        if e.restarts:
            # Back off between restarts: 1, 2, 4 ... s.
            await asyncio.sleep(min(30.0, 2.0 ** (len(e.restarts) - 1)))
        _, spec, timeout_s, keep = self._spec_for(options, batch_id)
        e.keep_alive_s = keep
        t0 = time.monotonic()

        async def remember(handle: RuntimeHandle) -> None:
            self._held(e, handle)
            await record(dict(handle, restarts=len(e.restarts)))

        handle = await e.runtime.acquire(spec, owner=e.key, record=remember)
        self._held(e, handle)
        try:
            endpoint = await e.runtime.wait_ready(handle, timeout_s=timeout_s)
        except RuntimeStartError as exc:
            with contextlib.suppress(Exception):
                await e.runtime.release(handle)
            self._given_back(e, handle)
            e.handle = None
            raise EngineFailed(exc.message) from exc
        e.url = endpoint.url
        e.up_since = time.monotonic()
        log.info("engine %s ready at %s after %.1f s", e.key, e.url, time.monotonic() - t0)
        return e.url

    async def detach(self, batch_id: str, options: dict[str, Any]) -> None:
        """The batch no longer uses its engine; release it after its keep-alive."""
        key = self.key_for(options)
        if key is None:
            return
        async with self._lock:
            e = self._engines.get(key)
            if e is None:
                return
            e.refs.discard(batch_id)
            if e.refs or e.starting is not None:
                return
            if e.keep_alive_s > 0 and e.handle is not None:
                loop = asyncio.get_running_loop()
                e.release_timer = loop.call_later(e.keep_alive_s, lambda: self._expire(key))
                return
            e.releasing = asyncio.get_running_loop().create_task(self._release(key))
        await asyncio.shield(e.releasing)

    def _expire(self, key: str) -> None:
        e = self._engines.get(key)
        if e is not None and not e.refs:
            e.release_timer = None
            e.releasing = asyncio.get_running_loop().create_task(self._release(key))

    async def _release(self, key: str) -> None:
        e = self._engines.get(key)
        if e is None:
            return
        handle, e.handle, e.url = e.handle, None, None
        if handle is not None:
            if not await e.runtime.alive(handle):
                # Its batches left because it died (they saw it unreachable before
                # the watch did): count the death, or a crash loop never ends.
                self._record_death(e, handle)
            try:
                await e.runtime.release(handle)
            finally:
                self._given_back(e, handle)
            log.info("engine %s released", key)
        # An engine that died keeps its entry (and so its restart count) while
        # batches come back for it.
        if not e.refs and not e.restarts and self._engines.get(key) is e:
            del self._engines[key]

    async def aclose(self) -> None:
        """Release every engine (the service is stopping)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(BaseException):
                await self._watch
        for e in list(self._engines.values()):
            if e.release_timer is not None:
                e.release_timer.cancel()
            if e.starting is not None:
                e.starting.cancel()
                with contextlib.suppress(BaseException):
                    await e.starting
            e.refs.clear()
            with contextlib.suppress(Exception):
                await self._release(e.key)
        self._engines.clear()
        for rt in self.runtimes.values():
            with contextlib.suppress(Exception):
                await rt.aclose()
