"""``overnight worker``: one shard of a batch, run inside a pod of its Indexed Job.

The ``kubernetes`` runtime renders one Indexed Job per batch
(``runtimes/kubernetes/manifests.py``); each pod runs the engine as a native
sidecar and this worker beside it. The worker learns its batch from the pod's
annotations (a downwardAPI file), its shard from the Job's completion index,
its store and storage from ``OVERNIGHT_STORE_URL`` / ``OVERNIGHT_STORAGE_URL``,
and then:

1. loads the batch record (a finished, cancelling or finalizing batch, or one whose
   completion window has ended: nothing to do);
2. claims its shard (``batches/shards.py``): a lease and a fencing token, so that
   two pods of one index never both write; a shard already ``done`` ends at once;
   while another holder's lease is live it waits, for a bounded time;
3. waits for the engine's health endpoint (the sidecar may have restarted);
4. runs ``execute()`` on the requests the shard owns (index mod shards), from the
   shard's checkpoint, storing a fenced checkpoint every few seconds, renewing the
   lease and watching the batch record for a cancel and the clock for the end of
   the completion window;
5. marks the shard ``done`` in the same write as its last checkpoint.

Exit codes (the Job's pod failure policy acts on them): 0 the shard is done, or
there is nothing to do; ``EXIT_UNRECOVERABLE`` (42) an error no retry can fix
(bad podinfo, no such batch, the input is gone): the index fails at once; 143
(130) stopped by SIGTERM (SIGINT) after a checkpoint, the lease given back so the
replacement starts at once; 1 anything else, and the index is retried (the
engine stayed unreachable, another pod holds the shard, a crash).

The worker never writes ``batch_cancelled`` or ``batch_expired`` lines or moves
the batch's status: that is the service's part once every shard has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overnight import defaults
from overnight.batches.service import LeaseLost
from overnight.batches.shards import ShardBusy, claim_shard, release_shard, renew_shard, update_shard
from overnight.batches.states import TERMINAL, BatchStatus
from overnight.composition import open_persistence, retry_policy
from overnight.config import Settings
from overnight.errors import ConflictError, NotFoundError, OvernightError, RetryableEngineError
from overnight.executor.checkpoint import Checkpoint
from overnight.executor.engine import HttpEngineClient
from overnight.executor.engine_metrics import MetricsProbe
from overnight.executor.health import EngineHealth, TrackedEngine
from overnight.executor.run import ExecuteParams, Outcome, Shard, StopSignal, execute
from overnight.executor.sharing import BatchShare, EngineCapacity
from overnight.executor.writer import Spool
from overnight.files.service import storage_key_for
from overnight.runtimes.kubernetes.manifests import (
    EXIT_UNRECOVERABLE,
    PODINFO_DIR,
    PodInfo,
    parse_annotations,
    pod_info,
)
from overnight.storage.base import Storage
from overnight.store.base import Store
from overnight.store.records import BatchRecord, ShardRecord

__all__ = [
    "EXIT_OK",
    "EXIT_RETRY",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_UNRECOVERABLE",
    "Target",
    "WorkerConfig",
    "WorkerExit",
    "read_target",
    "run_worker",
]

log = logging.getLogger("overnight.worker")

EXIT_OK = 0
#: Anything a later pod may get past: the Job retries the index (``backoffLimitPerIndex``).
EXIT_RETRY = 1
#: As shells report a death by SIGINT / SIGTERM.
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
#: Env the Job controller sets on each pod of an Indexed Job.
INDEX_ENV = "JOB_COMPLETION_INDEX"
#: How long a worker waits for another holder's lease, in lease periods (``--busy-timeout``).
BUSY_LEASES = 3
#: Longest pause between two health checks while the engine is not ready.
_READY_POLL_MAX_S = 5.0
#: The deadline execute() gets: the batch's own is watched here (see ``_expiry``).
_FAR_FUTURE_S = 100 * 365 * 86400.0


class WorkerExit(Exception):
    """Stop the worker with ``code``; ``message`` is the exit line's reason."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(kw_only=True)
