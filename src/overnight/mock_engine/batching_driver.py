"""Runs a :class:`~overnight.mock_engine.batching.BatchingEngine` in real time.

One asyncio task steps the engine: ``begin_step``, sleep for the step's
duration, ``end_step``, resolve the futures of the requests that finished.
While the engine has nothing to do the task waits on an event, so an idle mock
engine costs no CPU. Sleeps are aimed at an absolute step end time, so timer
overshoot does not add up over the thousands of steps of a benchmark.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from overnight.mock_engine.batching import BatchingEngine, BatchingParams, SimRequest

__all__ = ["BatchingDriver"]

log = logging.getLogger(__name__)

# How far behind schedule the loop may run before it stops catching up (a
# stalled event loop should not be repaid with a burst of zero-length steps).
_MAX_LAG_S = 0.05
_sleep = asyncio.sleep  # a seam for tests that simulate timer overshoot


class BatchingDriver:
    """The engine plus the task that steps it. ``on_step`` (optional) is called
    after every ``begin_step`` and ``end_step``, for gauges."""

    def __init__(self, params: BatchingParams, on_step: Callable[[BatchingEngine], None] | None = None) -> None:
        self.engine = BatchingEngine(params)
        self._on_step = on_step
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ requests

    def submit(self, prompt_tokens: int, output_tokens: int) -> tuple[SimRequest, asyncio.Future[None]] | None:
        """Queue a request; its future resolves when it has generated all its
        tokens. None when the engine's waiting queue is full."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        req = SimRequest(prompt_tokens, output_tokens, fut)
        if not self.engine.add(req):
            return None
        self._ensure_running(loop)
        assert self._wake is not None
        self._wake.set()
        if self._on_step is not None:
            self._on_step(self.engine)
        return req, fut

    def abort(self, req: SimRequest) -> None:
        """The client went away (or the server is shutting down): free its slot."""
        if req.state in ("waiting", "running"):
            self.engine.abort(req)
            if self._on_step is not None:
                self._on_step(self.engine)

    async def aclose(self) -> None:
        """Stop the step loop (requests still inside are left unresolved)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # ------------------------------------------------------------------ the loop

    def _ensure_running(self, loop: asyncio.AbstractEventLoop) -> None:
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="overnight-mock-batching")

    async def _run(self) -> None:
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave clients hanging forever
            log.exception("mock engine step loop failed")
            self._fail_all(exc)
            raise

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        eng = self.engine
        wake = self._wake
        assert wake is not None
        on_step = self._on_step
        sleep = _sleep
        clock = loop.time
        due = clock()
        while True:
            if eng.idle():
                wake.clear()
                await wake.wait()
                due = clock()
            ms = eng.begin_step()
            if on_step is not None:
                on_step(eng)
            if ms <= 0.0:
                continue
            now = clock()
            if due < now - _MAX_LAG_S:
                due = now
            due += ms / 1000.0
            await sleep(max(0.0, due - now))
            for req in eng.end_step():
                fut = req.handle
                if not fut.done():
                    fut.set_result(None)
            if on_step is not None:
                on_step(eng)

    def _fail_all(self, exc: BaseException) -> None:
        eng = self.engine
        for req in [*eng.waiting, *eng.running]:
            fut: Any = req.handle
            eng.abort(req)
            if fut is not None and not fut.done():
                fut.set_exception(RuntimeError(f"mock engine step loop failed: {exc!r}"))
