"""Engine clients: the one small interface the executor talks to.

``EngineClient.send(path, body) -> EngineReply`` plus ``aclose()``. Retries,
concurrency and checkpoints live in the executor, never here. Transport errors are
translated into overnight's ``RetryableEngineError`` at this boundary.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from overnight.errors import RetryableEngineError

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
    """aiohttp client with a keep-alive connection pool sized for the dispatch window."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_connections: int = 4096,
    ) -> None:
        self.base_url = engine_base_url(base_url)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, headers=self._headers, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def send(self, path: str, body: bytes) -> EngineReply:
        session = self._get_session()
        try:
            async with session.post(self.base_url + path, data=body) as resp:
                data = await resp.read()
                return EngineReply(
                    status=resp.status,
                    body=data,
                    request_id=resp.headers.get("x-request-id"),
                    retry_after_s=_retry_after(resp.headers.get("Retry-After")) if resp.status >= 400 else None,
                )
        except asyncio.TimeoutError as exc:
            raise RetryableEngineError("The engine did not answer in time.", code="request_timeout") from exc
        except aiohttp.ClientError as exc:
            raise RetryableEngineError(f"Could not reach the engine: {exc}", code="engine_unreachable") from exc

    async def get_json(self, path: str) -> Any:
        """GET a JSON document (``/v1/models``, health), for the API and runtimes."""
        session = self._get_session()
        try:
            async with session.get(self.base_url + path, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                return resp.status, await resp.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise RetryableEngineError(f"Could not reach the engine: {exc}", code="engine_unreachable") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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
