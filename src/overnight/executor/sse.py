"""Turn a ``text/event-stream`` answer into the JSON object a non-streaming call returns.

Some engines stream even when the request did not ask for it (transformers
``serve`` does for ``/v1/responses`` without a ``stream`` field). A batch line
must hold the final object, never SSE text, so the stream is assembled here:

* ``/v1/responses``: the ``response`` object of the terminal
  ``response.completed`` (or ``response.incomplete``) event;
* ``/v1/chat/completions`` and ``/v1/completions``: the chunks merged per choice
  index (text concatenated, ``finish_reason``/``role`` kept, tool call deltas
  merged, logprobs appended) into a ``chat.completion`` / ``text_completion``,
  with ``usage`` from the chunk that carries it.

Anything else (another endpoint, no terminal event, malformed data) raises
``StreamError``; an error event sent by the engine raises it with code
``stream_error`` and the engine's message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["StreamError", "assemble", "events", "is_event_stream"]

_SSE_START = re.compile(rb"\s*(?:data|event|id|retry)?:")
#: Delta fields whose pieces are concatenated; every other field keeps its last value.
_TEXT_FIELDS = frozenset({"content", "refusal", "reasoning_content", "reasoning", "text", "arguments"})


class StreamError(ValueError):
    """The stream cannot be turned into a final object."""

    def __init__(self, message: str, code: str = "unparseable_stream") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def is_event_stream(content_type: str | None, body: bytes) -> bool:
    """True for a ``text/event-stream`` answer, or an untyped body that starts like one."""
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        if media == "text/event-stream":
            return True
        if media.endswith("json"):
            return False
    return _SSE_START.match(body, 0, 64) is not None


def events(body: bytes) -> Iterator[tuple[str, str]]:
    """``(event type, data)`` per dispatched event, as the SSE spec parses them."""
    text = body.decode("utf-8", "replace")
    kind, data = "", []
    for line in text.splitlines():  # \r\n, \n and \r all end a line
        if not line:
            if data:
                yield kind or "message", "\n".join(data)
            kind, data = "", []
            continue
        if line.startswith(":"):
            continue  # a comment
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            kind = value
    if data:  # a last event without its blank line
        yield kind or "message", "\n".join(data)


def _json(data: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise StreamError(f"an event's data is not JSON: {data[:200]!r}") from None


def _engine_error(obj: dict[str, Any]) -> StreamError:
    err = obj.get("error")
    message = err.get("message") if isinstance(err, dict) else err
    if not message and isinstance(obj.get("message"), str):
        message = obj["message"]
    return StreamError(f"the engine reported an error in the stream: {message or obj}", code="stream_error")


def assemble(endpoint: str, body: bytes) -> dict[str, Any]:
    """The final object of ``endpoint`` from the stream ``body``; raises ``StreamError``."""
    path = endpoint.rstrip("/")
    if path == "/v1/responses":
        return _responses(body)
    if path == "/v1/chat/completions":
        return _merge_chunks(body, "chat.completion")
    if path == "/v1/completions":
        return _merge_chunks(body, "text_completion")
    raise StreamError(f"the engine streamed its answer, and no stream format is defined for {path}")


def _responses(body: bytes) -> dict[str, Any]:
    final: dict[str, Any] | None = None
    for kind, data in events(body):
        if data == "[DONE]":
            continue
        obj = _json(data)
        if not isinstance(obj, dict):
            raise StreamError(f"an event's data is not an object: {data[:200]!r}")
        kind = obj.get("type") or kind
        if kind in ("response.completed", "response.incomplete"):
            response = obj.get("response")
            if not isinstance(response, dict):
                raise StreamError(f"the {kind} event carries no response object")
            final = response
        elif kind in ("error", "response.failed"):
            failed = obj.get("response")
            raise _engine_error(failed if isinstance(failed, dict) and failed.get("error") else obj)
    if final is None:
        raise StreamError("the stream ended without a response.completed event")
    return final


def _merge_delta(into: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            into.setdefault(key, None)
        elif key == "tool_calls" and isinstance(value, list):
            _merge_tool_calls(into.setdefault("tool_calls", []), value)
        elif key in _TEXT_FIELDS and isinstance(value, str):
            into[key] = (into.get(key) or "") + value
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge_delta(into[key], value)
        else:
            into[key] = value


def _merge_tool_calls(calls: list[dict[str, Any]], deltas: list[Any]) -> None:
    for delta in deltas:
        if not isinstance(delta, dict):
            raise StreamError(f"a tool call delta is not an object: {delta!r}")
        index = delta.get("index", len(calls))
        if not isinstance(index, int) or index < 0:
            raise StreamError(f"a tool call delta has a bad index: {index!r}")
        while len(calls) <= index:
            calls.append({})
        _merge_delta(calls[index], {k: v for k, v in delta.items() if k != "index"})


def _merge_logprobs(into: dict[str, Any], logprobs: dict[str, Any]) -> None:
    for key, value in logprobs.items():
        if isinstance(value, list):
            into.setdefault(key, []).extend(value)
        elif value is not None:
            into[key] = value


def _merge_chunks(body: bytes, kind: str) -> dict[str, Any]:
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    done = False
    chunks = 0
    for _, data in events(body):
        if data == "[DONE]":
            done = True
            continue
        obj = _json(data)
        if not isinstance(obj, dict):
            raise StreamError(f"a chunk is not an object: {data[:200]!r}")
        if "error" in obj and "choices" not in obj:
            raise _engine_error(obj)
        chunks += 1
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if obj.get(key) is not None:
                head[key] = obj[key]
        if obj.get("usage") is not None:
            usage = obj["usage"]
        raw_choices = obj.get("choices") or []
        if not isinstance(raw_choices, list):
            raise StreamError("a chunk's choices is not an array")
        for raw in raw_choices:
            if not isinstance(raw, dict) or not isinstance(raw.get("index", 0), int):
                raise StreamError(f"a chunk has a malformed choice: {str(raw)[:200]}")
            index = raw.get("index", 0)
            choice = choices.setdefault(index, {"index": index, "logprobs": None, "finish_reason": None})
            if kind == "chat.completion":
                delta = raw.get("delta") or {}
                if not isinstance(delta, dict):
                    raise StreamError("a chunk's delta is not an object")
                _merge_delta(choice.setdefault("message", {}), delta)
            else:
                text = raw.get("text")
                if text is not None and not isinstance(text, str):
                    raise StreamError("a chunk's text is not a string")
                choice["text"] = choice.get("text", "") + (text or "")
            if isinstance(raw.get("logprobs"), dict):
                choice["logprobs"] = choice["logprobs"] or {}
                _merge_logprobs(choice["logprobs"], raw["logprobs"])
            if raw.get("finish_reason") is not None:
                choice["finish_reason"] = raw["finish_reason"]
            for key, value in raw.items():
                if key not in ("index", "delta", "text", "logprobs", "finish_reason"):
                    choice[key] = value
    if not chunks:
        raise StreamError("the stream holds no chunks")
    if not done and (not choices or any(c["finish_reason"] is None for c in choices.values())):
        raise StreamError("the stream ended before [DONE] or a finish_reason for every choice")
    out: dict[str, Any] = {"id": head.get("id"), "object": kind, "created": head.get("created"),
                           "model": head.get("model")}
    merged = []
    for index in sorted(choices):
        choice = choices[index]
        if kind == "chat.completion":
            message = choice.pop("message", {})
            message.setdefault("role", "assistant")
            message.setdefault("content", None)
            choice = {"index": index, "message": message, **{k: v for k, v in choice.items() if k != "index"}}
        else:
            choice.setdefault("text", "")
        merged.append(choice)
    out["choices"] = merged
    if usage is not None:
        out["usage"] = usage
    for key in ("system_fingerprint", "service_tier"):
        if key in head:
            out[key] = head[key]
    return out