class WorkerConfig:
    podinfo_dir: Path = Path(PODINFO_DIR)
    #: The shard index; None: ``JOB_COMPLETION_INDEX``, else the pod's index annotation.
    index: int | None = None
    #: The engine; None: ``http://127.0.0.1:<engine-port annotation>``.
    engine_url: str | None = None
    #: How long the engine's health endpoint may take to answer 200.
    ready_timeout_s: float = 600.0
    #: How long to wait for another holder's live lease; None: ``BUSY_LEASES`` lease periods.
    busy_timeout_s: float | None = None
    #: Seconds between two progress lines.
    progress_every_s: float = 5.0
    settings: Settings = field(default_factory=Settings)
    #: Catch SIGTERM / SIGINT: stop dispatching, checkpoint, give the lease back.
    handle_signals: bool = True
    #: The process environment (``JOB_COMPLETION_INDEX``, ``HOSTNAME``); None: ``os.environ``.
    environ: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """What this pod runs: its batch and shard, its engine, and who it is."""

    batch_id: str
    shards: int
    index: int
    engine_url: str
    health_path: str
    #: The lease holder: the pod's name and this process's pid.
    holder: str


def read_target(cfg: WorkerConfig) -> Target:
    """The pod's batch, shard and engine from ``<podinfo_dir>/annotations`` and the
    environment, flags first. Raises ``WorkerExit(EXIT_UNRECOVERABLE)`` naming the
    file or annotation that is missing or wrong: a retried pod would read the same."""
    env = os.environ if cfg.environ is None else cfg.environ
    path = cfg.podinfo_dir / "annotations"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkerExit(EXIT_UNRECOVERABLE, f"{path} does not exist: the pod needs the podinfo downwardAPI volume "
                         f"(metadata.annotations) at {cfg.podinfo_dir}, or give --podinfo-dir") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkerExit(EXIT_UNRECOVERABLE, f"cannot read {path}: {exc}") from None
    try:
        annotations = parse_annotations(text)
    except ValueError as exc:
        raise WorkerExit(EXIT_UNRECOVERABLE, f"{path} is not a downwardAPI annotations file: {exc}") from None
    raw_index: int | str | None = cfg.index
    if raw_index is None and env.get(INDEX_ENV, "").strip():
        raw_index = env[INDEX_ENV].strip()
    try:
        info: PodInfo = pod_info(annotations, shard=raw_index)
    except ValueError as exc:
        raise WorkerExit(EXIT_UNRECOVERABLE, f"{path}: {exc}") from None
    if not info.batch_id:
        raise WorkerExit(EXIT_UNRECOVERABLE, f"{path}: the batch-id annotation is empty")
    health = info.health_path if info.health_path.startswith("/") else "/" + info.health_path
    engine_url = (cfg.engine_url or info.engine_url).rstrip("/")
    return Target(batch_id=info.batch_id, shards=info.shards, index=info.shard, engine_url=engine_url,
                  health_path=health, holder=f"{_pod_name(cfg.podinfo_dir, env)}:{os.getpid()}")


