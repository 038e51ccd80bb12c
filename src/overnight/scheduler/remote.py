"""Batches that run in pods: the service's side of the ``kubernetes-job`` runtime.

The runner of such a batch sends no request itself. It creates the batch's
Indexed Job (the handle is on the batch record before the create), watches the
Job and its pods, and every few seconds sums the shard records the workers keep
(``batches/shards.py``) into the batch's counts, with pod problems as events.
It ends when:

* every shard is done: merge the shard checkpoints, publish the output and error
  files, ``completed``; then delete the Job;
* the batch is cancelled, or its window ends: delete the Job first (so no worker
  writes any more; each stores a last checkpoint on SIGTERM), then merge, write
  every undone line as ``batch_cancelled`` / ``batch_expired``;
* the Job fails (an index out of retries, the worker's unrecoverable exit code),
  its pods stay unschedulable too long, or the Job vanishes: delete it, merge, and
  write the undone lines as ``engine_failed`` naming why;
* the service stops or loses the lease: nothing is deleted. The Job runs on; the
  next owner of the batch reattaches to it through the stored handle.

Finalizing is deterministic from the shard checkpoints, so a crash part-way
through it is repaired by running it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from overnight.batches.service import update_batch
from overnight.batches.shards import merge_checkpoints
from overnight.batches.states import BatchStatus
from overnight.executor.checkpoint import Checkpoint
from overnight.executor.run import Outcome
from overnight.executor.usage import Usage
from overnight.executor.writer import Spool
from overnight.files.service import storage_key_for
from overnight.store.records import BatchRecord, ShardRecord
from overnight.templates.resolve import Resolved

if TYPE_CHECKING:
    from overnight.runtimes.kubernetes.job import JobView
    from overnight.runtimes.kubernetes.job import KubernetesJobRuntime
    from overnight.scheduler.runner import BatchRunner

__all__ = ["RemoteOptions", "run_on_job"]

log = logging.getLogger("overnight.scheduler")

#: Most events kept on a batch record (pod problems, failed workers).
MAX_EVENTS = 20
S = BatchStatus


class RemoteOptions:
    """How the service drives Job batches (from the settings)."""

    def __init__(self, *, poll_s: float = 2.0, unschedulable_timeout_s: float = 600.0) -> None:
        self.poll_s = poll_s
        self.unschedulable_timeout_s = unschedulable_timeout_s


def _shard_count(b: BatchRecord) -> int:
    return int(((b.options.get("runtime") or {}).get("shards")) or 1)


def _summed(shards: list[ShardRecord]) -> tuple[int, int, dict[str, Any]]:
    usage, completed, failed, any_usage = Usage(), 0, 0, False
    for s in shards:
        completed += s.completed
        failed += s.failed
        if s.usage:
            any_usage = True
            usage.merge(s.usage)
    return completed, failed, usage.to_dict() if any_usage else {}


async def run_on_job(runner: BatchRunner, b: BatchRecord, rt: KubernetesJobRuntime, opts: RemoteOptions) -> None:
    """Drive ``b`` (in_progress, cancelling or finalizing) on its Job to a terminal status."""
    store = runner.store
    count = _shard_count(b)
    handle = (b.runtime or {}).get("handle")
    events: list[dict[str, Any]] = list((b.runtime or {}).get("events") or [])

    async def record(h: dict[str, Any]) -> None:
        def mutate(rec: BatchRecord) -> BatchRecord:
            rec.runtime = {**(rec.runtime or {}), "type": "kubernetes-job", "handle": dict(h)}
            return rec

        await update_batch(store, b.id, mutate, fence=runner.token)

    if b.status == S.FINALIZING.value:
        await _finalize(runner, b, rt, handle, Outcome.DONE, count)
        return
    if b.status == S.CANCELLING.value:
        runner.stop.set(Outcome.CANCELLED)
    if runner.stop.reason is None:
        shards = await store.list_shards(b.id)
        all_done = len(shards) == count and all(s.status == "done" for s in shards)
        if not all_done and (handle is None or not await rt.exists(handle)):
            if handle is not None:
                log.warning("batch %s: its Job %s/%s is gone; creating it again (finished shards are kept)",
                            b.id, handle["namespace"], handle["name"])
            resolved = Resolved.from_record(b.options["template"])
            job = rt.render(resolved, batch_id=b.id, runtime=b.options.get("runtime") or {},
                            deadline_s=max(1.0, b.deadline - time.time()))
            handle = await rt.submit(job, batch_id=b.id, record=record)
        elif handle is not None:
            log.info("batch %s: reattached to Job %s/%s", b.id, handle["namespace"], handle["name"])
    outcome = await _follow(runner, b, rt, opts, handle, count, events) if handle is not None \
        else (runner.stop.reason or Outcome.DONE)
    if outcome in (Outcome.SHUTDOWN, Outcome.LEASE_LOST):
        if outcome is Outcome.LEASE_LOST:
            from overnight.batches.service import LeaseLost

            raise LeaseLost(b.id)
        return  # the Job runs on; the next owner reattaches
    await _finalize(runner, b, rt, handle, outcome, count)


async def _follow(runner: BatchRunner, b: BatchRecord, rt: KubernetesJobRuntime, opts: RemoteOptions,
                  handle: dict[str, Any], count: int, events: list[dict[str, Any]]) -> Outcome:
    """Watch until the batch must end; returns why."""
    watch = await rt.watch(handle)
    stop_wait = asyncio.ensure_future(runner.stop.event.wait())
    unschedulable_since: float | None = None
    seen: set[str] = {e["message"] for e in events}
    try:
        while True:
            reason = runner.stop.reason
            if reason is not None:
                return reason
            now = time.time()
            if now >= b.deadline:
                return Outcome.EXPIRED
            shards = await runner.store.list_shards(b.id)
            view = watch.view()
            for msg in view.problems + view.exits:
                if msg not in seen:
                    seen.add(msg)
                    events.append({"at": int(now), "message": msg})
                    log.warning("batch %s: %s", b.id, msg)
            del events[:-MAX_EVENTS]
            await _publish(runner, b, shards, view, events)
            if len(shards) == count and all(s.status == "done" for s in shards):
                return Outcome.DONE
            if view.failed:
                runner.stop.set(Outcome.ENGINE_FAILED, _failure(view, shards, count))
                return Outcome.ENGINE_FAILED
            if view.complete:
                # Every index succeeded, yet a shard is not done (a worker that exited
                # 0 early): its shard record is written before it exits, so re-read once.
                shards = await runner.store.list_shards(b.id)
                if len(shards) == count and all(s.status == "done" for s in shards):
                    return Outcome.DONE
                undone = sorted(set(range(count)) - {s.index for s in shards if s.status == "done"})
                runner.stop.set(Outcome.ENGINE_FAILED,
                                f"Its Job completed, but shards {undone[:10]} of {count} did not finish.")
                return Outcome.ENGINE_FAILED
            if view.synced and not view.exists and watch.error is None:
                runner.stop.set(Outcome.ENGINE_FAILED,
                                f"Its Job {handle['namespace']}/{handle['name']} was deleted outside overnight "
                                "before every shard finished.")
                return Outcome.ENGINE_FAILED
            if view.unschedulable:
                unschedulable_since = unschedulable_since or now
                if now - unschedulable_since >= opts.unschedulable_timeout_s:
                    why = next((p for p in view.problems if "cannot be scheduled" in p), "unschedulable")
                    runner.stop.set(Outcome.ENGINE_FAILED,
                                    f"Its pods could not be scheduled for {now - unschedulable_since:.0f} s "
                                    f"(OVERNIGHT_KUBERNETES_UNSCHEDULABLE_TIMEOUT_S="
                                    f"{opts.unschedulable_timeout_s:g}): {why}")
                    return Outcome.ENGINE_FAILED
            else:
                unschedulable_since = None
            changed = asyncio.ensure_future(watch.changed.wait())
            try:
                await asyncio.wait({stop_wait, changed}, timeout=min(opts.poll_s, max(0.0, b.deadline - now)))
            finally:
                changed.cancel()
            watch.changed.clear()
    finally:
        stop_wait.cancel()
        await watch.aclose()


def _failure(view: JobView, shards: list[ShardRecord], count: int) -> str:
    done = sum(1 for s in shards if s.status == "done")
    parts = [f"Its Job failed ({view.reason or 'Failed'}); {done} of {count} shards finished."]
    errors = [f"shard {s.index}: {s.error.get('message')}" for s in shards if s.error]
    if errors:
        parts.append("Shard errors: " + "; ".join(errors[:5]) + ".")
    if view.exits:
        parts.append("Failed pods: " + "; ".join(view.exits[-5:]) + ".")
    return " ".join(parts)


async def _publish(runner: BatchRunner, b: BatchRecord, shards: list[ShardRecord], view: JobView,
                   events: list[dict[str, Any]]) -> None:
    """Shard counts and the pods' state onto the batch record (fenced)."""
    completed, failed, usage = _summed(shards)
    pods = dict(sorted(view.pods.items()))
    pods["shards_done"] = sum(1 for s in shards if s.status == "done")

    def mutate(rec: BatchRecord) -> BatchRecord | None:
        rt = dict(rec.runtime or {})
        if (rec.completed, rec.failed, rec.usage, rt.get("pods"), rt.get("events")) == \
                (completed, failed, usage, pods, events):
            return None  # nothing new: no write
        rec.completed, rec.failed, rec.usage = completed, failed, usage
        rt["pods"], rt["events"] = pods, list(events)
        rec.runtime = rt
        return rec

    rec = await update_batch(runner.store, b.id, mutate, fence=runner.token)
    if rec.status == S.CANCELLING.value:
        runner.stop.set(Outcome.CANCELLED)


