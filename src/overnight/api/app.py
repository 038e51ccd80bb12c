"""``create_app(settings)``: the FastAPI app. Its lifespan opens the composition
root (``overnight.composition.open_services``) and mounts the routes on it; nothing
connects at import time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from overnight import __version__
from overnight._diagnostics import install_task_dump
from overnight.api.edge import EdgeMiddleware, public_paths
from overnight.api.errors import install_error_handlers
from overnight.api.routes import batches, console, files, health, jobs, metrics, models
from overnight.composition import open_services
from overnight.config import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_task_dump()
        async with open_services(settings) as services:
            app.state.services = services
            app.state.endpoint_policy, app.state.secrets = services.policy, services.secrets
            app.state.settings = services.settings
            app.state.store, app.state.storage = services.store, services.storage
            app.state.scheduler = services.scheduler
            app.state.api_keys = services.api_keys
            app.state.console_keys = services.console_keys
            app.state.runtime_rules = services.rules
            yield

    app = FastAPI(title="overnight", version=__version__, lifespan=lifespan)
    app.add_middleware(
        EdgeMiddleware,
        keys=settings.tenant_for_key(),
        public=public_paths(metrics_require_key=settings.metrics_require_key, public_docs=settings.public_docs)
        | console.PUBLIC_PATHS,
        max_json_body_bytes=settings.max_json_body_bytes,
        # Uploads are streamed by their routes (the console's file proxy as well), never buffered here.
        streamed=frozenset({("POST", "/v1/files"), ("POST", "/api/v1/files/upload")}),
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(console.router)
    app.include_router(jobs.router)
    for r in (files.router, batches.router, models.router):
        app.include_router(r, prefix="/v1")
    return app
