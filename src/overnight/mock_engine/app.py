"""A fast, OpenAI-compatible fake LLM engine (``overnight mock-engine``).

The mock engine lets people try overnight without a GPU, gives the test-suite a
scriptable upstream, and serves as the load target for throughput benchmarks.
It is therefore written as a bare ASGI application: no framework routing, JSON
parsed and rendered with orjson, no per-request logging, and a fast path with
no ``await`` besides reading the body and sending the response when the
configured latency is zero.

Endpoints
---------
``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``POST /v1/responses``
    Inference routes. Every POST to one of them counts in ``received_total``.
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
    Prometheus text exposition. ``metrics="vllm"`` (default) uses vLLM's names
    (``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
    ``vllm:kv_cache_usage_perc`` and the older ``vllm:gpu_cache_usage_perc``,
    ``vllm:num_preemptions_total``, ``vllm:prompt_tokens_total``,
    ``vllm:generation_tokens_total``, ``vllm:request_success_total``);
    ``"sglang"`` SGLang's (``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
    ``sglang:token_usage``, ``sglang:gen_throughput`` and the token counters);
    ``"off"`` answers 404, like an engine whose metrics cannot be reached.

Tokens and text
---------------
Prompt tokens are a deterministic estimate: ``ceil(chars / 4) + 3`` per chat
message (or Responses input item); ``ceil(chars / 4)`` per completion prompt or
embedding input string; the list length for pre-tokenised inputs. Each choice
generates ``min(output_tokens, max_tokens)`` filler words, one word per token
(``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens``, whichever
the route uses). ``finish_reason`` is ``"length"`` when the request's limit cut
the answer short, ``"stop"`` otherwise. Embeddings are small deterministic
unit vectors (8 floats unless ``dimensions`` asks otherwise) derived from a hash
of the input; ``encoding_format: "base64"`` (the OpenAI SDK's default) is
honoured.

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

Deterministic test triggers
---------------------------
Tests can script behaviour without randomness in two ways:

* a top-level request field ``"mock"``: an object such as
  ``{"status": 503, "retry_after": 2}`` (or the same ``key=value`` text a
  marker holds);
* markers in the prompt text, scanned only when the text contains
  ``[[mock:``: the last chat message, the completion prompt(s), the embedding
  input(s), or the last Responses input item. Several markers may appear, and
  one marker may hold several settings separated by commas, semicolons or
  spaces, e.g. ``[[mock:status=503,retry_after=1]]``.

Settings:

``status=N``
    Answer with HTTP status N (an OpenAI-style error body unless N is 200).
``sleep_ms=N``
    Use N milliseconds as the service time instead of the computed one; it
    also applies before a scripted or random failure.
``fail_times=N``
    Fail (with 500, or with ``status`` when given) the first N times this
    request is seen, then succeed. Requests are matched by route plus their
    full prompt (all messages, the whole prompt or input), so retries of the
    same request succeed on attempt N+1; in the ``"mock"`` field an explicit
    ``key`` may be given instead.
``retry_after=S``
    Add a ``Retry-After: S`` header to the failure response.
``tokens=N``
    Generate N completion tokens per choice instead of ``output_tokens``
    (still capped by the request's max tokens).
``sse``
    Answer a 200 as ``text/event-stream`` although the request did not ask to
    stream, in the endpoint's stream shape (``mock_engine/sse.py``), as
    transformers ``serve`` does for ``/v1/responses``.

Failures without ``sleep_ms`` are answered immediately. A request rejected
because the queue is full is not "seen" for ``fail_times``.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import itertools
import logging
import math
import os
import random
import re
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Awaitable, Callable

import orjson

from overnight.mock_engine.batching import BatchingEngine, BatchingParams
from overnight.mock_engine.batching_driver import BatchingDriver
from overnight.mock_engine.sse import sse_send

__all__ = ["MockEngineApp", "MockEngineConfig", "MockEngineStats", "create_app", "run", "serve"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class MockEngineConfig:
    """How the mock engine behaves. All times are in milliseconds."""

    latency_ms: float = 50.0
    """Base service time per request."""
    jitter_ms: float = 0.0
    """Uniform +/- jitter added to the latency."""
    fail_rate: float = 0.0
    """Probability that a request fails; failures are 500 or 429, half each."""
    max_concurrency: int | None = None
    """Requests served at once; beyond it requests wait in a bounded queue."""
    max_queue: int | None = None
    """Waiting requests allowed beyond ``max_concurrency`` (None: equal to it).
    Beyond that, requests get 429 with ``Retry-After``."""
    ms_per_output_token: float = 0.0
    """Extra service time per generated token."""
    load_slowdown: float = 0.0
    """Latency multiplier ``1 + load_slowdown * running / max_concurrency``
    (only when ``max_concurrency`` is set)."""
    output_tokens: int = 16
    """Completion tokens per choice unless the request asks for fewer."""
    seed: int | None = None
    """Seed for jitter and random failures."""
    model: str = "mock-model"
    """Model name listed by ``/v1/models`` and used in the metric labels."""
    batching: BatchingParams | None = None
    """Model a continuous-batching engine (see :mod:`overnight.mock_engine.batching`):
    latency, jitter, ``max_concurrency``/``max_queue``, ``ms_per_output_token``,
    ``load_slowdown`` and ``output_tokens`` are then unused."""
    metrics: str = "vllm"
    """``/metrics`` flavour: ``"vllm"``, ``"sglang"`` or ``"off"`` (404)."""

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.jitter_ms < 0 or self.ms_per_output_token < 0:
            raise ValueError("latency_ms, jitter_ms and ms_per_output_token must be >= 0")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 (or None for unlimited)")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError("max_queue must be >= 0 (or None)")
        if self.load_slowdown < 0:
            raise ValueError("load_slowdown must be >= 0")
        if self.output_tokens < 0:
            raise ValueError("output_tokens must be >= 0")
        if not self.model:
            raise ValueError("model must be a non-empty string")
        if self.metrics not in _METRIC_FLAVOURS:
            raise ValueError(f"metrics must be one of {', '.join(_METRIC_FLAVOURS)}, not {self.metrics!r}")
        if self.batching is not None and not isinstance(self.batching, BatchingParams):
            raise ValueError("batching must be a BatchingParams (or None)")


_METRIC_FLAVOURS = ("vllm", "sglang", "off")


# --------------------------------------------------------------------------- stats


class MockEngineStats:
    """Counters kept by the app; ``running`` and ``waiting`` are live gauges."""

    __slots__ = (
        "received_total",
        "completed_total",
        "rejected_total",
        "aborted_total",
        "by_status",
        "by_route",
        "prompt_tokens_total",
        "generation_tokens_total",
        "success_by_reason",
        "running",
        "waiting",
        "max_running_seen",
        "max_waiting_seen",
        "preemptions_total",
        "kv_usage",
    )

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.reset()

    def reset(self) -> None:
        """Zero the counters; the live gauges keep their values."""
        self.received_total = 0
        self.completed_total = 0
        self.rejected_total = 0
        self.aborted_total = 0
        self.by_status: dict[int, int] = {}
        self.by_route: dict[str, int] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_by_reason: dict[str, int] = {"stop": 0, "length": 0}
        self.preemptions_total = 0
        self.max_running_seen = self.running
        self.max_waiting_seen = self.waiting

    def snapshot(self) -> dict[str, Any]:
        """The JSON document served by ``GET /stats``."""
        finished = sum(self.by_status.values())
        return {
            "received_total": self.received_total,
            "completed_total": self.completed_total,
            "failed_total": finished - self.completed_total,
            "rejected_total": self.rejected_total,
            "aborted_total": self.aborted_total,
            "requests_total": finished,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_route": dict(self.by_route),
            "running": self.running,
            "waiting": self.waiting,
            "max_running_seen": self.max_running_seen,
            "max_waiting_seen": self.max_waiting_seen,
            "preemptions_total": self.preemptions_total,
            "kv_usage": self.kv_usage,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "success_by_finish_reason": dict(self.success_by_reason),
        }


# --------------------------------------------------------------------------- helpers

_JSON = b"application/json"
_MAX_BODY = 64 * 1024 * 1024
_CONTENT_CAP = 65536  # largest token count whose filler text is cached

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

_STATUS_TEXT = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    408: "Request timeout",
    409: "Conflict",
    422: "Unprocessable entity",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}

_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven mock tokens drift "
    "through an idle night shift and every batch finishes before morning light "
    "so overnight answers arrive cheap steady and entirely made up by design"
).split()


@lru_cache(maxsize=512)
def _filler(n: int) -> str:
    """Deterministic filler text of ``n`` words (one word per token)."""
    words = _WORDS
    if n <= len(words):
        return " ".join(words[:n])
    reps, rest = divmod(n, len(words))
    block = " ".join(words)
    parts = [block] * reps
    if rest:
        parts.append(" ".join(words[:rest]))
    return " ".join(parts)


def _filler_text(n: int) -> str:
    if n <= _CONTENT_CAP:
        return _filler(n)
    return _filler.__wrapped__(n)


def _content_text(content: Any) -> str:
    """Text of a chat message / Responses item ``content`` (string or parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    texts.append(t)
        return "\n".join(texts)
    raise _BadRequest("message content must be a string or an array of parts", "messages")


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def _positive_int(body: dict[str, Any], *names: str) -> int | None:
    """The first of ``names`` present in ``body`` (and not null), as an int >= 1."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest(f"'{name}' must be a positive integer", name)
        return value
    return None


_MARKER = "[[mock:"
_MAX_LISTED_MODELS = 100
_MARKER_RE = re.compile(r"\[\[mock:([^\]]*)\]\]")
_SETTING_SPLIT_RE = re.compile(r"[,;\s]+")
_INT_SETTINGS = ("status", "fail_times", "tokens")
_MAX_TOKENS_SETTING = 1_000_000


def _parse_settings(text: str, into: dict[str, Any]) -> None:
    for match in _MARKER_RE.finditer(text):
        for item in _SETTING_SPLIT_RE.split(match.group(1)):
            if item:
                key, _, value = item.partition("=")
                into[key.strip()] = value.strip()


class _Directives:
    __slots__ = ("status", "sleep_ms", "fail_times", "retry_after", "tokens", "key", "sse")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.status: int | None = None
        self.sleep_ms: float | None = None
        self.fail_times: int | None = None
        self.retry_after: str | None = None
        self.tokens: int | None = None
        self.key: str | None = None
        self.sse = False
        for name, value in raw.items():
            if name in _INT_SETTINGS:
                try:
                    number = int(value)
                except (TypeError, ValueError):
                    raise _BadRequest(f"mock setting '{name}' must be an integer", "mock") from None
                if (
                    number < 0
                    or (name == "status" and not 100 <= number <= 599)
                    or (name == "tokens" and number > _MAX_TOKENS_SETTING)
                ):
                    raise _BadRequest(f"mock setting '{name}' is out of range", "mock")
                setattr(self, name, number)
            elif name == "sleep_ms":
                try:
                    self.sleep_ms = max(0.0, float(value))
                except (TypeError, ValueError):
                    raise _BadRequest("mock setting 'sleep_ms' must be a number", "mock") from None
            elif name == "retry_after":
                self.retry_after = str(value)
            elif name == "key":
                self.key = str(value)
            elif name == "sse":
                self.sse = str(value).lower() not in ("0", "false", "no", "off")
            else:
                raise _BadRequest(f"unknown mock setting '{name}'", "mock")


class _GenRate:
    """Generated tokens per second over the last few seconds, from the token
    counter as seen at each scrape (``sglang:gen_throughput``)."""

    __slots__ = ("_marks",)

    def __init__(self) -> None:
        self._marks: deque[tuple[float, int]] = deque()

    def update(self, now: float, total: int) -> float:
        marks = self._marks
        if marks and total < marks[-1][1]:
            marks.clear()  # the counters were reset
        if not marks or now - marks[-1][0] >= 0.25:
            marks.append((now, total))
        # Measure from the newest mark at least a second old (or the oldest one).
        while len(marks) > 2 and now - marks[1][0] >= 1.0:
            marks.popleft()
        t0, n0 = marks[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0


def _embedding(data: bytes, dims: int) -> list[float]:
    raw = hashlib.shake_128(data).digest(2 * dims)
    values = [(v - 32767.5) / 32767.5 for v in struct.unpack(f"<{dims}H", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


# --------------------------------------------------------------------------- requests


class _Prepared:
    """What a route handler learned from a request body."""

    __slots__ = ("prompt_tokens", "limit", "choices", "marker_texts", "key_source", "extra")

    def __init__(
        self,
        prompt_tokens: int,
        limit: int | None,
        choices: int,
        marker_texts: list[str] | tuple[str, ...],
        key_source: Any,
        extra: Any = None,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        self.choices = choices
        self.marker_texts = marker_texts
        self.key_source = key_source
        self.extra = extra


def _n_choices(body: dict[str, Any]) -> int:
    n = _positive_int(body, "n")
    if n is None:
        return 1
    if n > 128:
        raise _BadRequest("'n' must be at most 128", "n")
    return n


def _prep_chat(body: dict[str, Any]) -> _Prepared:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array", "messages")
    prompt_tokens = 0
    text = ""
    for message in messages:
        if not isinstance(message, dict):
            raise _BadRequest("each message must be an object", "messages")
        text = _content_text(message.get("content"))
        prompt_tokens += (len(text) + 3) // 4 + 3
    limit = _positive_int(body, "max_completion_tokens", "max_tokens")
    return _Prepared(prompt_tokens, limit, _n_choices(body), (text,), messages)


def _prompt_items(value: Any, param: str) -> list[Any]:
    """Split a completions ``prompt`` / embeddings ``input`` into single items."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return [value]  # one pre-tokenised prompt
        return value
    raise _BadRequest(f"'{param}' must be a string, an array of strings or token arrays", param)


def _item_tokens(item: Any, param: str) -> int:
    if isinstance(item, str):
        return (len(item) + 3) // 4
    if isinstance(item, list):
        return len(item)
    raise _BadRequest(f"'{param}' must be a string, an array of strings or token arrays", param)


def _prep_completions(body: dict[str, Any]) -> _Prepared:
    prompt = body.get("prompt")
    items = _prompt_items(prompt, "prompt")
    tokens = [_item_tokens(item, "prompt") for item in items]
    limit = _positive_int(body, "max_tokens")
    texts = [item for item in items if isinstance(item, str)]
    return _Prepared(sum(tokens), limit, _n_choices(body) * len(items), texts, prompt)


def _prep_embeddings(body: dict[str, Any]) -> _Prepared:
    value = body.get("input")
    items = _prompt_items(value, "input")
    tokens = sum(_item_tokens(item, "input") for item in items)
    dims = _positive_int(body, "dimensions") or 8
    if dims > 4096:
        raise _BadRequest("'dimensions' must be at most 4096", "dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    texts = [item for item in items if isinstance(item, str)]
    return _Prepared(tokens, None, 0, texts, value, (items, dims, fmt))


def _prep_responses(body: dict[str, Any]) -> _Prepared:
    value = body.get("input")
    prompt_tokens = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        prompt_tokens += (len(instructions) + 3) // 4 + 3
    if isinstance(value, str):
        text = value
        prompt_tokens += (len(text) + 3) // 4 + 3
    elif isinstance(value, list) and value:
        text = ""
        for item in value:
            if isinstance(item, str):
                text = item
            elif isinstance(item, dict):
                if "content" in item:
                    text = _content_text(item.get("content"))
                else:
                    out = item.get("output")
                    text = out if isinstance(out, str) else ""
            else:
                raise _BadRequest("each input item must be an object", "input")
            prompt_tokens += (len(text) + 3) // 4 + 3
    else:
        raise _BadRequest("'input' must be a string or a non-empty array", "input")
    limit = _positive_int(body, "max_output_tokens")
    return _Prepared(prompt_tokens, limit, 1, (text,), [instructions, value])


_ROUTE_PREP: dict[str, Callable[[dict[str, Any]], _Prepared]] = {
    "/v1/chat/completions": _prep_chat,
    "/v1/completions": _prep_completions,
    "/v1/embeddings": _prep_embeddings,
    "/v1/responses": _prep_responses,
}


class _BodyTooLarge(Exception):
    pass


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any]) -> bool:
    """Cancel ``task`` when the client disconnects; returns True if it did."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return True


# --------------------------------------------------------------------------- the app


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
        self._gen_rate = _GenRate()
        label = config.model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        self._label = f'model_name="{label}"'
        self._routes: dict[str, dict[str, Callable[..., Awaitable[None]]]] = {
            path: {"POST": self._inference} for path in _ROUTE_PREP
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
            body = _error_body(f"Unknown path: {path}", "not_found_error", None, "not_found")
            await _send(send, 404, body, rid)
            return
        handler = methods.get(scope["method"])
        if handler is None:
            allow = ", ".join(methods).encode()
            message = f"Method {scope['method']} not allowed on {path}"
            body = _error_body(message, "invalid_request_error", None, "method_not_allowed")
            await _send(send, 405, body, rid, ((b"allow", allow),))
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
        await _send(send, 200, b'{"status":"ok"}', rid)

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
        await _send(send, 200, orjson.dumps(body), rid)

    async def _stats(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        await _send(send, 200, orjson.dumps(self.stats.snapshot()), rid)

    async def _stats_reset(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        await _read_body(receive)
        self.stats.reset()
        self._seen.clear()
        await _send(send, 200, orjson.dumps(self.stats.snapshot()), rid)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        flavour = self.config.metrics
        if flavour == "off":
            # As if the engine exposed no metrics (or they were unreachable).
            body = _error_body(f"Unknown path: {scope['path']}", "not_found_error", None, "not_found")
            await _send(send, 404, body, rid)
            return
        st = self.stats
        lbl = self._label
        if self._driver is not None:
            usage = st.kv_usage
        else:
            usage = st.running / self._max_concurrency if self._max_concurrency else 0.0
        if flavour == "sglang":
            rate = self._gen_rate.update(time.monotonic(), st.generation_tokens_total)
            lines = [
                "# HELP sglang:num_running_reqs The number of running requests.",
                "# TYPE sglang:num_running_reqs gauge",
                f"sglang:num_running_reqs{{{lbl}}} {float(st.running)}",
                "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.",
                "# TYPE sglang:num_queue_reqs gauge",
                f"sglang:num_queue_reqs{{{lbl}}} {float(st.waiting)}",
                "# HELP sglang:token_usage The token usage.",
                "# TYPE sglang:token_usage gauge",
                f"sglang:token_usage{{{lbl}}} {float(usage)}",
                "# HELP sglang:gen_throughput The generation throughput (token/s).",
                "# TYPE sglang:gen_throughput gauge",
                f"sglang:gen_throughput{{{lbl}}} {float(rate)}",
                "# HELP sglang:prompt_tokens_total Number of prefill tokens processed.",
                "# TYPE sglang:prompt_tokens_total counter",
                f"sglang:prompt_tokens_total{{{lbl}}} {float(st.prompt_tokens_total)}",
                "# HELP sglang:generation_tokens_total Number of generation tokens processed.",
                "# TYPE sglang:generation_tokens_total counter",
                f"sglang:generation_tokens_total{{{lbl}}} {float(st.generation_tokens_total)}",
            ]
        else:
            lines = [
                "# HELP vllm:num_requests_running Number of requests in model execution batches.",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{lbl}}} {float(st.running)}",
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{{{lbl}}} {float(st.waiting)}",
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f"vllm:kv_cache_usage_perc{{{lbl}}} {float(usage)}",
                "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage (older name). 1 means 100 percent usage.",
                "# TYPE vllm:gpu_cache_usage_perc gauge",
                f"vllm:gpu_cache_usage_perc{{{lbl}}} {float(usage)}",
                "# HELP vllm:num_preemptions_total Cumulative number of preemptions from the engine.",
                "# TYPE vllm:num_preemptions_total counter",
                f"vllm:num_preemptions_total{{{lbl}}} {float(st.preemptions_total)}",
                "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
                "# TYPE vllm:prompt_tokens_total counter",
                f"vllm:prompt_tokens_total{{{lbl}}} {float(st.prompt_tokens_total)}",
                "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
                "# TYPE vllm:generation_tokens_total counter",
                f"vllm:generation_tokens_total{{{lbl}}} {float(st.generation_tokens_total)}",
                "# HELP vllm:request_success_total Count of successfully processed requests.",
                "# TYPE vllm:request_success_total counter",
            ]
            for reason, count in st.success_by_reason.items():
                lines.append(f'vllm:request_success_total{{finished_reason="{reason}",{lbl}}} {float(count)}')
        body = ("\n".join(lines) + "\n").encode()
        await _send(send, 200, body, rid, content_type=b"text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ inference

    async def _inference(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        st = self.stats
        path = scope["path"].rstrip("/")
        st.received_total += 1
        st.by_route[path] = st.by_route.get(path, 0) + 1

        try:
            raw = await _read_body(receive)
        except _BodyTooLarge:
            await self._reject(send, rid, 413, "The request body is too large", "invalid_request_error")
            return
        if raw is None:
            self._count(499)
            st.aborted_total += 1
            return
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            await self._reject(send, rid, 400, f"Invalid JSON body: {exc}", "invalid_request_error")
            return
        try:
            if not isinstance(body, dict):
                raise _BadRequest("The request body must be a JSON object")
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise _BadRequest("'model' is required", "model")
            if body.get("stream"):
                raise _BadRequest(
                    "Streaming is not supported by the mock engine", "stream", "unsupported_parameter"
                )
            prep = _ROUTE_PREP[path](body)
            directives = self._directives(body, prep)
            if directives is not None and directives.sse:
                send = sse_send(send, path)
        except _BadRequest as exc:
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
                st.rejected_total += 1
                await self._reject(
                    send, rid, 429,
                    "The mock engine is at capacity; retry later",
                    "rate_limit_error", None, "rate_limit_exceeded",
                    ((b"retry-after", b"1"),),
                )
                return
            else:
                if self._closing:
                    await self._reject(send, rid, 503, "The mock engine is shutting down", "server_error")
                    return
                task, watcher = self._watch(receive)
                await self._wait_for_slot()
            acquired = True

            # ---- outcome
            cfg = self.config
            status, retry_after, sleep_ms, forced = self._outcome(path, prep, directives)
            tokens = cfg.output_tokens if forced is None else forced

            finish = "stop"
            limit = prep.limit
            if limit is not None and limit < tokens:
                tokens = limit
                finish = "length"
            if not prep.choices:
                tokens = 0  # embeddings generate nothing

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
                        await self._reject(send, rid, 503, "The mock engine is shutting down", "server_error")
                        return
                    task, watcher = self._watch(receive)
                await asyncio.sleep(delay / 1000.0)
            if watcher is not None:
                if watcher.done():
                    # The client disconnected and our cancellation is pending:
                    # let it land here so that it is handled as an abort below.
                    await asyncio.sleep(0)
                watcher.cancel()
                self._inflight.discard(task)

            # ---- response
            if status != 200:
                await self._reject_scripted(send, rid, status, retry_after)
                return
            payload = self._render(path, body, model, prep, tokens, finish)
            st.completed_total += 1
            self._count(200)
            st.prompt_tokens_total += prep.prompt_tokens
            st.generation_tokens_total += tokens * prep.choices
            st.success_by_reason[finish] += 1
            await _send(send, 200, payload, rid)
        except asyncio.CancelledError:
            if task is None:
                raise
            if not await self._on_cancelled(task, watcher, send, rid):
                raise
        finally:
            if watcher is not None:
                if not watcher.done():
                    watcher.cancel()
                self._inflight.discard(task)
            if acquired:
                self._release()

    async def _on_cancelled(
        self, task: asyncio.Task[Any], watcher: asyncio.Task[bool] | None, send: Send, rid: bytes
    ) -> bool:
        """Handle a cancelled request: a client disconnect (counted as 499) or
        shutdown (answered 503). False when the cancellation is someone else's."""
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
            self._count(499)
            self.stats.aborted_total += 1
            return True
        if task in self._shutdown_cancelled:
            # serve() is shutting down: answer instead of dying mid-request.
            self._shutdown_cancelled.discard(task)
            task.uncancel()
            await self._reject(send, rid, 503, "The mock engine is shutting down", "server_error")
            return True
        return False

    def _outcome(
        self, path: str, prep: _Prepared, directives: _Directives | None
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
                key = self._directive_key(path, directives, prep)
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
        prep: _Prepared,
        directives: _Directives | None,
    ) -> None:
        """One inference request through the batching engine: it queues, runs
        beside the others for one step per output token, then is answered."""
        st = self.stats
        driver = self._driver
        assert driver is not None
        task: asyncio.Task[Any] | None = None
        watcher: asyncio.Task[bool] | None = None
        req = None
        try:
            status, retry_after, sleep_ms, forced = self._outcome(path, prep, directives)
            if forced is None:
                forced = driver.engine.params.output_len.sample(self._rng)
            tokens, finish = forced, "stop"
            if prep.limit is not None and prep.limit < tokens:
                tokens, finish = prep.limit, "length"
            if not prep.choices:
                tokens = 0  # embeddings: prefill only
            if self._closing and (sleep_ms or (status == 200 and sleep_ms is None)):
                await self._reject(send, rid, 503, "The mock engine is shutting down", "server_error")
                return
            if sleep_ms:
                # A scripted service time stands in for the engine.
                task, watcher = self._watch(receive)
                await asyncio.sleep(sleep_ms / 1000.0)
            elif status == 200 and sleep_ms is None:
                submitted = driver.submit(prep.prompt_tokens, tokens)
                if submitted is None:
                    st.rejected_total += 1
                    await self._reject(
                        send, rid, 429,
                        "The mock engine's waiting queue is full; retry later",
                        "rate_limit_error", None, "rate_limit_exceeded",
                        ((b"retry-after", b"1"),),
                    )
                    return
                req, done = submitted
                task, watcher = self._watch(receive)
                await done
                req = None
            if watcher is not None:
                if watcher.done():
                    await asyncio.sleep(0)  # let a pending disconnect land as an abort
                watcher.cancel()
                self._inflight.discard(task)
            if status != 200:
                await self._reject_scripted(send, rid, status, retry_after)
                return
            payload = self._render(path, body, model, prep, tokens, finish)
            st.completed_total += 1
            self._count(200)
            st.prompt_tokens_total += prep.prompt_tokens
            st.generation_tokens_total += tokens * prep.choices
            st.success_by_reason[finish] += 1
            await _send(send, 200, payload, rid)
        except asyncio.CancelledError:
            if req is not None:
                driver.abort(req)
            if task is None:
                raise
            if not await self._on_cancelled(task, watcher, send, rid):
                raise
        finally:
            if watcher is not None:
                if not watcher.done():
                    watcher.cancel()
                self._inflight.discard(task)

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

    def _watch(self, receive: Receive) -> tuple[asyncio.Task[Any], asyncio.Task[bool]]:
        """Start watching for a client disconnect while the request waits or sleeps."""
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, task))
        self._inflight.add(task)
        return task, watcher

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

    async def _reject_scripted(self, send: Send, rid: bytes, status: int, retry_after: str | None) -> None:
        extra = ((b"retry-after", retry_after.encode()),) if retry_after else ()
        message = f"{_STATUS_TEXT.get(status, 'Error')} (mock engine)"
        fallback = "server_error" if status >= 500 else "invalid_request_error"
        err_type = _ERROR_TYPES.get(status, fallback)
        code = "rate_limit_exceeded" if status == 429 else None
        await self._reject(send, rid, status, message, err_type, None, code, extra)

    def _count(self, status: int) -> None:
        by_status = self.stats.by_status
        by_status[status] = by_status.get(status, 0) + 1

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
        self._count(status)
        await _send(send, status, _error_body(message, type_, param, code), rid, extra)

    def _directives(self, body: dict[str, Any], prep: _Prepared) -> _Directives | None:
        raw: dict[str, Any] | None = None
        field = body.get("mock")
        if field is not None:
            raw = {}
            if isinstance(field, dict):
                raw.update(field)
            elif isinstance(field, str):
                _parse_settings(f"[[mock:{field}]]", raw)
            else:
                raise _BadRequest("'mock' must be an object or a settings string", "mock")
        for text in prep.marker_texts:
            if _MARKER in text:
                if raw is None:
                    raw = {}
                _parse_settings(text, raw)
        if raw is None:
            return None
        return _Directives(raw)

    def _directive_key(self, path: str, directives: _Directives, prep: _Prepared) -> bytes:
        if directives.key is not None:
            return b"key\x00" + directives.key.encode()
        return path.encode() + b"\x00" + orjson.dumps(prep.key_source)

    def _render(
        self, path: str, body: dict[str, Any], model: str, prep: _Prepared, tokens: int, finish: str
    ) -> bytes:
        ident = self._new_id()
        now = int(time.time())
        completion_tokens = tokens * prep.choices
        if path == "/v1/chat/completions":
            content = _filler_text(tokens)
            return orjson.dumps(
                {
                    "id": "chatcmpl-" + ident,
                    "object": "chat.completion",
                    "created": now,
                    "model": model,
                    "choices": [
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": content},
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                        for i in range(prep.choices)
                    ],
                    "usage": {
                        "prompt_tokens": prep.prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prep.prompt_tokens + completion_tokens,
                    },
                    "system_fingerprint": None,
                }
            )
        if path == "/v1/completions":
            text = _filler_text(tokens)
            return orjson.dumps(
                {
                    "id": "cmpl-" + ident,
                    "object": "text_completion",
                    "created": now,
                    "model": model,
                    "choices": [
                        {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                        for i in range(prep.choices)
                    ],
                    "usage": {
                        "prompt_tokens": prep.prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prep.prompt_tokens + completion_tokens,
                    },
                    "system_fingerprint": None,
                }
            )
        if path == "/v1/embeddings":
            items, dims, fmt = prep.extra
            data = []
            for i, item in enumerate(items):
                source = item.encode() if isinstance(item, str) else orjson.dumps(item)
                vector = _embedding(source, dims)
                if fmt == "base64":
                    encoded: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
                else:
                    encoded = vector
                data.append({"object": "embedding", "index": i, "embedding": encoded})
            return orjson.dumps(
                {
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": prep.prompt_tokens, "total_tokens": prep.prompt_tokens},
                }
            )
        # /v1/responses
        truncated = finish == "length"
        return orjson.dumps(
            {
                "id": "resp_" + ident,
                "object": "response",
                "created_at": now,
                "status": "incomplete" if truncated else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
                "error": None,
                "model": model,
                "instructions": body.get("instructions"),
                "max_output_tokens": prep.limit,
                "metadata": body.get("metadata") or {},
                "output": [
                    {
                        "type": "message",
                        "id": "msg_" + ident,
                        "status": "incomplete" if truncated else "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": _filler_text(tokens), "annotations": []}],
                    }
                ],
                "parallel_tool_calls": True,
                "temperature": body.get("temperature", 1.0),
                "tool_choice": "auto",
                "tools": [],
                "top_p": body.get("top_p", 1.0),
                "usage": {
                    "input_tokens": prep.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": prep.prompt_tokens + completion_tokens,
                },
            }
        )


