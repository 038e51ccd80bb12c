"""Retention of console jobs: a terminal job, and its provision record once the
provider confirmed the release, is removed ``OVERNIGHT_CONSOLE_JOB_RETENTION_S``
after it ended (0 keeps them forever). Its batch and files are not touched: they
follow the batches API's own expiry.

A job whose provision is not confirmed released is never removed, however old: the
provision record is what carries the release to the provider's confirmation, and
the job is where its failures are shown. Nor is a job that still owes a webhook
delivery (``webhooks/jobs.py``), until it is sent or given up on. The provision goes first and the job
second, so a crash in between leaves a job without a provision (removed by the next
pass), never a provision without its job.

The planner runs ``remove_expired_jobs`` beside its tick (``Planner.tick``); several
replicas may run it at once (deleting twice is harmless)."""

from __future__ import annotations

import logging
import time

from overnight.console.jobs import JOB, PROVISION, TERMINAL
from overnight.store.base import Store
from overnight.store.records import DocRecord

__all__ = ["ended_at", "remove_expired_jobs"]

log = logging.getLogger("overnight.console")

_PAGE = 200


def ended_at(job: DocRecord) -> float:
    """When a terminal job reached its status (``<status>_at``; its last write or
    creation for a record without one)."""
    at = (job.body.get("timestamps") or {}).get(f"{job.status}_at")
    if isinstance(at, int | float) and not isinstance(at, bool):
        return float(at)
    return job.updated_at or job.created_at


async def _remove(store: Store, job: DocRecord) -> bool:
    if (job.body.get("webhook_deliveries") or {}).get("pending"):
        log.debug("retention: job %s kept: a webhook delivery of it is still owed", job.id)
        return False  # webhooks/jobs.py: its record is where the delivery's state is
    prov = await store.get_doc_by_key(PROVISION, job.tenant, job.id)
    if prov is None and job.body.get("provision_id"):
        prov = await store.get_doc(PROVISION, job.body["provision_id"])
    if prov is not None:
        if prov.status != "released":
            log.debug("retention: job %s kept: its provision %s is %s", job.id, prov.id, prov.status)
            return False
        await store.delete_doc(PROVISION, prov.id)
    await store.delete_doc(JOB, job.id)
    return True


async def remove_expired_jobs(store: Store, *, retention_s: float, now: float | None = None) -> list[str]:
    """Remove the terminal jobs that ended ``retention_s`` ago or more (and their
    released provisions); the ids removed. ``retention_s`` <= 0 removes nothing."""
    if retention_s <= 0:
        return []
    cutoff = (time.time() if now is None else now) - retention_s
    removed: list[str] = []
    after: str | None = None
    more = True
    while more:
        jobs = await store.list_docs(JOB, statuses=TERMINAL, order="oldest", after=after, limit=_PAGE)
        more = len(jobs) == _PAGE
        for job in jobs:
            if job.created_at > cutoff:  # oldest first: no later job ended before the cutoff
                more = False
                break
            if ended_at(job) <= cutoff and await _remove(store, job):
                removed.append(job.id)
        if jobs:
            after = jobs[-1].id  # a cursor on a doc just deleted still works (Store.list_docs)
    if removed:
        log.info("retention: removed %d job(s) that ended more than %g s ago", len(removed), retention_s)
    return removed
