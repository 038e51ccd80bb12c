"""Tests for the mock inference engine (overnight.mock_engine)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import struct
import time
from typing import Any, AsyncIterator

import httpx
import pytest

from overnight.mock_engine import MockEngineConfig, create_app, serve
from overnight.mock_engine.app import MockEngineApp

from .raw_asgi import RawRequest, check_abort_inflight_answers_503

CHAT = "/v1/chat/completions"


def _config(**kwargs: Any) -> MockEngineConfig:
    kwargs.setdefault("latency_ms", 0.0)
    return MockEngineConfig(**kwargs)


@contextlib.asynccontextmanager
async def _client(app: MockEngineApp, timeout: float = 10.0) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock", timeout=timeout) as client:
        yield client


def _chat(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "my-model", "messages": [{"role": "user", "content": text}]}
    body.update(extra)
    return body


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- config


def test_config_defaults_and_validation() -> None:
    cfg = MockEngineConfig()
    assert cfg.latency_ms == 50.0
    assert cfg.output_tokens == 16
    assert cfg.model == "mock-model"
    with pytest.raises(ValueError):
        MockEngineConfig(fail_rate=1.5)
    with pytest.raises(ValueError):
        MockEngineConfig(max_concurrency=0)
    with pytest.raises(ValueError):
        MockEngineConfig(latency_ms=-1)
    with pytest.raises(TypeError):
        MockEngineConfig(5.0)  # type: ignore[misc]  # keyword-only


# --------------------------------------------------------------------------- endpoint shapes


async def test_chat_completion_shape_and_usage() -> None:
    app = create_app(_config())
    async with _client(app) as client:
        resp = await client.post(CHAT, json=_chat("hello there"))
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-request-id"]
    body = resp.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "my-model"
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 16
    # "hello there" is 11 characters: ceil(11 / 4) + 3 per message.
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22}


async def test_chat_prompt_tokens_are_deterministic_over_messages_and_parts() -> None:
    app = create_app(_config(output_tokens=2))
    messages = [
        {"role": "system", "content": "x" * 40},
        {"role": "user", "content": [{"type": "text", "text": "y" * 9}, {"type": "image_url", "image_url": {}}]},
    ]
    async with _client(app) as client:
        first = (await client.post(CHAT, json={"model": "m", "messages": messages})).json()
        second = (await client.post(CHAT, json={"model": "m", "messages": messages})).json()
    assert first["usage"]["prompt_tokens"] == (10 + 3) + (3 + 3)
    assert first["usage"] == second["usage"]
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["id"] != second["id"]


async def test_request_id_is_echoed() -> None:
    app = create_app(_config())
    async with _client(app) as client:
        resp = await client.post(CHAT, json=_chat(), headers={"x-request-id": "abc-123"})
        other = await client.get("/nope", headers={"x-request-id": "r-404"})
    assert resp.headers["x-request-id"] == "abc-123"
    assert other.headers["x-request-id"] == "r-404"


async def test_max_tokens_caps_completion_tokens() -> None:
    app = create_app(_config(output_tokens=16))
    async with _client(app) as client:
        capped = (await client.post(CHAT, json=_chat(max_tokens=4))).json()
        newer = (await client.post(CHAT, json=_chat(max_completion_tokens=3, max_tokens=10))).json()
        roomy = (await client.post(CHAT, json=_chat(max_tokens=100))).json()
        bad = await client.post(CHAT, json=_chat(max_tokens=0))
    assert capped["usage"]["completion_tokens"] == 4
    assert capped["choices"][0]["finish_reason"] == "length"
    assert len(capped["choices"][0]["message"]["content"].split()) == 4
    assert newer["usage"]["completion_tokens"] == 3
    assert roomy["usage"]["completion_tokens"] == 16
    assert roomy["choices"][0]["finish_reason"] == "stop"
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "max_tokens"


async def test_chat_n_choices() -> None:
    app = create_app(_config(output_tokens=5))
    async with _client(app) as client:
        body = (await client.post(CHAT, json=_chat(n=3))).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 15


async def test_completions_shape_and_usage() -> None:
    app = create_app(_config(output_tokens=8))
    async with _client(app) as client:
        body = {"model": "m", "prompt": "abcdefgh", "max_tokens": 5}
        single = (await client.post("/v1/completions", json=body)).json()
        many = (await client.post("/v1/completions", json={"model": "m", "prompt": ["abcd", "abcde"]})).json()
        ids = (await client.post("/v1/completions", json={"model": "m", "prompt": [1, 2, 3, 4, 5]})).json()
    assert single["id"].startswith("cmpl-")
    assert single["object"] == "text_completion"
    assert single["model"] == "m"
    assert len(single["choices"][0]["text"].split()) == 5
    assert single["choices"][0]["finish_reason"] == "length"
    assert single["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert len(many["choices"]) == 2
    assert many["usage"] == {"prompt_tokens": 1 + 2, "completion_tokens": 16, "total_tokens": 19}
    assert ids["usage"]["prompt_tokens"] == 5
    assert len(ids["choices"]) == 1


async def test_embeddings_shape_and_determinism() -> None:
    app = create_app(_config())
    async with _client(app) as client:
        one = (await client.post("/v1/embeddings", json={"model": "e", "input": "hello world!"})).json()
        again = (await client.post("/v1/embeddings", json={"model": "e", "input": ["hello world!", "other"]})).json()
        b64 = (
            await client.post(
                "/v1/embeddings", json={"model": "e", "input": "hello world!", "encoding_format": "base64"}
            )
        ).json()
        wide = (await client.post("/v1/embeddings", json={"model": "e", "input": "x", "dimensions": 32})).json()
    assert one["object"] == "list"
    assert one["model"] == "e"
    (item,) = one["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    vector = item["embedding"]
    assert len(vector) == 8 and all(isinstance(v, float) for v in vector)
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-3
    assert one["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [d["index"] for d in again["data"]] == [0, 1]
    assert again["data"][0]["embedding"] == vector
    assert again["data"][1]["embedding"] != vector
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, vector))
    assert len(wide["data"][0]["embedding"]) == 32


async def test_responses_shape_and_usage() -> None:
    app = create_app(_config(output_tokens=6))
    async with _client(app) as client:
        full = (await client.post("/v1/responses", json={"model": "r", "input": "abcdefgh"})).json()
        items = [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]}]
        body = {"model": "r", "input": items, "max_output_tokens": 2}
        capped = (await client.post("/v1/responses", json=body)).json()
    assert full["id"].startswith("resp_")
    assert full["object"] == "response"
    assert full["status"] == "completed"
    assert full["model"] == "r"
    (message,) = full["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    (part,) = message["content"]
    assert part["type"] == "output_text"
    assert len(part["text"].split()) == 6
    assert full["usage"]["input_tokens"] == 2 + 3
    assert full["usage"]["output_tokens"] == 6
    assert full["usage"]["total_tokens"] == 11
    assert capped["status"] == "incomplete"
    assert capped["incomplete_details"] == {"reason": "max_output_tokens"}
    assert capped["usage"]["output_tokens"] == 2
    assert capped["usage"]["input_tokens"] == 1 + 3


async def test_models_and_health() -> None:
    app = create_app(_config(model="tiny-llm"))
    async with _client(app) as client:
        models = await client.get("/v1/models")
        health = await client.get("/health")
    assert models.status_code == 200
    body = models.json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "tiny-llm"
    assert body["data"][0]["object"] == "model"
    assert health.status_code == 200


# --------------------------------------------------------------------------- errors


async def test_request_errors() -> None:
    app = create_app(_config())
    async with _client(app) as client:
        bad_json = await client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
        not_object = await client.post(CHAT, json=[1, 2])
        no_model = await client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}]})
        stream = await client.post(CHAT, json=_chat(stream=True))
        no_messages = await client.post(CHAT, json={"model": "m", "messages": []})
        no_input = await client.post("/v1/embeddings", json={"model": "m"})
        missing = await client.post("/v1/nothing", json=_chat())
        wrong_method = await client.get(CHAT)
        bad_marker = await client.post(CHAT, json=_chat("[[mock:status=abc]]"))
    for resp in (bad_json, not_object, no_model, stream, no_messages, no_input, bad_marker):
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
        assert resp.headers["x-request-id"]
    assert no_model.json()["error"]["param"] == "model"
    assert stream.json()["error"]["param"] == "stream"
    assert missing.status_code == 404
    assert missing.json()["error"]["message"]
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
    stats = app.stats.snapshot()
    assert stats["received_total"] == 7  # the 404 and the 405 are not inference requests
    assert stats["by_status"] == {"400": 7}


async def test_chunked_request_body_is_read_fully() -> None:
    app = create_app(_config())
    payload = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"z" * 4000 + b'"}]}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 500):
            yield payload[start : start + 500]

    async with _client(app) as client:
        resp = await client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 200
    assert resp.json()["usage"]["prompt_tokens"] == 1000 + 3


async def test_fail_rate_one_gives_only_500_and_429() -> None:
    app = create_app(_config(fail_rate=1.0, seed=7))
    async with _client(app) as client:
        responses = await asyncio.gather(*(client.post(CHAT, json=_chat(f"q{i}")) for i in range(40)))
    statuses = {r.status_code for r in responses}
    assert statuses == {500, 429}
    for resp in responses:
        error = resp.json()["error"]
        assert error["message"]
        assert error["type"] == ("server_error" if resp.status_code == 500 else "rate_limit_error")
    stats = app.stats.snapshot()
    assert stats["completed_total"] == 0
    assert stats["received_total"] == 40
    assert sum(stats["by_status"].values()) == 40


# --------------------------------------------------------------------------- concurrency


async def test_max_concurrency_queue_and_rejection() -> None:
    app = create_app(_config(latency_ms=200.0, max_concurrency=2, max_queue=1))
    async with _client(app) as client:
        started = time.monotonic()
        tasks = [asyncio.create_task(client.post(CHAT, json=_chat(f"q{i}"))) for i in range(5)]
        await asyncio.sleep(0.05)
        assert app.stats.running == 2
        assert app.stats.waiting == 1
        responses = await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 200, 429, 429]
    for resp in responses:
        if resp.status_code == 429:
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    assert elapsed >= 0.39  # the queued request waited for a slot, then slept its own 200 ms
    stats = app.stats.snapshot()
    assert stats["max_running_seen"] == 2
    assert stats["max_waiting_seen"] == 1
    assert stats["rejected_total"] == 2
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["by_status"] == {"200": 3, "429": 2}


async def test_default_queue_equals_max_concurrency() -> None:
    app = create_app(_config(latency_ms=100.0, max_concurrency=2))
    async with _client(app) as client:
        responses = await asyncio.gather(*(client.post(CHAT, json=_chat(f"q{i}")) for i in range(6)))
    assert sorted(r.status_code for r in responses) == [200] * 4 + [429] * 2


async def test_latency_grows_with_output_tokens() -> None:
    app = create_app(_config(latency_ms=10.0, ms_per_output_token=10.0, output_tokens=20))
    async with _client(app) as client:
        started = time.monotonic()
        await client.post(CHAT, json=_chat(max_tokens=2))
        short = time.monotonic() - started
        started = time.monotonic()
        await client.post(CHAT, json=_chat())
        long = time.monotonic() - started
    assert short >= 0.029
    assert long >= 0.209
    assert long > short


async def test_load_slowdown_stretches_latency() -> None:
    app = create_app(_config(latency_ms=100.0, max_concurrency=2, load_slowdown=1.0))
    async with _client(app) as client:
        started = time.monotonic()
        await asyncio.gather(client.post(CHAT, json=_chat("a")), client.post(CHAT, json=_chat("b")))
        elapsed = time.monotonic() - started
    # The second request to arrive sees 2/2 running: 100 ms * (1 + 1.0 * 2 / 2).
    assert elapsed >= 0.195


# --------------------------------------------------------------------------- test triggers


async def test_fail_times_marker_fails_then_succeeds() -> None:
    app = create_app(_config())
    text = "summarise this [[mock:fail_times=2]]"
    async with _client(app) as client:
        first = await client.post(CHAT, json=_chat(text))
        other = await client.post(CHAT, json=_chat("another prompt [[mock:fail_times=2]]"))
        second = await client.post(CHAT, json=_chat(text))
        third = await client.post(CHAT, json=_chat(text))
        fourth = await client.post(CHAT, json=_chat(text))
    assert [first.status_code, second.status_code, third.status_code, fourth.status_code] == [500, 500, 200, 200]
    assert other.status_code == 500  # counted separately: a different prompt
    assert first.json()["error"]["type"] == "server_error"


async def test_fail_times_with_status_and_retry_after() -> None:
    app = create_app(_config())
    prompt = "x [[mock:fail_times=1,status=429]] [[mock:retry_after=3]]"
    async with _client(app) as client:
        first = await client.post("/v1/completions", json={"model": "m", "prompt": prompt})
        second = await client.post("/v1/completions", json={"model": "m", "prompt": prompt})
    assert first.status_code == 429
    assert first.headers["retry-after"] == "3"
    assert first.json()["error"]["code"] == "rate_limit_exceeded"
    assert second.status_code == 200


async def test_mock_body_field() -> None:
    app = create_app(_config())
    async with _client(app) as client:
        always = await client.post(CHAT, json=_chat(mock={"status": 503, "retry_after": 2}))
        keyed = [
            await client.post(CHAT, json=_chat(f"prompt {i}", mock={"fail_times": 1, "key": "shared"}))
            for i in range(2)
        ]
        text_form = await client.post("/v1/embeddings", json={"model": "m", "input": "x", "mock": "status=502"})
    assert always.status_code == 503
    assert always.headers["retry-after"] == "2"
    assert [r.status_code for r in keyed] == [500, 200]
    assert text_form.status_code == 502


async def test_sleep_and_tokens_markers() -> None:
    app = create_app(_config(output_tokens=16))
    async with _client(app) as client:
        started = time.monotonic()
        slow = await client.post(CHAT, json=_chat("wait [[mock:sleep_ms=150 tokens=3]]"))
        elapsed = time.monotonic() - started
        body = {"model": "m", "input": "[[mock:sleep_ms=20;status=500]]"}
        slow_fail = await client.post("/v1/responses", json=body)
    assert slow.status_code == 200
    assert elapsed >= 0.145
    assert slow.json()["usage"]["completion_tokens"] == 3
    assert slow_fail.status_code == 500


async def test_marker_only_in_last_chat_message() -> None:
    app = create_app(_config())
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "[[mock:status=500]]"},
            {"role": "user", "content": "fine"},
        ],
    }
    async with _client(app) as client:
        resp = await client.post(CHAT, json=body)
    assert resp.status_code == 200


# --------------------------------------------------------------------------- stats and metrics


async def test_stats_counters_and_reset() -> None:
    app = create_app(_config(output_tokens=4))
    async with _client(app) as client:
        await client.post(CHAT, json=_chat("abcd"))
        await client.post("/v1/completions", json={"model": "m", "prompt": "abcd", "max_tokens": 2})
        await client.post(CHAT, json=_chat("[[mock:status=503]]"))
        await client.post(CHAT, content=b"nope")
        await client.get("/health")
        stats = (await client.get("/stats")).json()
        assert stats["received_total"] == 4
        assert stats["completed_total"] == 2
        assert stats["by_status"] == {"200": 2, "400": 1, "503": 1}
        assert stats["by_route"] == {CHAT: 3, "/v1/completions": 1}
        assert stats["running"] == 0 and stats["waiting"] == 0
        assert stats["max_running_seen"] == 1
        assert stats["prompt_tokens_total"] == (1 + 3) + 1
        assert stats["generation_tokens_total"] == 4 + 2
        assert app.stats.received_total == 4

        reset = await client.post("/stats/reset")
        assert reset.status_code == 200
        stats = (await client.get("/stats")).json()
        assert stats["received_total"] == 0
        assert stats["completed_total"] == 0
        assert stats["by_status"] == {}
        assert stats["max_running_seen"] == 0
        assert stats["prompt_tokens_total"] == 0


async def test_reset_forgets_fail_times_history() -> None:
    app = create_app(_config())
    text = "[[mock:fail_times=1]]"
    async with _client(app) as client:
        assert (await client.post(CHAT, json=_chat(text))).status_code == 500
        await client.post("/stats/reset")
        assert (await client.post(CHAT, json=_chat(text))).status_code == 500
        assert (await client.post(CHAT, json=_chat(text))).status_code == 200


def _metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_use_vllm_names_and_reflect_running() -> None:
    app = create_app(_config(latency_ms=300.0, max_concurrency=2, output_tokens=5))
    label = (("model_name", "mock-model"),)
    async with _client(app) as client:
        tasks = [asyncio.create_task(client.post(CHAT, json=_chat(f"q{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)
        during = await client.get("/metrics")
        assert during.status_code == 200
        assert during.headers["content-type"].startswith("text/plain")
        samples = _metric_samples(during.text)
        assert samples[("vllm:num_requests_running", label)] == 2.0
        assert samples[("vllm:num_requests_waiting", label)] == 1.0
        await asyncio.gather(*tasks)
        after = await client.get("/metrics")
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
    ):
        assert name in after.text
    samples = _metric_samples(after.text)
    assert samples[("vllm:num_requests_running", label)] == 0.0
    assert samples[("vllm:generation_tokens_total", label)] == 15.0
    assert samples[("vllm:prompt_tokens_total", label)] == 3 * (1 + 3)
    assert samples[("vllm:request_success_total", (("finished_reason", "stop"),) + label)] == 3.0


# --------------------------------------------------------------------------- raw ASGI driving


async def test_disconnect_while_queued_or_running_frees_capacity() -> None:
    app = create_app(_config(max_concurrency=1))
    holder = RawRequest(app, _chat("[[mock:sleep_ms=300]]"))
    queued = RawRequest(app, _chat("queued"))
    await asyncio.sleep(0.02)
    assert (app.stats.running, app.stats.waiting) == (1, 1)

    queued.disconnect.set()
    await asyncio.wait_for(queued.task, 1)
    assert queued.messages == []
    assert (app.stats.running, app.stats.waiting) == (1, 0)

    holder.disconnect.set()
    await asyncio.wait_for(holder.task, 1)
    assert holder.messages == []
    assert (app.stats.running, app.stats.waiting) == (0, 0)
    stats = app.stats.snapshot()
    assert stats["by_status"] == {"499": 2}
    assert stats["aborted_total"] == 2

    # The slot is free again.
    after = RawRequest(app, _chat("after"))
    await asyncio.wait_for(after.task, 1)
    assert after.status == 200


async def test_slot_is_handed_to_the_next_waiter_in_order() -> None:
    app = create_app(_config(latency_ms=30.0, max_concurrency=1, max_queue=5))
    requests = [RawRequest(app, _chat(f"q{i}")) for i in range(4)]
    await asyncio.sleep(0.01)
    assert (app.stats.running, app.stats.waiting) == (1, 3)
    order: list[int] = []
    for i, request in enumerate(requests):
        request.task.add_done_callback(lambda _t, i=i: order.append(i))
    await asyncio.wait_for(asyncio.gather(*(r.task for r in requests)), 2)
    assert order == [0, 1, 2, 3]
    assert [r.status for r in requests] == [200] * 4
    assert app.stats.max_running_seen == 1


async def test_abort_inflight_answers_503() -> None:
    app = create_app(_config(latency_ms=5000.0, max_concurrency=1))
    await check_abort_inflight_answers_503(app, settle_s=0.02)


async def test_lifespan_protocol() -> None:
    app = create_app(_config())
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# --------------------------------------------------------------------------- SDK compatibility


async def test_openai_sdk_round_trip() -> None:
    openai = pytest.importorskip("openai")
    app = create_app(_config(output_tokens=4))
    async with _client(app) as http_client:
        client = openai.AsyncOpenAI(
            api_key="unused", base_url="http://mock/v1", http_client=http_client, max_retries=0
        )
        chat = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "the quick brown fox"
        assert chat.usage is not None and chat.usage.completion_tokens == 4
        embeddings = await client.embeddings.create(model="m", input=["a", "b"])
        assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) == 8
        completion = await client.completions.create(model="m", prompt="hi", max_tokens=2)
        assert completion.choices[0].text == "the quick"
        response = await client.responses.create(model="m", input="hi")
        assert response.output_text == "the quick brown fox"
        models = await client.models.list()
        assert [m.id for m in models.data] == ["mock-model", "m"]  # configured, then answered


# --------------------------------------------------------------------------- real TCP


async def test_serve_over_tcp() -> None:
    port = _free_port()
    started = asyncio.Event()
    server = asyncio.create_task(serve(_config(latency_ms=5.0), host="127.0.0.1", port=port, started=started))
    try:
        await asyncio.wait_for(started.wait(), 5)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            resp = await client.post(CHAT, json=_chat())
            assert resp.status_code == 200
            assert resp.json()["usage"]["completion_tokens"] == 16
            assert resp.headers["x-request-id"]
            assert (await client.get("/health")).status_code == 200

            # A client that gives up frees its slot; the request counts as aborted (499).
            with pytest.raises(httpx.TimeoutException):
                await client.post(CHAT, json=_chat("[[mock:sleep_ms=5000]]"), timeout=0.2)
            for _ in range(50):
                stats = (await client.get("/stats")).json()
                if stats["running"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert stats["running"] == 0
            assert stats["by_status"].get("499") == 1

            # Cancelling serve() answers in-flight requests with 503 and shuts down promptly.
            pending = asyncio.create_task(client.post(CHAT, json=_chat("[[mock:sleep_ms=10000]]")))
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            server.cancel()
            resp = await pending
            assert resp.status_code == 503
            with pytest.raises(asyncio.CancelledError):
                await server
            assert time.monotonic() - t0 < 3
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"http://127.0.0.1:{port}/health", timeout=1)
    finally:
        if not server.done():
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
