"""Assembling a streamed answer into the object a non-streaming call returns."""

from __future__ import annotations

import orjson
import pytest

from overnight.executor.sse import StreamError, assemble, events, is_event_stream


def sse(*objs, done: bool = True, sep: str = "\n") -> bytes:
    parts = []
    for obj in objs:
        if isinstance(obj, tuple):
            kind, obj = obj
            parts.append(f"event: {kind}{sep}data: {orjson.dumps(obj).decode()}{sep}{sep}")
        else:
            parts.append(f"data: {orjson.dumps(obj).decode()}{sep}{sep}")
    if done:
        parts.append(f"data: [DONE]{sep}{sep}")
    return "".join(parts).encode()


def chunk(choices, **extra):
    return {"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": choices, **extra}


def test_event_stream_is_recognised_by_content_type_or_by_its_start() -> None:
    assert is_event_stream("text/event-stream; charset=utf-8", b"")
    assert is_event_stream("Text/Event-Stream", b"")
    assert is_event_stream(None, b"\ndata: {}\n\n")
    assert is_event_stream("text/plain", b"event: x\ndata: 1\n\n")
    assert not is_event_stream("application/json", b"data: {}")
    assert not is_event_stream(None, b'{"data": 1}')
    assert not is_event_stream("text/html", b"<html>")


def test_events_follow_the_sse_rules() -> None:
    body = b": comment\r\nevent: a\r\ndata: 1\r\ndata:2\r\n\r\ndata: x\n\ndata: last"
    assert list(events(body)) == [("a", "1\n2"), ("message", "x"), ("message", "last")]


def test_chat_chunks_merge_into_a_chat_completion_with_usage() -> None:
    body = sse(
        chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
        chunk([{"index": 1, "delta": {"role": "assistant", "content": "B"}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None,
                "logprobs": {"content": [{"token": "Hel", "logprob": -0.1}]}}]),
        chunk([{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop",
                "logprobs": {"content": [{"token": "lo", "logprob": -0.2}]}}]),
        chunk([{"index": 1, "delta": {}, "finish_reason": "length"}]),
        chunk([], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
        sep="\r\n",
    )
    out = assemble("/v1/chat/completions", body)
    assert out["object"] == "chat.completion" and out["id"] == "c1" and out["model"] == "m"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    first, second = out["choices"]
    assert first["message"] == {"role": "assistant", "content": "Hello"} and first["finish_reason"] == "stop"
    assert [t["token"] for t in first["logprobs"]["content"]] == ["Hel", "lo"]
    assert second["index"] == 1 and second["message"]["content"] == "B" and second["finish_reason"] == "length"


def test_tool_call_deltas_are_merged_per_index() -> None:
    body = sse(
        chunk([{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}]}}]),
        chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}}]),
        chunk([{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "1}"}},
            {"index": 1, "id": "call_2", "type": "function", "function": {"name": "put", "arguments": "{}"}}]}}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
    )
    message = assemble("/v1/chat/completions", body)["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a":1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "put", "arguments": "{}"}},
    ]


def test_completion_chunks_merge_into_a_text_completion() -> None:
    body = sse(
        {"id": "x", "object": "text_completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "text": "a", "finish_reason": None, "logprobs": None}]},
        {"id": "x", "object": "text_completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "text": "b", "finish_reason": "stop", "logprobs": None}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
        done=False,
    )
    out = assemble("/v1/completions", body)
    assert out["object"] == "text_completion"
    assert out["choices"] == [{"index": 0, "text": "ab", "finish_reason": "stop", "logprobs": None}]
    assert out["usage"]["completion_tokens"] == 2


def test_responses_take_the_completed_event_response() -> None:
    final = {"id": "resp_1", "object": "response", "status": "completed", "output": [],
             "usage": {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11}}
    body = sse(
        ("response.created", {"type": "response.created", "response": {**final, "status": "in_progress"}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"}),
        ("response.completed", {"type": "response.completed", "response": final}),
        done=False,
    )
    assert assemble("/v1/responses", body) == final
    # the type inside the data is enough, without event: lines
    assert assemble("/v1/responses", sse({"type": "response.completed", "response": final})) == final


@pytest.mark.parametrize(("endpoint", "body", "code", "words"), [
    ("/v1/embeddings", sse({"data": []}), "unparseable_stream", "no stream format"),
    ("/v1/responses", sse({"type": "response.created", "response": {}}), "unparseable_stream", "response.completed"),
    ("/v1/responses", sse({"type": "error", "message": "boom"}), "stream_error", "boom"),
    ("/v1/responses", sse({"type": "response.failed", "response": {"error": {"message": "oom"}}}),
     "stream_error", "oom"),
    ("/v1/chat/completions", b"data: {not json\n\n", "unparseable_stream", "not JSON"),
    ("/v1/chat/completions", sse(chunk([{"index": 0, "delta": {"content": "a"}}]), done=False),
     "unparseable_stream", "ended before"),
    ("/v1/chat/completions", sse(), "unparseable_stream", "no chunks"),
    ("/v1/chat/completions", sse({"error": {"message": "engine died"}}), "stream_error", "engine died"),
    ("/v1/chat/completions", sse(chunk("nope")), "unparseable_stream", "choices"),
])
def test_streams_that_cannot_be_assembled_fail_with_a_code(endpoint, body, code, words) -> None:
    with pytest.raises(StreamError) as exc:
        assemble(endpoint, body)
    assert exc.value.code == code and words in exc.value.message