def _pod_name(podinfo_dir: Path, env: Mapping[str, str]) -> str:
    """The pod's name (downwardAPI ``name`` file), else ``HOSTNAME``, else the host name."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        name = (podinfo_dir / "name").read_text(encoding="utf-8").strip()
        if name:
            return name
    return env.get("HOSTNAME", "").strip() or socket.gethostname()


async def run_worker(cfg: WorkerConfig) -> int:
    """Run this pod's shard; the process exit code. Logs one line at the start,
    progress every ``progress_every_s`` and the reason it exits."""
    try:
        target = read_target(cfg)
    except WorkerExit as exc:
        log.error("exit %d: %s", exc.code, exc.message)
        return exc.code
    worker = _Worker(cfg, target)
    loop = asyncio.get_running_loop()
    handled: list[int] = []
    if cfg.handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, worker.on_signal, sig)
                handled.append(sig)
    try:
        code, reason = await worker.run()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    (log.info if code in (EXIT_OK, EXIT_SIGTERM, EXIT_SIGINT) else log.error)("exit %d: %s", code, reason)
    return code


class _Worker:
    def __init__(self, cfg: WorkerConfig, target: Target) -> None:
        self.cfg, self.t, self.settings = cfg, target, cfg.settings
        self.stop = StopSignal()
        #: Why the run was stopped from outside execute(): (kind, words); kind is
        #: ``signal``, ``batch`` (cancelled or finished elsewhere), ``expired``,
        #: ``engine`` or ``lease``.
        self.why: tuple[str, str] | None = None
        self.signal: int | None = None
        self.token = 0
        #: The shard as the last fenced write left it.
        self.shard: ShardRecord | None = None
        self.store: Store | None = None
        self.storage: Storage | None = None
        self.name = f"batch {target.batch_id} shard {target.index}/{target.shards}"

    # -- outside events ----------------------------------------------------------------
    def on_signal(self, sig: int) -> None:
        if self.signal is None:
            self.signal = sig
            log.info("%s: %s received; stopping after a checkpoint", self.name, signal.Signals(sig).name)
            self._stopping("signal", f"stopped by {signal.Signals(sig).name}")

    def _stopping(self, kind: str, words: str, outcome: Outcome = Outcome.SHUTDOWN) -> None:
        if self.why is None:
            self.why = (kind, words)
        self.stop.set(outcome, words)

    # -- the run --------------------------------------------------------------------------
    async def run(self) -> tuple[int, str]:
        t = self.t
        log.info("overnight worker: %s, holder %s, engine %s (health %s)", self.name, t.holder, t.engine_url,
                 t.health_path)
        try:
            async with open_persistence(self.settings) as (store, storage):
                self.store, self.storage = store, storage
                return await self._run()
        except WorkerExit as exc:
            return exc.code, exc.message
        except OvernightError as exc:
            log.exception("%s: failed", self.name)
            return EXIT_RETRY, f"{type(exc).__name__}: {exc.message}"
        except Exception as exc:
            log.exception("%s: crashed", self.name)
            return EXIT_RETRY, f"unexpected {type(exc).__name__}: {exc}"

    async def _run(self) -> tuple[int, str]:
        assert self.store is not None
        batch = await self.store.get_batch(self.t.batch_id)
        if batch is None:
            raise WorkerExit(EXIT_UNRECOVERABLE, f"batch {self.t.batch_id} does not exist in the store")
        status = batch.status
        if status in {s.value for s in TERMINAL} or status in (BatchStatus.CANCELLING.value,
                                                              BatchStatus.FINALIZING.value):
            return EXIT_OK, f"batch {batch.id} is {status}; nothing to do"
        if status != BatchStatus.IN_PROGRESS.value:
            raise WorkerExit(EXIT_RETRY, f"batch {batch.id} is {status}, not in_progress yet; nothing was run")
        if time.time() >= batch.deadline:
            return EXIT_OK, f"batch {batch.id}'s completion window has ended; nothing to do"
        shard = Shard(index=self.t.index, count=self.t.shards)
        owned = shard.size(batch.total)
        rec = await self._claim(batch, owned)
        if rec is None:
            return self._signal_exit(), "stopped by a signal while waiting for the shard"
        if rec.status == "done":
            return EXIT_OK, (f"{self.name} is already done ({rec.completed} completed, {rec.failed} failed); "
                             "nothing to do")
        self.token, self.shard = rec.token, rec
        log.info("%s: claimed (token %d, attempt %d): %d of the batch's %d requests, %d done before",
                 self.name, rec.token, rec.attempts, owned, batch.total, rec.completed + rec.failed)
        watchers = [asyncio.create_task(self._heartbeat(), name="overnight-worker-heartbeat"),
                    asyncio.create_task(self._expiry(batch.deadline), name="overnight-worker-expiry")]
        try:
            return await self._run_claimed(batch, shard)
        except LeaseLost as exc:
            return EXIT_RETRY, f"lease lost, another pod runs the shard now: {exc.message}"
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            # Give the lease back so a replacement need not wait it out (fenced: a
            # no-op once another pod holds the shard).
            with contextlib.suppress(Exception):
                await release_shard(self.store, self.t.batch_id, self.t.index, token=self.token)

    def _signal_exit(self) -> int:
        return EXIT_SIGINT if self.signal == signal.SIGINT else EXIT_SIGTERM

    async def _claim(self, batch: BatchRecord, owned: int) -> ShardRecord | None:
        """Claim the shard; wait (bounded) while another holder's lease is live.
        None: a signal came while waiting."""
        assert self.store is not None
        s = self.settings
        budget = self.cfg.busy_timeout_s if self.cfg.busy_timeout_s is not None else BUSY_LEASES * s.lease_s
        give_up = time.monotonic() + budget
        poll = min(2.0, max(0.1, s.lease_s / 5))
        told = False
        while True:
            if self.stop.reason is not None:
                return None
            try:
                return await claim_shard(self.store, batch.id, self.t.index, count=self.t.shards,
                                         holder=self.t.holder, lease_s=s.lease_s, total=owned)
            except ShardBusy as exc:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise WorkerExit(EXIT_RETRY, f"{exc.message}; gave up after waiting {budget:g} s "
                                     "(--busy-timeout)") from None
                if not told:
                    log.info("%s: %s; waiting up to %.0f s for it to end", self.name, exc.message, left)
                    told = True
                wait = min(poll, left, max(0.05, exc.until - time.time()))
            except ConflictError as exc:
                if exc.code == "shard_count_mismatch":
                    raise WorkerExit(EXIT_UNRECOVERABLE, exc.message) from None
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.event.wait(), wait)

    async def _heartbeat(self) -> None:
        """Renew the shard's lease; stop when it is lost, or when the batch is
        cancelled or finished elsewhere (the service deletes the Job then anyway)."""
        assert self.store is not None
        s, t = self.settings, self.t
        while True:
            await asyncio.sleep(s.heartbeat_s)
            try:
                self.shard = await renew_shard(self.store, t.batch_id, t.index, token=self.token, lease_s=s.lease_s)
            except (LeaseLost, NotFoundError) as exc:
                log.warning("%s: %s", self.name, exc.message)
                self._stopping("lease", exc.message, Outcome.LEASE_LOST)
                return
            except OvernightError as exc:  # a store hiccup: keep trying while the lease lasts
                log.warning("%s: renewing the lease failed: %s", self.name, exc.message)
                continue
            try:
                b = await self.store.get_batch(t.batch_id)
            except OvernightError as exc:
                log.warning("%s: reading the batch failed: %s", self.name, exc.message)
                continue
            status = "deleted" if b is None else b.status
            if b is None or status == BatchStatus.CANCELLING.value or BatchStatus(status) in TERMINAL:
                log.info("%s: the batch is %s; stopping after a checkpoint", self.name, status)
                self._stopping("batch", f"the batch is {status}")
                return

    async def _expiry(self, deadline: float) -> None:
        """Stop (after a checkpoint) when the batch's completion window ends. The
        service decides the batch expired and writes the ``batch_expired`` lines,
        as for a cancel: a pod whose clock runs ahead must not finish its shard
        with them first."""
        await asyncio.sleep(max(0.0, deadline - time.time()))
        log.info("%s: the batch's completion window has ended; stopping after a checkpoint", self.name)
        self._stopping("expired", "the batch's completion window ended")

    async def _wait_ready(self, client: HttpEngineClient) -> bool:
        """Poll the engine's health endpoint with backoff until it answers 200.
        False: stopped meanwhile. Raises ``WorkerExit`` after ``ready_timeout_s``."""
        t, timeout = self.t, self.cfg.ready_timeout_s
        started = time.monotonic()
        delay, last, told = 0.1, "", False
        while True:
            try:
                status, _ = await client.get(t.health_path, timeout_s=defaults.ENGINE_CHECK_TIMEOUT_S)
                if status == 200:
                    if told:
                        log.info("%s: the engine is ready after %.1f s", self.name, time.monotonic() - started)
                    return True
                last = f"HTTP {status}"
            except RetryableEngineError as exc:
                last = exc.message
            waited = time.monotonic() - started
            if waited >= timeout:
                raise WorkerExit(EXIT_RETRY, f"the engine {t.engine_url}{t.health_path} was not ready after "
                                 f"{waited:.0f} s (--ready-timeout {timeout:g}); the last answer: {last}")
            if not told:
                log.info("%s: waiting for the engine %s%s (%s)", self.name, t.engine_url, t.health_path, last)
                told = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.event.wait(), min(delay, timeout - waited))
            if self.stop.reason is not None:
                return False
            delay = min(delay * 2, _READY_POLL_MAX_S)

    async def _fail_shard(self, code: str, message: str) -> None:
        """Record why the shard cannot run (fenced); the pod then exits 42."""
        assert self.store is not None

        def mutate(rec: ShardRecord) -> ShardRecord:
            rec.status = "failed"
            rec.error = {"code": code, "message": message}
            return rec

        self.shard = await update_shard(self.store, self.t.batch_id, self.t.index, mutate, fence=self.token)

    async def _input_missing(self, batch: BatchRecord) -> str | None:
        """Why the batch's input cannot be read, or None."""
        assert self.store is not None and self.storage is not None
        if await self.store.get_file(batch.input_file_id) is None:
            return f"input file {batch.input_file_id} of batch {batch.id} no longer exists"
        try:
            await self.storage.size(storage_key_for(batch.input_file_id))
        except NotFoundError:
            return f"the bytes of input file {batch.input_file_id} are missing from storage"
        return None

    async def _run_claimed(self, batch: BatchRecord, shard: Shard) -> tuple[int, str]:
        assert self.store is not None and self.storage is not None
        s, t = self.settings, self.t
        raw = HttpEngineClient(t.engine_url, api_key=s.engine_api_key, timeout_s=s.request_timeout_s,
                               max_response_bytes=s.max_response_bytes)
        try:
            if not await self._wait_ready(raw):
                return self._stopped_exit(None)
            missing = await self._input_missing(batch)
            if missing is not None:
                await self._fail_shard("file_not_found", missing)
                return EXIT_UNRECOVERABLE, f"{missing}; the shard is marked failed"
            stored = await self.store.get_shard_checkpoint(t.batch_id, t.index)
            cp = Checkpoint.decode(stored) if stored else Checkpoint.empty(batch.total)
            if cp.total != batch.total:
                message = f"the shard's checkpoint covers {cp.total} requests, the batch has {batch.total}"
                await self._fail_shard("checkpoint_mismatch", message)
                return EXIT_UNRECOVERABLE, message
            spool = Spool(spool_dir=s.spool_dir(), storage=self.storage, batch_id=f"{batch.id}/shard-{t.index}",
                          token=self.token, checkpoint=cp)
            spool.open()
            try:
                recovered = await spool.recover()
                if recovered:
                    log.info("%s: recovered %d finished requests from the local spool", self.name, recovered)
                try:
                    outcome = await self._execute(batch, shard, spool, raw)
                except NotFoundError:
                    missing = await self._input_missing(batch)
                    if missing is None:
                        raise
                    await self._fail_shard("file_not_found", missing)
                    return EXIT_UNRECOVERABLE, f"{missing}; the shard is marked failed"
            finally:
                spool.close()
            return await self._outcome_exit(outcome, spool)
        finally:
            await raw.aclose()

    def _stopped_exit(self, spool: Spool | None) -> tuple[int, str]:
        kind, words = self.why or ("signal", "stopped")
        where = f" at {spool.cp.completed + spool.cp.failed}/{self._owned()} requests" if spool is not None else ""
        if kind == "signal":
            return self._signal_exit(), f"{words}{where}; the checkpoint is stored and the lease given back"
        if kind in ("batch", "expired"):
            return EXIT_OK, f"{words}{where}; the service writes the lines of the requests left"
        if kind == "engine":
            return EXIT_RETRY, f"{words}{where}; the checkpoint is stored, the index is retried"
        return EXIT_RETRY, f"lease lost, another pod runs the shard now: {words}"

    def _owned(self) -> int:
        return self.shard.total if self.shard is not None else 0

    async def _outcome_exit(self, outcome: Outcome, spool: Spool) -> tuple[int, str]:
        cp = spool.cp
        if outcome is Outcome.DONE:
            # Every owned request has a line. The last checkpoint marked the shard
            # done in the same write; make sure.
            if self.shard is None or self.shard.status != "done":
                sealed = await spool.seal()
                await self._persist(sealed.checkpoint, final=True)
                spool.discard(sealed.sealed_paths)
            return EXIT_OK, f"{self.name} done: {cp.completed} completed, {cp.failed} failed"
        if outcome is Outcome.LEASE_LOST:
            return EXIT_RETRY, f"lease lost, another pod runs the shard now: {self.why[1] if self.why else ''}"
        return self._stopped_exit(spool)

    async def _persist(self, encoded: bytes, *, final: bool = False) -> None:
        """Store the checkpoint with the counts it holds (fenced); the write that
        holds every owned request's line also marks the shard done."""
        assert self.store is not None
        head = Checkpoint.header(encoded)
        lease_s = self.settings.lease_s

        def mutate(rec: ShardRecord) -> ShardRecord:
            rec.completed, rec.failed, rec.usage = head["completed"], head["failed"], head["usage"]
            rec.lease_expires_at = time.time() + lease_s
            if final or head["completed"] + head["failed"] >= rec.total:
                rec.status = "done"
                rec.error = None
            return rec

        self.shard = await update_shard(self.store, self.t.batch_id, self.t.index, mutate, fence=self.token,
                                        checkpoint=encoded)

    def _limits(self, batch: BatchRecord) -> tuple[Any, int, int]:
        """(engine limits, the shard's cap, its floor) from the settings and the
        batch's options, as the scheduler's runner reads them."""
        c = self.settings.concurrency_limits()
        opts = batch.options or {}
        cap = c.max
        if opts.get("max_concurrency"):
            cap = min(cap, int(opts["max_concurrency"]))
        floor = int(opts.get("min_concurrency") or 0)
        if opts.get("concurrency"):
            cap = floor = int(opts["concurrency"])  # fixed: no adaptation
        floor = min(floor, cap)
        limits = dataclasses.replace(c, initial=min(c.initial, cap), min=min(c.min, cap), max=cap)
        return limits, cap, floor

    async def _execute(self, batch: BatchRecord, shard: Shard, spool: Spool, raw: HttpEngineClient) -> Outcome:
        t, storage = self.t, self.storage
        assert storage is not None
        limits, cap, floor = self._limits(batch)
        capacity = EngineCapacity(limits)
        owned = shard.size(batch.total)
        share = capacity.join(
            name=f"{batch.id}/shard-{t.index}", cap=cap, priority=int(batch.options.get("priority") or 0),
            deadline=batch.deadline, window_s=float(batch.completion_window_s),
            remaining=max(0, owned - spool.cp.completed - spool.cp.failed), floor=floor,
        )
        health = EngineHealth(t.engine_url)
        client = TrackedEngine(raw, health)
        probe = MetricsProbe(raw.get, capacity.limit, active=lambda: bool(capacity.shares),
                             inflight=lambda: capacity.inflight, interval_s=defaults.METRICS_POLL_S,
                             sink=capacity.on_metrics)
        probe.start()
        params = ExecuteParams(
            endpoint=batch.endpoint, input_key=storage_key_for(batch.input_file_id),
            batch_suffix=batch.id.split("_", 1)[1], deadline=time.time() + _FAR_FUTURE_S,
            checkpoint_interval_s=self.settings.checkpoint_interval_s, persist=self._persist, shard=shard,
        )
        watch = asyncio.create_task(self._watch_engine(health), name="overnight-worker-engine-watch")
        ticker = asyncio.create_task(self._progress(spool, share, owned), name="overnight-worker-progress")
        log.info("%s: running, concurrency up to %d%s", self.name, cap, f" (at least {floor})" if floor else "")
        try:
            return await execute(storage=storage, spool=spool, engine=client, limiter=share,
                                 policy=retry_policy(self.settings), params=params, stop=self.stop)
        finally:
            for task in (watch, ticker):
                task.cancel()
            await asyncio.gather(watch, ticker, return_exceptions=True)
            await probe.stop()
            share.close()

    async def _watch_engine(self, health: EngineHealth) -> None:
        """Stop (resumably) once the engine has been unreachable too long without a
        break; shorter outages (a sidecar restart) are ridden out by the retries
        and the limiter's outage hold."""
        limit = self.settings.engine_unreachable_timeout_s
        every = max(0.05, min(1.0, limit / 4))
        while True:
            await asyncio.sleep(every)
            down = health.unreachable_for()
            if down >= limit:
                words = (f"the engine {health.url} was unreachable for {down:.0f} s without a break "
                         f"(OVERNIGHT_ENGINE_UNREACHABLE_TIMEOUT_S={limit:g}); the last error: {health.last_error}")
                log.error("%s: %s; stopping", self.name, words)
                self._stopping("engine", words)
                return

    async def _progress(self, spool: Spool, share: BatchShare, owned: int) -> None:
        every = self.cfg.progress_every_s
        last_t, last_n = time.monotonic(), spool.cp.completed + spool.cp.failed
        while True:
            await asyncio.sleep(every)
            cp, now = spool.cp, time.monotonic()
            n = cp.completed + cp.failed
            rate = (n - last_n) / (now - last_t) if now > last_t else 0.0
            last_t, last_n = now, n
            pct = 100.0 * n / owned if owned else 100.0
            log.info("%s: %d/%d (%.1f%%), %.1f req/s, %d failed, concurrency %d (%d in flight)", self.name, n, owned,
                     pct, rate, cp.failed, int(share.capacity.limit.value), share.inflight)
