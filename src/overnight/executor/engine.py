"""Engine clients: the one small interface the executor talks to.

``EngineClient.send(path, body) -> EngineReply`` plus ``aclose()``. Retries,
concurrency and checkpoints live in the executor, never here. Transport errors are
translated into overnight's ``RetryableEngineError`` at this boundary.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from overnight.errors import RetryableEngineError
from overnight.executor.http1 import ConnectionFailed, HttpPool, RequestTimedOut

__all__ = ["EngineClient", "EngineReply", "FakeEngine", "HttpEngineClient", "engine_base_url"]


@dataclass(slots=True)
class EngineReply:
    """An HTTP answer from the engine, whatever its status."""

    status: int
    body: bytes
    request_id: str | None = None
    retry_after_s: float | None = None


class EngineClient(Protocol):
    async def send(self, path: str, body: bytes) -> EngineReply:
        """POST ``body`` (JSON bytes) to ``path`` (e.g. ``/v1/chat/completions``).
        Raises ``RetryableEngineError`` when no HTTP answer came back."""

    async def aclose(self) -> None: ...


def engine_base_url(url: str) -> str:
    """Accept ``http://host:port`` or ``http://host:port/v1`` for the same engine."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


class HttpEngineClient:
    """The engine over HTTP/1.1 keep-alive (``executor/http1.py``), sized for the
    dispatch window."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_connections: int = 4096,
    ) -> None:
        self.base_url = engine_base_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self._pool = HttpPool(self.base_url, headers=headers, timeout_s=timeout_s, max_connections=max_connections)

    async def send(self, path: str, body: bytes) -> EngineReply:
        try:
            r = await self._pool.request("POST", path, body)
        except RequestTimedOut as exc:
            raise RetryableEngineError("The engine did not answer in time.", code="request_timeout") from exc
        except ConnectionFailed as exc:
            raise RetryableEngineError(f"Could not reach the engine: {exc}", code="engine_unreachable") from exc
        return EngineReply(
            status=r.status,
            body=r.body,
            request_id=r.request_id,
            retry_after_s=_retry_after(r.retry_after) if r.status >= 400 else None,
        )

    async def get(self, path: str, *, timeout_s: float = 10.0) -> tuple[int, bytes]:
        """GET ``path``; ``(status, body)``. Raises ``RetryableEngineError`` without an answer."""
        try:
            r = await self._pool.request("GET", path, timeout_s=min(timeout_s, self.timeout_s))
        except (RequestTimedOut, ConnectionFailed) as exc:
            raise RetryableEngineError(f"Could not reach the engine: {exc}", code="engine_unreachable") from exc
        return r.status, r.body

    async def get_json(self, path: str) -> Any:
        """GET a JSON document (``/v1/models``, health), for the API and runtimes:
        ``(status, body bytes)``."""
        return await self.get(path)

    async def aclose(self) -> None:
        await self._pool.aclose()


Handler = Callable[[str, dict[str, Any]], "tuple[int, Any] | Awaitable[tuple[int, Any]]"]


class FakeEngine:
    """An in-process engine for tests: ``handler(path, body) -> (status, body)``.

    The handler may be sync or async and may raise ``RetryableEngineError`` to
    simulate a timeout or a dropped connection.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.calls = 0

    async def send(self, path: str, body: bytes) -> EngineReply:
        self.calls += 1
        result = self.handler(path, orjson.loads(body))
        if inspect.isawaitable(result):
            result = await result
        status, payload = result  # type: ignore[misc]
        return EngineReply(status=status, body=orjson.dumps(payload), request_id=f"fake-{self.calls}")

    async def aclose(self) -> None:
        return None
