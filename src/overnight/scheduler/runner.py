"""One claimed batch, driven from where its record says it is to a terminal status."""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overnight import defaults
from overnight.batches.service import LeaseLost, transition, update_batch
from overnight.batches.states import BatchStatus
from overnight.batches.validation import ValidationLimits, validate_input
from overnight.errors import (
    GpusBusy, NotFoundError, OvernightError, RetryableEngineError, RuntimeStartError, TransitionError,
)
from overnight.executor.checkpoint import Checkpoint
from overnight.executor.engine import EngineClient, EngineReply
from overnight.executor.health import EngineHealth
from overnight.executor.limiter import ConcurrencyLimits, Gate
from overnight.executor.retry import RetryPolicy
from overnight.executor.run import ExecuteParams, Outcome, StopSignal, execute
from overnight.executor.sharing import BatchShare, EngineCapacity
from overnight.executor.stats import ExecutorStats
from overnight.executor.writer import Spool
from overnight.files.service import storage_key_for
from overnight.runtimes.manager import EngineFailed
from overnight.scheduler.leases import release_lease, renew_lease
from overnight.storage.base import Storage
from overnight.store.base import Store
from overnight.store.records import BatchRecord, FileRecord

__all__ = ["RunnerConfig", "BatchRunner"]

#: A batch waiting for GPUs is tried again this often.
_GPU_RECHECK_S = 2.0


class _NoEngine:
    """The engine that could not be started: nothing is sent (the stop is already set)."""

    def __init__(self, message: str) -> None:
        self.message = message

    async def send(self, path: str, body: bytes) -> EngineReply:
        raise RetryableEngineError(f"Not sent: {self.message}", code="engine_failed")

    async def aclose(self) -> None:
        return None

log = logging.getLogger("overnight.scheduler")

S = BatchStatus


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    spool_dir: Path
    lease_s: float
    heartbeat_s: float
    checkpoint_interval_s: float
    limits: ValidationLimits
    concurrency: ConcurrencyLimits
    policy: RetryPolicy
    output_expires_after_s: int | None
    #: Continuous engine unreachability after which the batch fails.
    engine_unreachable_timeout_s: float = defaults.ENGINE_UNREACHABLE_TIMEOUT_S
    #: Unreachable this long in a run: give the running slot up ...
    engine_yield_after_s: float = defaults.ENGINE_YIELD_AFTER_S
    #: ... and be claimed again no sooner than this later.
    engine_recheck_s: float = defaults.ENGINE_RECHECK_S
    #: Request and checkpoint counters of every batch run with this config (``/metrics``).
    stats: ExecutorStats = field(default_factory=ExecutorStats, compare=False)


