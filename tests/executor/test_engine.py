"""Engine clients: the HTTP/1.1 keep-alive client against the mock engine and a raw
socket server scripted for the awkward cases, and ``FakeEngine``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from overnight.errors import FatalEngineError, RetryableEngineError
from overnight.executor.engine import FakeEngine, HttpEngineClient, engine_base_url
from overnight.mock_engine import MockEngineConfig, serve

CHAT = "/v1/chat/completions"
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def mock_engine(**kw) -> AsyncIterator[str]:
    port = _free_port()
    started = asyncio.Event()
    kw.setdefault("latency_ms", 0)
    task = asyncio.create_task(serve(MockEngineConfig(**kw), port=port, started=started))
    await asyncio.wait_for(started.wait(), 10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server calling ``handler(reader, writer, connection_number)``."""
    conns: list[int] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(len(conns))
        try:
            await handler(reader, writer, len(conns))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", conns
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def response(status: int, body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%b\r\n%b" % (status, len(body), extra, body)


async def test_posts_and_reads_the_answer_on_one_reused_connection() -> None:
    async with mock_engine() as url:
        client = HttpEngineClient(url + "/v1")
        try:
            replies = [await client.send(CHAT, BODY) for _ in range(20)]
            assert {r.status for r in replies} == {200}
            assert orjson.loads(replies[0].body)["object"] == "chat.completion"
            assert replies[0].request_id and replies[0].retry_after_s is None
            assert client._pool.open_connections == 1
            status, body = await client.get("/metrics")
            assert status == 200 and b"vllm:num_requests_waiting" in body
        finally:
            await client.aclose()


async def test_many_requests_at_once_each_get_their_own_answer() -> None:
    async with mock_engine(latency_ms=5) as url:
        client = HttpEngineClient(url)
        try:
            bodies = [orjson.dumps({"model": "m", "input": f"text {i}"}) for i in range(200)]
            replies = await asyncio.gather(*(client.send("/v1/embeddings", b) for b in bodies))
            assert all(r.status == 200 for r in replies)
            assert len({r.request_id for r in replies}) == 200
        finally:
            await client.aclose()


async def test_429_carries_retry_after() -> None:
    async with mock_engine() as url:
        client = HttpEngineClient(url)
        try:
            body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                 "mock": {"status": 429, "retry_after": "2"}})
            reply = await client.send(CHAT, body)
            assert reply.status == 429 and reply.retry_after_s == 2.0
            assert b"error" in reply.body
        finally:
            await client.aclose()


async def test_no_answer_in_time_is_a_retryable_timeout() -> None:
    async def never(reader, writer, n) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with raw_server(never) as (url, _):
        client = HttpEngineClient(url, timeout_s=0.2)
        t0 = time.monotonic()
        with pytest.raises(RetryableEngineError) as exc:
            await client.send(CHAT, BODY)
        assert exc.value.code == "request_timeout"
        assert time.monotonic() - t0 < 2
        await client.aclose()


async def test_refused_connection_is_engine_unreachable() -> None:
    client = HttpEngineClient(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(RetryableEngineError) as exc:
        await client.send(CHAT, BODY)
    assert exc.value.code == "engine_unreachable"
    await client.aclose()


async def test_a_keepalive_connection_the_server_closed_is_retried_on_a_new_one() -> None:
    async def one_answer_then_close(reader, writer, n) -> None:
        await read_request(reader)
        writer.write(response(200, b'{"ok":%d}' % n))
        await writer.drain()
        # keep the socket open until the client writes its next request, then drop it
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")

    async with raw_server(one_answer_then_close) as (url, conns):
        client = HttpEngineClient(url)
        try:
            first = await client.send(CHAT, BODY)
            second = await client.send(CHAT, BODY)
            assert (first.body, second.body) == (b'{"ok":1}', b'{"ok":2}')
            assert len(conns) == 2
        finally:
            await client.aclose()


async def test_bodies_delimited_by_close_and_chunked_bodies() -> None:
    async def close_delimited(reader, writer, n) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b'{"a":1}')
        await writer.drain()

    async def chunked(reader, writer, n) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":2}\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    for handler, expected in ((close_delimited, b'{"a":1}'), (chunked, b'{"a":2}')):
        async with raw_server(handler) as (url, _):
            client = HttpEngineClient(url)
            try:
                reply = await client.send(CHAT, BODY)
                assert (reply.status, reply.body) == (200, expected)
            finally:
                await client.aclose()


