"""An engine that already runs somewhere: nothing to start, nothing to release."""

from __future__ import annotations

from typing import Any

from overnight.errors import RuntimeStartError
from overnight.executor.engine import HttpEngineClient
from overnight.runtimes.base import Endpoint, RuntimeState

__all__ = ["EndpointRuntime"]


class EndpointRuntime:
    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.endpoint = Endpoint(url.rstrip("/"), api_key)
        self.state = RuntimeState.NEW

    async def start(self, template: dict[str, Any] | None = None) -> Endpoint:
        if self.state is not RuntimeState.NEW:
            raise RuntimeStartError(f"runtime for {self.endpoint.url} was already started")
        self.state = RuntimeState.RUNNING
        return self.endpoint

    async def stop(self) -> None:
        self.state = RuntimeState.STOPPED

    async def health(self) -> bool:
        client = HttpEngineClient(self.endpoint.url, api_key=self.endpoint.api_key)
        try:
            status, _ = await client.get_json("/v1/models")
            return status == 200
        except Exception:
            return False
        finally:
            await client.aclose()
