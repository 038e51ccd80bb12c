"""Bare ASGI plumbing: reading a bounded body, sending a whole response,
noticing a client that went away."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

__all__ = [
    "MAX_BODY",
    "BodyTooLarge",
    "Receive",
    "Scope",
    "Send",
    "read_body",
    "send_response",
    "watch_disconnect",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY = 64 * 1024 * 1024
_JSON = b"application/json"


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    rid: bytes,
    extra: tuple[tuple[bytes, bytes], ...] = (),
    content_type: bytes = _JSON,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid),
    ]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def watch_disconnect(receive: Receive, task: asyncio.Task[Any]) -> bool:
    """Cancel ``task`` when the client disconnects; returns True if it did."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return True
