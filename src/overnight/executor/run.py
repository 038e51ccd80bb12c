"""``execute()``: input -> dispatch -> spool -> checkpoints, until done or stopped.

The one executor entry point: the scheduler's runner, ``overnight run`` and (for
one ``Shard`` of a batch) a pod worker all call it with the batch's input,
storage, a spool, a checkpoint sink (``ExecuteParams.persist``), an engine client
and a share of the engine's concurrency. The executor never changes a batch's
status; it returns an ``Outcome`` and the caller moves the state machine. It only
catches overnight's own errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import orjson

from overnight.errors import EngineError, RetryableEngineError
from overnight.executor import sse
from overnight.executor.engine import EngineClient, EngineReply
from overnight.executor.limiter import Signal
from overnight.executor.retry import (
    TIMEOUT_CODES,
    Decision,
    RetryPolicy,
    classify_no_answer,
    classify_status,
    overload_signal,
)
from overnight.executor.sharing import BatchShare
from overnight.executor.stats import Histogram, RequestStats
from overnight.executor.writer import Spool
from overnight.storage.base import Storage

__all__ = ["ExecuteParams", "Outcome", "Shard", "StopSignal", "execute"]

log = logging.getLogger("overnight.executor")


class Outcome(str, Enum):
    DONE = "done"  #: every request has a line
    CANCELLED = "cancelled"  #: stopped by cancel; undone requests written as batch_cancelled
    EXPIRED = "expired"  #: deadline passed; undone requests written as batch_expired
    LEASE_LOST = "lease_lost"  #: another owner took over; nothing more was written
    SHUTDOWN = "shutdown"  #: this process is stopping (or gives the slot up); the last checkpoint is stored
    #: the engine was unreachable for too long; undone requests written as engine_unreachable
    ENGINE_UNREACHABLE = "engine_unreachable"
    ENGINE_FAILED = "engine_failed"  #: the engine overnight starts could not be started


class StopSignal:
    """Set by whoever watches the batch (cancel seen, lease lost, shutdown)."""

    def __init__(self) -> None:
        self.reason: Outcome | None = None
        #: Why, in words, where the reason needs them (the engine's last error).
        self.detail: str | None = None
        self.event = asyncio.Event()

    def set(self, reason: Outcome, detail: str | None = None) -> None:
        if self.reason is None:
            self.reason = reason
            self.detail = detail
            self.event.set()


@dataclass(kw_only=True)
class ExecuteParams:
    endpoint: str
    input_key: str
    batch_suffix: str
    deadline: float
    checkpoint_interval_s: float
    #: Store the checkpoint (raises LeaseLost if this replica no longer owns the batch).
    persist: Callable[[bytes], Awaitable[None]]
    #: Run only part of the batch (a pod of a sharded Kubernetes Job): None is all.
    shard: Shard | None = None
    #: Where this run's requests are counted (``/metrics``): None counts nowhere.
    stats: RequestStats | None = None
    #: Seconds each checkpoint took to store, observed here (None: not kept).
    checkpoint_latency: Histogram | None = None


@dataclass(frozen=True, slots=True)
class Shard:
    """Which request indices (0-based) one run owns: ``index mod count == index``
    (``count`` > 1), or the line range ``[start, stop)``, or both."""

    index: int = 0
    count: int = 1
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} must be in [0, count={self.count})")
        if self.start < 0 or (self.stop is not None and self.stop < self.start):
            raise ValueError(f"shard range [{self.start}, {self.stop}) is empty or negative")

    def owns(self, i: int) -> bool:
        return self.start <= i and (self.stop is None or i < self.stop) and i % self.count == self.index

    def size(self, total: int) -> int:
        """How many of ``total`` requests this shard owns."""
        stop = total if self.stop is None else min(total, self.stop)
        return len(range(self.start + (self.index - self.start) % self.count, stop, self.count))


@dataclass(slots=True)
class _Answer:
    """What goes into a line for one HTTP answer."""

    body: bytes  #: JSON for the line's ``response.body``
    usage: object = None
    #: JSON ``{"code", "message"}`` when the answer cannot be used as it is.
    error: bytes | None = None


def _unusable(reply: EngineReply, code: str, why: str) -> _Answer:
    """An answer that is not JSON (or a stream that cannot be assembled), 2xx or not:
    the body becomes an error object holding the start of the text, never a success."""
    text = reply.body[:2000].decode("utf-8", "replace")
    body = orjson.dumps({"error": {
        "message": text or f"HTTP {reply.status} with an empty body", "type": "invalid_engine_response", "code": code,
    }})
    ct = reply.content_type or "no Content-Type"
    message = f"The engine's HTTP {reply.status} answer ({ct}) {why}; it starts with {text[:200]!r}"
    return _Answer(body, None, orjson.dumps({"code": code, "message": message}))


def _read_answer(endpoint: str, reply: EngineReply) -> _Answer:
    raw, ok = reply.body, 200 <= reply.status < 300
    if ok and sse.is_event_stream(reply.content_type, raw):
        try:
            obj = sse.assemble(endpoint, raw)
        except sse.StreamError as exc:
            return _unusable(reply, exc.code, f"is a stream that cannot be used: {exc.message}")
        return _Answer(orjson.dumps(obj), obj.get("usage"))
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _unusable(reply, "invalid_engine_response", "is not JSON")
    body = raw if b"\n" not in raw else orjson.dumps(parsed)  # one line per request
    return _Answer(body, parsed.get("usage") if ok and isinstance(parsed, dict) else None)


def _completion_tokens(usage: object) -> int | None:
    """The answer's completion tokens for the concurrency law (untrusted: any
    odd value is no value)."""
    if isinstance(usage, dict):
        n = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 31:
            return n
    return None


class _Dispatcher:
    def __init__(
        self, *, storage: Storage, spool: Spool, engine: EngineClient, limiter: BatchShare,
        policy: RetryPolicy, params: ExecuteParams, stop: StopSignal,
    ) -> None:
        self.storage, self.spool, self.engine = storage, spool, engine
        self.limiter, self.policy, self.p, self.stop = limiter, policy, params, stop
        #: Plain-int counters read at scrape time (a throwaway when nobody reads them).
        self.stats = params.stats if params.stats is not None else RequestStats()
        self.tasks: set[asyncio.Task[None]] = set()
        #: index -> [attempts made, last failure] for requests sent but without a
        #: line yet, so a line written for them on a stop says what was tried.
        self.tries: dict[int, list] = {}
        self._prefix = f"batch_req_{params.batch_suffix}".encode()
        # Requests alive at once (in flight or waiting to retry) are bounded, so an
        # engine outage cannot turn the whole file into sleeping tasks.
        self.max_tasks = max(2 * limiter.cap, limiter.cap + 256)
        self._task_room = asyncio.Event()
        self._call_soon = asyncio.get_running_loop().call_soon
        cp, usage = spool.cp, spool.usage
        #: What the spool had recorded when last moved into ``stats`` (``count_lines``).
        self._counted = (cp.completed, cp.failed, usage.input_tokens, usage.output_tokens)

    def count_lines(self) -> None:
        """Move the lines and tokens the spool recorded since the last call into the
        counters: once per checkpoint and at the end, not per request, and exactly
        what the batch's ``request_counts`` and ``usage`` say."""
        cp, usage, st = self.spool.cp, self.spool.usage, self.stats
        now = (cp.completed, cp.failed, usage.input_tokens, usage.output_tokens)
        ok, failed, tokens_in, tokens_out = self._counted
        st.succeeded += now[0] - ok
        st.failed += now[1] - failed
        st.tokens_in += now[2] - tokens_in
        st.tokens_out += now[3] - tokens_out
        self._counted = now

    def _line_id(self, index: int) -> bytes:
        return self._prefix + b"%08x" % index

    def _write_reply(self, index: int, cid_json: bytes, reply: EngineReply, answer: _Answer, ok: bool) -> None:
        rid = orjson.dumps(reply.request_id or f"req_{self.p.batch_suffix}{index:08x}")
        line = b'{"id":"%b","custom_id":%b,"response":{"status_code":%d,"request_id":%b,"body":%b},"error":%b}' % (
            self._line_id(index), cid_json, reply.status, rid, answer.body, answer.error or b"null",
        )
        self.spool.write(index, line, error=not ok, usage=answer.usage if ok else None)

    def write_no_answer(self, index: int, cid_json: bytes, code: str, message: str) -> None:
        err = orjson.dumps({"code": code, "message": message})
        line = b'{"id":"%b","custom_id":%b,"response":null,"error":%b}' % (self._line_id(index), cid_json, err)
        self.spool.write(index, line, error=True)

    def write_unsendable(self, index: int, raw: bytes, exc: Exception) -> None:
        """A line whose request cannot be built: it alone ends, in the error file."""
        try:
            cid = orjson.loads(raw).get("custom_id")
            cid_json = orjson.dumps(cid if isinstance(cid, str) else None)
        except Exception:
            cid_json = b"null"
        why = "is nested too deeply to send" if "Recursion" in str(exc) else f"cannot be sent ({type(exc).__name__}: {exc})"
        log.warning("batch line %d: the request %s", index + 1, why)
        self.write_no_answer(index, cid_json, "invalid_request_body", f"The request body {why}.")

    async def send_one(self, index: int, cid_json: bytes, body: bytes) -> None:
        """Own one request from first attempt to its line; holds a limiter slot
        while a request is on the wire (not while backing off)."""
        limiter, engine, path, st = self.limiter, self.engine, self.p.endpoint, self.stats
        attempt = 0
        last_error: str | None = None
        holding = True  # the dispatch loop acquired the first slot for us
        try:
            while True:
                attempt += 1
                if not holding:
                    await limiter.acquire()
                    holding = True
                started = time.monotonic()
                st.dispatched += 1
                self.tries[index] = [attempt, last_error]
                try:
                    reply = await engine.send(path, body)
                except EngineError as exc:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        # Stopped while the attempt failed, and something below
                        # turned the cancel into this error (Python 3.11's wait_for
                        # does): end as cancelled, not as a retry nobody waits for.
                        raise asyncio.CancelledError from exc
                    code, message = exc.code, exc.message
                    reply = answer = retry_after = None
                    if isinstance(exc, RetryableEngineError):
                        decision = classify_no_answer(code)
                        limiter.on_overload(Signal.TIMEOUT if code in TIMEOUT_CODES else Signal.UNREACHABLE)
                    else:  # the engine answered, with something we will not take (too large)
                        decision = Decision.FAIL
                        limiter.on_success(time.monotonic() - started)
                else:
                    status = reply.status
                    answer = _read_answer(path, reply)
                    # Taken after reading the answer, as the concurrency law always had it.
                    elapsed = time.monotonic() - started
                    lat = st.latency  # Histogram.observe, inlined: this runs per attempt
                    lat.counts[bisect_left(lat.bounds, elapsed)] += 1
                    lat.sum += elapsed
                    retry_after = None
                    if 200 <= status < 300:
                        limiter.on_success(elapsed, _completion_tokens(answer.usage))
                        if answer.error is None:
                            self._write_reply(index, cid_json, reply, answer, True)
                            return
                        # Not JSON, or a stream that cannot be assembled: maybe a
                        # glitch in front of the engine, so it is retried as an attempt.
                        decision = Decision.RETRY
                    else:
                        decision = classify_status(status)
                        retry_after = reply.retry_after_s
                        signal = overload_signal(status)
                        if signal is None:
                            limiter.on_success(elapsed)  # an answer, just not a good one
                        else:
                            limiter.on_overload(signal, retry_after)
                if decision is Decision.FAIL or (decision is Decision.RETRY and attempt >= self.policy.max_attempts):
                    if reply is not None:
                        assert answer is not None
                        self._write_reply(index, cid_json, reply, answer, False)
                    else:
                        tries = f"{attempt} attempt" + ("s" if attempt != 1 else "")
                        self.write_no_answer(index, cid_json, code or "engine_error", f"{message} (after {tries})")
                    return
                st.retried += 1
                last_error = message if reply is None else f"HTTP {reply.status}"
                self.tries[index][1] = last_error
                limiter.release()
                holding = False
                delay = self.policy.delay_s(attempt, retry_after)
                await asyncio.sleep(max(0.0, min(delay, self.p.deadline - time.time())))
        finally:
            if index in self.spool.cp.done:
                self.tries.pop(index, None)
            if holding:
                # Give the slot back only after the spool has written this line
                # (its flush was queued first and runs first): a request counts as
                # in flight until its line is with the kernel, so a SIGKILL re-sends
                # at most the in-flight window.
                self._call_soon(limiter.release)

    async def dispatch(self) -> None:
        done = self.spool.cp.done
        limiter, tasks, loads, dumps = self.limiter, self.tasks, orjson.loads, orjson.dumps
        create_task, send_one, task_done = asyncio.get_running_loop().create_task, self.send_one, self._task_done
        shard = self.p.shard
        async for lineno, raw in self.storage.read_lines(self.p.input_key):
            index = lineno - 1
            if index in done or (shard is not None and not shard.owns(index)):
                continue
            try:
                obj = loads(raw)
                cid_json = dumps(obj["custom_id"])
                body = dumps(obj["body"])
            except Exception as exc:  # validation rules this out; still, one line never stops a batch
                self.write_unsendable(index, raw, exc)
                continue
            if len(tasks) >= self.max_tasks:
                self._task_room.clear()
                await self._task_room.wait()
            if not limiter.try_acquire():
                await limiter.acquire()
            task = create_task(send_one(index, cid_json, body))
            tasks.add(task)
            task.add_done_callback(task_done)
        while tasks:
            await asyncio.wait(list(tasks))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if len(self.tasks) < self.max_tasks:
            self._task_room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("request task failed", exc_info=task.exception())

    async def abort_inflight(self) -> None:
        """Cancel every request task and wait until each has ended. A task that
        swallows its cancel (a library turning it into an error) is cancelled
        again, so a stop never waits on a retry loop."""
        tasks = set(self.tasks)
        while tasks:
            for t in tasks:
                t.cancel()
            done, tasks = await asyncio.wait(tasks, timeout=1.0)
            if tasks:
                log.warning("%d request task(s) outlived their cancel; cancelling again", len(tasks))

    def tried(self, index: int) -> str | None:
        """What was tried for a request that has no line yet, in words (None: not sent)."""
        t = self.tries.get(index)
        if t is None:
            return None
        n, last = t
        made = f"{n} attempt was made" if n == 1 else f"{n} attempts were made"
        return f"{made}, the last failed with: {last}" if last else f"{made}; the last was in flight, its answer was not kept"

    async def write_undone(self, code: str, message: str, *, unsent: str | None = None) -> None:
        """A line for every request without one: ``message`` plus what was tried, or
        ``unsent`` (when given) for requests never sent in this run."""
        done = self.spool.cp.done
        if done.missing() == 0:
            return
        shard = self.p.shard
        async for lineno, raw in self.storage.read_lines(self.p.input_key):
            index = lineno - 1
            if index not in done and (shard is None or shard.owns(index)):
                cid = orjson.loads(raw)["custom_id"]
                tried = self.tried(index)
                text = f"{message}; {tried}." if tried else (unsent or f"{message}.")
                self.write_no_answer(index, orjson.dumps(cid), code, text)


