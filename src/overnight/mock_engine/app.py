"""A fast, OpenAI-compatible fake LLM engine (``overnight mock-engine``).

The mock engine lets people try overnight without a GPU, gives the test-suite a
scriptable upstream, and serves as the load target for throughput benchmarks.
It is therefore written as a bare ASGI application: no framework routing, JSON
parsed and rendered with orjson, no per-request logging, and a fast path with
no ``await`` besides reading the body and sending the response when the
configured latency is zero.

This module holds the app: routing, admission (slots and queue, or the batching
engine) and the inference path. Request bodies are read in :mod:`.prep`,
scripted behaviour in :mod:`.directives`, answers rendered in :mod:`.render`,
counters kept in :mod:`.stats`; :mod:`.server` serves it with uvicorn.

Endpoints
---------
``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``POST /v1/responses``
    Inference routes. Every POST to one of them counts in ``received_total``.
    Each choice generates ``min(output_tokens, max tokens)`` tokens;
    ``finish_reason`` is ``"length"`` when the request's limit cut the answer
    short, ``"stop"`` otherwise.
``GET /v1/models``
    The model names it accepts: any name is accepted (and echoed in the
    answer), so the list holds the configured ``model`` first, then every other
    name it has answered so far (at most 100 are listed).
``GET /health``
    Always 200.
``GET /stats``, ``POST /stats/reset``
    JSON counters (see :meth:`MockEngineStats.snapshot`); reset zeroes them and
    forgets the ``fail_times`` history.
``GET /metrics``
    Prometheus text exposition in vLLM's names (``metrics="vllm"``, the
    default) or SGLang's (``"sglang"``); ``"off"`` answers 404, like an engine
    whose metrics cannot be reached.

Latency and concurrency
-----------------------
Each request's service time is::

    (latency_ms +/- jitter_ms + ms_per_output_token * completion_tokens)
        * (1 + load_slowdown * running / max_concurrency)

and a service time of zero means no sleep at all. With ``max_concurrency`` set,
at most that many requests are served at once, up to ``max_queue`` more wait
in FIFO order, and anything beyond is answered at once with 429, a
``rate_limit_exceeded`` error body and ``Retry-After: 1``. A client that
disconnects while its request waits or sleeps frees its slot (recorded under
status 499 in the stats). Random failures (``fail_rate``) are answered as soon
as the request holds a slot, half with 500 and half with 429.

Batching mode
-------------
With ``batching`` set (a :class:`~overnight.mock_engine.batching.BatchingParams`),
the latency model above is replaced by a continuous-batching engine stepped in
real time (:mod:`overnight.mock_engine.batching`,
:mod:`overnight.mock_engine.batching_driver`): each request generates
``min(max tokens, a sample of output_len)`` tokens (``tokens=N`` forces N),
waits for one of ``max_num_seqs`` slots, and runs one step per output token
while every step slows with the number running. A full waiting queue
(``max_waiting``) answers 429 ``rate_limit_exceeded`` with ``Retry-After: 1``;
a client that disconnects frees its slot and KV cache. ``running``, ``waiting``,
``kv_usage`` and ``preemptions_total`` come from the engine. Scripted failures
are answered at once without entering the engine, and ``sleep_ms`` stands in
for the engine's service time.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections import deque
from typing import Any, Awaitable, Callable

import orjson

from overnight.mock_engine.asgi import (
    BodyTooLarge,
    Receive,
    Scope,
    Send,
    read_body,
    send_response,
    watch_disconnect,
)
from overnight.mock_engine.batching import BatchingEngine
from overnight.mock_engine.batching_driver import BatchingDriver
from overnight.mock_engine.config import MockEngineConfig
from overnight.mock_engine.directives import Directives, read_directives
from overnight.mock_engine.prep import ROUTE_PREP, BadRequest, Prepared
from overnight.mock_engine.render import error_body, render_answer, scripted_error
from overnight.mock_engine.sse import sse_send
from overnight.mock_engine.stats import GenRate, MockEngineStats, metrics_text, model_label

__all__ = ["MockEngineApp", "create_app"]

_MAX_LISTED_MODELS = 100
_RETRY_AFTER_1 = ((b"retry-after", b"1"),)


def _capped(prep: Prepared, tokens: int) -> tuple[int, str]:
    """Tokens per choice under the request's limit, and the finish reason."""
    finish = "stop"
    if prep.limit is not None and prep.limit < tokens:
        tokens, finish = prep.limit, "length"
    if not prep.choices:
        tokens = 0  # embeddings generate nothing
    return tokens, finish


