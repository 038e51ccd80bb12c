"""The composition root: everything ``overnight serve`` runs on, built from the
settings in one place.

``open_services(settings)`` opens the store and storage, starts the in-process
mock engine when asked to, builds the engine pool, runtimes and engine manager,
template source, scheduler and sweeper, and undoes all of it in reverse order.
The API app (``api/app.py``) only mounts routes on what this yields; tests use it
the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overnight.batches.service import RUNTIME_TYPES, RuntimeRules
from overnight.batches.validation import ValidationLimits
from overnight.config import Settings
from overnight.executor.retry import RetryPolicy
from overnight.files.retention import run_sweeper
from overnight.replica import ReplicaIdentity
from overnight.runtimes.egress import EndpointPolicy
from overnight.runtimes.manager import EngineManager
from overnight.scheduler.loop import EnginePool, Scheduler
from overnight.scheduler.runner import RunnerConfig
from overnight.secret_box import SecretBox, load_or_create_key_file
from overnight.storage import open_storage
from overnight.storage.base import Storage
from overnight.store import connect_store
from overnight.store.base import Store

__all__ = [
    "ConsoleServices", "Services", "build_scheduler", "kubernetes_deployment_runtime", "kubernetes_job_runtime", "local_runtime", "open_console", "open_persistence", "open_services", "retry_policy",
    "runner_config",
]

log = logging.getLogger("overnight")


@dataclass
class Services:
    settings: Settings
    store: Store
    storage: Storage
    scheduler: Scheduler
    policy: EndpointPolicy
    secrets: SecretBox
    rules: RuntimeRules
    engines: EngineManager
    api_keys: dict[str, str]
    #: Webhook settings (``webhooks/config.py``); batches' webhook_url is checked against them.
    webhooks: Any = None
    #: The console (``console/service.py``): jobs, providers and the planner; None when off.
    console: Any = None
    #: Keys of consoles running as their own processes (``OVERNIGHT_TRUSTED_CONSOLE_KEYS``).
    console_keys: frozenset[str] = frozenset()


@contextlib.asynccontextmanager
async def _mock_engine(settings: Settings) -> AsyncIterator[str]:
    """Run the built-in mock engine in this process; yields its URL."""
    from overnight.mock_engine import MockEngineConfig, serve
    from overnight.runtimes.local import reserve_port

    port, hold = reserve_port()  # until the engine listens: nothing else takes the port meanwhile
    started = asyncio.Event()
    try:
        task = asyncio.create_task(
            serve(MockEngineConfig(latency_ms=settings.mock_latency_ms), host="127.0.0.1", port=port, started=started)
        )
        await asyncio.wait_for(started.wait(), 10)
    finally:
        if hold is not None:
            hold.close()
    log.info("mock engine listening on 127.0.0.1:%d", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def retry_policy(settings: Settings) -> RetryPolicy:
    """How a request is retried: the same for ``serve``, ``run`` and ``worker``."""
    return RetryPolicy(
        max_attempts=settings.max_attempts, base_delay_s=settings.backoff_base_s, max_delay_s=settings.backoff_max_s,
    )


def runner_config(settings: Settings) -> RunnerConfig:
    return RunnerConfig(
        spool_dir=settings.spool_dir(),
        lease_s=settings.lease_s,
        heartbeat_s=settings.heartbeat_s,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        limits=ValidationLimits(max_requests=settings.max_requests_per_file, max_bytes=settings.max_input_bytes),
        concurrency=settings.concurrency_limits(),
        policy=retry_policy(settings),
        output_expires_after_s=settings.output_expires_after_s,
        engine_unreachable_timeout_s=settings.engine_unreachable_timeout_s,
        engine_recheck_s=settings.engine_recheck_s,
    )


def ssh_runtime(settings: Settings) -> Any:
    """The ssh runtime: engines on the machines the RunPod / Lambda Cloud providers rent,
    reached over SSH (``runtimes/ssh.py``; asyncssh is imported when it first connects)."""
    import importlib.util

    from overnight.runtimes.ssh import SshRuntime

    if importlib.util.find_spec("asyncssh") is None:
        log.warning("the ssh runtime is on but asyncssh is not installed: pip install 'overnight[ssh]'")
    return SshRuntime(log_dir=settings.data_dir / "engines", key_file=settings.ssh_key_file)


def local_runtime(*, log_dir: Path, installation_id: str, gpus: Any = None) -> Any:
    """The local-process runtime (``serve``'s engine manager and ``run --template``)."""
    from overnight.runtimes.local import LocalRuntime

    return LocalRuntime(log_dir=log_dir, installation_id=installation_id, gpus=gpus)


@contextlib.asynccontextmanager
async def open_persistence(settings: Settings) -> AsyncIterator[tuple[Store, Storage]]:
    """The store and storage the settings name, opened; closed on exit."""
    store = connect_store(settings.resolved_store_url())
    storage = open_storage(settings.resolved_storage_url())
    await store.open()
    try:
        await storage.open()
        try:
            yield store, storage
        finally:
            await storage.aclose()
    finally:
        await store.aclose()


def build_scheduler(  # type: ignore[no-untyped-def]
    settings: Settings, *, store, storage, engine_url: str | None, replica_id: str,
    policy: EndpointPolicy | None = None, secrets: SecretBox | None = None, runtimes: EngineManager | None = None,
    kubernetes: Any = None,
) -> Scheduler:
    from overnight.scheduler.remote import RemoteOptions

    config = runner_config(settings)
    engines = EnginePool(
        default_url=engine_url, default_api_key=settings.engine_api_key, timeout_s=settings.request_timeout_s,
        max_response_bytes=settings.max_response_bytes,
        policy=policy, secrets=secrets,
    )
    return Scheduler(
        store=store,
        storage=storage,
        engines=engines,
        config=config,
        replica_id=replica_id,
        max_running=settings.max_running_batches,
        poll_s=settings.scheduler_poll_s,
        global_concurrency=settings.max_concurrency_global,
        runtimes=runtimes,
        kubernetes=kubernetes,
        remote_options=RemoteOptions(poll_s=settings.kubernetes_poll_s,
                                     unschedulable_timeout_s=settings.kubernetes_unschedulable_timeout_s),
    )


def _egress(settings: Settings, engine_url: str | None) -> tuple[EndpointPolicy, SecretBox]:
    """Which endpoints tenants may name, and the key their engine API keys are sealed with."""
    keyed = bool(settings.tenant_for_key())
    policy = EndpointPolicy(settings.allowed_endpoints, keyed=keyed, default_url=engine_url)
    key = settings.secret_key
    if not key and not keyed:
        key = load_or_create_key_file(settings.data_dir)  # open mode: one user, one machine
    return policy, SecretBox(key)




def kubernetes_job_runtime(settings: Settings) -> Any:
    """The kubernetes-job runtime from the settings (it connects on first use)."""
    from overnight.runtimes.kubernetes.job import KubernetesJobRuntime

    return KubernetesJobRuntime(
        config=settings.kube_config(), namespace=settings.kubernetes_namespace,
        namespaces=_namespaces(settings), image=settings.kubernetes_image,
        store_secret=settings.kubernetes_store_secret, storage_secret=settings.kubernetes_storage_secret,
        backoff_limit_per_index=settings.kubernetes_backoff_limit_per_index,
    )


def _namespaces(settings: Settings) -> tuple[str, ...]:
    return tuple(n.strip() for n in settings.kubernetes_namespaces.split(",") if n.strip())


def kubernetes_deployment_runtime(settings: Settings, replica_id: str) -> Any:
    from overnight.runtimes.kubernetes.deployment import KubernetesDeploymentRuntime

    return KubernetesDeploymentRuntime(
        config=settings.kube_config(), namespace=settings.kubernetes_namespace, namespaces=_namespaces(settings),
        image=settings.kubernetes_image, replica_id=replica_id, service_url=settings.kubernetes_service_url,
    )


async def _sweep_kubernetes(settings: Settings, store: Store, rt: Any, replica: str | None) -> None:
    """At start-up and then every ``kubernetes_sweep_interval_s``: delete labelled
    objects whose batch is terminal or unknown (an engine Deployment: that no
    active batch uses; this replica's own are its engine manager's to release)."""
    from overnight.batches.states import TERMINAL, BatchStatus
    from overnight.runtimes.manager import EngineManager

    async def live_keys() -> set[str]:
        keys = set()
        for rec in await store.list_active_batches():
            key = EngineManager.key_for(rec.options)
            if key:
                keys.add(key)
        return keys

    async def is_live(batch_id: str, labels: dict[str, str] | None = None) -> bool:
        labels = labels or {}
        if replica is not None and labels.get("overnight.dev/replica") == replica:
            return True
        engine_key = labels.get("overnight.dev/engine-key")
        if labels.get("app.kubernetes.io/component") == "engine" and engine_key:
            return any(engine_key in k for k in await live_keys())
        rec = await store.get_batch(batch_id)
        return rec is not None and BatchStatus(rec.status) not in TERMINAL

    while True:
        try:
            await rt.sweep(is_live, grace_s=settings.kubernetes_sweep_grace_s)
        except Exception as exc:  # the cluster is unreachable now: next time
            log.warning("Kubernetes orphan sweep failed: %s", exc)
        await asyncio.sleep(settings.kubernetes_sweep_interval_s)


async def _console(settings: Settings, store: Store, storage: Storage, rules: RuntimeRules,
                   scheduler: Scheduler, webhooks: Any = None, secrets: SecretBox | None = None) -> Any:
    """The console's planner and providers, started."""
    from overnight.console.service import Console, build_provisioners, installation_id

    console = Console(
        store=store, storage=storage, settings=settings, rules=rules,
        provisioners=build_provisioners(settings, gpus=rules.gpus, templates=rules.templates),
        installation=await installation_id(store, settings.installation_id),
        limits=ValidationLimits(max_requests=settings.max_requests_per_file, max_bytes=settings.max_input_bytes),
        on_batch=lambda _batch_id: scheduler.wake(),
        webhooks=webhooks, secrets=secrets,
    )
    if scheduler.engines.policy is not None:
        # Engines the console provisioned are not tenant-named: allowed in keyed mode too.
        console.planner.on_endpoint = scheduler.engines.policy.trust
    console.start()
    return console


async def _template_sources(settings: Settings, stack: contextlib.AsyncExitStack) -> Any:
    """The templates directory and/or the labelled ConfigMaps, as one source (None: neither)."""
    from overnight.templates.source import CombinedSource, DirectorySource

    sources: list[Any] = []
    if settings.templates_dir is not None:
        sources.append(DirectorySource(settings.templates_dir))
    if settings.templates_configmaps.strip():
        if not settings.kubernetes:
            raise ValueError("OVERNIGHT_TEMPLATES_CONFIGMAPS needs a cluster: set OVERNIGHT_KUBERNETES")
        from overnight.templates.configmap import ConfigMapSource

        cm = ConfigMapSource(settings.kube_config(), settings.templates_configmaps,
                             selector=settings.templates_configmap_selector)
        await cm.start()
        stack.push_async_callback(cm.aclose)
        await cm.ready(timeout_s=30)  # a server that cannot read its templates says so at start
        sources.append(cm)
    if not sources:
        return None
    return sources[0] if len(sources) == 1 else CombinedSource(*sources)


def _runtime_rules(settings: Settings, engine_url: str | None, templates: Any, gpus: Any,
                   kubernetes: Any = None, kube_deployments: Any = None) -> RuntimeRules:
    allowed = settings.allowed_runtimes() & frozenset(RUNTIME_TYPES)
    check = None
    if kubernetes is not None and kube_deployments is not None:
        def check(resolved: Any, rt: dict[str, Any]) -> None:
            (kubernetes if rt.get("type") == "kubernetes-job" else kube_deployments).check(resolved, rt)
    default = settings.default_runtime or None
    if default is not None and default not in allowed:
        raise ValueError(f"OVERNIGHT_DEFAULT_RUNTIME={default!r} is not in OVERNIGHT_RUNTIMES={settings.runtimes}")
    return RuntimeRules(allowed=allowed, default=default, templates=templates, gpus=gpus,
                        default_engine=bool(engine_url),
                        kubernetes_check=check)


def _engine_manager(settings: Settings, installation_id: str, kube_deployments: Any = None,
                    ) -> tuple[EngineManager, Any]:
    from overnight.runtimes.gpus import GpuPool

    gpus = GpuPool.from_env()
    local = local_runtime(log_dir=settings.data_dir / "engines", installation_id=installation_id, gpus=gpus)
    runtimes: dict[str, Any] = {"local": local}
    if kube_deployments is not None:
        runtimes["kubernetes-deployment"] = kube_deployments
    if "ssh" in settings.allowed_runtimes():
        runtimes["ssh"] = ssh_runtime(settings)
    return EngineManager(runtimes), gpus


@contextlib.asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    """Open everything ``serve`` needs; close it all on exit (engines released)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    console_keys = settings.console_key_set()  # a key that is no API key fails the start
    identity = ReplicaIdentity(settings.data_dir, settings.replica_id)
    try:
        async with contextlib.AsyncExitStack() as stack:
            store, storage = await stack.enter_async_context(open_persistence(settings))
            engine_url = settings.engine_url
            if engine_url == "mock":
                engine_url = await stack.enter_async_context(_mock_engine(settings))
            policy, secrets = _egress(settings, engine_url)
            from overnight.webhooks.config import WebhookConfig
            from overnight.webhooks.dispatcher import WebhookDispatcher

            webhooks = WebhookConfig.from_settings(settings, keyed=bool(settings.tenant_for_key()))
            templates = await _template_sources(settings, stack)
            kubernetes = kube_deployments = None
            if settings.kubernetes:
                kubernetes = kubernetes_job_runtime(settings)
                stack.push_async_callback(kubernetes.aclose)
                kube_deployments = kubernetes_deployment_runtime(settings, identity.id)
                stack.push_async_callback(kube_deployments.aclose)
            manager, gpus = _engine_manager(settings, identity.id.replace("/", "_").replace(":", "_"),
                                            kube_deployments)
            await manager.start()
            stack.push_async_callback(manager.aclose)
            scheduler = build_scheduler(
                settings, store=store, storage=storage, engine_url=engine_url, replica_id=identity.id,
                policy=policy, secrets=secrets, runtimes=manager, kubernetes=kubernetes,
            )
            services = Services(
                settings=settings.model_copy(update={"engine_url": engine_url}), store=store, storage=storage,
                scheduler=scheduler, policy=policy, secrets=secrets,
                rules=_runtime_rules(settings, engine_url, templates, gpus, kubernetes, kube_deployments),
                engines=manager,
                api_keys=settings.tenant_for_key(),
                webhooks=webhooks,
                console_keys=console_keys,
            )
            if settings.console and policy is not None:
                # The console's machines (endpoints, ssh targets) are trusted before the
                # scheduler claims their batches after a restart, not at the planner's first tick.
                from overnight.console.planner import trusted_targets

                for target in await trusted_targets(store):
                    policy.trust(target)
            await scheduler.start()
            dispatcher = WebhookDispatcher(store=store, config=webhooks, secrets=secrets, replica_id=identity.id,
                                           jobs=settings.console)
            await dispatcher.start()
            stack.push_async_callback(dispatcher.stop)
            if settings.console:
                services.console = await _console(settings, store, storage, services.rules, scheduler, webhooks,
                                                  secrets)
                services.console.job_webhooks.on_event = dispatcher.wake
                stack.push_async_callback(services.console.aclose)
            sweepers = [asyncio.create_task(
                run_sweeper(store=store, storage=storage, interval_s=settings.sweep_interval_s)
            )]
            if kubernetes is not None:
                sweepers.append(asyncio.create_task(
                    _sweep_kubernetes(settings, store, kubernetes, kube_deployments.replica),
                    name="overnight-kubernetes-sweep"))
            try:
                yield services
            finally:
                for sweeper in sweepers:
                    sweeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sweeper
                await scheduler.stop()
                await scheduler.engines.aclose()
    finally:
        identity.release()


@dataclass
class ConsoleServices:
    """What ``overnight console`` as its own process runs on (``open_console``)."""

    settings: Settings
    store: Store
    #: The console (``console/service.py``); its planner's gateway is ``remote``.
    console: Any
    #: The batches service over its API (``console/remote.py``): batches and files.
    remote: Any
    api_keys: dict[str, str]
    #: No file storage here: files live at the batches service (the routes check this).
    storage: None = None


@contextlib.asynccontextmanager
async def open_console(settings: Settings) -> AsyncIterator[ConsoleServices]:
    """Open what ``overnight console`` needs: its own store (jobs, provisions,
    models), the templates, the providers, a client of the batches service at
    ``metadata_service_url``, and the planner, started; closed in reverse order.
    No scheduler, engines or file storage: batches run at the batches service."""
    from overnight.console.remote import RemoteBatches, check_mds_keys
    from overnight.console.service import Console, build_provisioners, installation_id

    if not settings.metadata_service_url:
        raise ValueError("the console as its own process needs the batches service's URL: "
                         "--metadata-service-url or METADATA_SERVICE_URL")
    api_keys = settings.tenant_for_key()
    mds_keys = settings.console_mds_key_map()
    check_mds_keys(api_keys, mds_keys)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        store = connect_store(settings.resolved_store_url())
        await store.open()
        stack.push_async_callback(store.aclose)
        templates = await _template_sources(settings, stack)
        remote = RemoteBatches(settings.metadata_service_url, keys=mds_keys, timeout_s=settings.console_mds_timeout_s)
        stack.push_async_callback(remote.aclose)
        # Jobs' webhooks (job.*) are sent from here, where the jobs are; batches' by the batches service.
        from overnight.webhooks.config import WebhookConfig
        from overnight.webhooks.dispatcher import WebhookDispatcher

        webhooks = WebhookConfig.from_settings(settings, keyed=bool(api_keys))
        key = settings.secret_key or (None if api_keys else load_or_create_key_file(settings.data_dir))
        secrets = SecretBox(key)
        console = Console(
            store=store, storage=None, settings=settings, rules=RuntimeRules(templates=templates),
            provisioners=build_provisioners(settings, templates=templates),  # local: this host's GPUs
            installation=await installation_id(store, settings.installation_id), limits=None, batches=remote,
            webhooks=webhooks, secrets=secrets,
        )
        dispatcher = WebhookDispatcher(store=store, config=webhooks, secrets=secrets, batches=False, jobs=True,
                                       replica_id=f"console-{socket.gethostname()}-{os.getpid()}")
        console.job_webhooks.on_event = dispatcher.wake
        await dispatcher.start()
        stack.push_async_callback(dispatcher.stop)
        console.start()
        stack.push_async_callback(console.aclose)
        yield ConsoleServices(settings=settings, store=store, console=console, remote=remote, api_keys=api_keys)
