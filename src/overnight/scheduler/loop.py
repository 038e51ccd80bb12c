"""The scheduler: finds claimable batches, claims them and runs each to its end.

Any number of replicas may run one scheduler each against a shared store; leases
make sure each batch has one executor at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from overnight.batches.service import transition
from overnight.batches.states import BatchStatus
from overnight.errors import OvernightError
from overnight.executor.engine import EngineClient, HttpEngineClient
from overnight.executor.limiter import Gate
from overnight.scheduler.leases import claim_batch, lease_is_free
from overnight.scheduler.runner import BatchRunner, RunnerConfig
from overnight.storage.base import Storage
from overnight.store.base import Store
from overnight.store.records import BatchRecord

__all__ = ["Scheduler", "EnginePool"]

log = logging.getLogger("overnight.scheduler")


class EnginePool:
    """One engine client (connection pool) per engine endpoint, shared by batches."""

    def __init__(self, *, default_url: str | None, default_api_key: str | None, timeout_s: float) -> None:
        self.default_url = default_url
        self.default_api_key = default_api_key
        self.timeout_s = timeout_s
        self._clients: dict[tuple[str, str | None], EngineClient] = {}

    def endpoint_for(self, batch: BatchRecord) -> tuple[str, str | None]:
        rt = batch.options.get("runtime")
        if rt and rt.get("endpoint"):
            return rt["endpoint"], rt.get("api_key")
        if not self.default_url:
            raise OvernightError(
                "No engine for this batch: start the service with --engine-url (or OVERNIGHT_ENGINE_URL), "
                "or pass extra_body={'overnight': {'runtime': {'endpoint': URL}}}."
            )
        return self.default_url, self.default_api_key

    def client_for(self, batch: BatchRecord) -> EngineClient:
        key = self.endpoint_for(batch)
        if key not in self._clients:
            self._clients[key] = HttpEngineClient(key[0], api_key=key[1], timeout_s=self.timeout_s)
        return self._clients[key]

    def set_client(self, url: str, api_key: str | None, client: EngineClient) -> None:
        """Install a custom client (tests use ``FakeEngine``)."""
        self._clients[(url, api_key)] = client

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()


class Scheduler:
    def __init__(
        self,
        *,
        store: Store,
        storage: Storage,
        engines: EnginePool,
        config: RunnerConfig,
        replica_id: str,
        max_running: int,
        poll_s: float,
        global_concurrency: int,
    ) -> None:
        self.store, self.storage, self.engines, self.cfg = store, storage, engines, config
        self.replica_id = replica_id
        self.max_running = max_running
        self.poll_s = poll_s
        self.global_gate = Gate(global_concurrency)
        self.runners: dict[str, BatchRunner] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="overnight-scheduler")

    def wake(self) -> None:
        self._wake.set()

    def notify_cancel(self, batch_id: str) -> None:
        runner = self.runners.get(batch_id)
        if runner is not None:
            runner.notify_cancel()

    async def stop(self) -> None:
        """Graceful: checkpoint running batches and give their leases back."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        for r in self.runners.values():
            r.shutdown()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except OvernightError as exc:
                log.warning("scheduler tick failed: %s", exc)
            except Exception:
                log.exception("scheduler tick crashed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()

    async def tick(self) -> int:
        """Claim and start what can run now; returns how many batches started."""
        started = 0
        now = time.time()
        for rec in await self.store.list_active_batches():
            if len(self.runners) >= self.max_running:
                break
            if rec.id in self.runners or not lease_is_free(rec, self.replica_id, now):
                continue
            claimed = await claim_batch(self.store, rec, owner=self.replica_id, lease_s=self.cfg.lease_s)
            if claimed is None:
                continue
            try:
                engine = self.engines.client_for(claimed)
            except OvernightError as exc:
                await self._fail_unrunnable(claimed, exc)
                continue
            runner = BatchRunner(
                batch=claimed, store=self.store, storage=self.storage, engine=engine,
                gates=(self.global_gate,), config=self.cfg,
            )
            self.runners[claimed.id] = runner
            task = asyncio.create_task(self._run(runner), name=f"batch-{claimed.id}")
            self._tasks[claimed.id] = task
            started += 1
        return started

    async def _fail_unrunnable(self, rec: BatchRecord, exc: OvernightError) -> None:
        log.error("batch %s cannot run: %s", rec.id, exc)
        error = {"code": "no_engine", "message": exc.message, "line": None, "param": None}
        with contextlib.suppress(OvernightError):
            if rec.status in ("cancelling",):
                await transition(self.store, rec.id, BatchStatus.CANCELLED, fence=rec.lease_token)
            else:
                await transition(self.store, rec.id, BatchStatus.FAILED, fence=rec.lease_token, errors=[error])

    async def _run(self, runner: BatchRunner) -> None:
        try:
            await runner.run()
        except Exception:
            log.exception("batch %s: runner crashed; it will be retried", runner.batch.id)
        finally:
            self.runners.pop(runner.batch.id, None)
            self._tasks.pop(runner.batch.id, None)
            self._wake.set()

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Run until no batch is active (tests): tick, then wait on running batches."""
        async def _until_idle() -> None:
            while True:
                await self.tick()
                if self._tasks:
                    await asyncio.wait(list(self._tasks.values()))
                    continue
                if not await self.store.list_active_batches(limit=1):
                    return
                await asyncio.sleep(0.01)

        await asyncio.wait_for(_until_idle(), timeout_s)
