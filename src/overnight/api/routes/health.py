"""``/health``: 200 once the store and storage are open and the scheduler runs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "replica": request.app.state.scheduler.replica_id}
