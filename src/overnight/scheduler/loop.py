"""The scheduler: finds claimable batches, claims them and runs each to its end.

Any number of replicas may run one scheduler each against a shared store; leases
make sure each batch has one executor at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

from overnight import defaults
from overnight.batches.service import (
    CONSOLE_PROVISIONED,
    SEALED_API_KEY,
    ssh_target_refusal,
    transition,
    update_batch,
)
from overnight.batches.states import TERMINAL, BatchStatus
from overnight.errors import OvernightError, RetryableEngineError
from overnight.executor.engine import EngineClient, EngineReply, HttpEngineClient, RequestLimit, engine_base_url
from overnight.executor.engine_metrics import MetricsProbe
from overnight.executor.health import EngineHealth, TrackedEngine
from overnight.executor.limiter import ConcurrencyLimits, Gate
from overnight.executor.retry import UNSENDABLE_CODES
from overnight.executor.sharing import EngineCapacity
from overnight.scheduler.leases import claim_batch, lease_is_free
from overnight.runtimes.egress import EndpointPolicy, EndpointRefused
from overnight.runtimes.manager import EngineManager
from overnight.scheduler.runner import BatchRunner, RunnerConfig
from overnight.secret_box import SecretBox, SecretError
from overnight.storage.base import Storage
from overnight.store.base import Store
from overnight.store.records import BatchRecord

__all__ = ["Scheduler", "EnginePool"]

log = logging.getLogger("overnight.scheduler")

#: Longest wait before a batch whose runner crashed is claimed again.
_MAX_CRASH_BACKOFF_S = 60.0
#: Consecutive non-outage crashes after which a batch ends with the error.
_MAX_BATCH_FAULTS = 3


def _is_outage(exc: BaseException) -> bool:
    """Store, storage or network trouble: worth retrying for as long as it lasts."""
    return isinstance(exc, (OvernightError, OSError, asyncio.TimeoutError))


def _describe(exc: BaseException) -> tuple[str, str]:
    """(code, message) for a batch's ``errors``: overnight's own text, or the exception's."""
    if isinstance(exc, OvernightError):
        return exc.code or "engine_unusable", exc.message
    return "engine_unusable", f"{type(exc).__name__}: {exc}"


class _UnusableEngine:
    """Stands in for an engine that cannot be used: every request ends, unsent, with
    the reason (``classify_no_answer`` does not retry these codes)."""

    def __init__(self, exc: BaseException) -> None:
        self.code, self.message = _describe(exc)
        if self.code not in UNSENDABLE_CODES:
            self.code = "engine_unusable"

    async def send(self, path: str, body: bytes) -> EngineReply:
        raise RetryableEngineError(f"Not sent: {self.message}", code=self.code)

    async def aclose(self) -> None:
        return None