class BatchRunner:
    def __init__(
        self,
        *,
        batch: BatchRecord,
        store: Store,
        storage: Storage,
        engine: EngineClient | None,
        gates: tuple[Gate, ...],
        config: RunnerConfig,
        capacity: EngineCapacity | None = None,
        health: EngineHealth | None = None,
        prepare: Callable[[BatchRunner], Awaitable[None]] | None = None,
        finalize: Callable[[BatchRunner], Awaitable[None]] | None = None,
        remote: tuple[Any, Any] | None = None,
    ) -> None:
        self.batch = batch
        self.token = batch.lease_token
        self.store, self.storage, self.engine, self.gates, self.cfg = store, storage, engine, gates, config
        #: The engine's shared capacity; without one the batch gets an engine of its own.
        self.capacity = capacity
        self.stop = StopSignal()
        self.limiter: BatchShare | None = None
        #: Reachability of the batch's engine (shared with every batch on it).
        self.health = health
        #: Set when the runner gives its slot up: claim again no sooner than this.
        self.not_before = 0.0
        self.yielding = False
        #: Runtime batches: start (or share) the engine before dispatch, give it
        #: back when the run ends however it ends.
        self.prepare, self.finalize = prepare, finalize
        self._prepared = False
        #: (runtime, options) of a batch that runs in a Kubernetes Job's pods.
        self.remote = remote
        #: The engine's label in ``/metrics`` (the scheduler sets it; never a batch id).
        self.engine_label = "none"

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat())
        lost = False
        try:
            await self._advance()
        except LeaseLost:
            lost = True
            log.warning("batch %s: lease lost; another replica continues it", self.batch.id)
        except NotFoundError:
            if await self.store.get_batch(self.batch.id) is not None:
                raise  # something else is missing (a storage object): a crash, not a deletion
            lost = True  # the batch record itself is gone
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            if self._prepared and self.finalize is not None:
                try:
                    await asyncio.shield(self.finalize(self))
                except Exception:
                    log.exception("batch %s: releasing its engine failed", self.batch.id)
            if not lost:
                with contextlib.suppress(OvernightError):
                    await release_lease(
                        self.store, self.batch.id, token=self.token, not_before=self.not_before,
                        engine=self._engine_view(),
                    )

    def shutdown(self) -> None:
        self.stop.set(Outcome.SHUTDOWN)

    def yield_slot(self, why: str, *, not_before: float = 0.0) -> None:
        """Stop at the next checkpoint and give the lease back, so another batch can
        have this replica's running slot; no scheduler claims it before ``not_before``."""
        if self.stop.reason is None:
            self.yielding = True
            self.not_before = not_before
            log.info("batch %s: giving its running slot up (%s)", self.batch.id, why)
        self.stop.set(Outcome.SHUTDOWN)

    def _engine_view(self) -> dict | None:
        if self.health is None:
            return self.batch.engine
        return self.health.view() if self.health.reachable is not None else self.batch.engine

    async def _watch_engine(self, started: float) -> None:
        """Give the slot up while the engine is unreachable; fail the batch once it
        has been unreachable for ``engine_unreachable_timeout_s`` without a break."""
        h, cfg = self.health, self.cfg
        assert h is not None
        every = max(0.05, min(1.0, cfg.engine_yield_after_s / 4, cfg.engine_unreachable_timeout_s / 4))
        while True:
            await asyncio.sleep(every)
            now = time.time()
            down = h.unreachable_for(now)
            # Judge the engine only on failures seen since this run began.
            if not down or h.unreachable_since is None or h.last_failure_at is None or h.last_failure_at < started:
                continue
            if down >= cfg.engine_unreachable_timeout_s:
                log.error("batch %s: its engine %s has been unreachable for %.0f s; failing the batch",
                          self.batch.id, h.url, down)
                self.stop.set(Outcome.ENGINE_UNREACHABLE, (
                    f"The engine {h.url} was unreachable for {down:.0f} s without a break "
                    f"(OVERNIGHT_ENGINE_UNREACHABLE_TIMEOUT_S={cfg.engine_unreachable_timeout_s:g}); "
                    f"the last error: {h.last_error}"
                ))
                return
            if now - max(h.unreachable_since, started) >= cfg.engine_yield_after_s:
                not_before = min(now + cfg.engine_recheck_s, h.unreachable_since + cfg.engine_unreachable_timeout_s,
                                 self.batch.deadline)
                self.yield_slot(f"its engine {h.url} is unreachable; back in {not_before - now:.0f} s",
                                not_before=not_before)
                return

    async def _heartbeat(self) -> None:
        """Renew the lease and watch for a cancel made on any replica."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                rec = await renew_lease(self.store, self.batch.id, token=self.token, lease_s=self.cfg.lease_s)
            except LeaseLost:
                self.stop.set(Outcome.LEASE_LOST)
                return
            except OvernightError as exc:  # store hiccup: keep trying until the lease runs out
                log.warning("batch %s: heartbeat failed: %s", self.batch.id, exc)
                continue
            if rec.status == S.CANCELLING.value:
                self.stop.set(Outcome.CANCELLED)

    def notify_cancel(self) -> None:
        """Fast path when the cancel arrived on this replica."""
        self.stop.set(Outcome.CANCELLED)

    async def _advance(self) -> None:
        b = self.batch
        if b.status == S.VALIDATING.value:
            b = await self._validate(b)
            if b is None:
                return
        if b.status == S.CANCELLING.value and b.in_progress_at is None:
            await transition(self.store, b.id, S.CANCELLED, fence=self.token)
            return
        if self.remote is not None:
            from overnight.scheduler.remote import run_on_job

            await run_on_job(self, b, *self.remote)
            return
        if (b.options.get("runtime") or {}).get("type") == "kubernetes-job":
            await self._execute_nowhere(b)
            return
        await self._execute(b)

    async def _execute_nowhere(self, b: BatchRecord) -> None:
        """A kubernetes-job batch on a server without Kubernetes: every line fails,
        saying why (``_fail_unrunnable`` let it run this far because it had started)."""
        self.engine = _NoEngine("this server has no Kubernetes configuration for the kubernetes-job runtime")
        self.stop.set(Outcome.ENGINE_FAILED, "This server has no Kubernetes configuration for the kubernetes-job "
                      "runtime (OVERNIGHT_RUNTIMES does not list it).")
        await self._execute(b)

    async def _validate(self, b: BatchRecord) -> BatchRecord | None:
        f = await self.store.get_file(b.input_file_id)
        if f is None:
            await transition(
                self.store, b.id, S.FAILED, fence=self.token,
                errors=[{"code": "file_not_found", "message": f"Input file {b.input_file_id} no longer exists.",
                         "line": None, "param": "input_file_id"}],
            )
            return None
        try:
            result = await validate_input(self.storage, f.storage_key, endpoint=b.endpoint, limits=self.cfg.limits)
        except NotFoundError:
            await transition(
                self.store, b.id, S.FAILED, fence=self.token,
                errors=[{"code": "file_not_found", "message": f"The bytes of input file {f.id} are missing "
                         "from storage.", "line": None, "param": "input_file_id"}],
            )
            return None
        if self.stop.reason is Outcome.CANCELLED:
            return await self._refresh(b)
        try:
            if not result.ok:
                await transition(self.store, b.id, S.FAILED, fence=self.token, errors=result.errors, total=result.total)
                return None
            return await transition(
                self.store, b.id, S.IN_PROGRESS, fence=self.token, total=result.total, model=result.model
            )
        except TransitionError:
            return await self._refresh(b)  # cancelled while validating

    async def _refresh(self, b: BatchRecord) -> BatchRecord:
        cur = await self.store.get_batch(b.id)
        if cur is None:
            raise NotFoundError(b.id)
        return cur

    async def _execute(self, b: BatchRecord) -> None:
        raw = await self.store.get_checkpoint(b.id)
        cp = Checkpoint.decode(raw) if raw else Checkpoint.empty(b.total)
        spool = Spool(spool_dir=self.cfg.spool_dir, storage=self.storage, batch_id=b.id, token=self.token, checkpoint=cp)
        spool.open()
        try:
            recovered = await spool.recover()
            if recovered:
                log.info("batch %s: recovered %d finished requests from the local spool", b.id, recovered)
            if b.status == S.CANCELLING.value:
                self.stop.set(Outcome.CANCELLED)
            outcome = Outcome.DONE
            if b.status != S.FINALIZING.value:
                if self.prepare is not None and self.stop.reason is None:
                    if not await self._prepare_engine():
                        return
                outcome = await self._dispatch(b, spool)
            if outcome in (Outcome.LEASE_LOST, Outcome.SHUTDOWN):
                if outcome is Outcome.LEASE_LOST:
                    raise LeaseLost(b.id)
                return
            await self._finish(b, spool, outcome)
        finally:
            spool.close()

    async def _prepare_engine(self) -> bool:
        """Start or share this batch's engine. False: the batch waits for GPUs (its
        slot is given back). An engine that cannot be started fails the batch, every
        undone line saying why."""
        assert self.prepare is not None
        self._prepared = True
        try:
            await self.prepare(self)
        except GpusBusy as exc:
            self.yield_slot(f"waiting for GPUs: {exc.message}", not_before=time.time() + _GPU_RECHECK_S)
            return False
        except (RuntimeStartError, EngineFailed) as exc:
            log.error("batch %s: its engine could not be started: %s", self.batch.id, exc.message)
            self.engine = _NoEngine(exc.message)
            self.stop.set(Outcome.ENGINE_FAILED, f"The engine could not be started: {exc.message}")
        return True

    async def _dispatch(self, b: BatchRecord, spool: Spool) -> Outcome:
        cap = self.cfg.concurrency.max
        opts = b.options
        if opts.get("max_concurrency"):
            cap = min(cap, int(opts["max_concurrency"]))
        floor = int(opts.get("min_concurrency") or 0)
        if opts.get("concurrency"):
            cap = floor = int(opts["concurrency"])  # fixed: no adaptation for this batch
        floor = min(floor, cap)
        capacity = self.capacity
        if capacity is None:
            c = self.cfg.concurrency
            capacity = EngineCapacity(
                dataclasses.replace(c, initial=min(c.initial, cap), max=cap),
                gates=self.gates,
            )
        if self.health is not None:
            e = b.engine or {}
            if e.get("state") == "unreachable" and e.get("unreachable_since"):
                self.health.adopt(float(e["unreachable_since"]), e.get("last_error"))
        share = capacity.join(
            name=b.id, cap=cap, priority=int(b.options.get("priority") or 0), deadline=b.deadline,
            window_s=float(b.completion_window_s), remaining=spool.cp.done.missing(),
            floor=floor, yield_to_others=bool(opts.get("yield_to_others")),
        )
        self.limiter = share
        watch = asyncio.create_task(self._watch_engine(time.time())) if self.health is not None else None
        try:
            return await self._execute_with(b, spool, share)
        finally:
            if watch is not None:
                watch.cancel()
            share.close()

    async def _execute_with(self, b: BatchRecord, spool: Spool, share: BatchShare) -> Outcome:
        progress = [-1, time.monotonic(), 0.0]  # lines done, since when, last warned

        def watch_progress(done: int) -> None:
            now = time.monotonic()
            if done != progress[0]:
                progress[0], progress[1] = done, now
                return
            idle = now - progress[1]
            if idle >= defaults.STALL_WARN_S and now - progress[2] >= defaults.STALL_WARN_S:
                progress[2] = now
                log.warning("batch %s: no request finished for %.0f s (%d of %d done); concurrency %s; "
                            "engine %s; kill -USR1 this process for where each task waits",
                            b.id, idle, done, b.total, share.snapshot(), self._engine_view())

        async def persist(encoded: bytes) -> None:
            # Report the counts of this checkpoint, not the live ones: lines finished
            # since the snapshot are not durable yet (invariant 2).
            head = Checkpoint.header(encoded)
            watch_progress(head["completed"] + head["failed"])

            def mutate(rec: BatchRecord) -> BatchRecord:
                rec.completed, rec.failed, rec.usage = head["completed"], head["failed"], head["usage"]
                rec.lease_expires_at = time.time() + self.cfg.lease_s
                rec.engine = self._engine_view()
                rec.concurrency = share.snapshot()
                return rec

            rec = await update_batch(self.store, b.id, mutate, fence=self.token, checkpoint=encoded)
            if rec.status == S.CANCELLING.value:
                self.stop.set(Outcome.CANCELLED)

        params = ExecuteParams(
            endpoint=b.endpoint,
            input_key=storage_key_for(b.input_file_id),
            batch_suffix=b.id.split("_", 1)[1],
            deadline=b.deadline,
            checkpoint_interval_s=self.cfg.checkpoint_interval_s,
            persist=persist,
            stats=self.cfg.stats.requests_for(self.engine_label, b.endpoint),
            checkpoint_latency=self.cfg.stats.checkpoint,
        )
        return await execute(
            storage=self.storage, spool=spool, engine=self.engine, limiter=share,
            policy=self.cfg.policy, params=params, stop=self.stop,
        )

    async def _finish(self, b: BatchRecord, spool: Spool, outcome: Outcome) -> None:
        """Publish output/error files, then move to the terminal status."""
        cur = await self._refresh(b)
        if outcome is Outcome.DONE and cur.status == S.IN_PROGRESS.value:
            cur = await transition(self.store, b.id, S.FINALIZING, fence=self.token)
        errors: dict[str, object] = {}
        if cur.status == S.CANCELLING.value:
            final = S.CANCELLED
        elif outcome is Outcome.EXPIRED:
            final = S.EXPIRED
        elif outcome is Outcome.ENGINE_UNREACHABLE:
            final = S.FAILED
            errors["errors"] = [{"code": "engine_unreachable", "message": self.stop.detail, "line": None,
                                 "param": None}]
        elif outcome is Outcome.ENGINE_FAILED:
            final = S.FAILED
            errors["errors"] = [{"code": "engine_failed", "message": self.stop.detail, "line": None, "param": None}]
        else:
            final = S.COMPLETED
        suffix = b.id.split("_", 1)[1]
        out_id, err_id = f"file-{suffix}out", f"file-{suffix}err"
        assembled = await spool.assemble(out_key=storage_key_for(out_id), err_key=storage_key_for(err_id))
        now = int(time.time())
        expires_s = b.output_expires_after_s or self.cfg.output_expires_after_s
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for fid, nbytes, lines, name, field in (
            (out_id, assembled.out_bytes, assembled.out_lines, "output", "output_file_id"),
            (err_id, assembled.err_bytes, assembled.err_lines, "error", "error_file_id"),
        ):
            if not lines:
                continue
            ids[field] = fid
            if await self.store.get_file(fid) is None:
                await self.store.insert_file(
                    FileRecord(
                        id=fid, tenant=b.tenant, filename=f"{b.id}_{name}.jsonl", purpose="batch_output",
                        bytes=nbytes, created_at=now, storage_key=storage_key_for(fid),
                        expires_at=now + expires_s if expires_s else None, batch_id=b.id,
                    )
                )
        await transition(
            self.store, b.id, final, fence=self.token,
            completed=spool.cp.completed, failed=spool.cp.failed, usage=spool.usage.to_dict(),
            engine=self._engine_view(), **ids, **errors,
        )
        await spool.cleanup()
