"""Delivering webhooks: a loop on every replica that claims due deliveries with
compare-and-set, POSTs them signed, and records the outcome.

At least once, in order per batch and target, never early:

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
connection per attempt, no redirects followed. A shutdown hands claimed
deliveries back so that whoever runs next sends them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from overnight import __version__
from overnight.batches.service import update_batch
from overnight.errors import OvernightError
from overnight.executor.http1 import ConnectFailed, ConnectionFailed, HttpPool, RequestTimedOut, ResponseTooLarge
from overnight.runtimes.egress import EndpointRefused
from overnight.secret_box import SecretBox, SecretError
from overnight.store.base import Store
from overnight.store.records import BatchRecord
from overnight.webhooks import state
from overnight.webhooks.config import SEALED_SECRET, WebhookConfig
from overnight.webhooks.signing import WebhookSecretError, parse_secret, signed_headers
from overnight.webhooks.state import Outcome

__all__ = ["WebhookDispatcher", "post_event"]

log = logging.getLogger("overnight.webhooks")

#: A receiver's answer is not used beyond its status: read at most this much.
MAX_ANSWER_BYTES = 64 * 1024
#: Batches being delivered at once by one replica.
MAX_IN_FLIGHT = 32


async def post_event(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float) -> Outcome:
    """One attempt: POST ``body`` to ``url``; what it came to (never raises for the
    receiver's faults)."""
    try:
        pool = HttpPool(url, headers={"User-Agent": f"overnight/{__version__}", **headers}, timeout_s=timeout_s,
                        connect_timeout_s=min(timeout_s, 10.0), max_connections=1, max_body_bytes=MAX_ANSWER_BYTES)
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


class WebhookDispatcher:
    """The delivery loop of one replica (``start``/``stop``)."""

    def __init__(self, *, store: Store, config: WebhookConfig, secrets: SecretBox | None, replica_id: str) -> None:
        self.store = store
        self.config = config
        self.secrets = secrets
        self.replica_id = replica_id
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

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

    async def _loop(self) -> None:
        while True:
            try:
                due = await self.store.list_webhooks_due(now=time.time(), limit=MAX_IN_FLIGHT * 2)
            except OvernightError as exc:
                log.warning("webhooks: cannot read due deliveries: %s", exc)
                due = []
            for rec in due:
                if rec.id in self._inflight or len(self._inflight) >= MAX_IN_FLIGHT:
                    continue
                task = asyncio.create_task(self._deliver(rec.id), name=f"overnight-webhook-{rec.id}")
                self._inflight[rec.id] = task
                task.add_done_callback(lambda _t, bid=rec.id: self._inflight.pop(bid, None))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)

    async def _deliver(self, batch_id: str) -> None:
        try:
            claimed, rec = await self._claim(batch_id)
        except OvernightError as exc:
            log.warning("webhooks: batch %s: cannot claim its deliveries: %s", batch_id, exc)
            return
        if not claimed:
            return  # another replica has them, or they are not due after all
        try:
            for d in claimed:
                outcome = await self._attempt(rec, d)
                await self._settle(batch_id, d, outcome)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # best effort: else the claim lapses by itself
                await asyncio.shield(self._release(batch_id, claimed))
            raise
        except OvernightError as exc:
            # The outcome could not be stored: the claim lapses and it is tried again.
            log.warning("webhooks: batch %s: cannot record a delivery: %s", batch_id, exc)
        except Exception:  # a bug: say so; the claim lapses and it is tried again
            log.exception("webhooks: batch %s: delivery failed unexpectedly", batch_id)

    async def _claim(self, batch_id: str) -> tuple[list[dict[str, Any]], BatchRecord]:
        claimed: list[dict[str, Any]] = []

        def mutate(rec: BatchRecord) -> BatchRecord | None:
            claimed[:] = state.claim(rec, now=time.time(), owner=self.replica_id, hold_s=self.config.hold_s)
            return rec if claimed else None

        rec = await update_batch(self.store, batch_id, mutate)
        return claimed, rec

    def _target(self, rec: BatchRecord, target: str) -> tuple[str | None, tuple[bytes, ...], str | None]:
        """(URL, signing keys, why it cannot be sent) for one target of ``rec``."""
        if target == state.TARGET_SERVER:
            return self.config.url, self.config.keys, None
        hook = (rec.options or {}).get("webhook") or {}
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

    async def _attempt(self, rec: BatchRecord, d: dict[str, Any]) -> Outcome:
        event = state.find_event(rec, d["event"])
        if event is None:
            return Outcome(error=f"event {d['event']} is not on the record", final=True)
        url, keys, problem = self._target(rec, d["target"])
        if url is None:
            return Outcome(skipped=True)
        if problem is not None:
            return Outcome(error=problem, final=True)
        if d["target"] == state.TARGET_BATCH:
            try:  # again at every attempt: the name may resolve elsewhere by now
                url = await self.config.policy.check(url)
            except EndpointRefused as exc:
                return Outcome(error=f"webhook_url {exc}")
        body = state.event_body(rec.id, event)
        return await post_event(url, body, signed_headers(keys, event["id"], body), timeout_s=self.config.timeout_s)

    async def _settle(self, batch_id: str, d: dict[str, Any], outcome: Outcome) -> None:
        result: list[dict[str, Any] | None] = [None]

        def mutate(rec: BatchRecord) -> BatchRecord | None:
            result[0] = state.settle(rec, d["event"], d["target"], outcome, now=time.time(),
                                     rules=self.config.retry)
            return rec if result[0] is not None else None

        await update_batch(self.store, batch_id, mutate)
        done = result[0]
        if done is None or outcome.skipped:
            return
        what = f"webhook {d['event']} of batch {batch_id} to the {d['target']} URL"
        if done.get("outcome") == "delivered":
            log.info("%s delivered (attempt %d)", what, done["attempts"])
        elif done.get("outcome") == "failed":
            log.error("%s given up after %d attempts: %s", what, done["attempts"], done.get("error"))
        else:
            log.warning("%s: attempt %d failed (%s); next in %.1f s", what, done["attempts"], done.get("error"),
                        max(0.0, done["next_at"] - time.time()))

    async def _release(self, batch_id: str, claimed: list[dict[str, Any]]) -> None:
        """Hand claimed deliveries back (due now) at shutdown."""
        keys = {(d["event"], d["target"]) for d in claimed}

        def mutate(rec: BatchRecord) -> BatchRecord | None:
            changed = False
            for d in (rec.webhook or {}).get("pending") or ():
                if (d["event"], d["target"]) in keys and d.get("claimed_by") == self.replica_id:
                    d.pop("claimed_by")
                    d["next_at"] = time.time()
                    changed = True
            return rec if changed else None

        await update_batch(self.store, batch_id, mutate)
