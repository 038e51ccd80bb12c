"""An engine that already runs somewhere: nothing to start, nothing to release."""

from __future__ import annotations

from typing import ClassVar

from overnight.runtimes.base import Endpoint, RecordHandle, RuntimeHandle, RuntimeSpec, _ignore

__all__ = ["EndpointRuntime", "EndpointSpec"]


class EndpointSpec(RuntimeSpec):
    """``{"type": "endpoint", "url": "http://host:port", "api_key": "..."}``."""

    type: str = "endpoint"
    url: str
    api_key: str | None = None


class EndpointRuntime:
    type: ClassVar[str] = "endpoint"
    spec_model: ClassVar[type[RuntimeSpec]] = EndpointSpec

    async def acquire(self, spec: RuntimeSpec, *, owner: str, record: RecordHandle = _ignore) -> RuntimeHandle:
        assert isinstance(spec, EndpointSpec)
        # The key is not part of the handle: handles are stored, secrets are not.
        handle = {"type": self.type, "owner": owner, "url": spec.url.rstrip("/")}
        await record(handle)
        return handle

    async def wait_ready(self, handle: RuntimeHandle, *, timeout_s: float) -> Endpoint:
        # An endpoint someone else runs is as ready as it will get; whether it
        # answers is the executor's business (engine health, outage handling).
        return Endpoint(handle["url"])

    async def alive(self, handle: RuntimeHandle) -> bool:
        return True

    async def release(self, handle: RuntimeHandle) -> None:
        return None

    async def sweep(self, live_owners: set[str]) -> list[RuntimeHandle]:
        return []

    async def aclose(self) -> None:
        return None
