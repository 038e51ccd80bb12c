"""``/v1/models``: what the default engine serves."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter

from overnight.api.deps import SchedulerDep, TenantDep
from overnight.errors import EngineError
from overnight.executor.engine import HttpEngineClient

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
async def list_models(scheduler: SchedulerDep, tenant: TenantDep) -> dict[str, Any]:
    engines = scheduler.engines
    if not engines.default_url:
        return {"object": "list", "data": []}
    client = HttpEngineClient(engines.default_url, api_key=engines.default_api_key, timeout_s=10)
    try:
        status, body = await client.get_json("/v1/models")
    except EngineError:
        return {"object": "list", "data": []}
    finally:
        await client.aclose()
    if status != 200:
        return {"object": "list", "data": []}
    return orjson.loads(body)
