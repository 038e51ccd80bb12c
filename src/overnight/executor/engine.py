"""Engine clients: the one small interface the executor talks to.

``EngineClient.send(path, body) -> EngineReply`` plus ``aclose()``. Retries,
concurrency and checkpoints live in the executor, never here. Transport errors are
translated into overnight's errors at this boundary, each with a code:

* ``engine_unreachable``: no connection could be opened (an outage);
* ``connection_error``: a connection was accepted, then reset, closed before the
  answer was complete, or answered with something that is not HTTP;
* ``request_timeout``: no complete answer in time;
* ``response_too_large`` (``FatalEngineError``): the answer's body is over
  ``max_response_bytes``; it was not read to the end.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from overnight import defaults
from overnight.errors import EngineError, FatalEngineError, RetryableEngineError
from overnight.executor.http1 import ConnectFailed, ConnectionFailed, HttpPool, RequestTimedOut, ResponseTooLarge

__all__ = ["EngineClient", "EngineReply", "FakeEngine", "HttpEngineClient", "RequestLimit", "engine_base_url"]


@dataclass(slots=True)
class EngineReply:
    """An HTTP answer from the engine, whatever its status."""

    status: int
    body: bytes
    request_id: str | None = None
    retry_after_s: float | None = None
    #: The answer's ``Content-Type`` header, if it had one.
    content_type: str | None = None


class EngineClient(Protocol):
    async def send(self, path: str, body: bytes) -> EngineReply:
        """POST ``body`` (JSON bytes) to ``path`` (e.g. ``/v1/chat/completions``).
        Raises ``RetryableEngineError`` when no HTTP answer came back, or an
        ``EngineError`` with its code when the answer is unusable."""

    async def aclose(self) -> None: ...


def engine_base_url(url: str) -> str:
    """Accept ``http://host:port`` or ``http://host:port/v1`` for the same engine."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _transport_error(exc: Exception) -> EngineError:
    if isinstance(exc, RequestTimedOut):
        return RetryableEngineError("The engine did not answer in time.", code="request_timeout")
    if isinstance(exc, ResponseTooLarge):
        return FatalEngineError(
            f"The engine's answer was not read: {exc} (OVERNIGHT_MAX_RESPONSE_BYTES).", code="response_too_large"
        )
    if isinstance(exc, ConnectFailed):
        return RetryableEngineError(f"Could not reach the engine: {exc}", code="engine_unreachable")
    return RetryableEngineError(f"The connection to the engine failed: {exc}", code="connection_error")


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
        max_response_bytes: int = defaults.MAX_RESPONSE_BYTES,
        resolve: Callable[[], Awaitable[list[str] | None]] | None = None,
    ) -> None:
        """``resolve``: where connections go (``HttpPool``); a tenant's endpoint gets
        the endpoint policy's answer, so it is checked at every connect."""
        self.base_url = engine_base_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self._pool = HttpPool(self.base_url, headers=headers, timeout_s=timeout_s, max_connections=max_connections,
                              max_body_bytes=max_response_bytes, resolve=resolve)

    async def send(self, path: str, body: bytes) -> EngineReply:
        try:
            r = await self._pool.request("POST", path, body)
        except (RequestTimedOut, ConnectionFailed, ResponseTooLarge) as exc:
            raise _transport_error(exc) from exc
        return EngineReply(
            status=r.status,
            body=r.body,
            request_id=r.request_id,
            retry_after_s=_retry_after(r.retry_after) if r.status >= 400 else None,
            content_type=r.content_type,
        )

    async def get(self, path: str, *, timeout_s: float = 10.0) -> tuple[int, bytes]:
        """GET ``path``; ``(status, body)``. Raises ``RetryableEngineError`` without an answer."""
        try:
            r = await self._pool.request("GET", path, timeout_s=min(timeout_s, self.timeout_s))
        except (RequestTimedOut, ConnectionFailed, ResponseTooLarge) as exc:
            err = _transport_error(exc)
            raise RetryableEngineError(err.message, code=err.code) from exc
        return r.status, r.body

    async def get_json(self, path: str) -> Any:
        """GET a JSON document (``/v1/models``, health), for the API and runtimes:
        ``(status, body bytes)``."""
        return await self.get(path)

    async def aclose(self) -> None:
        await self._pool.aclose()


class RequestLimit:
    """An engine behind a proxy that cuts every request at ``limit_s`` (RunPod's
    HTTP proxy: Cloudflare answers 524 after 100 s). A request that has no answer
    by then, or gets HTTP 524, fails with code ``proxy_timeout``: a retryable
    error that counts against the request's attempts (the engine may only be
    queueing under load; a generation that needs longer than the limit ends as an
    error line after the attempts, never retried until the deadline)."""

    def __init__(self, inner: EngineClient, limit_s: float) -> None:
        self.inner = inner
        self.limit_s = limit_s
        self.message = (
            f"No answer within the endpoint's request_timeout_s ({limit_s:g} s). RunPod's HTTP proxy limits a "
            "request to 100 s (HTTP 524); use RUNPOD_ENDPOINT_MODE=ssh for longer generations.")

    async def send(self, path: str, body: bytes) -> EngineReply:
        try:
            async with asyncio.timeout(self.limit_s):
                reply = await self.inner.send(path, body)
        except TimeoutError:
            raise RetryableEngineError(self.message, code="proxy_timeout") from None
        if reply.status == 524:
            raise RetryableEngineError(f"HTTP 524 from the proxy. {self.message}", code="proxy_timeout")
        return reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # get / get_json of HTTP clients

    async def aclose(self) -> None:
        await self.inner.aclose()


Handler = Callable[[str, dict[str, Any]], "tuple[int, Any] | Awaitable[tuple[int, Any]]"]


class FakeEngine:
    """An in-process engine for tests: ``handler(path, body) -> (status, body)``.

    The handler may be sync or async, may return an ``EngineReply`` to answer raw
    bytes, and may raise ``EngineError`` to simulate a timeout or a dropped connection.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.calls = 0

    async def send(self, path: str, body: bytes) -> EngineReply:
        self.calls += 1
        result = self.handler(path, orjson.loads(body))
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, EngineReply):
            return result
        status, payload = result  # type: ignore[misc]
        return EngineReply(status=status, body=orjson.dumps(payload), request_id=f"fake-{self.calls}")

    async def aclose(self) -> None:
        return None
