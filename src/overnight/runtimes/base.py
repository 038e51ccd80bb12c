"""The runtime interface: where an engine lives and how to bring it up and down."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

__all__ = ["Endpoint", "Runtime", "RuntimeState"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An OpenAI-compatible engine reachable over HTTP."""

    url: str
    api_key: str | None = None


class RuntimeState(str, Enum):
    NEW = "new"  #: constructed, nothing started
    STARTING = "starting"  #: start() in progress
    RUNNING = "running"  #: the endpoint answers
    STOPPED = "stopped"  #: stop() ran; stopping again is a no-op


class Runtime(Protocol):
    state: RuntimeState

    async def start(self, template: dict[str, Any] | None = None) -> Endpoint:
        """Bring the engine up and return where it answers. A second start() raises."""

    async def stop(self) -> None:
        """Release everything start() acquired. Idempotent."""

    async def health(self) -> bool: ...