async def execute(
    *,
    storage: Storage,
    spool: Spool,
    engine: EngineClient,
    limiter: BatchShare,
    policy: RetryPolicy,
    params: ExecuteParams,
    stop: StopSignal,
) -> Outcome:
    """Run every undone request of the batch. Returns why it stopped."""
    d = _Dispatcher(storage=storage, spool=spool, engine=engine, limiter=limiter, policy=policy, params=params, stop=stop)

    limiter.remaining = spool.cp.done.missing()

    async def checkpoints() -> None:
        while True:
            await asyncio.sleep(params.checkpoint_interval_s)
            await _checkpoint(spool, params, stop)
            d.count_lines()
            limiter.remaining = spool.cp.done.missing()

    dispatch = asyncio.create_task(d.dispatch())
    ticker = asyncio.create_task(checkpoints())
    stop_wait = asyncio.create_task(stop.event.wait())
    try:
        timeout = max(0.0, params.deadline - time.time())
        done, _ = await asyncio.wait({dispatch, stop_wait, ticker}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if dispatch in done:
            dispatch.result()  # surface a crash of the dispatch loop
            outcome = Outcome.DONE
        elif ticker in done:
            ticker.result()  # a failed checkpoint stops the run with its error
            outcome = stop.reason or Outcome.LEASE_LOST
        elif stop_wait in done:
            outcome = stop.reason or Outcome.SHUTDOWN
        else:
            outcome = Outcome.EXPIRED
    finally:
        for t in (dispatch, ticker, stop_wait):
            t.cancel()
        await asyncio.gather(dispatch, ticker, stop_wait, return_exceptions=True)
        await d.abort_inflight()
        d.count_lines()
    if outcome in (Outcome.LEASE_LOST, Outcome.SHUTDOWN):
        if outcome is Outcome.SHUTDOWN:
            with contextlib.suppress(Exception):
                await _checkpoint(spool, params, stop)
        return outcome
    if outcome is Outcome.CANCELLED:
        await d.write_undone("batch_cancelled", "The batch was cancelled",
                             unsent="The batch was cancelled before this request was sent.")
    elif outcome is Outcome.EXPIRED:
        await d.write_undone("batch_expired", "The batch's completion window ended before this request finished")
    elif outcome is Outcome.ENGINE_UNREACHABLE:
        await d.write_undone("engine_unreachable", stop.detail or "The engine was unreachable for too long")
    elif outcome is Outcome.ENGINE_FAILED:
        await d.write_undone("engine_failed", stop.detail or "The engine could not be started")
    d.count_lines()
    await _checkpoint(spool, params, stop)
    return outcome


async def _checkpoint(spool: Spool, params: ExecuteParams, stop: StopSignal) -> None:
    started = time.monotonic()
    sealed = await spool.seal()
    await params.persist(sealed.checkpoint)
    if params.checkpoint_latency is not None:
        params.checkpoint_latency.observe(time.monotonic() - started)
    spool.discard(sealed.sealed_paths)