async def test_the_api_key_is_sent_as_a_bearer_token() -> None:
    seen: list[bytes] = []

    async def record(reader, writer, n) -> None:
        seen.append(await read_request(reader))
        writer.write(response(200, b"{}"))
        await writer.drain()

    async with raw_server(record) as (url, _):
        client = HttpEngineClient(url + "/v1/", api_key="sk-1")
        await client.send(CHAT, BODY)
        await client.aclose()
    head = seen[0].split(b"\r\n\r\n")[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer sk-1" in head and b"Content-Type: application/json" in head


def test_engine_base_url_accepts_a_v1_suffix() -> None:
    assert engine_base_url("http://h:1/v1/") == "http://h:1"
    assert engine_base_url("http://h:1") == "http://h:1"


async def test_fake_engine_runs_sync_and_async_handlers() -> None:
    sync = FakeEngine(lambda path, body: (200, {"echo": body["x"], "path": path}))
    reply = await sync.send(CHAT, b'{"x": 1}')
    assert reply.status == 200 and orjson.loads(reply.body) == {"echo": 1, "path": CHAT}

    async def slow(path, body):
        await asyncio.sleep(0)
        raise RetryableEngineError("dropped", code="engine_unreachable")

    with pytest.raises(RetryableEngineError):
        await FakeEngine(slow).send(CHAT, b"{}")


# -- bounded and truncated answers ---------------------------------------------

_MiB = 1024 * 1024


async def _stream_huge(writer: asyncio.StreamWriter, total: int) -> None:
    block = b"x" * _MiB
    sent = 0
    while sent < total:
        writer.write(block)
        await writer.drain()
        sent += len(block)


async def _rss_growth_while(coro) -> tuple[int, object]:
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    task = asyncio.ensure_future(coro)
    while not task.done():
        peak = max(peak, proc.memory_info().rss)
        await asyncio.sleep(0.01)
    return peak - base, task.exception() or task.result()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_answer_over_the_size_limit_is_dropped_while_reading(framing) -> None:
    """1 GiB announced and streamed: reading stops at the limit, memory stays flat."""
    async def huge(reader, writer, n) -> None:
        await read_request(reader)
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % (1024 * _MiB))
            await _stream_huge(writer, 1024 * _MiB)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            block = b"%x\r\n%b\r\n" % (_MiB, b"x" * _MiB)
            for _ in range(1024):
                writer.write(block)
                await writer.drain()

    async with raw_server(huge) as (url, _):
        client = HttpEngineClient(url, max_response_bytes=4 * _MiB)
        try:
            growth, exc = await _rss_growth_while(client.send(CHAT, BODY))
        finally:
            await client.aclose()
    assert isinstance(exc, FatalEngineError) and exc.code == "response_too_large", exc
    assert "4194304" in exc.message
    assert growth < 200 * _MiB, f"RSS grew by {growth / _MiB:.0f} MiB"


async def test_a_body_at_the_limit_is_read_and_the_connection_reused() -> None:
    body = b'"' + b"y" * 998 + b'"'

    async def exact(reader, writer, n) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(response(200, body))
            await writer.drain()

    async with raw_server(exact) as (url, conns):
        client = HttpEngineClient(url, max_response_bytes=1000)
        try:
            for _ in range(2):
                assert (await client.send(CHAT, BODY)).body == body
            assert len(conns) == 1
        finally:
            await client.aclose()


async def test_truncated_answers_are_connection_errors_not_successes() -> None:
    async def reset_close_delimited(reader, writer, n) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b'{"half":')
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with linger 0: an RST, not a clean end of the body

    async def short_content_length(reader, writer, n) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"half":')
        await writer.drain()

    async def chunked_cut(reader, writer, n) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"half\":\r\n")
        await writer.drain()

    async def garbage(reader, writer, n) -> None:
        await read_request(reader)
        writer.write(b"SMTP READY\r\n\r\n")
        await writer.drain()

    for handler in (reset_close_delimited, short_content_length, chunked_cut, garbage):
        async with raw_server(handler) as (url, _):
            client = HttpEngineClient(url)
            try:
                with pytest.raises(RetryableEngineError) as exc:
                    await client.send(CHAT, BODY)
                assert exc.value.code == "connection_error", (handler.__name__, exc.value.code)
            finally:
                await client.aclose()


async def test_the_content_type_of_the_answer_is_kept() -> None:
    async def sse(reader, writer, n) -> None:
        await read_request(reader)
        writer.write(response(200, b"data: {}\n\n", b"Content-Type: text/event-stream; charset=utf-8"))
        await writer.drain()

    async with raw_server(sse) as (url, _):
        client = HttpEngineClient(url)
        try:
            reply = await client.send(CHAT, BODY)
            assert reply.content_type == "text/event-stream; charset=utf-8"
        finally:
            await client.aclose()


async def test_a_cancel_that_arrives_as_the_connect_fails_is_not_lost() -> None:
    # The connect ends (refused) in the same loop turn as a stop cancels the
    # request. The cancel must win: Python 3.11's wait_for returned the connect's
    # error instead, the executor took it for a failed attempt and retried on.
    from overnight.executor.http1 import HttpPool

    pool = HttpPool("http://127.0.0.1:9", timeout_s=5.0)
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()

    async def connect(*_args, **_kwargs):
        await gate
        raise ConnectionRefusedError(111, "Connection refused")

    pool._loop = type("L", (), {"create_connection": staticmethod(connect),
                                "create_future": loop.create_future, "call_later": loop.call_later,
                                "call_soon": loop.call_soon, "time": loop.time})()
    task = asyncio.create_task(pool.request("POST", "/v1/chat/completions", b"{}"))
    for _ in range(5):
        await asyncio.sleep(0)  # the request is now waiting in the connect
    gate.set_result(None)  # the connect fails on the next turn ...
    task.cancel()  # ... and the stop arrives in the same turn
    with pytest.raises(asyncio.CancelledError):
        await task