class MockEngineApp:
    """The ASGI3 application. ``stats`` holds the counters, ``config`` the settings."""

    def __init__(self, config: MockEngineConfig) -> None:
        self.config = config
        self.stats = MockEngineStats()
        self._rng = random.Random(config.seed)
        self._max_concurrency = config.max_concurrency
        self._max_queue = (
            config.max_queue
            if config.max_queue is not None
            else (config.max_concurrency or 0)
        )
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._seen: dict[bytes, int] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._shutdown_cancelled: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._started = int(time.time())
        #: Names for /v1/models: the configured one, then those answered (any is accepted).
        self._models: dict[str, None] = {config.model: None}
        self._driver = BatchingDriver(config.batching, self._engine_gauges) if config.batching else None
        self._preempt_seen = 0
        self._gen_rate = GenRate()
        self._label = model_label(config.model)
        self._routes: dict[str, dict[str, Callable[..., Awaitable[None]]]] = {
            path: {"POST": self._inference} for path in ROUTE_PREP
        }
        self._routes["/v1/models"] = {"GET": self._list_models}
        self._routes["/health"] = {"GET": self._health, "HEAD": self._health}
        self._routes["/stats"] = {"GET": self._stats}
        self._routes["/stats/reset"] = {"POST": self._stats_reset}
        self._routes["/metrics"] = {"GET": self._metrics}

    # ------------------------------------------------------------------ plumbing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value
                break
        if rid is None:
            rid = self._new_id().encode()
        path = scope["path"]
        methods = self._routes.get(path)
        if methods is None and len(path) > 1 and path.endswith("/"):
            methods = self._routes.get(path.rstrip("/"))
        if methods is None:
            await _not_found(send, rid, path)
            return
        handler = methods.get(scope["method"])
        if handler is None:
            allow = ", ".join(methods).encode()
            message = f"Method {scope['method']} not allowed on {path}"
            body = error_body(message, "invalid_request_error", None, "method_not_allowed")
            await send_response(send, 405, body, rid, ((b"allow", allow),))
            return
        await handler(scope, receive, send, rid)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):012x}"

    # ------------------------------------------------------------------ simple routes

    async def _health(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        await send_response(send, 200, b'{"status":"ok"}', rid)

    async def _list_models(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        body = {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": self._started,
                    "owned_by": "overnight-mock",
                    "root": model,
                    "parent": None,
                }
                for model in self._models
            ],
        }
        await send_response(send, 200, orjson.dumps(body), rid)

    async def _stats(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        await send_response(send, 200, orjson.dumps(self.stats.snapshot()), rid)

    async def _stats_reset(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        await read_body(receive)
        self.stats.reset()
        self._seen.clear()
        await send_response(send, 200, orjson.dumps(self.stats.snapshot()), rid)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        flavour = self.config.metrics
        if flavour == "off":
            # As if the engine exposed no metrics (or they were unreachable).
            await _not_found(send, rid, scope["path"])
            return
        st = self.stats
        if self._driver is not None:
            usage = st.kv_usage
        else:
            usage = st.running / self._max_concurrency if self._max_concurrency else 0.0
        rate = self._gen_rate.update(time.monotonic(), st.generation_tokens_total) if flavour == "sglang" else 0.0
        body = metrics_text(flavour, st, self._label, usage, rate)
        await send_response(send, 200, body, rid, content_type=b"text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ inference

    async def _inference(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        st = self.stats
        path = scope["path"].rstrip("/")
        st.received_total += 1
        st.by_route[path] = st.by_route.get(path, 0) + 1

        try:
            raw = await read_body(receive)
        except BodyTooLarge:
            await self._reject(send, rid, 413, "The request body is too large", "invalid_request_error")
            return
        if raw is None:
            st.count(499)
            st.aborted_total += 1
            return
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            await self._reject(send, rid, 400, f"Invalid JSON body: {exc}", "invalid_request_error")
            return
        try:
            if not isinstance(body, dict):
                raise BadRequest("The request body must be a JSON object")
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise BadRequest("'model' is required", "model")
            if body.get("stream"):
                raise BadRequest(
                    "Streaming is not supported by the mock engine", "stream", "unsupported_parameter"
                )
            prep = ROUTE_PREP[path](body)
            directives = read_directives(body, prep)
            if directives is not None and directives.sse:
                send = sse_send(send, path)
        except BadRequest as exc:
            await self._reject(send, rid, 400, exc.message, "invalid_request_error", exc.param, exc.code)
            return
        if model not in self._models and len(self._models) < _MAX_LISTED_MODELS:
            self._models[model] = None
        if self._driver is not None:
            await self._batched(receive, send, rid, path, body, model, prep, directives)
            return

        max_conc = self._max_concurrency
        task: asyncio.Task[Any] | None = None
        watcher: asyncio.Task[bool] | None = None
        acquired = False
        try:
            # ---- admission
            if max_conc is None or (st.running < max_conc and not self._waiters):
                st.running += 1
                if st.running > st.max_running_seen:
                    st.max_running_seen = st.running
            elif st.waiting >= self._max_queue:
                await self._reject_busy(send, rid, "The mock engine is at capacity; retry later")
                return
            else:
                if self._closing:
                    await self._reject_closing(send, rid)
                    return
                task, watcher = self._watch(receive)
                await self._wait_for_slot()
            acquired = True

            # ---- outcome
            cfg = self.config
            status, retry_after, sleep_ms, forced = self._outcome(path, prep, directives)
            tokens, finish = _capped(prep, cfg.output_tokens if forced is None else forced)

            # ---- service time
            if sleep_ms is not None:
                delay = sleep_ms
            elif status != 200:
                delay = 0.0
            else:
                delay = cfg.latency_ms
                if cfg.jitter_ms:
                    delay += self._rng.uniform(-cfg.jitter_ms, cfg.jitter_ms)
                if cfg.ms_per_output_token:
                    delay += cfg.ms_per_output_token * tokens
                if cfg.load_slowdown and max_conc:
                    delay *= 1.0 + cfg.load_slowdown * st.running / max_conc
            if delay > 0.0:
                if watcher is None:
                    if self._closing:
                        await self._reject_closing(send, rid)
                        return
                    task, watcher = self._watch(receive)
                await asyncio.sleep(delay / 1000.0)
            if watcher is not None:
                await self._stop_watching(task, watcher)

            # ---- response
            await self._answer(send, rid, status, retry_after, path, body, model, prep, tokens, finish)
        except asyncio.CancelledError:
            if not await self._on_cancelled(task, watcher, send, rid):
                raise
        finally:
            self._unwatch(task, watcher)
            if acquired:
                self._release()

    async def _answer(
        self,
        send: Send,
        rid: bytes,
        status: int,
        retry_after: str | None,
        path: str,
        body: dict[str, Any],
        model: str,
        prep: Prepared,
        tokens: int,
        finish: str,
    ) -> None:
        """Send the outcome: the scripted failure, or the answer (counted)."""
        if status != 200:
            message, type_, code = scripted_error(status)
            extra = ((b"retry-after", retry_after.encode()),) if retry_after else ()
            await self._reject(send, rid, status, message, type_, None, code, extra)
            return
        payload = render_answer(path, body, model, prep, tokens, finish, self._new_id())
        st = self.stats
        st.completed_total += 1
        st.count(200)
        st.prompt_tokens_total += prep.prompt_tokens
        st.generation_tokens_total += tokens * prep.choices
        st.success_by_reason[finish] += 1
        await send_response(send, 200, payload, rid)

    async def _on_cancelled(
        self, task: asyncio.Task[Any] | None, watcher: asyncio.Task[bool] | None, send: Send, rid: bytes
    ) -> bool:
        """Handle a cancelled request: a client disconnect (counted as 499) or
        shutdown (answered 503). False when the cancellation is someone else's
        (always so before the request waited: ``task`` is None)."""
        if task is None:
            return False
        if (
            watcher is not None
            and watcher.done()
            and not watcher.cancelled()
            and watcher.exception() is None
            and watcher.result()
        ):
            # The client went away: drop the request quietly.
            task.uncancel()
            if task in self._shutdown_cancelled:
                self._shutdown_cancelled.discard(task)
                task.uncancel()
            self.stats.count(499)
            self.stats.aborted_total += 1
            return True
        if task in self._shutdown_cancelled:
            # serve() is shutting down: answer instead of dying mid-request.
            self._shutdown_cancelled.discard(task)
            task.uncancel()
            await self._reject_closing(send, rid)
            return True
        return False

    def _outcome(
        self, path: str, prep: Prepared, directives: Directives | None
    ) -> tuple[int, str | None, float | None, int | None]:
        """The scripted or random outcome: (status, retry_after, sleep_ms, forced tokens)."""
        status = 200
        retry_after = None
        sleep_ms = None
        tokens = None
        if directives is not None:
            sleep_ms = directives.sleep_ms
            retry_after = directives.retry_after
            tokens = directives.tokens
            if directives.fail_times is not None:
                key = directives.request_key(path, prep)
                seen = self._seen.get(key, 0) + 1
                self._seen[key] = seen
                if seen <= directives.fail_times:
                    status = directives.status or 500
            elif directives.status is not None:
                status = directives.status
        fail_rate = self.config.fail_rate
        if status == 200 and fail_rate > 0.0 and self._rng.random() < fail_rate:
            status = 500 if self._rng.random() < 0.5 else 429
        return status, retry_after, sleep_ms, tokens

    # ------------------------------------------------------------------ batching mode

    async def _batched(
        self,
        receive: Receive,
        send: Send,
        rid: bytes,
        path: str,
        body: dict[str, Any],
        model: str,
        prep: Prepared,
        directives: Directives | None,
    ) -> None:
        """One inference request through the batching engine: it queues, runs
        beside the others for one step per output token, then is answered."""
        driver = self._driver
        assert driver is not None
        task: asyncio.Task[Any] | None = None
        watcher: asyncio.Task[bool] | None = None
        req = None
        try:
            status, retry_after, sleep_ms, forced = self._outcome(path, prep, directives)
            if forced is None:
                forced = driver.engine.params.output_len.sample(self._rng)
            tokens, finish = _capped(prep, forced)
            if self._closing and (sleep_ms or (status == 200 and sleep_ms is None)):
                await self._reject_closing(send, rid)
                return
            if sleep_ms:
                # A scripted service time stands in for the engine.
                task, watcher = self._watch(receive)
                await asyncio.sleep(sleep_ms / 1000.0)
            elif status == 200 and sleep_ms is None:
                submitted = driver.submit(prep.prompt_tokens, tokens)
                if submitted is None:
                    await self._reject_busy(send, rid, "The mock engine's waiting queue is full; retry later")
                    return
                req, done = submitted
                task, watcher = self._watch(receive)
                await done
                req = None
            if watcher is not None:
                await self._stop_watching(task, watcher)
            await self._answer(send, rid, status, retry_after, path, body, model, prep, tokens, finish)
        except asyncio.CancelledError:
            if req is not None:
                driver.abort(req)
            if not await self._on_cancelled(task, watcher, send, rid):
                raise
        finally:
            self._unwatch(task, watcher)

    def _engine_gauges(self, eng: BatchingEngine) -> None:
        """Mirror the engine's state into the stats (called by the step loop)."""
        st = self.stats
        st.running = running = eng.num_running
        st.waiting = waiting = eng.num_waiting
        if running > st.max_running_seen:
            st.max_running_seen = running
        if waiting > st.max_waiting_seen:
            st.max_waiting_seen = waiting
        st.kv_usage = eng.kv_usage()
        if eng.preemptions_total != self._preempt_seen:
            st.preemptions_total += eng.preemptions_total - self._preempt_seen
            self._preempt_seen = eng.preemptions_total

    async def aclose(self) -> None:
        """Stop background work (the batching step loop)."""
        if self._driver is not None:
            await self._driver.aclose()

    # ------------------------------------------------------------------ disconnects, slots, shutdown

    def _watch(self, receive: Receive) -> tuple[asyncio.Task[Any], asyncio.Task[bool]]:
        """Start watching for a client disconnect while the request waits or sleeps."""
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, task))
        self._inflight.add(task)
        return task, watcher

    async def _stop_watching(self, task: asyncio.Task[Any] | None, watcher: asyncio.Task[bool]) -> None:
        """Stop watching once the wait is over."""
        if watcher.done():
            # The client disconnected and our cancellation is pending:
            # let it land here so that it is handled as an abort.
            await asyncio.sleep(0)
        watcher.cancel()
        self._inflight.discard(task)

    def _unwatch(self, task: asyncio.Task[Any] | None, watcher: asyncio.Task[bool] | None) -> None:
        if watcher is not None:
            if not watcher.done():
                watcher.cancel()
            self._inflight.discard(task)

    def abort_inflight(self) -> int:
        """Answer every waiting or sleeping request with 503 now (used on shutdown).

        Requests arriving afterwards that would have to wait are refused with 503
        too. Returns how many requests were interrupted.
        """
        self._closing = True
        count = 0
        for task in list(self._inflight):
            if task not in self._shutdown_cancelled and not task.done():
                self._shutdown_cancelled.add(task)
                task.cancel()
                count += 1
        return count

    async def _wait_for_slot(self) -> None:
        st = self.stats
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        st.waiting += 1
        if st.waiting > st.max_waiting_seen:
            st.max_waiting_seen = st.waiting
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # A slot was handed over just as we were cancelled: pass it on.
                self._release()
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
                st.waiting -= 1
            raise

    def _release(self) -> None:
        st = self.stats
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                # Hand the slot straight to the next waiter; ``running`` is unchanged.
                st.waiting -= 1
                fut.set_result(None)
                return
        st.running -= 1

    # ------------------------------------------------------------------ error answers

    async def _reject(
        self,
        send: Send,
        rid: bytes,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.stats.count(status)
        await send_response(send, status, error_body(message, type_, param, code), rid, extra)

    async def _reject_busy(self, send: Send, rid: bytes, message: str) -> None:
        self.stats.rejected_total += 1
        await self._reject(
            send, rid, 429, message, "rate_limit_error", None, "rate_limit_exceeded", _RETRY_AFTER_1
        )

    async def _reject_closing(self, send: Send, rid: bytes) -> None:
        await self._reject(send, rid, 503, "The mock engine is shutting down", "server_error")


async def _not_found(send: Send, rid: bytes, path: str) -> None:
    body = error_body(f"Unknown path: {path}", "not_found_error", None, "not_found")
    await send_response(send, 404, body, rid)


def create_app(config: MockEngineConfig) -> MockEngineApp:
    """Build the ASGI application for ``config``."""
    return MockEngineApp(config)
