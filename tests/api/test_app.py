"""The HTTP edge in process: the official SDK over httpx's ASGI transport."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from overnight.api.app import create_app
from overnight.config import Settings


@pytest.fixture
async def app(tmp_path):
    settings = Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9", api_keys="key-a:alice,key-b:bob")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


def sdk(app, key: str) -> AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return AsyncOpenAI(base_url="http://test/v1", api_key=key, http_client=http, max_retries=0)


async def test_unknown_api_key_is_401_with_openai_body(app):
    with pytest.raises(openai.AuthenticationError) as exc:
        await sdk(app, "nope").files.list()
    assert exc.value.body["code"] == "invalid_api_key"


async def test_configured_keys_map_to_tenants(app):
    a, b = sdk(app, "key-a"), sdk(app, "key-b")
    f = await a.files.create(file=("in.jsonl", b'{"a": 1}\n'), purpose="batch")
    assert (await a.files.retrieve(f.id)).id == f.id
    with pytest.raises(openai.NotFoundError):
        await b.files.retrieve(f.id)
    assert (await a.files.content(f.id)).content == b'{"a": 1}\n'


async def test_health_and_unknown_route(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        assert (await c.get("/health")).status_code == 200
        r = await c.get("/v1/nothing", headers={"Authorization": "Bearer key-a"})
        assert r.status_code == 404 and r.json()["error"]["message"]


async def test_list_limit_out_of_range_is_400(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        r = await c.get("/v1/batches", params={"limit": 0}, headers={"Authorization": "Bearer key-a"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


async def test_metrics_exposition(app):
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        r = await c.get("/metrics")
    assert r.status_code == 200
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert "overnight_batches_running" in names and "process_cpu_seconds" in names


async def test_metrics_carry_no_batch_or_tenant_ids(app):
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    share = SimpleNamespace(inflight=3, max_inflight_seen=7, overloads=2)
    app.state.scheduler.runners["batch_secret123"] = SimpleNamespace(limiter=share)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            r = await c.get("/metrics")
    finally:
        del app.state.scheduler.runners["batch_secret123"]
    assert "batch_secret123" not in r.text and "alice" not in r.text
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert fams["overnight_requests_inflight"].samples[0].value == 3
    assert fams["overnight_running_batches_engine_overloads"].samples[0].value == 2
    labels = {k for f in fams.values() if f.name.startswith("overnight_") for s in f.samples for k in s.labels}
    assert labels <= {"engine", "endpoint", "le", "mode", "provider", "runtime", "status"}
