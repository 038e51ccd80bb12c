"""``create_app(settings)``: the FastAPI app and the lifespan that owns its resources.

Nothing connects at import time. The lifespan opens the store and storage, starts
the in-process mock engine if asked to, starts the scheduler, and undoes all of it
in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

from fastapi import FastAPI

from overnight import __version__
from overnight.api.edge import EdgeMiddleware, public_paths
from overnight.api.errors import install_error_handlers
from overnight.api.routes import batches, files, health, metrics, models
from overnight.batches.validation import ValidationLimits
from overnight.config import Settings
from overnight.executor.limiter import ConcurrencyLimits
from overnight.files.retention import run_sweeper
from overnight.executor.retry import RetryPolicy
from overnight.replica import ReplicaIdentity
from overnight.runtimes.egress import EndpointPolicy
from overnight.secret_box import SecretBox, load_or_create_key_file
from overnight.scheduler.loop import EnginePool, Scheduler
from overnight.scheduler.runner import RunnerConfig
from overnight.storage import open_storage
from overnight.store import connect_store

__all__ = ["create_app"]

log = logging.getLogger("overnight")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def _mock_engine(settings: Settings) -> AsyncIterator[str]:
    """Run the built-in mock engine in this process; yields its URL."""
    from overnight.mock_engine import MockEngineConfig, serve

    port = _free_port()
    started = asyncio.Event()
    task = asyncio.create_task(
        serve(MockEngineConfig(latency_ms=settings.mock_latency_ms), host="127.0.0.1", port=port, started=started)
    )
    await asyncio.wait_for(started.wait(), 10)
    log.info("mock engine listening on 127.0.0.1:%d", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def build_scheduler(  # type: ignore[no-untyped-def]
    settings: Settings, *, store, storage, engine_url: str | None, replica_id: str,
    policy: EndpointPolicy | None = None, secrets: SecretBox | None = None,
) -> Scheduler:
    config = RunnerConfig(
        spool_dir=settings.spool_dir(),
        lease_s=settings.lease_s,
        heartbeat_s=settings.heartbeat_s,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        limits=ValidationLimits(max_requests=settings.max_requests_per_file, max_bytes=settings.max_input_bytes),
        concurrency=settings.concurrency_limits(),
        policy=RetryPolicy(
            max_attempts=settings.max_attempts,
            base_delay_s=settings.backoff_base_s,
            max_delay_s=settings.backoff_max_s,
        ),
        output_expires_after_s=settings.output_expires_after_s,
        engine_unreachable_timeout_s=settings.engine_unreachable_timeout_s,
        engine_recheck_s=settings.engine_recheck_s,
    )
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
    )


def _egress(settings: Settings, engine_url: str | None) -> tuple[EndpointPolicy, SecretBox]:
    """Which endpoints tenants may name, and the key their engine API keys are sealed with."""
    keyed = bool(settings.tenant_for_key())
    policy = EndpointPolicy(settings.allowed_endpoints, keyed=keyed, default_url=engine_url)
    key = settings.secret_key
    if not key and not keyed:
        key = load_or_create_key_file(settings.data_dir)  # open mode: one user, one machine
    return policy, SecretBox(key)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        identity = ReplicaIdentity(settings.data_dir, settings.replica_id)
        store = connect_store(settings.resolved_store_url())
        storage = open_storage(settings.resolved_storage_url())
        await store.open()
        await storage.open()
        async with contextlib.AsyncExitStack() as stack:
            engine_url = settings.engine_url
            if engine_url == "mock":
                engine_url = await stack.enter_async_context(_mock_engine(settings))
            policy, secrets = _egress(settings, engine_url)
            scheduler = build_scheduler(
                settings, store=store, storage=storage, engine_url=engine_url, replica_id=identity.id,
                policy=policy, secrets=secrets,
            )
            app.state.endpoint_policy, app.state.secrets = policy, secrets
            app.state.settings = settings.model_copy(update={"engine_url": engine_url})
            app.state.store, app.state.storage, app.state.scheduler = store, storage, scheduler
            app.state.api_keys = settings.tenant_for_key()
            await scheduler.start()
            sweeper = asyncio.create_task(
                run_sweeper(store=store, storage=storage, interval_s=settings.sweep_interval_s)
            )
            try:
                yield
            finally:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
                await scheduler.stop()
                await scheduler.engines.aclose()
        await storage.aclose()
        await store.aclose()
        identity.release()

    app = FastAPI(title="overnight", version=__version__, lifespan=lifespan)
    app.add_middleware(
        EdgeMiddleware,
        keys=settings.tenant_for_key(),
        public=public_paths(metrics_require_key=settings.metrics_require_key, public_docs=settings.public_docs),
        max_json_body_bytes=settings.max_json_body_bytes,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    for r in (files.router, batches.router, models.router):
        app.include_router(r, prefix="/v1")
    return app
