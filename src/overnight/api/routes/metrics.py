"""``/metrics``: Prometheus exposition of this replica."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from overnight.metrics import build_registry, render

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state
    if getattr(state, "metrics_registry", None) is None:
        state.metrics_registry = build_registry(state.scheduler)
    return Response(render(state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
