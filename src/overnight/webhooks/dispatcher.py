"""Delivering webhooks: a loop on every replica that claims due deliveries with
compare-and-set, POSTs them signed, and records the outcome.

It delivers batches' events (found by the store's ``list_webhooks_due``) and,
where the console runs, console jobs' (found by their markers,
``webhooks/jobs.py``); the state is on each one's own record, the rules the same.

At least once, in order per batch (job) and target, never early:

- A delivery exists only once the batch's terminal status (and its files) are
  stored: it is written in that same compare-and-set (``state.add_event``).
- To send one, a replica first claims it: a compare-and-set that moves its
  ``next_at`` past the longest attempt (``WebhookConfig.hold_s``). Of several
  replicas one wins; the others see it as not due. The claim is on the record,
  so a restart or another replica takes a delivery over when its claim lapses
  (its sender died mid-attempt: the only way a receiver gets an event twice
  without a failed attempt in between).
- The outcome is a second compare-and-set: done on a 2xx, else tried again
  after an exponential backoff until ``RetryRules`` gives up (logged as an
  error, and kept on the record). A store failure in between only means the
  claim lapses and the delivery is sent again.
- A target's deliveries go one at a time, oldest first (``state.claim``).

The POST goes through overnight's own HTTP/1.1 client (``executor/http1.py``:
no new dependency, TLS, a bounded answer, header values checked for CR/LF), one
connection per attempt, no redirects followed. A batch's or job's own URL is
checked against ``OVERNIGHT_ALLOWED_WEBHOOK_URLS`` at every attempt, and the
connection goes to the addresses that check found (the name stays in ``Host``
and TLS's SNI): no window between check and connect for the name to point
somewhere else (DNS rebinding). A shutdown hands claimed deliveries back so that
whoever runs next sends them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from overnight import __version__
from overnight.batches.service import update_batch
from overnight.errors import NotFoundError, OvernightError
from overnight.executor.http1 import (
    ConnectFailed,
    ConnectionFailed,
    HttpPool,
    RequestTimedOut,
    ResponseTooLarge,
)
from overnight.runtimes.egress import EndpointRefused, check_endpoint_url
from overnight.secret_box import SecretBox, SecretError
from overnight.store.base import Store
from overnight.store.records import BatchRecord, DocRecord
from overnight.webhooks import jobs as job_hooks
from overnight.webhooks import state
from overnight.webhooks.config import SEALED_SECRET, WebhookConfig
from overnight.webhooks.signing import WebhookSecretError, parse_secret, signed_headers
from overnight.webhooks.state import Outcome

__all__ = ["WebhookDispatcher", "post_event"]

log = logging.getLogger("overnight.webhooks")

#: A receiver's answer is not used beyond its status: read at most this much.
MAX_ANSWER_BYTES = 64 * 1024
#: Batches (jobs) being delivered at once by one replica.
MAX_IN_FLIGHT = 32
#: How often every marked job is read, whatever its marker's hint says (``webhooks/jobs.py``).
FULL_PASS_S = 60.0


async def post_event(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float,
                     addresses: list[str] | None = None) -> Outcome:
    """One attempt: POST ``body`` to ``url``; what it came to (never raises for the
    receiver's faults). ``addresses``: connect to these (tried in turn) rather than
    to what the name resolves to now."""

    async def checked() -> list[str] | None:
        return addresses

    try:
        pool = HttpPool(url, headers={"User-Agent": f"overnight/{__version__}", **headers}, timeout_s=timeout_s,
                        connect_timeout_s=min(timeout_s, 10.0), max_connections=1, max_body_bytes=MAX_ANSWER_BYTES,
                        resolve=checked if addresses is not None else None)
    except ValueError as exc:
        return Outcome(error=str(exc), final=True)
    try:
        reply = await pool.request("POST", "" if pool.prefix else "/", body)
    except ConnectFailed as exc:
        return Outcome(error=str(exc))
    except ConnectionFailed as exc:
        return Outcome(error=f"connection failed: {exc}")
    except RequestTimedOut:
        return Outcome(error=f"no answer within {timeout_s:g} s")
    except ResponseTooLarge:
        return Outcome(error=f"the receiver's answer is over {MAX_ANSWER_BYTES} bytes")
    except ValueError as exc:  # a header or path the client refuses to send
        return Outcome(error=str(exc), final=True)
    finally:
        await pool.aclose()
    if 200 <= reply.status < 300:
        return Outcome(sent=True)
    retry_after = None
    if reply.retry_after and reply.retry_after.strip().isdigit():
        retry_after = float(reply.retry_after.strip())
    # 410 Gone: the receiver wants no more of these (Standard Webhooks).
    return Outcome(error=f"HTTP {reply.status}", retry_after_s=retry_after, final=reply.status == 410)


class _Kind:
    """Where one kind of record keeps its webhook state and own URL, and how it is
    written (compare-and-set, retried on conflict)."""

    name: str
    #: The target of the record's own URL.
    own: str

    def state(self, rec: Any) -> dict[str, Any] | None:
        raise NotImplementedError

    def hook(self, rec: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def update(self, store: Store, id: str, change: Callable[[Any], bool]) -> Any:
        """Apply ``change`` (True: write) to the current record; the record as stored."""
        raise NotImplementedError


class _Batches(_Kind):
    name, own = "batch", state.TARGET_BATCH

    def state(self, rec: BatchRecord) -> dict[str, Any] | None:
        return rec.webhook

    def hook(self, rec: BatchRecord) -> dict[str, Any]:
        return (rec.options or {}).get("webhook") or {}

    async def update(self, store: Store, id: str, change: Callable[[Any], bool]) -> BatchRecord:
        return await update_batch(store, id, lambda rec: rec if change(rec) else None)


class _Jobs(_Kind):
    name, own = "job", job_hooks.TARGET_JOB

    def state(self, rec: DocRecord) -> dict[str, Any] | None:
        return rec.body.get(job_hooks.STATE)

    def hook(self, rec: DocRecord) -> dict[str, Any]:
        return rec.body.get(job_hooks.HOOK) or {}

    async def update(self, store: Store, id: str, change: Callable[[Any], bool]) -> DocRecord:
        from overnight.console.docs import update_doc

        return await update_doc(store, job_hooks.JOB, id, lambda rec: rec if change(rec) else None)


BATCHES, JOBS = _Batches(), _Jobs()


class WebhookDispatcher:
    """The delivery loop of one replica (``start``/``stop``): batches' events, and
    console jobs' with ``jobs=True`` (where the console's jobs are stored)."""

    def __init__(self, *, store: Store, config: WebhookConfig, secrets: SecretBox | None, replica_id: str,
                 batches: bool = True, jobs: bool = False) -> None:
        self.store = store
        self.config = config
        self.secrets = secrets
        self.replica_id = replica_id
        self.batches = batches
        self.jobs = jobs
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._full_pass_at = 0.0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="overnight-webhooks")

    def wake(self) -> None:
        """Look for due deliveries now instead of at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _due(self) -> list[tuple[_Kind, str]]:
        now = time.time()
        due: list[tuple[_Kind, str]] = []
        if self.batches:
            try:
                due += [(BATCHES, rec.id) for rec in
                        await self.store.list_webhooks_due(now=now, limit=MAX_IN_FLIGHT * 2)]
            except OvernightError as exc:
                log.warning("webhooks: cannot read due deliveries: %s", exc)
        if self.jobs:
            every = now - self._full_pass_at >= FULL_PASS_S
            try:
                due += [(JOBS, job_id) for job_id in await job_hooks.owed_jobs(self.store, now=now, every=every)]
                if every:
                    self._full_pass_at = now
            except OvernightError as exc:
                log.warning("webhooks: cannot read the jobs that owe deliveries: %s", exc)
        return due

    async def _loop(self) -> None:
        while True:
            for kind, id in await self._due():
                key = (kind.name, id)
                if key in self._inflight or len(self._inflight) >= MAX_IN_FLIGHT:
                    continue
                task = asyncio.create_task(self._deliver(kind, id), name=f"overnight-webhook-{id}")
                self._inflight[key] = task
                task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_s):
                    await self._wake.wait()

    async def _deliver(self, kind: _Kind, id: str) -> None:
        try:
            claimed, rec = await self._claim(kind, id)
        except NotFoundError:
            if kind is JOBS:  # the job is gone: so is what it owed
                with contextlib.suppress(OvernightError):
                    await job_hooks.sync_marker(self.store, id, None)
            return
        except OvernightError as exc:
            log.warning("webhooks: %s %s: cannot claim its deliveries: %s", kind.name, id, exc)
            return
        try:
            for d in claimed:
                outcome = await self._attempt(kind, rec, d)
                rec = await self._settle(kind, id, d, outcome) or rec
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # best effort: else the claim lapses by itself
                rec = await asyncio.shield(self._release(kind, id, claimed)) or rec
                if kind is JOBS:
                    await asyncio.shield(job_hooks.sync_marker(self.store, id, rec))
            raise
        except OvernightError as exc:
            # The outcome could not be stored: the claim lapses and it is tried again.
            log.warning("webhooks: %s %s: cannot record a delivery: %s", kind.name, id, exc)
        except Exception:  # a bug: say so; the claim lapses and it is tried again
            log.exception("webhooks: %s %s: delivery failed unexpectedly", kind.name, id)
        if kind is JOBS:
            try:
                await job_hooks.sync_marker(self.store, id, rec)
            except OvernightError as exc:  # the hint stays as it was: read again at the next poll
                log.warning("webhooks: job %s: cannot update its marker: %s", id, exc)

    async def _claim(self, kind: _Kind, id: str) -> tuple[list[dict[str, Any]], Any]:
        """Claim what is due (none: another replica has it, or nothing is due after all)."""
        claimed: list[dict[str, Any]] = []

        def change(rec: Any) -> bool:
            if kind is JOBS and rec.status not in job_hooks.EVENT_TYPES:
                claimed.clear()
                return False  # not terminal (yet): it owes nothing
            claimed[:] = state.claim_in(kind.state(rec), now=time.time(), owner=self.replica_id,
                                        hold_s=self.config.hold_s)
            return bool(claimed)

        rec = await kind.update(self.store, id, change)
        return claimed, rec

    def _target(self, kind: _Kind, rec: Any, target: str) -> tuple[str | None, tuple[bytes, ...], str | None]:
        """(URL, signing keys, why it cannot be sent) for one target of ``rec``."""
        if target == state.TARGET_SERVER:
            return self.config.url, self.config.keys, None
        hook = kind.hook(rec)
        url = hook.get("url")
        sealed = hook.get(SEALED_SECRET)
        if sealed is None:
            return url, self.config.keys, None if self.config.keys else "no secret to sign with"
        if self.secrets is None:
            return url, (), "its webhook_secret cannot be decrypted: no OVERNIGHT_SECRET_KEY"
        try:
            return url, (parse_secret(self.secrets.open(sealed)),), None
        except (SecretError, WebhookSecretError) as exc:
            return url, (), f"its webhook_secret cannot be used: {exc}"

    async def _attempt(self, kind: _Kind, rec: Any, d: dict[str, Any]) -> Outcome:
        event = state.find_event_in(kind.state(rec), d["event"])
        if event is None:
            return Outcome(error=f"event {d['event']} is not on the record", final=True)
        url, keys, problem = self._target(kind, rec, d["target"])
        if url is None:
            return Outcome(skipped=True)
        if problem is not None:
            return Outcome(error=problem, final=True)
        addresses: list[str] | None = None
        if d["target"] != state.TARGET_SERVER:
            # Again at every attempt (the name may resolve elsewhere by now), and the
            # connection goes where this check looked, not to a second lookup.
            try:
                url = check_endpoint_url(url)
                addresses = await self.config.policy.connect_addresses(url)
            except EndpointRefused as exc:
                return Outcome(error=f"webhook_url {exc}")
        body = state.event_body(rec.id, event)
        return await post_event(url, body, signed_headers(keys, event["id"], body), timeout_s=self.config.timeout_s,
                                addresses=addresses)

    async def _settle(self, kind: _Kind, id: str, d: dict[str, Any], outcome: Outcome) -> Any:
        result: list[dict[str, Any] | None] = [None]

        def change(rec: Any) -> bool:
            result[0] = state.settle_in(kind.state(rec), d["event"], d["target"], outcome, now=time.time(),
                                        rules=self.config.retry)
            return result[0] is not None

        rec = await kind.update(self.store, id, change)
        done = result[0]
        if done is None or outcome.skipped:
            return rec
        what = f"webhook {d['event']} of {kind.name} {id} to the {d['target']} URL"
        if done.get("outcome") == "delivered":
            log.info("%s delivered (attempt %d)", what, done["attempts"])
        elif done.get("outcome") == "failed":
            log.error("%s given up after %d attempts: %s", what, done["attempts"], done.get("error"))
        else:
            log.warning("%s: attempt %d failed (%s); next in %.1f s", what, done["attempts"], done.get("error"),
                        max(0.0, done["next_at"] - time.time()))
        return rec

    async def _release(self, kind: _Kind, id: str, claimed: list[dict[str, Any]]) -> Any:
        """Hand claimed deliveries back (due now) at shutdown."""
        keys = {(d["event"], d["target"]) for d in claimed}

        def change(rec: Any) -> bool:
            changed = False
            for d in (kind.state(rec) or {}).get("pending") or ():
                if (d["event"], d["target"]) in keys and d.get("claimed_by") == self.replica_id:
                    d.pop("claimed_by")
                    d["next_at"] = time.time()
                    changed = True
            return changed

        return await kind.update(self.store, id, change)
