"""``execute()`` with ``FakeEngine``: retries, Retry-After, cancel, expiry, outages and
exactly-once lines across a resume."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from overnight.errors import FatalEngineError, RetryableEngineError
from overnight.executor.checkpoint import Checkpoint
from overnight.executor.engine import EngineReply, FakeEngine
from overnight.executor.limiter import ConcurrencyLimits
from overnight.executor.retry import RetryPolicy
from overnight.executor.run import ExecuteParams, Outcome, Shard, StopSignal, execute
from overnight.executor.sharing import EngineCapacity
from overnight.executor.writer import Spool
from overnight.storage.memory import MemoryStorage

CHAT = "/v1/chat/completions"
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.01)


def ok(body: dict) -> tuple[int, dict]:
    return 200, {"object": "chat.completion", "echo": body["messages"][0]["content"],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


class Batch:
    """An input file in memory storage plus everything ``execute`` needs."""

    def __init__(self, tmp_path: Path, n: int, *, contents=None, limit: int = 8, cap: int = 8) -> None:
        self.tmp, self.n = tmp_path, n
        self.storage = MemoryStorage()
        self.contents = contents or [f"hello {i}" for i in range(n)]
        self.capacity = EngineCapacity(ConcurrencyLimits(initial=limit, max=max(limit, cap)))
        self.cap = cap
        self.persisted: list[bytes] = []
        self.token = 0

    async def upload(self) -> None:
        lines = [orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT,
                               "body": {"model": "m", "messages": [{"role": "user", "content": c}]}})
                 for i, c in enumerate(self.contents)]
        await self.storage.put_bytes("in", b"\n".join(lines) + b"\n")

    async def run(self, engine, *, stop: StopSignal | None = None, deadline_s: float = 3600,
                  policy: RetryPolicy = FAST_RETRY, checkpoint: bytes | None = None, interval_s: float = 0.05,
                  shard: Shard | None = None):
        self.token += 1
        cp = Checkpoint.decode(checkpoint) if checkpoint else Checkpoint.empty(self.n)
        self.spool = Spool(spool_dir=self.tmp / "spool", storage=self.storage, batch_id="batch_t", token=self.token,
                           checkpoint=cp)
        self.spool.open()
        await self.spool.recover()

        async def persist(data: bytes) -> None:
            self.persisted.append(data)

        params = ExecuteParams(endpoint=CHAT, input_key="in", batch_suffix="t", deadline=time.time() + deadline_s,
                               checkpoint_interval_s=interval_s, persist=persist, shard=shard)
        self.share = self.capacity.join(cap=self.cap)
        try:
            return await execute(storage=self.storage, spool=self.spool, engine=engine, limiter=self.share,
                                 policy=policy, params=params, stop=stop or StopSignal())
        finally:
            self.share.close()

    async def lines(self) -> tuple[list[dict], list[dict]]:
        await self.spool.assemble(out_key="out", err_key="err")
        self.spool.close()
        out = [orjson.loads(x) for x in (await self.storage.get_bytes("out")).splitlines()] \
            if self.spool.cp.completed else []
        err = [orjson.loads(x) for x in (await self.storage.get_bytes("err")).splitlines()] \
            if self.spool.cp.failed else []
        return out, err

    def assert_exactly_once(self, out: list[dict], err: list[dict]) -> None:
        counts = Counter(row["custom_id"] for row in out + err)
        assert set(counts) == {f"c{i}" for i in range(self.n)}
        assert max(counts.values()) == 1


async def test_every_request_lands_once_with_usage(tmp_path) -> None:
    b = Batch(tmp_path, 200)
    await b.upload()
    engine = FakeEngine(lambda path, body: ok(body))
    assert await b.run(engine) is Outcome.DONE
    out, err = await b.lines()
    b.assert_exactly_once(out, err)
    assert not err and engine.calls == 200
    assert out[0]["response"]["body"]["echo"] == "hello 0" and out[0]["id"].startswith("batch_req_t")
    assert b.spool.usage.input_tokens == 600 and b.spool.usage.output_tokens == 400
    assert b.share.max_inflight_seen <= 8


async def test_5xx_is_retried_and_a_4xx_answer_is_final(tmp_path) -> None:
    b = Batch(tmp_path, 10, contents=["flaky"] + ["bad"] + [f"x{i}" for i in range(8)])
    await b.upload()
    seen: Counter = Counter()

    def handler(path, body):
        text = body["messages"][0]["content"]
        seen[text] += 1
        if text == "flaky" and seen[text] < 3:
            return 500, {"error": {"message": "boom"}}
        if text == "bad":
            return 400, {"error": {"message": "no"}}
        return ok(body)

    assert await b.run(FakeEngine(handler)) is Outcome.DONE
    out, err = await b.lines()
    b.assert_exactly_once(out, err)
    assert seen["flaky"] == 3 and seen["bad"] == 1
    assert [e["custom_id"] for e in err] == ["c1"]
    assert err[0]["response"]["status_code"] == 400 and err[0]["error"] is None


async def test_timeouts_give_up_after_max_attempts_as_request_timeout(tmp_path) -> None:
    b = Batch(tmp_path, 3, contents=["slow", "a", "b"])
    await b.upload()

    def handler(path, body):
        if body["messages"][0]["content"] == "slow":
            raise RetryableEngineError("no answer", code="request_timeout")
        return ok(body)

    engine = FakeEngine(handler)
    assert await b.run(engine) is Outcome.DONE
    out, err = await b.lines()
    b.assert_exactly_once(out, err)
    assert err[0]["error"]["code"] == "request_timeout" and err[0]["response"] is None
    assert "after 3 attempts" in err[0]["error"]["message"]


async def test_retry_after_is_honoured_before_the_retry(tmp_path) -> None:
    b = Batch(tmp_path, 1)
    await b.upload()
    sent_at: list[float] = []

    class Once429(FakeEngine):
        async def send(self, path, body):
            sent_at.append(time.monotonic())
            reply = await super().send(path, body)
            if len(sent_at) == 1:
                reply.status, reply.retry_after_s = 429, 0.3
            return reply

    assert await b.run(Once429(lambda p, body: ok(body))) is Outcome.DONE
    assert len(sent_at) == 2 and sent_at[1] - sent_at[0] >= 0.3
    out, err = await b.lines()
    assert len(out) == 1 and not err


async def test_429s_never_lose_a_request_and_shrink_the_limit(tmp_path) -> None:
    b = Batch(tmp_path, 300, limit=32, cap=64)
    await b.upload()
    running = 0

    async def capped(path, body):  # an engine that serves 8 at once and refuses the rest
        nonlocal running
        if running >= 8:
            return 429, {"error": {"message": "full"}}
        running += 1
        try:
            await asyncio.sleep(0.002)
            return ok(body)
        finally:
            running -= 1

    assert await b.run(FakeEngine(capped)) is Outcome.DONE
    out, err = await b.lines()
    b.assert_exactly_once(out, err)
    assert not err
    assert b.capacity.limit.cuts >= 1 and b.capacity.limit.value < 32


async def test_cancel_writes_the_undone_requests_as_cancelled(tmp_path) -> None:
    b = Batch(tmp_path, 100, limit=2, cap=2)
    await b.upload()
    stop = StopSignal()
    calls = 0

    async def handler(path, body):
        nonlocal calls
        calls += 1
        if calls == 10:
            stop.set(Outcome.CANCELLED)
        await asyncio.sleep(0.001)
        return ok(body)

    assert await b.run(FakeEngine(handler), stop=stop) is Outcome.CANCELLED
    out, err = await b.lines()
    b.assert_exactly_once(out, err)
    assert 5 <= len(out) < 100
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"}


async def test_expiry_writes_the_undone_requests_as_expired(tmp_path) -> None:
    b = Batch(tmp_path, 50, limit=1, cap=1)
    await b.upload()

    async def slow(path, body):
        await asyncio.sleep(0.02)
        return ok(body)

    assert await b.run(FakeEngine(slow), deadline_s=0.2) is Outcome.EXPIRED
    out, err = await b.lines()
    b.assert_exactly_once(out, err)
    assert 0 < len(out) < 50
    assert {e["error"]["code"] for e in err} == {"batch_expired"}


async def test_shutdown_then_resume_sends_each_request_at_most_once_more(tmp_path) -> None:
    b = Batch(tmp_path, 400, limit=16, cap=16)
    await b.upload()
    stop = StopSignal()
    sent: Counter = Counter()

    async def handler(path, body):
        sent[body["messages"][0]["content"]] += 1
        if sum(sent.values()) == 150:
            stop.set(Outcome.SHUTDOWN)
        await asyncio.sleep(0.001)
        return ok(body)

    assert await b.run(FakeEngine(handler), stop=stop) is Outcome.SHUTDOWN
    b.spool.close()
    first = sum(sent.values())
    assert await b.run(FakeEngine(handler), checkpoint=b.persisted[-1]) is Outcome.DONE
    out, err = await b.lines()
    b.assert_exactly_once(out, err)
    resent = sum(sent.values()) - 400
    assert resent <= 16, (first, resent)  # at most the in-flight window


async def test_an_outage_holds_dispatch_and_bounds_the_live_requests(tmp_path) -> None:
    b = Batch(tmp_path, 3000, limit=4, cap=4)
    await b.upload()
    down_until = time.monotonic() + 1.5
    peak_tasks = 0
    attempts_while_down = 0

    async def flaky(path, body):
        nonlocal attempts_while_down
        if time.monotonic() < down_until:
            attempts_while_down += 1
            raise RetryableEngineError("connection refused", code="engine_unreachable")
        return ok(body)

    policy = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05)
    task = asyncio.create_task(b.run(FakeEngine(flaky), policy=policy))
    while not task.done():
        await asyncio.sleep(0.01)
        peak_tasks = max(peak_tasks, sum(1 for t in asyncio.all_tasks() if "send_one" in repr(t.get_coro())))
    assert task.result() is Outcome.DONE
    out, err = await b.lines()
    b.assert_exactly_once(out, err)
    assert not err  # an unreachable engine is waited for, not failed
    assert peak_tasks <= 2 * 4 + 256  # the file did not turn into 3,000 sleeping tasks
    assert attempts_while_down < 200, attempts_while_down  # held back, not hammering


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_gateway_errors_are_overload_signals(tmp_path, status) -> None:
    b = Batch(tmp_path, 1)
    await b.upload()
    n = 0

    def handler(path, body):
        nonlocal n
        n += 1
        return (status, {"error": {"message": "x"}}) if n == 1 else ok(body)

    assert await b.run(FakeEngine(handler)) is Outcome.DONE
    assert b.capacity.limit.overloads == 1


# -- answers that are not plain JSON ---------------------------------------------


def raw(status: int, body: bytes, content_type: str | None = None) -> EngineReply:
    return EngineReply(status=status, body=body, request_id="r1", content_type=content_type)


async def test_a_2xx_answer_that_is_not_json_is_an_error_line_after_the_attempts(tmp_path) -> None:
    b = Batch(tmp_path, 2, contents=["html", "ok"])
    await b.upload()
    seen: Counter = Counter()

    def handler(path, body):
        text = body["messages"][0]["content"]
        seen[text] += 1
        if text == "html":
            return raw(200, b"<html>proxy login</html>", "text/html")
        return ok(body)

    assert await b.run(FakeEngine(handler)) is Outcome.DONE
    out, err = await b.lines()
    b.assert_exactly_once(out, err)
    assert seen["html"] == 3 and [o["custom_id"] for o in out] == ["c1"]
    line = err[0]
    assert line["error"]["code"] == "invalid_engine_response" and "<html>proxy login" in line["error"]["message"]
    assert line["response"]["status_code"] == 200
    assert line["response"]["body"]["error"]["message"] == "<html>proxy login</html>"
    assert b.spool.cp.completed == 1 and b.spool.cp.failed == 1


async def test_a_non_2xx_answer_that_is_not_json_is_recorded_the_same_way(tmp_path) -> None:
    b = Batch(tmp_path, 1)
    await b.upload()
    assert await b.run(FakeEngine(lambda path, body: raw(400, b"Bad Request", "text/plain"))) is Outcome.DONE
    out, err = await b.lines()
    assert not out
    assert err[0]["error"]["code"] == "invalid_engine_response" and "HTTP 400" in err[0]["error"]["message"]
    assert err[0]["response"]["status_code"] == 400
    assert err[0]["response"]["body"]["error"]["message"] == "Bad Request"


async def test_a_streamed_answer_is_assembled_and_its_usage_counted(tmp_path) -> None:
    b = Batch(tmp_path, 1)
    await b.upload()
    chunks = [
        {"id": "c", "object": "chat.completion.chunk", "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "he"}, "finish_reason": None}]},
        {"id": "c", "object": "chat.completion.chunk", "model": "m",
         "choices": [{"index": 0, "delta": {"content": "y"}, "finish_reason": "stop"}]},
        {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [],
         "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
    ]
    stream = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    assert await b.run(FakeEngine(lambda path, body: raw(200, stream, "text/event-stream"))) is Outcome.DONE
    out, err = await b.lines()
    assert not err
    body = out[0]["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "hey"
    assert b.spool.usage.input_tokens == 4 and b.spool.usage.output_tokens == 2


async def test_a_stream_that_cannot_be_assembled_is_never_a_success(tmp_path) -> None:
    b = Batch(tmp_path, 1)
    await b.upload()
    stream = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"cut"}}]}\n\n'
    assert await b.run(FakeEngine(lambda path, body: raw(200, stream, "text/event-stream"))) is Outcome.DONE
    out, err = await b.lines()
    assert not out
    assert err[0]["error"]["code"] == "unparseable_stream"
    assert err[0]["response"]["status_code"] == 200 and "data: " in err[0]["response"]["body"]["error"]["message"]


async def test_an_answer_over_the_size_limit_fails_at_once(tmp_path) -> None:
    b = Batch(tmp_path, 1)
    await b.upload()

    def handler(path, body):
        raise FatalEngineError("too big", code="response_too_large")

    engine = FakeEngine(handler)
    assert await b.run(engine) is Outcome.DONE
    out, err = await b.lines()
    assert engine.calls == 1 and not out
    assert err[0]["error"] == {"code": "response_too_large", "message": "too big (after 1 attempt)"}


async def test_broken_connections_count_as_attempts_not_as_an_outage(tmp_path) -> None:
    b = Batch(tmp_path, 1)
    await b.upload()

    def handler(path, body):
        raise RetryableEngineError("reset mid-answer", code="connection_error")

    engine = FakeEngine(handler)
    assert await b.run(engine, deadline_s=3600) is Outcome.DONE
    out, err = await b.lines()
    assert engine.calls == 3 and err[0]["error"]["code"] == "connection_error"


async def test_shards_split_a_batch_and_together_send_each_request_once(tmp_path) -> None:
    n = 101
    sent: Counter[str] = Counter()

    def answer(path, body):
        sent[body["messages"][0]["content"]] += 1
        return ok(body)

    seen: Counter[str] = Counter()
    for index in range(3):
        b = Batch(tmp_path / f"s{index}", n)
        await b.upload()
        assert await b.run(FakeEngine(answer), shard=Shard(index=index, count=3)) is Outcome.DONE
        out, err = await b.lines()
        assert not err
        assert len(out) == Shard(index=index, count=3).size(n)
        assert all(int(row["custom_id"][1:]) % 3 == index for row in out)
        seen.update(row["custom_id"] for row in out)
    assert set(seen) == {f"c{i}" for i in range(n)} and max(seen.values()) == 1
    assert sum(sent.values()) == n


async def test_a_cancelled_shard_writes_only_its_own_undone_lines(tmp_path) -> None:
    b = Batch(tmp_path, 50)
    await b.upload()
    stop = StopSignal()
    stop.set(Outcome.CANCELLED)
    shard = Shard(start=10, stop=20)
    assert await b.run(FakeEngine(lambda p, body: ok(body)), stop=stop, shard=shard) is Outcome.CANCELLED
    out, err = await b.lines()
    assert sorted(int(r["custom_id"][1:]) for r in out + err) == list(range(10, 20))


def test_shard_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        Shard(index=3, count=3)
    with pytest.raises(ValueError):
        Shard(start=5, stop=2)
    assert Shard(index=1, count=4, start=2, stop=11).size(100) == len([i for i in range(2, 11) if i % 4 == 1])



async def test_a_stop_ends_requests_whose_engine_call_swallows_the_cancel(tmp_path) -> None:
    # A library under the engine client that turns a cancel into an error (Python
    # 3.11's wait_for did, for a connect refused as the cancel came) must not make
    # a stopped request retry on: the stop would wait on it, and its line would be
    # written after the checkpoint the stop just took.
    b = Batch(tmp_path, 50, limit=8, cap=8)
    await b.upload()
    stop = StopSignal()
    started = asyncio.Event()

    async def handler(path, body):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RetryableEngineError("Could not reach the engine", code="engine_unreachable") from None
        return ok(body)

    async def stop_soon() -> None:
        await started.wait()
        await asyncio.sleep(0.05)
        stop.set(Outcome.SHUTDOWN)

    asyncio.get_running_loop().create_task(stop_soon())
    policy = RetryPolicy(max_attempts=5, base_delay_s=0.01, max_delay_s=0.01)
    t0 = time.monotonic()
    assert await asyncio.wait_for(b.run(FakeEngine(handler), stop=stop, policy=policy), 10) is Outcome.SHUTDOWN
    assert time.monotonic() - t0 < 3
    b.spool.close()
    assert b.spool.cp.completed == b.spool.cp.failed == 0  # nothing was written after the stop
    await asyncio.sleep(0)
    assert b.capacity.inflight == 0
