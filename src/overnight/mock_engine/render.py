"""The mock engine's answer bodies: one per inference route, and OpenAI-style
error bodies.

Each choice holds ``tokens`` filler words, one word per token. Embeddings are
small deterministic unit vectors (8 floats unless ``dimensions`` asks otherwise)
derived from a hash of the input; ``encoding_format: "base64"`` (the OpenAI SDK's
default) is honoured.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from functools import lru_cache
from typing import Any

import orjson

from overnight.mock_engine.prep import Prepared

__all__ = ["error_body", "render_answer", "scripted_error"]

_CONTENT_CAP = 65536  # largest token count whose filler text is cached

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

_STATUS_TEXT = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    408: "Request timeout",
    409: "Conflict",
    422: "Unprocessable entity",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}

_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven mock tokens drift "
    "through an idle night shift and every batch finishes before morning light "
    "so overnight answers arrive cheap steady and entirely made up by design"
).split()


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def scripted_error(status: int) -> tuple[str, str, str | None]:
    """(message, type, code) of a scripted or random failure with ``status``."""
    message = f"{_STATUS_TEXT.get(status, 'Error')} (mock engine)"
    fallback = "server_error" if status >= 500 else "invalid_request_error"
    code = "rate_limit_exceeded" if status == 429 else None
    return message, _ERROR_TYPES.get(status, fallback), code


@lru_cache(maxsize=512)
def _filler(n: int) -> str:
    """Deterministic filler text of ``n`` words (one word per token)."""
    words = _WORDS
    if n <= len(words):
        return " ".join(words[:n])
    reps, rest = divmod(n, len(words))
    block = " ".join(words)
    parts = [block] * reps
    if rest:
        parts.append(" ".join(words[:rest]))
    return " ".join(parts)


def _filler_text(n: int) -> str:
    if n <= _CONTENT_CAP:
        return _filler(n)
    return _filler.__wrapped__(n)


def _embedding(data: bytes, dims: int) -> list[float]:
    raw = hashlib.shake_128(data).digest(2 * dims)
    values = [(v - 32767.5) / 32767.5 for v in struct.unpack(f"<{dims}H", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def render_answer(
    path: str, body: dict[str, Any], model: str, prep: Prepared, tokens: int, finish: str, ident: str
) -> bytes:
    """The 200 answer to ``body`` on route ``path``: ``tokens`` per choice,
    ``finish`` the finish reason, ``ident`` the unique part of its ids."""
    now = int(time.time())
    completion_tokens = tokens * prep.choices
    if path == "/v1/chat/completions" or path == "/v1/completions":
        chat = path == "/v1/chat/completions"
        text = _filler_text(tokens)
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": text}}
            if chat
            else {"index": i, "text": text}
            for i in range(prep.choices)
        ]
        for choice in choices:
            choice["logprobs"] = None
            choice["finish_reason"] = finish
        return orjson.dumps(
            {
                "id": ("chatcmpl-" if chat else "cmpl-") + ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": now,
                "model": model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prep.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prep.prompt_tokens + completion_tokens,
                },
                "system_fingerprint": None,
            }
        )
    if path == "/v1/embeddings":
        items, dims, fmt = prep.extra
        data = []
        for i, item in enumerate(items):
            source = item.encode() if isinstance(item, str) else orjson.dumps(item)
            vector = _embedding(source, dims)
            if fmt == "base64":
                encoded: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            else:
                encoded = vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prep.prompt_tokens, "total_tokens": prep.prompt_tokens},
            }
        )
    # /v1/responses
    truncated = finish == "length"
    return orjson.dumps(
        {
            "id": "resp_" + ident,
            "object": "response",
            "created_at": now,
            "status": "incomplete" if truncated else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
            "error": None,
            "model": model,
            "instructions": body.get("instructions"),
            "max_output_tokens": prep.limit,
            "metadata": body.get("metadata") or {},
            "output": [
                {
                    "type": "message",
                    "id": "msg_" + ident,
                    "status": "incomplete" if truncated else "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": _filler_text(tokens), "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "temperature": body.get("temperature", 1.0),
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "usage": {
                "input_tokens": prep.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prep.prompt_tokens + completion_tokens,
            },
        }
    )
