"""``/v1/models`` of the mock engine lists the names it accepts: the configured
one first, then every other name it has answered (it accepts any name)."""

from __future__ import annotations

import httpx

from overnight.mock_engine import MockEngineConfig
from overnight.mock_engine.app import create_app


async def _ids(client: httpx.AsyncClient) -> list[str]:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    return [m["id"] for m in body["data"]]


async def test_models_lists_the_configured_name_then_every_name_it_answered() -> None:
    app = create_app(MockEngineConfig(latency_ms=0.0, model="tiny"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        assert await _ids(client) == ["tiny"]
        for name in ("my-model", "other", "my-model", "tiny"):
            reply = await client.post(
                "/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}]}
            )
            assert reply.status_code == 200
            assert reply.json()["model"] == name
        assert await _ids(client) == ["tiny", "my-model", "other"]


async def test_a_rejected_request_does_not_add_its_model() -> None:
    app = create_app(MockEngineConfig(latency_ms=0.0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        reply = await client.post("/v1/chat/completions", json={"model": "x", "messages": "not a list"})
        assert reply.status_code == 400
        assert await _ids(client) == ["mock-model"]
