"""The mock engine's ``sse`` trigger: a non-streaming request answered as an event stream
that the executor's assembly turns back into the plain answer."""

from __future__ import annotations

import httpx
import orjson
import pytest

from overnight.executor.sse import assemble, events
from overnight.mock_engine import MockEngineConfig, create_app

BODIES = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi [[mock:sse=1]]"}], "n": 2},
    "/v1/completions": {"model": "m", "prompt": "hi [[mock:sse=1]]"},
    "/v1/responses": {"model": "m", "input": "hi [[mock:sse=1]]"},
}


async def _post(path: str, body: dict) -> httpx.Response:
    app = create_app(MockEngineConfig(latency_ms=0.0, output_tokens=7, seed=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as client:
        return await client.post(path, json=body)


@pytest.mark.parametrize("path", sorted(BODIES))
async def test_sse_marker_streams_an_answer_that_assembles_to_the_plain_one(path) -> None:
    streamed = await _post(path, BODIES[path])
    # the same prompt length without the trigger, for the plain answer to compare with
    plain_body = orjson.loads(orjson.dumps(BODIES[path]).replace(b"sse=1", b"sse=0"))
    plain = orjson.loads((await _post(path, plain_body)).content)
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert int(streamed.headers["content-length"]) == len(streamed.content)
    assert len(list(events(streamed.content))) > 2
    got = assemble(path, streamed.content)
    assert got["object"] == plain["object"] and got["usage"] == plain["usage"]
    if path == "/v1/responses":
        assert got["output"][0]["content"][0]["text"] == plain["output"][0]["content"][0]["text"]
    elif path == "/v1/chat/completions":
        assert [c["message"]["content"] for c in got["choices"]] == [c["message"]["content"] for c in plain["choices"]]
        assert [c["finish_reason"] for c in got["choices"]] == ["stop", "stop"]
    else:
        assert got["choices"][0]["text"] == plain["choices"][0]["text"]


async def test_sse_leaves_errors_and_the_mock_field_form_works() -> None:
    failed = await _post("/v1/chat/completions", {**BODIES["/v1/chat/completions"], "mock": "status=500"})
    assert failed.status_code == 500 and failed.headers["content-type"] == "application/json"
    emb = await _post("/v1/embeddings", {"model": "m", "input": "x", "mock": {"sse": "1"}})
    assert emb.headers["content-type"].startswith("text/event-stream") and emb.content.startswith(b"data: {")
