"""The dispatch client never writes a header or request line that could carry a
second request: a raw socket engine records every byte it receives."""

from __future__ import annotations

import asyncio

import pytest

from overnight.executor.engine import HttpEngineClient
from overnight.executor.http1 import HttpPool

SMUGGLE = "k\r\nX-Injected: 1\r\nContent-Length: 0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x"


class Recorder:
    def __init__(self) -> None:
        self.received = b""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
                if b"\r\n\r\n" in data:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def engine():
    rec = Recorder()
    server = await asyncio.start_server(rec.serve, "127.0.0.1", 0)
    rec.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"  # type: ignore[attr-defined]
    yield rec
    server.close()


@pytest.mark.parametrize("value", [SMUGGLE, "a\nb", "a\rb", "a\x00b", "a\x1bb", "a\x7fb", "\u2603"])
async def test_a_header_value_with_control_characters_is_refused_and_nothing_is_sent(engine, value) -> None:
    with pytest.raises(ValueError, match="refusing to send header") as exc:
        HttpPool(engine.url, headers={"Authorization": f"Bearer {value}"})
    assert value not in str(exc.value)  # a secret is never echoed
    with pytest.raises(ValueError):
        HttpEngineClient(engine.url, api_key=value)
    await asyncio.sleep(0.05)
    assert engine.received == b""


@pytest.mark.parametrize("name", ["X-A\r\nX-B", "X A", "X:A", ""])
async def test_a_malformed_header_name_is_refused(engine, name) -> None:
    with pytest.raises(ValueError, match="refusing to send header"):
        HttpPool(engine.url, headers={name: "v"})


async def test_a_path_or_method_with_control_characters_is_refused(engine) -> None:
    pool = HttpPool(engine.url)
    try:
        with pytest.raises(ValueError, match="path"):
            await pool.request("POST", "/v1/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /smuggled")
        with pytest.raises(ValueError, match="method"):
            await pool.request("GET /smuggled HTTP/1.1\r\n\r\nPOST", "/v1/x")
        assert engine.received == b""
        reply = await pool.request("POST", "/v1/x", b"{}")  # a normal request still goes through
        assert reply.status == 200
    finally:
        await pool.aclose()
    assert engine.received.startswith(b"POST /v1/x HTTP/1.1\r\n") and b"smuggled" not in engine.received


async def test_a_tab_in_a_header_value_is_allowed_and_the_key_is_sent(engine) -> None:
    client = HttpEngineClient(engine.url, api_key="sk-good")
    try:
        assert (await client.send("/v1/chat/completions", b"{}")).status == 200
    finally:
        await client.aclose()
    assert b"\r\nAuthorization: Bearer sk-good\r\n" in engine.received
    HttpPool(engine.url, headers={"X-T": "a\tb"})
