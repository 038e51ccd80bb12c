"""The planner: takes console jobs from ``queued`` to a terminal status, provisioning
what each needs and always releasing it.

It is a reconcile loop, not a set of long-running workers: every tick it lists the
active jobs (and the provisions waiting for release), and hands each one that is
due to a pool of ``PLANNER_WORKER_COUNT`` workers for **one step**. A step reads
the job's stored state, does at most one thing outside the store (ask the provider
for a resource, read its status, create the batch, cancel it, release), and writes
the result with compare-and-set. So the planner's whole state is in the store:
after a restart, or a SIGKILL anywhere, the next tick carries on from what was
written, and two replicas stepping the same job cannot both win a write.

What keeps it from leaking or duplicating, step by step:

* **provision**: a provisioning record (kind ``provision``, unique key = the job
  id) is written *before* the provider is called; the provider deduplicates on the
  same key, so a call repeated after a crash returns the same resource; its id is
  stored right after.
* **submit**: the batch id is derived from the job id; creating it again returns
  the batch that exists.
* **release**: a provision is ``release_pending`` from the moment its job needs it
  no more until the provider confirms it gone (``release`` returns True only after
  a re-read); failures are retried with backoff and shown as job events.
* **sweep**: at start-up and periodically, every resource the provider lists with
  this installation's tag whose job is terminal or unknown is released.
* **retention**: terminal jobs whose provision is confirmed released are removed
  ``job_retention_s`` after they ended (``console/retention.py``), never sooner.

Queued jobs are taken oldest first (``fifo``) or by priority then age
(``priority``): ``PLANNING_POLICY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from overnight.batches.service import (
    BatchCreate,
    batch_id_for_job,
    cancel_batch,
    create_batch,
    get_batch,
)
from overnight.console.docs import update_doc
from overnight.console.jobs import ACTIVE, JOB, PROVISION, TERMINAL, add_event
from overnight.console.provisioners.base import (
    Provisioner,
    ProvisionError,
    ProvisionRequest,
)
from overnight.console.retention import remove_expired_jobs
from overnight.console.stats import CONSOLE_STATS
from overnight.errors import ConflictError, NotFoundError, OvernightError, StoreError
from overnight.store.base import Store
from overnight.store.records import DocRecord
from overnight.templates.resolve import Resolved
from overnight.webhooks.jobs import JobWebhooks

__all__ = ["BatchView", "BatchesUnavailable", "InProcessBatches", "Planner", "PlannerConfig", "batch_id_for"]

log = logging.getLogger("overnight.console")

#: Batch statuses a job mirrors while its batch runs.
_BATCH_STAGES = ("validating", "in_progress", "finalizing", "cancelling")
#: Stages one worker turn may take a job through (queued -> ... -> batch created).
_STAGES_PER_TURN = 4


class BatchesUnavailable(StoreError):
    """The batches service gave no usable answer (unreachable, timed out, 429, 5xx,
    or it refused the console's key): nothing is known to have changed there, so
    the planner tries the step again later, with backoff, and the job does not
    fail. An HTTP caller gets 503 (a ``StoreError``)."""


def trust_key(provision: dict[str, Any]) -> str | None:
    """What the endpoint policy trusts while a provision lives: its engine URL, or
    ``ssh://user@host:port`` for a machine the batch's SSH runtime starts an engine on."""
    rt = provision.get("runtime")
    if rt and rt.get("type") == "ssh":
        return f"ssh://{rt['user']}@{rt['host']}:{rt['port']}"
    return provision.get("endpoint")


async def trusted_targets(store: Store) -> list[str]:
    """The engines (``trust_key``) of this store's jobs that got as far as a batch
    and are not over: what the endpoint policy trusts again after a restart, before
    the scheduler claims their batches."""
    out = []
    for job in await store.list_docs(JOB, statuses=ACTIVE, order="oldest", limit=10_000):
        ep = trust_key(job.body.get("provision") or {})
        if ep and job.status not in ("queued", "resource_preparing"):
            out.append(ep)
    return out


def batch_id_for(tenant: str, job_id: str) -> str:
    """The batch a job submits: the same for the same job (idempotent submit; the
    batches API derives it from the job id it is given, ``batch_id_for_job``)."""
    return batch_id_for_job(tenant, job_id)


@dataclass(frozen=True, kw_only=True)
class BatchView:
    """What the planner reads of a batch, wherever it lives."""

    id: str
    status: str
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: dict[str, Any] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    cancelling_at: int | None = None

    @classmethod
    def of(cls, rec: Any) -> BatchView:
        return cls(id=rec.id, status=rec.status, total=rec.total, completed=rec.completed, failed=rec.failed,
                   usage=rec.usage or None, output_file_id=rec.output_file_id, error_file_id=rec.error_file_id,
                   errors=rec.errors, in_progress_at=rec.in_progress_at, finalizing_at=rec.finalizing_at,
                   cancelling_at=rec.cancelling_at)


class InProcessBatches:
    """The batches API of the same process (``overnight serve`` with the console
    embedded): service calls on the same store. ``overnight console`` as its own
    process uses ``console/remote.py`` instead, over the OpenAI-compatible API."""

    def __init__(self, store: Store, storage: Any, limits: Any) -> None:
        self.store, self.storage, self.limits = store, storage, limits

    async def create(self, *, tenant: str, job_id: str, body: BatchCreate) -> BatchView:
        rec = await create_batch(store=self.store, storage=self.storage, tenant=tenant, body=body,
                                 limits=self.limits)  # the job id in the extension names the batch
        return BatchView.of(rec)

    async def find(self, *, tenant: str, job_id: str) -> BatchView | None:
        rec = await self.store.get_batch(batch_id_for(tenant, job_id))
        return BatchView.of(rec) if rec is not None and rec.tenant == tenant else None

    async def get(self, *, tenant: str, batch_id: str) -> BatchView:
        return BatchView.of(await get_batch(store=self.store, tenant=tenant, batch_id=batch_id))

    async def cancel(self, *, tenant: str, batch_id: str) -> BatchView:
        return BatchView.of(await cancel_batch(store=self.store, tenant=tenant, batch_id=batch_id))

    async def input_file(self, *, tenant: str, file_id: str) -> str:
        """The purpose of the tenant's file ``file_id`` (a job's input_dataset); 404 if none."""
        from overnight.files.service import get_file

        try:
            return (await get_file(store=self.store, tenant=tenant, file_id=file_id)).purpose
        except NotFoundError:
            raise NotFoundError(f"No such File object: {file_id}", code="file_not_found") from None


@dataclass(frozen=True, kw_only=True)
class PlannerConfig:
    installation_id: str
    workers: int = 10
    policy: str = "fifo"  # fifo | priority
    tick_s: float = 0.5
    #: How often a provisioning resource / running batch is looked at.
    poll_s: float = 1.0
    provision_timeout_s: float = 1800.0
    sweep_interval_s: float = 300.0
    #: Terminal jobs (and their released provisions) are removed this long after they
    #: ended (console/retention.py); 0 keeps them forever. Checked every retention_interval_s.
    job_retention_s: float = 30 * 86400.0
    retention_interval_s: float = 300.0
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    #: Jobs being provisioned at once (0: no limit); more stay ``queued`` in policy
    #: order until one is ready or ends (``PLANNER_MAX_PROVISIONING``).
    max_provisioning: int = 0


class Planner:
    def __init__(self, *, store: Store, storage: Any, provisioners: dict[str, Provisioner], config: PlannerConfig,
                 limits: Any, rules: Any = None, on_batch: Callable[[str], None] | None = None,
                 batches: Any = None, webhooks: JobWebhooks | None = None) -> None:
        self.store, self.storage, self.provisioners, self.cfg = store, storage, provisioners, config
        self.limits, self.rules = limits, rules
        #: Where batches are created, read and cancelled (``InProcessBatches`` or a remote one).
        self.batches = batches if batches is not None else InProcessBatches(store, storage, limits)
        #: Called with a new batch's id (the scheduler's wake-up).
        self.on_batch = on_batch
        #: The job.* webhook events a terminal write owes (``webhooks/jobs.py``); None: none.
        self.webhooks = webhooks
        #: Told of each provisioned engine as it comes up and goes (``url, live``): the
        #: endpoint policy trusts what the console itself provisioned (keyed mode too).
        self.on_endpoint: Callable[[str, bool], None] | None = None
        #: Seals an engine API key a provider hands over (RunPod's proxy mode) before the
        #: job record stores it (``SecretBox``; None or disabled: stored as given).
        self.secrets: Any = None
        self._trusted_known = False
        self._sem = asyncio.Semaphore(max(1, config.workers))
        #: Polls of running batches take turns of their own: a new job's stages never
        #: queue behind hundreds of jobs whose batches are merely being looked at.
        self._poll_sem = asyncio.Semaphore(max(1, config.workers))
        self._busy: set[str] = set()
        #: Keys kicked while their step ran: stepped again as soon as it ends.
        self._again: set[str] = set()
        #: job id -> when to look at it again (polls and backoffs; in memory only).
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._steps: set[asyncio.Task[None]] = set()
        self._last_sweep = 0.0
        #: job id -> consecutive steps the batches service was unavailable (the backoff).
        self._outage: dict[str, int] = {}
        self._last_retention = 0.0

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="overnight-planner")
        if isinstance(self.batches, InProcessBatches):
            # Batches created in this process: look at a job as soon as its batch moves.
            from overnight.batches import events

            self._unsubscribe = events.subscribe(self._batch_moved)

    def _batch_moved(self, rec: Any) -> None:
        job_id = (rec.options or {}).get("job_id")
        if job_id:
            self.kick(job_id)

    def wake(self) -> None:
        """Scan every job at once (the next tick), not only at the tick's period."""
        self._wake.set()

    def kick(self, job_id: str, *, queued: bool = False) -> None:
        """Step this job now (it was just created, cancelled, or its batch moved):
        a turn of its own, without waiting for the next tick's scan of every job. A
        job whose step is running is stepped again as soon as that step ends, so a
        change it did not see is never left to the next poll. A new (``queued``) job
        under ``max_provisioning`` waits for the tick, which takes queued jobs in
        policy order while there is room."""
        self._due.pop(job_id, None)
        if (self._task is None or self._task.done() or (queued and self.cfg.max_provisioning)
                or not self._on_own_loop()):
            self.wake()  # not started (or stopped): the loop's first tick sees it
        elif job_id in self._busy:
            self._again.add(job_id)
        else:
            self._spawn(job_id, self.advance(job_id))

    def _on_own_loop(self) -> bool:
        """Called from the planner's own event loop (a step is a task there; anything
        else, such as a notice from another loop or thread, only wakes the tick)."""
        try:
            return self._task is not None and asyncio.get_running_loop() is self._task.get_loop()
        except RuntimeError:
            return False

    async def aclose(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for t in list(self._steps):
            t.cancel()
        if self._steps:
            await asyncio.gather(*self._steps, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("planner tick failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.tick_s):
                    await self._wake.wait()
            self._wake.clear()

    async def tick(self) -> None:
        now = time.time()
        if not self._trusted_known and self.on_endpoint is not None:
            # After a restart: the engines of jobs already submitted are trusted again
            # (serve does this before its scheduler starts: ``trusted_targets``).
            for ep in await trusted_targets(self.store):
                self.on_endpoint(ep, True)
            self._trusted_known = True
        if now - self._last_sweep >= self.cfg.sweep_interval_s:
            self._last_sweep = now
            self._spawn("sweep", self.sweep())
        if self.cfg.job_retention_s > 0 and now - self._last_retention >= self.cfg.retention_interval_s:
            self._last_retention = now
            self._spawn("retention", remove_expired_jobs(self.store, retention_s=self.cfg.job_retention_s))
        jobs = await self.store.list_docs(JOB, statuses=ACTIVE, order="oldest", limit=10_000)
        if self.cfg.policy == "priority":
            jobs.sort(key=lambda j: (j.status != "queued", -int(j.body.get("priority") or 0), j.created_at))
        preparing = sum(1 for j in jobs if j.status == "resource_preparing")
        for job in jobs:
            if job.id in self._busy or self._due.get(job.id, 0.0) > now:
                continue
            if job.status == "queued" and self.cfg.max_provisioning:
                if preparing >= self.cfg.max_provisioning:
                    continue  # its turn comes when a provision is ready or ends
                preparing += 1
            self._spawn(job.id, self.advance(job.id), poll=job.status in _BATCH_STAGES)
        for prov in await self.store.list_docs(PROVISION, statuses=("requested", "provisioning"), order="oldest",
                                               limit=10_000):
            # A provision whose job ended without marking it (a crash between the two
            # writes, or a cancel that won the race to a queued job): release it.
            key = "orphan:" + prov.id
            if key not in self._busy:
                self._spawn(key, self._adopt(prov))
        for prov in await self.store.list_docs(PROVISION, statuses=("release_pending",), order="oldest",
                                               limit=10_000):
            if float(prov.body.get("next_at") or 0) <= now:
                self._release_soon(prov)

    def _release_soon(self, prov: DocRecord) -> None:
        """Start the release of a ``release_pending`` provision unless one runs."""
        key = "release:" + prov.id
        if key not in self._busy:
            self._spawn(key, self.release(prov.id, prov=prov))

    def _spawn(self, key: str, coro: Any, *, poll: bool = False) -> None:
        sem = self._poll_sem if poll else self._sem
        self._busy.add(key)

        async def run() -> None:
            try:
                async with sem:
                    await coro
            except (ConflictError, StoreError) as exc:  # a racing write: the next tick reads again
                log.debug("planner step %s: %s", key, exc)
            except Exception:
                log.exception("planner step %s failed", key)
            finally:
                self._busy.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.kick(key)

        t = asyncio.create_task(run(), name=f"planner-{key}")
        self._steps.add(t)
        t.add_done_callback(self._steps.discard)

    # -- one step of one job -------------------------------------------------------------------
    async def advance(self, job_id: str) -> None:
        """Take the job as far as it can go now: a stage that ends in another one
        ready at once (queued -> resource_preparing with a provider that answers
        running -> submitting -> the batch created) runs on in this worker's turn
        instead of waiting for the next tick and a free worker for each stage."""
        status, job = None, None
        for _ in range(_STAGES_PER_TURN):
            if job is None:
                job = await self.store.get_doc(JOB, job_id)
            if job is None or job.status in TERMINAL or job.status == status:
                return
            status = job.status
            job = await self._one_step(job)  # the record it wrote, when it moved the job on
            if status in _BATCH_STAGES or self._due.get(job_id, 0.0) > time.time():
                return  # following a batch is a poll, once per turn; or the job waits
            if job is not None and job.status in _BATCH_STAGES:
                return  # its batch was just created: its moves kick the job (or the next tick polls it)

    async def step(self, job_id: str) -> None:
        """One stage of the job (tests drive the planner stage by stage with it)."""
        job = await self.store.get_doc(JOB, job_id)
        if job is None or job.status in TERMINAL:
            return
        await self._one_step(job)

    async def _one_step(self, job: DocRecord) -> DocRecord | None:
        """One stage; returns the job as written when the stage moved it on (None:
        read it again before anything else)."""
        new = None
        try:
            if job.status == "queued":
                new = await self._take(job)
            elif job.status == "resource_preparing":
                new = await self._provisioning(job)
            elif job.status == "submitting":
                new = await self._submit(job)
            elif job.status in _BATCH_STAGES:
                await self._follow_batch(job)
        except BatchesUnavailable as exc:
            await self._batches_unavailable(job, exc)
        else:
            self._outage.pop(job.id, None)
        return new

    async def _batches_unavailable(self, job: DocRecord, exc: BatchesUnavailable) -> None:
        """Try the step again later (doubling, up to ``retry_max_s``). One event per
        outage, updated in place, so a long one does not push the timeline out."""
        attempt = self._outage.get(job.id, 0) + 1
        self._outage[job.id] = attempt
        delay = min(self.cfg.retry_max_s, self.cfg.retry_base_s * 2 ** (attempt - 1))
        message = f"{exc.message}; trying again in {delay:g} s"
        log.warning("job %s: %s", job.id, message)

        def later(rec: DocRecord) -> None:
            events = rec.body.get("events") or []
            if events and events[-1]["type"] == "batches_unavailable":
                events[-1].update(message=message, attempts=attempt, last_at=round(time.time(), 3))
            else:
                add_event(rec, "batches_unavailable", message, attempts=attempt)
            self._later(rec, delay)

        await self._write(job, later)

    async def _write(self, job: DocRecord, change: Callable[[DocRecord], None], *, expect: str | None = None,
                     ) -> DocRecord:
        """Apply ``change`` to the job's current record, only if it is still in
        ``expect`` (default: the status it was read in)."""
        status = expect or job.status

        def mutate(rec: DocRecord) -> DocRecord | None:
            if rec.status != status:
                raise ConflictError(f"job {rec.id} moved on to {rec.status}")
            if change(rec) is False:
                return None  # nothing new: no write
            return rec

        new = await update_doc(self.store, JOB, job.id, mutate, current=job)
        if new.status != status and new.status in TERMINAL:
            CONSOLE_STATS.job_finished(new.status)  # counted once the write won
        return new

    def _later(self, rec: DocRecord, delay_s: float) -> None:
        """Look at this job again in ``delay_s``. Kept in memory, not written: a
        poll must not cost a store write (a restart looks at every job at once,
        which is what it should do anyway)."""
        self._due[rec.id] = time.time() + delay_s

    def _to(self, rec: DocRecord, status: str, message: str = "", event: str | None = None) -> None:
        now = int(time.time())
        rec.status = status
        rec.body.setdefault("timestamps", {})[f"{status}_at"] = now
        self._due.pop(rec.id, None)
        add_event(rec, event or status, message)
        if status in TERMINAL and self.webhooks is not None:
            # In the write that makes it true, after ``_owe`` (every terminal write's caller).
            self.webhooks.add_event(rec, status, at=now)

    async def _take(self, job: DocRecord) -> DocRecord:
        """queued -> resource_preparing: write the provisioning record first."""
        from overnight.console.docs import new_doc_id

        provider = job.body["provider"]
        prov = DocRecord(kind=PROVISION, id=new_doc_id("prov"), tenant=job.tenant, created_at=time.time(),
                         status="requested", key=job.id, updated_at=time.time(),
                         body={"job_id": job.id, "provider": provider, "provider_id": None})
        try:
            await self.store.insert_doc(prov)
        except StoreError:
            # The key is taken: a step before a crash (or a racing replica) wrote it.
            prov = await self.store.get_doc_by_key(PROVISION, job.tenant, job.id)
            if prov is None:
                raise

        def change(rec: DocRecord) -> None:
            rec.body["provision_id"] = prov.id
            rec.body["provision"] = {"provider": provider, "status": "requested", "resource_ids": [],
                                     "endpoint": None, "raw": {}}
            rec.body["provision_started"] = time.time()
            self._to(rec, "resource_preparing", f"asking {provider} for the resource",
                     event="provision_requested")

        return await self._write(job, change)

    def _request(self, job: DocRecord) -> ProvisionRequest:
        r = Resolved.from_record(job.body["template"])
        t = r.template.spec
        return ProvisionRequest(
            job_id=job.id, tenant=job.tenant, installation_id=self.cfg.installation_id, idempotency_key=job.id,
            template=job.body["template"], replicas=max(1, int(t.parallelism.dp or 1)),
            gpus_per_replica=r.gpus // max(1, int(t.parallelism.dp or 1)) if r.gpus else 0,
            gpu_type=t.accelerator.type, deadline=job.body.get("provision_resource_deadline"),
        )

    def _provision_deadline(self, job: DocRecord, provisioner: Provisioner) -> tuple[float, str]:
        started = float(job.body.get("provision_started") or job.created_at)
        timeout = min(self.cfg.provision_timeout_s, getattr(provisioner, "ready_timeout_s", 1e9) or 1e9)
        end, why = started + timeout, f"the provisioning timeout ({timeout:g} s)"
        dl = job.body.get("provision_resource_deadline")
        if dl and float(dl) < end:
            end, why = float(dl), "the job's provision_resource_deadline"
        return end, why

    async def _provisioning(self, job: DocRecord) -> DocRecord | None:
        provisioner = self.provisioners.get(job.body["provider"])
        prov = await self.store.get_doc(PROVISION, job.body["provision_id"])
        if provisioner is None or prov is None:
            await self._fail(job, "resource_failed", f"provider {job.body['provider']!r} is not configured here")
            return
        if job.body.get("cancel_requested"):
            await self._release_then(job, "cancelled", "cancelled while the resource was being prepared")
            return
        end, why = self._provision_deadline(job, provisioner)
        try:
            if not prov.body.get("provider_id"):
                state = await provisioner.provision(self._request(job))

                def noted(p: DocRecord) -> DocRecord:
                    p.body["provider_id"] = state.provision_id
                    p.status = "provisioning"
                    return p

                prov = await update_doc(self.store, PROVISION, prov.id, noted, current=prov)
            elif getattr(provisioner, "status_takes_template", False):
                # An SSH provider builds the batch's runtime spec from the job's template.
                state = await provisioner.status(prov.body["provider_id"], template=job.body["template"])
            else:
                state = await provisioner.status(prov.body["provider_id"])
        except ProvisionError as exc:
            attempt = int(job.body.get("provision_attempt") or 0) + 1
            if not exc.retryable or time.time() >= end:
                msg = exc.message if not exc.retryable else f"{exc.message} (gave up at {why})"
                await self._fail(job, "resource_failed", msg)
                return
            delay = min(self.cfg.retry_max_s, self.cfg.retry_base_s * 2 ** (attempt - 1))
            why_not = exc.message

            def retry(rec: DocRecord) -> None:
                rec.body["provision_attempt"] = attempt
                add_event(rec, "provision_retry", f"{why_not}; trying again in {delay:g} s")
                self._later(rec, delay)

            await self._write(job, retry)
            return
        view = {**state.to_dict(), "status": state.status}
        rt = view.get("runtime") or {}
        if rt.get("api_key") and self.secrets is not None and self.secrets.enabled:
            # Stored sealed, as the batch stores it (batches/service.py); opened at submit.
            view["runtime"] = {**{k: v for k, v in rt.items() if k != "api_key"},
                               "api_key_sealed": self.secrets.seal(rt["api_key"])}
        if state.status == "running" and (state.endpoint or state.runtime):
            if self.on_endpoint is not None:
                self.on_endpoint(trust_key(view) or "", True)
            def ready(rec: DocRecord) -> None:
                rec.body["provision"] = view
                rec.body["running_at"] = time.time()
                rec.body["price_per_hour"] = state.price_per_hour
                add_event(rec, "provision_ready", f"{state.provider} resource {state.provision_id} at "
                          f"{state.endpoint or trust_key(view)}")
                self._to(rec, "submitting")

            job = await self._write(job, ready)
            started = float(job.body.get("provision_started") or job.created_at)
            CONSOLE_STATS.provision_ready(job.body["provider"], float(job.body["running_at"]) - started)
            return job
        if state.status in ("failed", "released"):
            await self._fail(job, "resource_failed", state.error or f"the provider reports the resource {state.status}")
            return None
        if time.time() >= end:
            reason = f": {state.error}" if state.error else ""
            await self._fail(job, "resource_failed", f"the resource was not running by {why}{reason}")
            return None

        def waiting(rec: DocRecord) -> bool:
            self._later(rec, self.cfg.poll_s)
            if rec.body.get("provision") == view:
                return False
            if state.error and state.error != (rec.body.get("provision") or {}).get("error"):
                # What holds the resource back (unschedulable, an image pull), once per change.
                add_event(rec, "provision_waiting", state.error)
            rec.body["provision"] = view
            return True

        await self._write(job, waiting)
        return None

    async def _submit(self, job: DocRecord) -> DocRecord | None:
        if job.body.get("cancel_requested"):
            batch = await self.batches.find(tenant=job.tenant, job_id=job.id)
            if batch is None:
                await self._release_then(job, "cancelled", "cancelled before the batch was created")
                return
        window = job.body["completion_window"]
        dl = job.body.get("provision_resource_deadline")
        if dl:
            from overnight.batches.service import parse_completion_window

            left = int(float(dl) - time.time())
            if left < 60:
                await self._fail(job, "submit_failed", "less than a minute is left before the job's "
                                 "provision_resource_deadline")
                return
            window = f"{min(left, parse_completion_window(window))}s"
        # An engine the provision runs (its URL), or one the batch's runtime starts
        # on the provisioned machine (the SSH providers' ``ssh`` runtime spec).
        runtime = job.body["provision"].get("runtime") or {"endpoint": job.body["provision"]["endpoint"]}
        if "api_key_sealed" in runtime:
            runtime = {**{k: v for k, v in runtime.items() if k != "api_key_sealed"},
                       "api_key": self.secrets.open(runtime["api_key_sealed"])}
        body = BatchCreate(
            input_file_id=job.body["input_dataset"], endpoint=job.body["endpoint"], completion_window=window,
            metadata={"overnight_job_id": job.id, **({"name": job.body["name"]} if job.body.get("name") else {})},
            extension={"runtime": runtime, "priority": max(0, int(job.body.get("priority") or 0)),
                       "job_id": job.id, "resource_allocation": {
                           "provision_id": job.body.get("provision_id"),
                           "provision_resource_deadline": job.body.get("provision_resource_deadline"),
                           "resource_details": [{"provider": job.body["provider"],
                                                 "resource_ids": job.body["provision"].get("resource_ids") or [],
                                                 "gpu_type": Resolved.from_record(job.body["template"])
                                                 .template.spec.accelerator.type}]}},
        )
        try:
            batch = await self.batches.create(tenant=job.tenant, job_id=job.id, body=body)
        except BatchesUnavailable:
            raise  # nothing known to be created: the step is tried again
        except OvernightError as exc:
            await self._fail(job, "submit_failed", f"the batch could not be created: {exc.message}")
            return
        pause = getattr(self.provisioners.get(job.body["provider"]), "submit_pause_s", 0.0)
        if pause:  # injected (the fake provider's OVERNIGHT_FAKE_SUBMIT_PAUSE_S): the batch exists, unrecorded
            await asyncio.sleep(pause)

        def created(rec: DocRecord) -> None:
            rec.body["batch_id"] = batch.id
            add_event(rec, "batch_created", f"batch {batch.id}")
            self._to(rec, batch.status if batch.status in _BATCH_STAGES else "validating", "")

        job = await self._write(job, created)
        if self.on_batch is not None:
            self.on_batch(batch.id)
        return job

    async def _follow_batch(self, job: DocRecord) -> None:
        try:
            batch = await self.batches.get(tenant=job.tenant, batch_id=job.body["batch_id"])
        except NotFoundError:
            await self._fail(job, "failed", f"its batch {job.body['batch_id']} no longer exists")
            return
        if job.body.get("cancel_requested") and batch.status in ("validating", "in_progress", "finalizing"):
            await self.batches.cancel(tenant=job.tenant, batch_id=batch.id)
            if self.on_batch is not None:
                self.on_batch(batch.id)
            batch = await self.batches.get(tenant=job.tenant, batch_id=batch.id)
        terminal = batch.status in ("completed", "failed", "expired", "cancelled")

        def mirror(rec: DocRecord) -> bool:
            b = rec.body
            if not terminal:
                self._later(rec, self.cfg.poll_s)
            counts = {"total": batch.total, "completed": batch.completed, "failed": batch.failed}
            if (b.get("request_counts") == counts and b.get("usage") == (batch.usage or None)
                    and batch.status == rec.status and not terminal):
                return False  # nothing new: no write
            b["request_counts"] = counts
            b["usage"] = batch.usage or None
            b["output_dataset"], b["error_dataset"] = batch.output_file_id, batch.error_file_id
            if batch.errors and not b.get("error_message"):
                b["error_message"] = batch.errors[0].get("message")
            # Every stage the batch went through is on the timeline, also those that
            # came and went between two looks (a small batch is in progress briefly).
            seen = {e["type"] for e in b.get("events") or []}
            for stage in ("in_progress", "finalizing", "cancelling"):
                at = getattr(batch, f"{stage}_at", None)
                if at and stage not in seen and stage != batch.status:
                    add_event(rec, stage, "", batch_at=at)
                    b.setdefault("timestamps", {})[f"{stage}_at"] = at
            if batch.status != rec.status:
                self._to(rec, batch.status)
            return True

        if terminal:
            await self._owe(job)
        job = await self._write(job, mirror) or job
        if terminal:
            self._notify()
            await self._request_release(job, why=f"the job is {batch.status}")

    # -- ending ---------------------------------------------------------------------------------
    async def _fail(self, job: DocRecord, status: str, message: str) -> None:
        log.warning("job %s: %s: %s", job.id, status, message)

        def change(rec: DocRecord) -> None:
            rec.body["error_message"] = message
            self._to(rec, status, message)

        await self._owe(job)
        job = await self._write(job, change)
        self._notify()
        await self._request_release(job, why=f"the job is {status}")

    async def _release_then(self, job: DocRecord, status: str, message: str) -> None:
        def change(rec: DocRecord) -> None:
            self._to(rec, status, message)

        await self._owe(job)
        job = await self._write(job, change)
        self._notify()
        await self._request_release(job, why=message)

    async def _owe(self, job: DocRecord) -> None:
        """Before a write that makes the job terminal: what lets the delivery loop find
        the job.* event that write adds (``webhooks/jobs.py``; a crash in between is harmless)."""
        if self.webhooks is not None:
            await self.webhooks.owe(self.store, job)

    def _notify(self) -> None:
        if self.webhooks is not None:
            self.webhooks.notify()

    async def _request_release(self, job: DocRecord, *, why: str, provision_id: str | None = None) -> None:
        """The job needs its resource no more: mark its provision for release (the
        provision record, not the job, carries it to the provider's confirmation)."""
        pid = provision_id or job.body.get("provision_id")
        if not pid:
            return

        def pending(p: DocRecord) -> DocRecord | None:
            if p.status in ("release_pending", "released"):
                return None
            p.status = "release_pending"
            p.body["release_requested_at"] = time.time()
            p.body["next_at"] = 0
            return p

        prov = await update_doc(self.store, PROVISION, pid, pending)
        if prov.status == "release_pending":

            def noted(rec: DocRecord) -> None:
                add_event(rec, "release_requested", why)
                if rec.body.get("provision"):
                    rec.body["provision"]["status"] = "release_pending"

            with contextlib.suppress(ConflictError):
                await self._write(job, noted, expect=job.status)
        if prov.status == "release_pending":
            self._release_soon(prov)  # now, not at the next tick

    async def _adopt(self, prov: DocRecord) -> None:
        job = await self.store.get_doc(JOB, prov.body["job_id"])
        if job is None or job.status in TERMINAL:
            if job is None:
                def pending(p: DocRecord) -> DocRecord | None:
                    if p.status not in ("requested", "provisioning"):
                        return None
                    p.status = "release_pending"
                    p.body["next_at"] = 0
                    return p

                await update_doc(self.store, PROVISION, prov.id, pending)
            else:
                await self._request_release(job, why=f"the job is {job.status}", provision_id=prov.id)

    async def release(self, provision_id: str, *, prov: DocRecord | None = None) -> None:
        """Ask the provider to release one provision; done once it confirms.
        ``prov``: the record as the caller just wrote it (else it is read)."""
        prov = prov or await self.store.get_doc(PROVISION, provision_id)
        if prov is None or prov.status != "release_pending":
            return
        provisioner = self.provisioners.get(prov.body["provider"])
        job = await self.store.get_doc(JOB, prov.body["job_id"])
        confirmed, error = False, None
        if not prov.body.get("provider_id"):
            # Never reached the provider under this record, but a provider call may
            # have been under way: ask it by key (it deduplicates) before calling it done.
            confirmed = True
            if provisioner is not None and job is not None:
                try:
                    owned = await provisioner.list_owned(self.cfg.installation_id)
                    hit = [s for s in owned if s.job_id == job.id]
                    for s in hit:
                        confirmed = await provisioner.release(s.provision_id) and confirmed
                except ProvisionError as exc:
                    confirmed, error = False, exc.message
        elif provisioner is None:
            error = f"provider {prov.body['provider']!r} is not configured here"
        else:
            try:
                confirmed = await provisioner.release(prov.body["provider_id"])
                if not confirmed:
                    error = "the provider still lists the resource"
            except ProvisionError as exc:
                error = exc.message
        now = time.time()
        if confirmed:
            def done(p: DocRecord) -> DocRecord:
                p.status = "released"
                p.body["released_at"] = now
                return p

            await update_doc(self.store, PROVISION, prov.id, done, current=prov)
            if job is not None:
                ep = trust_key(job.body.get("provision") or {})
                if ep and self.on_endpoint is not None:
                    self.on_endpoint(ep, False)
                await self._note_release(job.id, now, None, current=job)
            log.info("provision %s (job %s): release confirmed", prov.id, prov.body["job_id"])
            return
        attempt = int(prov.body.get("release_attempt") or 0) + 1
        delay = min(self.cfg.retry_max_s, self.cfg.retry_base_s * 2 ** (attempt - 1))

        def again(p: DocRecord) -> DocRecord:
            p.body["release_attempt"] = attempt
            p.body["next_at"] = now + delay
            return p

        await update_doc(self.store, PROVISION, prov.id, again, current=prov)
        CONSOLE_STATS.release_failed(prov.body["provider"])
        if job is not None:
            await self._note_release(job.id, None, f"{error}; trying again in {delay:g} s", current=job)
        log.warning("provision %s (job %s): release not confirmed: %s", prov.id, prov.body["job_id"], error)

    async def _note_release(self, job_id: str, released_at: float | None, failure: str | None, *,
                            current: DocRecord | None = None) -> None:
        costed: list[float] = []  # the GPU-seconds this write adds (mutate may run more than once)

        def mutate(rec: DocRecord) -> DocRecord:
            costed.clear()
            b = rec.body
            if released_at is not None:
                add_event(rec, "release_confirmed")
                if b.get("provision"):
                    b["provision"]["status"] = "released"
                running = b.get("running_at")
                if running and not b.get("cost"):  # a second confirmation (another replica) costs nothing more
                    gpus = max(1, Resolved.from_record(b["template"]).gpus)
                    secs = max(0.0, released_at - float(running))
                    price = b.get("price_per_hour")
                    b["cost"] = {"gpu_seconds": round(secs * gpus, 3),
                                 "usd": round(secs / 3600 * price, 6) if price is not None else None}
                    costed.append(b["cost"]["gpu_seconds"])
            else:
                add_event(rec, "release_failed", failure or "")
            return rec

        with contextlib.suppress(ConflictError, NotFoundError):
            rec = await update_doc(self.store, JOB, job_id, mutate, current=current)
            if costed:
                CONSOLE_STATS.add_gpu_seconds(str(rec.body.get("provider")), costed[0])

    async def sweep(self) -> list[str]:
        """Release every resource of this installation whose job is terminal or unknown."""
        released: list[str] = []
        for name, provisioner in self.provisioners.items():
            try:
                owned = await provisioner.list_owned(self.cfg.installation_id)
            except Exception as exc:  # noqa: BLE001 - one provider's failure never stops the others' sweep
                log.warning("sweep: listing %s resources failed: %s", name, exc)
                continue
            for state in owned:
                job = await self.store.get_doc(JOB, state.job_id) if state.job_id else None
                if job is not None and job.status not in TERMINAL:
                    continue
                prov = await self.store.get_doc_by_key(PROVISION, job.tenant, job.id) if job is not None else None
                if prov is not None and prov.status == "release_pending":
                    continue  # the release loop has it
                try:
                    if await provisioner.release(state.provision_id):
                        released.append(state.provision_id)
                        log.warning("sweep: released %s resource %s (job %s is %s)", name, state.provision_id,
                                    state.job_id, job.status if job else "unknown")
                except ProvisionError as exc:
                    log.warning("sweep: releasing %s resource %s failed: %s", name, state.provision_id, exc)
                    CONSOLE_STATS.release_failed(name)
        return released