async def _merged(runner: BatchRunner, b: BatchRecord, count: int) -> Checkpoint:
    parts = []
    for i in range(count):
        raw = await runner.store.get_shard_checkpoint(b.id, i)
        parts.append(Checkpoint.decode(raw) if raw else Checkpoint.empty(b.total))
    return merge_checkpoints(b.total, parts)


async def _write_undone(runner: BatchRunner, b: BatchRecord, spool: Spool, code: str, message: str) -> int:
    """An error line for every request without one."""
    done = spool.cp.done
    if not done.missing():
        return 0
    prefix = f"batch_req_{b.id.split('_', 1)[1]}".encode()
    n = 0
    async for lineno, raw in runner.storage.read_lines(storage_key_for(b.input_file_id)):
        index = lineno - 1
        if index in done:
            continue
        cid = orjson.dumps(orjson.loads(raw)["custom_id"])
        err = orjson.dumps({"code": code, "message": message})
        line = b'{"id":"%b%08x","custom_id":%b,"response":null,"error":%b}' % (prefix, index, cid, err)
        spool.write(index, line, error=True)
        n += 1
    return n


_UNDONE = {
    Outcome.CANCELLED: ("batch_cancelled", "The batch was cancelled before this request finished."),
    Outcome.EXPIRED: ("batch_expired", "The batch's completion window ended before this request finished."),
}


