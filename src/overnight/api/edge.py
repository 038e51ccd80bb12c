"""The HTTP edge, in front of every route: the API key, then a bounded body.

FastAPI reads (and parses) a request body before it resolves dependencies, so a key
checked in a dependency is checked only after the whole body is in memory. This ASGI
middleware checks the key from the headers first and answers 401 without reading a
byte of the body; then it buffers a JSON body only up to ``max_json_body_bytes``,
counting the bytes as they arrive (a Content-Length can lie, a chunked body has
none), and answers 413 as soon as the limit is passed. Uploads (``POST /v1/files``)
are streamed by their route, which enforces the file limits itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from overnight.api.errors import error_response

__all__ = ["OPEN_TENANT", "TENANT_SCOPE_KEY", "EdgeMiddleware", "is_console_key", "public_paths", "tenant_for_headers"]

#: The one tenant of open mode (no keys configured).
OPEN_TENANT = "anonymous"
#: Where the middleware leaves the request's tenant in the ASGI scope.
TENANT_SCOPE_KEY = "overnight.tenant"

_DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def public_paths(*, metrics_require_key: bool, public_docs: bool) -> frozenset[str]:
    """Paths served without a key even when keys are configured."""
    paths = {"/health"}
    if not metrics_require_key:
        paths.add("/metrics")
    if public_docs:
        paths.update(_DOCS_PATHS)
    return frozenset(paths)


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"authorization":
            auth = value.decode("latin-1")
            return auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return ""


def tenant_for_headers(headers: Iterable[tuple[bytes, bytes]], keys: dict[str, str]) -> str | None:
    """The tenant a request acts for, or None for a missing or unknown key. Without
    configured keys (open mode) every request is the one open tenant."""
    if not keys:
        return OPEN_TENANT
    return keys.get(_bearer(headers))


def is_console_key(headers: Iterable[tuple[bytes, bytes]], console_keys: frozenset[str]) -> bool:
    """Does the request carry a key of a trusted console (``OVERNIGHT_TRUSTED_CONSOLE_KEYS``)?"""
    if not console_keys:
        return False
    key = _bearer(headers).encode()
    # Compared with every entry in constant time: no timing tells how much of a key matched.
    return any([hmac.compare_digest(key, k.encode()) for k in console_keys])  # noqa: C419 (all, not the first)


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: dict[str, str],
        public: frozenset[str],
        max_json_body_bytes: int,
        streamed: frozenset[tuple[str, str]] = frozenset({("POST", "/v1/files")}),
    ) -> None:
        self.app = app
        self.keys = keys
        self.public = public
        self.max_body = max_json_body_bytes
        self.streamed = streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if scope["path"] not in self.public:
            tenant = tenant_for_headers(headers, self.keys)
            if tenant is None:
                msg = (
                    "Incorrect API key provided."
                    if _bearer(headers)
                    else "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
                )
                await error_response(401, msg, code="invalid_api_key")(scope, receive, send)
                return
            scope[TENANT_SCOPE_KEY] = tenant
        if (scope["method"], scope["path"]) in self.streamed:
            await self.app(scope, receive, send)
            return
        body = await self._read_bounded(headers, receive)
        if body is None:
            await error_response(
                413,
                f"Request body is larger than the {self.max_body}-byte limit (OVERNIGHT_MAX_JSON_BODY_BYTES).",
                code="request_too_large",
            )(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_bounded(self, headers: Iterable[tuple[bytes, bytes]], receive: Receive) -> bytes | None:
        """The whole body, or None once it is known to pass the limit."""
        for name, value in headers:
            if name == b"content-length":
                try:
                    if int(value) > self.max_body:
                        return None
                except ValueError:
                    pass
        parts: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # client went away
                return b"".join(parts)
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            if chunk:
                parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: http.disconnect

    return replay


def tenant_from_scope(scope: dict[str, Any]) -> str | None:
    return scope.get(TENANT_SCOPE_KEY)