async def _send(
    send: Send,
    status: int,
    body: bytes,
    rid: bytes,
    extra: tuple[tuple[bytes, bytes], ...] = (),
    content_type: bytes = _JSON,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid),
    ]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(config: MockEngineConfig) -> MockEngineApp:
    """Build the ASGI application for ``config``."""
    return MockEngineApp(config)


# --------------------------------------------------------------------------- serving


def _bind(host: str, port: int) -> socket.socket:
    """A bound, non-blocking TCP socket (errors surface as OSError, not SystemExit)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    config: MockEngineConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8100,
    started: asyncio.Event | None = None,
) -> None:
    """Serve the mock engine with uvicorn in the running event loop.

    ``started`` is set once the socket is listening. Returns when the server
    exits (e.g. on SIGINT/SIGTERM). Cancelling the coroutine shuts the server
    down: waiting and sleeping requests are answered with 503 at once, then the
    server closes and the cancellation propagates.
    """
    import uvicorn

    app = create_app(config)
    http: Any
    access_log = True
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        class _Protocol(HttpToolsProtocol):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.access_log = False  # never log requests, whatever the process configured

        http = _Protocol
    except ImportError:  # pragma: no cover - uvicorn[standard] ships httptools
        http = "auto"
        access_log = False
    # No log_config / log_level: uvicorn would otherwise reconfigure the process-wide
    # "uvicorn.*" loggers, which matters when the engine runs inside another
    # uvicorn-served process. Warnings and errors still reach the root logger.
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http,
        ws="none",
        lifespan="off",
        log_config=None,
        log_level=None,
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=5,
        backlog=4096,
    )

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and started is not None:
                started.set()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            app.abort_inflight()
            await super().shutdown(sockets=sockets)
            await app.aclose()

    server = _Server(uv_config)
    sock = _bind(host, port)
    _install_quiet_filter()
    context = contextvars.copy_context()
    context.run(_QUIET.set, True)
    runner = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), context=context)
    try:
        await asyncio.shield(runner)
    except asyncio.CancelledError:
        server.should_exit = True
        while not runner.done():
            try:
                await asyncio.shield(runner)
            except asyncio.CancelledError:
                server.force_exit = True  # cancelled again: stop waiting for connections
        raise
    finally:
        sock.close()


#: True inside the task serving the mock engine: uvicorn's INFO lines about its start
#: and stop go to the shared "uvicorn.error" logger and, when the engine runs inside
#: ``overnight serve``, would repeat the service's own lines.
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("overnight_mock_quiet", default=False)


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not _QUIET.get()


def _install_quiet_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietFilter) for f in logger.filters):
        logger.addFilter(_QuietFilter())


def run(config: MockEngineConfig, *, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Serve the mock engine until interrupted (blocking; uses uvloop when available)."""
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] ships it
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(config, host=host, port=port))
    except KeyboardInterrupt:
        pass
