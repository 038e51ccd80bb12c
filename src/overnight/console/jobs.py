"""Console jobs: what a user asks for ("this dataset through this model within 24h")
and what the planner makes of it. Kept as document records (kind ``job``) in the
store, so every backend holds them and every replica sees them.

Statuses::

    queued -> resource_preparing -> submitting -> validating -> in_progress -> finalizing -> completed
                      |                  |              \\____________ failed | expired | cancelled
               resource_failed     submit_failed
    (any non-terminal) -- cancel --> cancelling -> cancelled

The job's own record carries its timeline (``events``), its provision
(``provision``) and, once submitted, its batch's counts. Business rules live here;
the routes in ``api/routes/console.py`` only translate HTTP.
"""

from __future__ import annotations

import time
from typing import Any

from overnight.batches.service import check_metadata, parse_completion_window
from overnight.console.docs import new_doc_id, update_doc
from overnight.console.stats import CONSOLE_STATS
from overnight.errors import ConflictError, InvalidRequestError, NotFoundError
from overnight.store.base import Store
from overnight.store.records import DocRecord
from overnight.webhooks import jobs as job_hooks
from overnight.webhooks.config import parse_batch_webhook
from overnight.webhooks.jobs import JobWebhooks

__all__ = [
    "ACTIVE", "JOB", "PROVIDERS", "PROVISION", "TERMINAL", "JobCreate", "add_event", "cancel_job", "create_job",
    "get_job", "job_object", "list_jobs", "release_confirmed",
]

JOB = "job"
PROVISION = "provision"
PROVIDERS = ("kubernetes", "local", "fake", "runpod", "lambdaCloud")
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled", "resource_failed", "submit_failed"})
ACTIVE = ("queued", "resource_preparing", "submitting", "validating", "in_progress", "finalizing", "cancelling")
#: Most events kept on a job (the oldest are dropped beyond this).
MAX_EVENTS = 200


def add_event(rec: DocRecord, type_: str, message: str = "", **extra: Any) -> None:
    events = rec.body.setdefault("events", [])
    events.append({"at": round(time.time(), 3), "type": type_, "message": message, **extra})
    del events[:-MAX_EVENTS]


