"""``create_console_app(settings)``: the app of ``overnight console`` as its own
process. The same ``/api/v1`` routes as ``overnight serve`` serves (jobs, models,
the file proxy, the catalog), behind the same API keys, on what
``overnight.composition.open_console`` opens; plus ``/health`` and ``/metrics``.
No ``/v1``: batches and files are the batches service's, reached over its API.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from overnight import __version__
from overnight._diagnostics import install_task_dump
from overnight.api.edge import EdgeMiddleware, public_paths
from overnight.api.errors import install_error_handlers
from overnight.api.routes import jobs
from overnight.composition import open_console
from overnight.config import Settings
from overnight.metrics import ConsoleMetrics

__all__ = ["create_console_app"]

#: The upload is streamed by its route (spooled, then sent on), not buffered by the edge.
STREAMED = frozenset({("POST", "/api/v1/files/upload")})

_routes = APIRouter()


@_routes.get("/health", tags=["health"])
async def health(request: Request) -> dict[str, Any]:
    """200 once the store is open and the planner runs. The batches service being
    down does not make the console unhealthy (jobs wait for it; restarting the
    console would not help)."""
    services = request.app.state.services
    return {"status": "ok", "role": "console", "installation_id": services.console.installation_id,
            "metadata_service": services.remote.url}


@_routes.get("/metrics", tags=["metrics"])
async def metrics(request: Request) -> Response:
    """The console's metrics from this process's planner and store (``ConsoleMetrics``:
    the ``overnight_console_*`` families ``overnight serve`` exports for its embedded
    console) and the process's own; batches' families are the batches service's."""
    state = request.app.state
    if getattr(state, "metrics", None) is None:
        state.metrics = ConsoleMetrics(state.services.console)
    return Response(await state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_console_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_task_dump()
        async with open_console(settings) as services:
            app.state.services = services
            app.state.settings = services.settings
            app.state.store, app.state.storage = services.store, None
            app.state.api_keys = services.api_keys
            yield

    app = FastAPI(title="overnight console", version=__version__, lifespan=lifespan)
    app.add_middleware(
        EdgeMiddleware,
        keys=settings.tenant_for_key(),
        public=public_paths(metrics_require_key=settings.metrics_require_key, public_docs=settings.public_docs),
        max_json_body_bytes=settings.max_json_body_bytes,
        streamed=STREAMED,
    )
    install_error_handlers(app)
    app.include_router(_routes)
    app.include_router(jobs.router)
    return app
