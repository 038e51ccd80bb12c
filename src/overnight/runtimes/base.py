"""The runtime interface: where an engine lives and how to bring it up and down.

A runtime knows one way of running an engine (an endpoint that already runs, the
built-in mock engine, a local process, a Kubernetes Job, an SSH host) and nothing
about batches. Its life cycle, driven by the scheduler (or ``overnight run``):

1. ``acquire(spec, owner=..., record=...)`` starts whatever the spec asks for and
   returns a ``RuntimeHandle``: plain JSON naming what was started and where
   (pid and start time, object names, provider ids). The runtime calls
   ``record(handle)`` *before or as* each side effect happens, so the caller can
   store the handle with the batch and a process that dies mid-acquire leaves a
   trace the next one can release.
2. ``wait_ready(handle, timeout_s=...)`` returns the ``Endpoint`` once the
   engine's health endpoint answers 200, or raises ``RuntimeStartError``.
3. ``alive(handle)``: is what the handle names still there (reattach after a
   restart, or notice a crash)?
4. ``release(handle)``: idempotent; returns only once the resource is confirmed
   gone. Releasing something already gone is success.
5. ``sweep(live_owners)``: find resources carrying this installation's owner
   marker whose owner is not in ``live_owners`` and release them; returns the
   handles released.

Specs are validated pydantic models (an error names the field); handles are
dicts so that every store can keep them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

__all__ = ["Endpoint", "RecordHandle", "Runtime", "RuntimeHandle", "RuntimeSpec"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An OpenAI-compatible engine reachable over HTTP."""

    url: str
    api_key: str | None = None


class RuntimeSpec(BaseModel):
    """Base of every runtime's typed spec: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str


#: What a runtime reports as it goes: ``{"type": ..., "owner": ..., ...}``.
RuntimeHandle = dict[str, Any]
RecordHandle = Callable[[RuntimeHandle], Awaitable[None]]


async def _ignore(_: RuntimeHandle) -> None:
    return None


class Runtime(Protocol):
    #: The ``type`` this runtime answers to in ``extra_body.overnight.runtime``.
    type: ClassVar[str]
    #: The pydantic model its spec is validated with.
    spec_model: ClassVar[type[RuntimeSpec]]

    async def acquire(self, spec: RuntimeSpec, *, owner: str, record: RecordHandle = _ignore) -> RuntimeHandle:
        """Start what ``spec`` asks for, for ``owner`` (a batch id or an engine
        key); ``record`` is awaited with the handle before or as side effects
        happen."""

    async def wait_ready(self, handle: RuntimeHandle, *, timeout_s: float) -> Endpoint:
        """Return the endpoint once the engine is healthy; raise ``RuntimeStartError``
        if it is not within ``timeout_s`` or what the handle names died."""

    async def alive(self, handle: RuntimeHandle) -> bool:
        """Is what the handle names still there?"""

    async def release(self, handle: RuntimeHandle) -> None:
        """Stop and remove what the handle names; idempotent; returns once it is gone."""

    async def sweep(self, live_owners: set[str]) -> list[RuntimeHandle]:
        """Release resources with this installation's owner marker whose owner is
        not live; return what was released."""

    async def aclose(self) -> None:
        """Drop clients and connections (not the resources)."""