class JobCreate:
    """A checked ``POST /api/v1/jobs`` body."""

    FIELDS = frozenset({
        "input_dataset", "endpoint", "completion_window", "name", "model_id", "model_template_name",
        "model_template_version", "profile", "provider", "priority", "metadata", "provision_resource_deadline",
        "webhook_url", "webhook_secret",
    })

    def __init__(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        unknown = sorted(set(body) - self.FIELDS)
        if unknown:
            raise InvalidRequestError(f"Unknown field '{unknown[0]}'.", param=unknown[0])
        for f in ("input_dataset", "endpoint"):
            if not isinstance(body.get(f), str) or not body.get(f):
                raise InvalidRequestError(f"'{f}' is required (a string).", param=f)
        self.input_dataset: str = body["input_dataset"]
        self.endpoint: str = body["endpoint"]
        window = body.get("completion_window")
        self.completion_window: str = "24h" if window is None else window
        # Checked now, as the batch will be: a bad one found at submit would fail the
        # job after a resource was paid for.
        parse_completion_window(self.completion_window)
        self.name: str | None = body.get("name")
        self.model_id: str | None = body.get("model_id")
        self.template: str | None = body.get("model_template_name")
        self.template_version: str | None = body.get("model_template_version") or None
        self.profile: str | None = body.get("profile")
        self.provider: str | None = body.get("provider")
        if self.provider is not None and self.provider not in PROVIDERS:
            raise InvalidRequestError(f"Unknown provider {self.provider!r}; one of {', '.join(PROVIDERS)}.",
                                      param="provider")
        pr = body.get("priority", 0)
        if isinstance(pr, bool) or not isinstance(pr, int) or not -1000 <= pr <= 1000:
            raise InvalidRequestError("'priority' must be an integer from -1000 to 1000.", param="priority")
        self.priority = pr
        self.metadata: dict[str, str] = check_metadata(body.get("metadata")) or {}
        dl = body.get("provision_resource_deadline")
        # Finite and below the bound the batches API takes for it (JSON's NaN and
        # Infinity parse as floats here), and not past.
        if dl is not None and (isinstance(dl, bool) or not isinstance(dl, (int, float)) or not time.time() < dl < 1e11):
            raise InvalidRequestError("'provision_resource_deadline' must be a Unix time in the future (seconds).",
                                      param="provision_resource_deadline")
        self.deadline: float | None = float(dl) if dl is not None else None
        for f in ("name", "model_id", "model_template_name", "model_template_version", "profile"):
            v = body.get(f)
            if v is not None and (not isinstance(v, str) or len(v) > 256):
                raise InvalidRequestError(f"'{f}' must be a string of at most 256 characters.", param=f)
        # Where this job's own job.* events go (webhooks/jobs.py): the syntax here; the
        # server's policy and the sealing of the secret in Console.create_job.
        self.webhook: dict[str, Any] | None = parse_batch_webhook(body, "")


async def create_job(*, store: Store, tenant: str, req: JobCreate, resolved: dict[str, Any], provider: str,
                     installation_id: str, webhook: dict[str, Any] | None = None) -> DocRecord:
    """Record a queued job; the planner takes it from there. ``webhook``: its own
    URL as checked (``{"url", "secret_sealed"?}``, ``webhooks/config.check_batch_webhook``)."""
    now = time.time()
    rec = DocRecord(
        kind=JOB, id=new_doc_id("job"), tenant=tenant, created_at=now, status="queued", updated_at=now,
        body={
            "name": req.name, "input_dataset": req.input_dataset, "endpoint": req.endpoint,
            "completion_window": req.completion_window, "model_id": req.model_id,
            "model_template_name": resolved["template"]["name"],
            "model_template_version": resolved["template"]["version"],
            "profile": (resolved.get("profile") or {}).get("name"), "template": resolved,
            "provider": provider, "priority": req.priority, "metadata": req.metadata,
            "provision_resource_deadline": req.deadline, "installation_id": installation_id,
            "batch_id": None, "provision_id": None, "provision": None, "error_message": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "usage": None,
            "output_dataset": None, "error_dataset": None, "cancel_requested": False,
            "timestamps": {"created_at": int(now), "queued_at": int(now)}, "events": [],
            **({job_hooks.HOOK: webhook} if webhook else {}),
        },
    )
    add_event(rec, "queued", f"queued for provider {provider}")
    await store.insert_doc(rec)
    return rec


async def get_job(*, store: Store, tenant: str, job_id: str) -> DocRecord:
    rec = await store.get_doc(JOB, job_id)
    if rec is None or rec.tenant != tenant:
        raise NotFoundError(f"No such job: {job_id}", code="job_not_found")
    return rec


async def list_jobs(*, store: Store, tenant: str, after: str | None, limit: int) -> tuple[list[DocRecord], bool]:
    if after is not None:
        cur = await store.get_doc(JOB, after)
        if cur is None or cur.tenant != tenant:
            raise NotFoundError(f"No such job: {after}", code="job_not_found")
    recs = await store.list_docs(JOB, tenant=tenant, after=after, limit=limit + 1, order="newest")
    return recs[:limit], len(recs) > limit


async def cancel_job(*, store: Store, tenant: str, job_id: str, webhooks: JobWebhooks | None = None) -> DocRecord:
    """Ask for a cancel; the planner carries it out at whatever stage the job is
    (a queued one is cancelled here, with its ``job.cancelled`` event: ``webhooks``)."""
    job = await get_job(store=store, tenant=tenant, job_id=job_id)
    if job.status == "queued" and webhooks is not None:
        await webhooks.owe(store, job)  # before the write that may end it

    def mutate(rec: DocRecord) -> DocRecord | None:
        if rec.status in TERMINAL:
            raise ConflictError(f"Job {job_id} is already {rec.status}.", code="job_terminal")
        if rec.body.get("cancel_requested"):
            return None
        now = int(time.time())
        rec.body["cancel_requested"] = True
        rec.body["timestamps"]["cancel_requested_at"] = now
        add_event(rec, "cancel_requested")
        if rec.status == "queued":
            # Nothing was asked of a provider yet (a planner that takes the job
            # meanwhile loses its compare-and-set and sees this).
            rec.status = "cancelled"
            rec.body["timestamps"]["cancelled_at"] = now
            add_event(rec, "cancelled", "cancelled before any resource was requested")
            if webhooks is not None:
                webhooks.add_event(rec, "cancelled", at=now)
        return rec

    rec = await update_doc(store, JOB, job_id, mutate)
    if rec.status == "cancelled":  # only this write moves a job to cancelled here (queued ones)
        CONSOLE_STATS.job_finished("cancelled")
        if webhooks is not None:
            webhooks.notify()
    return rec


def job_object(rec: DocRecord) -> dict[str, Any]:
    """The job as the API shows it."""
    b = rec.body
    prov = b.get("provision") or None
    cost = b.get("cost") or {"gpu_seconds": 0.0, "usd": None}
    return {
        "id": rec.id, "object": "job", "name": b.get("name"), "status": rec.status,
        "batch_id": b.get("batch_id"), "provision_id": b.get("provision_id"),
        "provision": None if prov is None else {
            "provider": prov.get("provider"), "resource_ids": prov.get("resource_ids") or [],
            "endpoint": prov.get("endpoint"), "status": prov.get("status"), "raw": prov.get("raw") or {},
        },
        "events": b.get("events") or [], "error_message": b.get("error_message"),
        "input_dataset": b.get("input_dataset"), "output_dataset": b.get("output_dataset"),
        "error_dataset": b.get("error_dataset"), "endpoint": b.get("endpoint"),
        "completion_window": b.get("completion_window"), "model_id": b.get("model_id"),
        "model_template_name": b.get("model_template_name"), "model_template_version": b.get("model_template_version"),
        "profile": b.get("profile"), "provider": b.get("provider"), "priority": b.get("priority", 0),
        "metadata": b.get("metadata") or {}, "provision_resource_deadline": b.get("provision_resource_deadline"),
        "request_counts": b.get("request_counts") or {"total": 0, "completed": 0, "failed": 0},
        "usage": b.get("usage"), "cost": cost, "created_at": int(rec.created_at),
        "release_confirmed": release_confirmed(rec),
        "webhook_url": (b.get(job_hooks.HOOK) or {}).get("url"),
        "webhooks": job_hooks.deliveries(rec),
        **{k: v for k, v in (b.get("timestamps") or {}).items() if k != "created_at"},
    }


def release_confirmed(rec: DocRecord) -> bool | None:
    """None while the job is active; once it is terminal, whether nothing is held
    for it any more: the provider confirmed its resource gone, or it never had one
    (a job that ended before it was provisioned). A ``job.*`` webhook is sent at the
    terminal status, not at this: a receiver that cares reads it here."""
    if rec.status not in TERMINAL:
        return None
    b = rec.body
    if not b.get("provision_id"):
        return True
    return (b.get("provision") or {}).get("status") == "released" or any(
        e.get("type") == "release_confirmed" for e in b.get("events") or ())
