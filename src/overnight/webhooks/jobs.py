"""Console jobs' webhooks: ``job.completed``, ``job.failed``, ``job.expired``,
``job.cancelled``, ``job.resource_failed`` and ``job.submit_failed``, one per job
when it reaches that terminal status, in the batch events' shape (``data.id`` is
the job's id), signed and retried exactly like them (``dispatcher.py``).

Where a job's deliveries are owed to: the server's ``OVERNIGHT_WEBHOOK_URL``
(target ``server``) and the job's own ``webhook_url`` (target ``job``, given at
create, checked by the same ``OVERNIGHT_ALLOWED_WEBHOOK_URLS`` policy and signed
with its own ``webhook_secret`` like a batch's). A job with neither when it ends
owes nothing.

**The state** (events, pending and done deliveries; ``state.py``) is kept on the
job's own record, ``body["webhook_deliveries"]``, written in the very
compare-and-set that makes the job terminal (the planner's ``_to``,
``console.jobs.cancel_job``): a delivery is owed exactly when the terminal status
(and the output/error datasets written with it) is stored, never before it and
never lost if the process dies right after.

**Finding what is owed.** Batches have a store index of their next delivery
(``Store.list_webhooks_due``); document records have none, only (kind, status)
lists. So each job that may owe deliveries also has a small *marker* doc (kind
``job-webhook``, id = the job's id, status ``pending``), inserted **before** the
terminal write (``JobWebhooks.owe``). Its order is what makes a crash harmless:

- killed after the marker, before the terminal write: the job is not terminal,
  the planner steps it again and writes the end (with the event); a marker whose
  job is not terminal yet is left alone;
- killed after the terminal write: the marker is there, every replica's delivery
  loop lists it (an indexed list of ``pending`` markers) and sends what the job's
  record owes, after a restart too.

The marker carries a hint, ``next_at``, the job's next due delivery as the loop
last wrote it after an attempt, so a poll reads only the jobs that are due; once
a minute every marked job is read whatever its hint. When a terminal job owes
nothing more (or is gone), its marker is deleted. The marker is only an index:
what was sent, what is owed and when is always the job's record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from overnight.errors import NotFoundError, StoreError
from overnight.store.base import Store
from overnight.store.records import DocRecord
from overnight.webhooks import state
from overnight.webhooks.config import WebhookConfig

__all__ = [
    "EVENT_TYPES",
    "HOOK",
    "JOB",
    "OWED",
    "STATE",
    "TARGET_JOB",
    "JobWebhooks",
    "deliveries",
    "owed_jobs",
    "sync_marker",
]

log = logging.getLogger("overnight.webhooks")

#: The console's job kind (``console.jobs.JOB``; not imported: that module imports this one).
JOB = "job"
#: The marker docs: a job that may owe webhook deliveries.
OWED = "job-webhook"
#: Where the job's record keeps the state (``state.py``) and its own URL (``{"url", "secret_sealed"?}``).
STATE, HOOK = "webhook_deliveries", "webhook"
#: The target of a job's own ``webhook_url``.
TARGET_JOB = "job"
#: One event per terminal status of a job.
EVENT_TYPES = {s: f"job.{s}" for s in
               ("completed", "failed", "expired", "cancelled", "resource_failed", "submit_failed")}
#: Markers read per page when the loop lists them.
_PAGE = 500


class JobWebhooks:
    """What the console needs to owe a job's events: the server's webhook settings
    (None: this server sends none) and who to wake when an event is owed (the
    delivery loop, so it need not wait for its next poll)."""

    def __init__(self, config: WebhookConfig | None, *, on_event: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_event = on_event

    def targets(self, job: DocRecord) -> list[str]:
        """Where ``job``'s events go: the server's URL when one is set, its own when it has one."""
        if self.config is None:
            return []
        out = [state.TARGET_SERVER] if self.config.url else []
        if job.body.get(HOOK):
            out.append(TARGET_JOB)
        return out

    async def owe(self, store: Store, job: DocRecord) -> None:
        """Call before a write that may make ``job`` terminal: the marker that lets
        the delivery loop find it. Raises (the step is tried again) when the marker
        cannot be written, so no job ends owing a delivery nobody would find."""
        if not self.targets(job):
            return
        now = time.time()
        marker = DocRecord(kind=OWED, id=job.id, tenant=job.tenant, created_at=now, updated_at=now,
                           status="pending", body={"next_at": 0.0})
        try:
            await store.insert_doc(marker)
        except StoreError:
            if await store.get_doc(OWED, job.id) is None:
                raise
            # There already (a terminal write tried before): due now, in case the loop put it off.
            await _set_hint(store, job.id, 0.0)

    def add_event(self, rec: DocRecord, status: str, *, at: int) -> dict[str, Any] | None:
        """Record the ``job.<status>`` event on ``rec`` and owe its deliveries (due at
        once). Call inside the compare-and-set that makes the job terminal, after
        ``owe``."""
        etype = EVENT_TYPES.get(status)
        targets = self.targets(rec)
        if etype is None or not targets:
            return None
        rec.body[STATE], event = state.new_event(rec.body.get(STATE), etype, targets, at=at, now=time.time())
        return event

    def notify(self) -> None:
        if self.on_event is not None:
            self.on_event()


def deliveries(job: DocRecord) -> list[dict[str, Any]]:
    """The job's deliveries for its API object (as a batch's ``overnight.webhooks``)."""
    return state.view_of(job.body.get(STATE))


async def owed_jobs(store: Store, *, now: float, every: bool = False, limit: int = 10_000) -> list[str]:
    """The ids of marked jobs whose hint says a delivery may be due by ``now``
    (``every``: all marked jobs), oldest marker first."""
    out: list[str] = []
    after: str | None = None
    while len(out) < limit:
        page = await store.list_docs(OWED, statuses=("pending",), order="oldest", after=after, limit=_PAGE)
        for m in page:
            if every or float(m.body.get("next_at") or 0.0) <= now:
                out.append(m.id)
        if len(page) < _PAGE:
            break
        after = page[-1].id
    return out[:limit]


async def sync_marker(store: Store, job_id: str, job: DocRecord | None) -> None:
    """Bring the marker of ``job_id`` in line with the job's record as last read or
    written (``job``; None: it is gone): deleted when a gone or terminal job owes
    nothing more, its hint set to the next due delivery otherwise. A job that is
    not terminal yet keeps its marker as it is (its terminal write is still to come)."""
    if job is not None and job.status not in EVENT_TYPES:
        return
    due = state.due_at(job.body.get(STATE)) if job is not None else None
    if due is None:
        await store.delete_doc(OWED, job_id)
        return
    await _set_hint(store, job_id, due)


async def _set_hint(store: Store, job_id: str, next_at: float) -> None:
    from overnight.console.docs import update_doc

    def mutate(m: DocRecord) -> DocRecord | None:
        if float(m.body.get("next_at") or 0.0) == next_at:
            return None
        m.body["next_at"] = next_at
        m.updated_at = time.time()
        return m

    try:
        await update_doc(store, OWED, job_id, mutate)
    except NotFoundError:
        pass  # deleted meanwhile: the job owes nothing more
