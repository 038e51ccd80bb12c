"""The edge: the key is checked before any body byte is read; JSON bodies are bounded
while they are read; open mode is one tenant; which routes need no key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from overnight.api.app import create_app
from overnight.config import Settings

CHUNK = b"x" * 65536


class Body:
    """An ASGI ``receive`` that hands out ``chunks`` chunks and counts what was taken."""

    def __init__(self, chunks: int, chunk: bytes = CHUNK) -> None:
        self.left, self.chunk, self.taken = chunks, chunk, 0

    async def __call__(self) -> dict:
        if self.left == 0:
            return {"type": "http.disconnect"}
        self.left -= 1
        self.taken += len(self.chunk)
        return {"type": "http.request", "body": self.chunk, "more_body": self.left > 0}


async def call(app, method: str, path: str, headers: dict[str, str], body: Body) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
        "server": ("test", 80), "client": ("127.0.0.1", 1), "state": {},
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    await app(scope, body, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")




@pytest.fixture
async def keyed(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9", api_keys="key-a:alice",
                              max_json_body_bytes=100_000))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def open_app(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9"))
    async with app.router.lifespan_context(app):
        yield app


@pytest.mark.parametrize("path", ["/v1/batches", "/v1/files"])
async def test_wrong_key_is_401_before_the_body_is_read(keyed, path):
    body = Body(chunks=5000)  # 300 MiB on offer
    status, raw = await call(keyed, "POST", path, {"authorization": "Bearer wrong",
                                                   "content-type": "application/json"}, body)
    assert status == 401 and b"invalid_api_key" in raw
    assert body.taken == 0


async def test_missing_key_is_401(keyed):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=keyed), base_url="http://t") as c:
        r = await c.get("/v1/files")
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_json_body_over_limit_is_413_while_reading(keyed):
    # No Content-Length (chunked): the limit is enforced on the bytes as they come.
    body = Body(chunks=5000)
    status, raw = await call(keyed, "POST", "/v1/batches", {"authorization": "Bearer key-a",
                                                            "content-type": "application/json"}, body)
    assert status == 413
    assert body.taken <= 100_000 + len(CHUNK)
    err = httpx.Response(413, content=raw).json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "request_too_large"
    assert err["type"] == "invalid_request_error"


async def test_content_length_that_lies_small_is_still_bounded(keyed):
    body = Body(chunks=5000)
    status, _ = await call(keyed, "POST", "/v1/batches", {"authorization": "Bearer key-a", "content-length": "10",
                                                          "content-type": "application/json"}, body)
    assert status == 413 and body.taken <= 100_000 + len(CHUNK)


async def test_content_length_over_limit_is_413_unread(keyed):
    body = Body(chunks=5000)
    status, _ = await call(keyed, "POST", "/v1/batches", {"authorization": "Bearer key-a",
                                                          "content-length": str(300 * 2**20)}, body)
    assert status == 413 and body.taken == 0


async def test_json_body_under_limit_still_works(keyed):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=keyed), base_url="http://t",
                                 headers={"Authorization": "Bearer key-a"}) as c:
        r = await c.post("/v1/batches", json={"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h", "metadata": {"k": "v" * 100}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"


async def test_open_mode_is_one_tenant_whatever_the_key(open_app):
    def sdk(key: str) -> AsyncOpenAI:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=open_app), base_url="http://t")
        return AsyncOpenAI(base_url="http://t/v1", api_key=key, http_client=http, max_retries=0)

    f = await sdk("anything").files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    assert (await sdk("something-else").files.retrieve(f.id)).id == f.id
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=open_app), base_url="http://t") as c:
        r = await c.get(f"/v1/files/{f.id}")  # no key at all
    assert r.status_code == 200


async def test_public_routes_need_no_key(keyed):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=keyed), base_url="http://t") as c:
        for path in ("/health", "/metrics", "/openapi.json", "/docs"):
            assert (await c.get(path)).status_code == 200, path


async def test_switches_require_a_key_for_metrics_and_docs(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9", api_keys="key-a:alice",
                              metrics_require_key=True, public_docs=False))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/health")).status_code == 200
            for path in ("/metrics", "/openapi.json", "/docs"):
                assert (await c.get(path)).status_code == 401, path
                assert (await c.get(path, headers={"Authorization": "Bearer key-a"})).status_code == 200, path


async def test_sdk_with_wrong_key_gets_authentication_error(keyed):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=keyed), base_url="http://t")
    client = AsyncOpenAI(base_url="http://t/v1", api_key="nope", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.batches.create(input_file_id="file-x", endpoint="/v1/chat/completions", completion_window="24h")


async def test_invalid_json_body_names_the_line_not_a_char_offset(open_app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=open_app), base_url="http://t") as c:
        r = await c.post("/v1/batches", content=b'{\n  "endpoint": "/v1/chat/completions",\n  oops}',
                         headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["line"] == 3 and err["param"] is None and err["code"] == "invalid_json"
    assert "line 3, column 3" in err["message"]