async def _finalize(runner: BatchRunner, b: BatchRecord, rt: KubernetesJobRuntime, handle: dict[str, Any] | None,
                    outcome: Outcome, count: int) -> None:
    """Stop the Job if it may still write, merge the shards, write the undone
    lines, publish the files and the terminal status, then clean up."""
    if handle is not None and outcome is not Outcome.DONE:
        await rt.release(handle)  # workers store a last checkpoint as they stop
    cur = await runner.store.get_batch(b.id)
    if cur is not None and cur.status == S.CANCELLING.value:
        outcome = Outcome.CANCELLED
    merged = await _merged(runner, b, count)
    spool = Spool(spool_dir=runner.cfg.spool_dir, storage=runner.storage, batch_id=f"{b.id}/final",
                  token=runner.token, checkpoint=merged)
    spool.open()
    try:
        if outcome is Outcome.DONE and merged.done.missing():
            # Every shard said done, yet lines are missing: a bug, never silence.
            log.error("batch %s: %d requests have no line after every shard finished", b.id, merged.done.missing())
            outcome = Outcome.ENGINE_FAILED
            runner.stop.set(Outcome.ENGINE_FAILED, "Every shard finished, yet some requests have no line.")
        code, message = _UNDONE.get(outcome, ("engine_failed", runner.stop.detail or "The batch's Job failed."))
        written = await _write_undone(runner, b, spool, code, message)
        if written:
            log.info("batch %s: %d undone requests written as %s", b.id, written, code)
        await spool.seal()
        await runner._finish(cur or b, spool, outcome)
    finally:
        spool.close()
    if handle is not None and outcome is Outcome.DONE:
        try:
            await rt.release(handle)
        except Exception as exc:  # the batch is done; the sweep deletes the Job later
            log.warning("batch %s: deleting its Job failed (the orphan sweep will): %s", b.id, exc)
    with contextlib.suppress(Exception):
        await runner.store.delete_shards(b.id)