class EnginePool:
    """Per engine endpoint: one client (connection pool), one shared ``EngineCapacity``
    (the adaptive limit all batches on that engine split) and, when the engine
    publishes vLLM metrics, one ``MetricsProbe`` feeding it."""

    def __init__(
        self,
        *,
        default_url: str | None,
        default_api_key: str | None,
        timeout_s: float,
        max_response_bytes: int = defaults.MAX_RESPONSE_BYTES,
        limits: ConcurrencyLimits | None = None,
        gates: tuple[Gate, ...] = (),
        metrics_poll_s: float = defaults.METRICS_POLL_S,
        policy: EndpointPolicy | None = None,
        secrets: SecretBox | None = None,
    ) -> None:
        self.default_url = default_url
        self.policy = policy
        self.secrets = secrets
        self.default_api_key = default_api_key
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.limits = limits or ConcurrencyLimits(max=defaults.MAX_CONCURRENCY_GLOBAL)
        self.gates = gates
        self.metrics_poll_s = metrics_poll_s
        #: By (URL, API key, pinned): a tenant-named endpoint's client connects only
        #: where the policy allows at that moment (``_pinned``).
        self._clients: dict[tuple[str, str | None, bool], EngineClient] = {}
        self._tracked: dict[tuple[str, str | None, bool], TrackedEngine] = {}
        self._health: dict[str, EngineHealth] = {}
        self._capacities: dict[str, EngineCapacity] = {}
        self._probes: dict[str, MetricsProbe] = {}
        #: batch id -> URL of the engine overnight started for it (``runtimes/manager.py``)
        self._bound: dict[str, str] = {}
        #: base URL -> ``/metrics`` label of an engine overnight started (its runtime key)
        self._labels: dict[str, str] = {}

    def bind(self, batch_id: str, url: str, label: str | None = None) -> None:
        """The batch's engine is one overnight started, at ``url`` (``label``: its
        runtime key, what ``/metrics`` calls it across restarts on new ports)."""
        self._bound[batch_id] = url
        if label:
            self._labels[engine_base_url(url)] = label

    def unbind(self, batch_id: str) -> None:
        self._bound.pop(batch_id, None)

    def label_of(self, url: str) -> str:
        """An engine's label in ``/metrics``, bounded and not revealing tenants' URLs:
        ``default`` for the server's own engine, the runtime key for one overnight
        started, a short hash of the base URL otherwise."""
        key = engine_base_url(url)
        if key in self._labels:
            return self._labels[key]
        if self.default_url and key == engine_base_url(self.default_url):
            return "default"
        return "engine-" + hashlib.sha256(key.encode()).hexdigest()[:8]

    def label_for(self, batch: BatchRecord) -> str:
        return self.label_of(self.endpoint_for(batch)[0])

    def capacities(self) -> dict[str, EngineCapacity]:
        """Each engine's shared capacity by its ``label_of`` (an engine overnight
        restarted on a new port: the newest capacity under its label)."""
        return {self.label_of(url): cap for url, cap in list(self._capacities.items())}

    def configure(self, *, limits: ConcurrencyLimits | None = None, gates: tuple[Gate, ...] | None = None) -> None:
        """Set the engine-level limits and shared gates (before the first batch runs)."""
        if limits is not None:
            self.limits = limits
        if gates is not None:
            self.gates = gates

    async def check(self, batch: BatchRecord) -> None:
        """Check a tenant-named endpoint against the policy again right before it is
        used: a DNS name may point elsewhere than it did at create time."""
        rt = batch.options.get("runtime")
        if batch.options.get(CONSOLE_PROVISIONED):
            return  # a trusted console's own provision (``create_batch(console=True)``)
        if self.policy is not None and rt and rt.get("endpoint"):
            try:
                await self.policy.check(rt["endpoint"])
            except EndpointRefused as exc:
                raise OvernightError(f"runtime.endpoint {exc}.", code="endpoint_not_allowed") from None
        if self.policy is not None and rt and rt.get("type") == "ssh":
            # The console trusts a machine while its provision lives. Secrets were checked at
            # create (open mode); here, after a restart, the console may not have re-trusted yet.
            refused = ssh_target_refusal(rt, self.policy, secrets=False)
            if refused:
                raise OvernightError(f"runtime {refused}.", code="endpoint_not_allowed")

    def endpoint_for(self, batch: BatchRecord) -> tuple[str, str | None]:
        if batch.id in self._bound:
            return self._bound[batch.id], None
        rt = batch.options.get("runtime")
        if rt and rt.get("endpoint"):
            sealed = rt.get(SEALED_API_KEY)
            if sealed is None:
                return rt["endpoint"], rt.get("api_key")  # records from before keys were sealed
            try:
                return rt["endpoint"], (self.secrets or SecretBox(None)).open(sealed)
            except SecretError as exc:
                raise OvernightError(f"runtime.api_key: {exc}.", code="secret_unavailable") from None
        if not self.default_url:
            raise OvernightError(
                "No engine for this batch: start the service with --engine-url (or OVERNIGHT_ENGINE_URL), "
                "or pass extra_body={'overnight': {'runtime': {'endpoint': URL}}}.",
                code="no_engine",
            )
        return self.default_url, self.default_api_key

    def _raw_client(self, key: tuple[str, str | None, bool]) -> EngineClient:
        if key not in self._clients:
            url, api_key, pinned = key
            self._clients[key] = HttpEngineClient(
                url, api_key=api_key, timeout_s=self.timeout_s, max_response_bytes=self.max_response_bytes,
                resolve=self._resolver(url) if pinned else None,
            )
        return self._clients[key]

    def _pinned(self, batch: BatchRecord) -> bool:
        """Does the batch name its own engine endpoint (not one overnight started or a
        trusted console provisioned), under a policy?"""
        rt = batch.options.get("runtime") or {}
        return (self.policy is not None and bool(rt.get("endpoint")) and batch.id not in self._bound
                and not batch.options.get(CONSOLE_PROVISIONED))

    def _resolver(self, url: str) -> Callable[[], Awaitable[list[str] | None]]:
        policy = self.policy
        assert policy is not None

        async def resolve() -> list[str] | None:
            try:
                return await policy.connect_addresses(url)
            except EndpointRefused as exc:
                raise OSError(f"the endpoint {exc} (checked again at connect)") from None

        return resolve

    def client_for(self, batch: BatchRecord) -> EngineClient:
        """The batch's engine client; every send through it feeds the engine's health."""
        key = (*self.endpoint_for(batch), self._pinned(batch))
        tracked = self._tracked.get(key)
        if tracked is None or tracked.inner is not self._raw_client(key):
            tracked = self._tracked[key] = TrackedEngine(self._raw_client(key), self._health_of(key[0]))
        limit = (batch.options.get("runtime") or {}).get("request_timeout_s")
        if limit and batch.id not in self._bound:
            # An endpoint behind a proxy that cuts requests (RunPod's, 100 s): each
            # request past the limit ends as ``proxy_timeout``.
            return RequestLimit(tracked, float(limit))
        return tracked

    def _health_of(self, url: str) -> EngineHealth:
        key = engine_base_url(url)
        h = self._health.get(key)
        if h is None:
            h = self._health[key] = EngineHealth(key)
        return h

    def health_for(self, batch: BatchRecord) -> EngineHealth:
        """Reachability of the batch's engine, shared with every batch on the same URL."""
        return self._health_of(self.endpoint_for(batch)[0])

    async def check_default(self, timeout_s: float = defaults.ENGINE_CHECK_TIMEOUT_S) -> bool | None:
        """At start: does the default engine answer ``GET /v1/models``? Logs a
        warning when it does not (never fatal: it may come up later). None without one."""
        if not self.default_url:
            return None
        url = engine_base_url(self.default_url)
        get = getattr(self._raw_client((self.default_url, self.default_api_key, False)), "get", None)
        if get is None:
            return None
        try:
            status, _ = await get("/v1/models", timeout_s=timeout_s)
        except RetryableEngineError as exc:
            log.warning("default engine %s is unreachable at start (batches will wait for it): %s", url, exc.message)
            return False
        except Exception as exc:  # a check must never stop the service from starting
            log.warning("default engine %s could not be checked at start: %s", url, exc)
            return False
        if status >= 400:
            log.warning("default engine %s answered GET /v1/models with HTTP %d; check its URL and API key",
                        url, status)
        else:
            log.info("default engine %s answers", url)
        return True

    def capacity_for(self, batch: BatchRecord) -> EngineCapacity:
        """The capacity of the batch's engine, shared with every batch on the same URL."""
        url, _ = self.endpoint_for(batch)
        key = engine_base_url(url)
        cap = self._capacities.get(key)
        if cap is None:
            cap = self._capacities[key] = EngineCapacity(self.limits, gates=self.gates)
            get = getattr(self.client_for(batch), "get", None)
            if get is not None and self.metrics_poll_s > 0:
                probe = MetricsProbe(
                    get, cap.limit, active=lambda: bool(cap.shares), inflight=lambda: cap.inflight,
                    interval_s=self.metrics_poll_s, sink=cap.on_metrics,
                )
                probe.start()
                self._probes[key] = probe
        return cap

    def set_client(self, url: str, api_key: str | None, client: EngineClient) -> None:
        """Install a custom client (tests use ``FakeEngine``)."""
        for pinned in (False, True):
            self._clients[(url, api_key, pinned)] = client
            self._tracked.pop((url, api_key, pinned), None)

    async def aclose(self) -> None:
        for p in self._probes.values():
            await p.stop()
        self._probes.clear()
        for c in {id(c): c for c in self._clients.values()}.values():
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
        runtimes: EngineManager | None = None,
        kubernetes: Any = None,
        remote_options: Any = None,
    ) -> None:
        self.store, self.storage, self.engines, self.cfg = store, storage, engines, config
        #: The kubernetes-job runtime (``runtimes/kubernetes/job.py``), when enabled.
        self.kubernetes = kubernetes
        self.remote_options = remote_options
        #: Engines overnight starts itself (templates, the mock runtime).
        self.runtimes = runtimes
        if runtimes is not None:
            runtimes.on_engine_died = self._engine_died
        self.replica_id = replica_id
        self.max_running = max_running
        self.poll_s = poll_s
        self.global_gate = Gate(global_concurrency)
        c = config.concurrency
        # The adaptive limit is per engine (shared by its batches), bounded by the
        # global cap; each batch is bounded by its own cap on top of it.
        engines.configure(
            limits=dataclasses.replace(c, max=c.max if c.fixed else max(global_concurrency, 1)),
            gates=(self.global_gate,),
        )
        self.runners: dict[str, BatchRunner] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        #: batch id -> (monotonic time before which it is not claimed again, last delay)
        self._crash_backoff: dict[str, tuple[float, float]] = {}
        #: batch id -> consecutive crashes that were not an outage (see ``_is_outage``)
        self._faults: dict[str, int] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._check_task: asyncio.Task[bool | None] | None = None
        self._idle = asyncio.Event()

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="overnight-scheduler")
        self._check_task = asyncio.create_task(self.engines.check_default(), name="overnight-engine-check")

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
        if self._check_task is not None:
            self._check_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._check_task
            self._check_task = None
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
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel
            # that stop() sends when the wait ends at the same moment (a hung shutdown).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            self._wake.clear()

    async def tick(self) -> int:
        """Claim and start what can run now, sharing the running slots fairly between
        tenants; returns how many batches started."""
        now, mono = time.time(), time.monotonic()
        # Claimable batches per tenant, oldest first.
        waiting: dict[str, deque[BatchRecord]] = {}
        for rec in await self.store.list_active_batches():
            if rec.id in self.runners or not lease_is_free(rec, self.replica_id, now):
                continue
            if self._crash_backoff.get(rec.id, (0.0, 0.0))[0] > mono:
                continue
            if rec.not_before > now and rec.status == BatchStatus.IN_PROGRESS.value:
                continue  # waiting for its engine (a cancel is not kept waiting)
            waiting.setdefault(rec.tenant, deque()).append(rec)
        held = self._held()
        started = 0
        while waiting and len(self.runners) < self.max_running:
            # The tenant running the fewest batches goes first (ties: oldest batch).
            tenant = min(waiting, key=held.__getitem__)
            queue = waiting[tenant]
            rec = queue.popleft()
            if not queue:
                del waiting[tenant]
            if await self._start(rec):
                held[tenant] += 1
                started += 1
        if waiting:
            self._rebalance(waiting, held)
        return started

    def _held(self) -> Counter[str]:
        """Running slots per tenant, not counting runners already giving theirs up."""
        return Counter(r.batch.tenant for r in self.runners.values() if not r.yielding)

    def _rebalance(self, waiting: dict[str, deque[BatchRecord]], held: Counter[str]) -> None:
        """All slots are taken and batches wait: each waiting tenant below its fair
        share (slots / tenants) gets one slot from the tenant furthest above it. The
        batch giving its slot up checkpoints and goes back to the queue."""
        tenants = {t for t, n in held.items() if n > 0} | set(waiting)
        fair = max(1, self.max_running // len(tenants))
        short = sum(1 for t in waiting if held[t] < fair)
        freeing = sum(1 for r in self.runners.values() if r.yielding)
        for _ in range(short - freeing):
            over = max((t for t, n in held.items() if n > fair), key=held.__getitem__, default=None)
            if over is None:
                return
            victim = next((r for r in reversed(list(self.runners.values()))
                           if r.batch.tenant == over and not r.yielding and r.stop.reason is None), None)
            if victim is None:
                return
            victim.yield_slot(f"its tenant runs {held[over]} batches, above a fair share of {fair}, while others wait")
            held[over] -= 1

    async def _start(self, rec: BatchRecord) -> bool:
        """Claim ``rec`` and start its runner; False if another replica got it."""
        claimed = await claim_batch(self.store, rec, owner=self.replica_id, lease_s=self.cfg.lease_s)
        if claimed is None:
            return False
        if (claimed.options.get("runtime") or {}).get("type") == "kubernetes-job":
            # Its requests are sent from the Job's pods: this runner creates and watches the Job.
            if self.kubernetes is None:
                exc = RuntimeError("this server has no Kubernetes configuration for the kubernetes-job runtime "
                                   "(OVERNIGHT_RUNTIMES does not list it)")
                if not await self._fail_unrunnable(claimed, exc):
                    return False
            runner = BatchRunner(
                batch=claimed, store=self.store, storage=self.storage, engine=None, gates=(), config=self.cfg,
                remote=(self.kubernetes, self.remote_options) if self.kubernetes is not None else None,
            )
            self.runners[claimed.id] = runner
            self._tasks[claimed.id] = asyncio.create_task(self._run(runner), name=f"batch-{claimed.id}")
            return True
        runtime_batch = self.runtimes is not None and EngineManager.key_for(claimed.options) is not None
        if runtime_batch and (claimed.options.get("runtime") or {}).get("type") == "ssh":
            try:
                await self.engines.check(claimed)
            except OvernightError:
                runtime_batch = False  # the check below fails it, naming why
        if runtime_batch:
            # Its engine is started (or shared) when the runner gets to dispatch.
            runner = BatchRunner(
                batch=claimed, store=self.store, storage=self.storage, engine=None,
                gates=(self.global_gate,), config=self.cfg, prepare=self._attach_engine, finalize=self._detach_engine,
            )
            self.runners[claimed.id] = runner
            self._tasks[claimed.id] = asyncio.create_task(self._run(runner), name=f"batch-{claimed.id}")
            return True
        capacity: EngineCapacity | None
        try:
            await self.engines.check(claimed)
            engine = self.engines.client_for(claimed)
            capacity = self.engines.capacity_for(claimed)
            label = self.engines.label_for(claimed)
        except Exception as exc:  # one batch's engine must never stop the others
            if not await self._fail_unrunnable(claimed, exc):
                return False
            engine, capacity, label = _UnusableEngine(exc), None, "none"
        runner = BatchRunner(
            batch=claimed, store=self.store, storage=self.storage, engine=engine,
            gates=(self.global_gate,), config=self.cfg, capacity=capacity,
            health=self.engines.health_for(claimed) if capacity is not None else None,
        )
        runner.engine_label = label
        self.runners[claimed.id] = runner
        task = asyncio.create_task(self._run(runner), name=f"batch-{claimed.id}")
        self._tasks[claimed.id] = task
        return True

    async def _attach_engine(self, runner: BatchRunner) -> None:
        """Start (or share) the engine a runtime batch needs and point the runner at it."""
        assert self.runtimes is not None
        b = runner.batch

        async def record(handle: dict) -> None:
            def mutate(rec: BatchRecord) -> BatchRecord:
                restarts = handle.get("restarts", 0)
                rec.runtime = {"type": (b.options.get("runtime") or {}).get("type"), "handle": handle,
                               "restarts": restarts}
                return rec

            await update_batch(self.store, b.id, mutate, fence=runner.token)

        url = await self.runtimes.attach(b.id, b.options, record=record)
        self.engines.bind(b.id, url, label=EngineManager.key_for(b.options))
        runner.engine_label = self.engines.label_of(url)
        runner.engine = self.engines.client_for(b)
        runner.capacity = self.engines.capacity_for(b)
        runner.health = self.engines.health_for(b)

    def _engine_died(self, batch_ids: set[str], why: str) -> None:
        """Batches on an engine that died checkpoint and come back at once; the next
        attach restarts the engine (bounded, with backoff)."""
        for bid in batch_ids:
            runner = self.runners.get(bid)
            if runner is not None:
                runner.yield_slot(why, not_before=time.time())
        self._wake.set()

    async def _detach_engine(self, runner: BatchRunner) -> None:
        assert self.runtimes is not None
        self.engines.unbind(runner.batch.id)
        await self.runtimes.detach(runner.batch.id, runner.batch.options)

    async def _fail_unrunnable(self, rec: BatchRecord, exc: Exception) -> bool:
        """A batch whose engine cannot be used. Before ``in_progress`` it fails (or is
        cancelled) at once; after, True: run it on an engine that answers nothing, so
        every remaining line still gets its error line, saying why."""
        code, message = _describe(exc)
        log.error("batch %s cannot run: %s", rec.id, message)
        if rec.in_progress_at is not None:
            return True
        error = {"code": code, "message": message, "line": None, "param": None}
        try:
            if rec.status == BatchStatus.CANCELLING.value:
                await transition(self.store, rec.id, BatchStatus.CANCELLED, fence=rec.lease_token)
            else:
                await transition(self.store, rec.id, BatchStatus.FAILED, fence=rec.lease_token, errors=[error])
        except Exception:
            log.exception("batch %s: could not record that it cannot run", rec.id)
        return False

    async def _run(self, runner: BatchRunner) -> None:
        batch_id = runner.batch.id
        try:
            await runner.run()
        except Exception as exc:
            if not _is_outage(exc):
                # A fault of this batch (a bug, a value it carries): a few tries, then
                # it ends with the reason instead of crash-looping for good.
                self._faults[batch_id] = self._faults.get(batch_id, 0) + 1
                if self._faults[batch_id] >= _MAX_BATCH_FAULTS:
                    self._faults.pop(batch_id, None)
                    await self._give_up(runner, exc)
                    return
            # Back off before claiming it again, so a persistent fault (storage down, a
            # missing object) is a slow retry with a log line, not a hot loop.
            delay = min(_MAX_CRASH_BACKOFF_S, 2 * self._crash_backoff.get(batch_id, (0.0, 0.5))[1])
            self._crash_backoff[batch_id] = (time.monotonic() + delay, delay)
            log.exception("batch %s: runner crashed; retrying in %.0f s", batch_id, delay)
        else:
            self._crash_backoff.pop(batch_id, None)
            self._faults.pop(batch_id, None)
        finally:
            self.runners.pop(runner.batch.id, None)
            self._tasks.pop(runner.batch.id, None)
            self._wake.set()

    async def _give_up(self, runner: BatchRunner, exc: Exception) -> None:
        batch_id = runner.batch.id
        _, message = _describe(exc)
        log.error("batch %s: runner crashed %d times; ending it: %s", batch_id, _MAX_BATCH_FAULTS, message,
                  exc_info=exc)
        error = {"code": "internal_error", "message": f"The batch could not be run: {message}",
                 "line": None, "param": None}
        try:
            cur = await self.store.get_batch(batch_id)
            if cur is None or BatchStatus(cur.status) in TERMINAL:
                return
            if cur.status == BatchStatus.CANCELLING.value:
                await transition(self.store, batch_id, BatchStatus.CANCELLED, fence=runner.token, errors=[error])
            else:
                await transition(self.store, batch_id, BatchStatus.FAILED, fence=runner.token, errors=[error])
        except Exception:
            log.exception("batch %s: could not record its failure", batch_id)

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
