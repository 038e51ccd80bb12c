"""``/metrics``: Prometheus exposition of this replica (``overnight.metrics``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from overnight.metrics import Metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state
    if getattr(state, "metrics", None) is None:
        # The console's jobs and provisions too, when it runs in this process.
        state.metrics = Metrics(state.scheduler, getattr(getattr(state, "services", None), "console", None))
    return Response(await state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
