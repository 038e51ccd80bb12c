"""The ``sse`` trigger: answer a non-streaming request as ``text/event-stream``.

Some engines do this (transformers ``serve`` for ``/v1/responses``), so tests need
an engine that does it too. The finished JSON answer is re-cut into the events
the endpoint streams: chat/completions chunks with a final usage chunk and
``[DONE]``; Responses ``response.created`` / ``response.output_text.delta`` /
``response.completed`` events; embeddings, which define no stream, as one
``data:`` event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

__all__ = ["sse_send", "to_event_stream"]

Send = Callable[[dict[str, Any]], Awaitable[None]]


def _pieces(text: str | None, n: int = 3) -> list[str]:
    """``text`` cut into up to ``n`` non-empty parts (at least one part)."""
    if not text:
        return [""]
    size = max(1, -(-len(text) // n))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _data(obj: Any, event: str | None = None) -> bytes:
    head = b"event: %b\n" % event.encode() if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunks(done: dict[str, Any], chat: bool) -> list[bytes]:
    head = {k: done.get(k) for k in ("id", "created", "model")}
    kind = "chat.completion.chunk" if chat else "text_completion"
    out = []
    for choice in done.get("choices", []):
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message") or {}
            parts = _pieces(message.get("content"))
            deltas = [{"role": message.get("role", "assistant"), "content": parts[0]}]
            deltas += [{"content": p} for p in parts[1:]]
            key = "delta"
        else:
            deltas = _pieces(choice.get("text"))
            key = "text"
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            out.append(_data({**head, "object": kind, "choices": [{
                "index": index, key: delta, "logprobs": None,
                "finish_reason": choice.get("finish_reason") if last else None,
            }]}))
    out.append(_data({**head, "object": kind, "choices": [], "usage": done.get("usage")}))
    out.append(b"data: [DONE]\n\n")
    return out


def _response_events(done: dict[str, Any]) -> list[bytes]:
    started = {**done, "status": "in_progress", "output": [], "usage": None}
    out = [_data({"type": "response.created", "sequence_number": 0, "response": started}, "response.created")]
    seq = 1
    for item in done.get("output", []):
        for part in item.get("content") or []:
            for piece in _pieces(part.get("text")):
                out.append(_data({"type": "response.output_text.delta", "sequence_number": seq,
                                  "item_id": item.get("id"), "output_index": 0, "content_index": 0,
                                  "delta": piece}, "response.output_text.delta"))
                seq += 1
    kind = "response.completed" if done.get("status") == "completed" else "response.incomplete"
    out.append(_data({"type": kind, "sequence_number": seq, "response": done}, kind))
    return out


def to_event_stream(path: str, body: bytes) -> bytes:
    """The JSON answer ``body`` of ``path`` as the event stream that endpoint sends."""
    done = orjson.loads(body)
    if path == "/v1/chat/completions":
        return b"".join(_chunks(done, chat=True))
    if path == "/v1/completions":
        return b"".join(_chunks(done, chat=False))
    if path == "/v1/responses":
        return b"".join(_response_events(done))
    return _data(done) + b"data: [DONE]\n\n"  # no stream format: one event


def sse_send(send: Send, path: str) -> Send:
    """Wrap an ASGI ``send`` so a 200 answer goes out as ``text/event-stream``."""
    start: dict[str, Any] | None = None

    async def wrapped(message: dict[str, Any]) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] == 200:
            start = message  # held until the body is known
            return
        if message["type"] == "http.response.body" and start is not None:
            stream = to_event_stream(path, message.get("body", b""))
            headers = [(k, v) for k, v in start["headers"] if k not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"content-length", str(len(stream)).encode())]
            await send({**start, "headers": headers})
            start = None
            await send({"type": "http.response.body", "body": stream})
            return
        await send(message)

    return wrapped
