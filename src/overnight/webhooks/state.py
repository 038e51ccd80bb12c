"""A batch's webhook events and deliveries, kept on its record (``BatchRecord.webhook``).

Why on the batch record and not in a queue of their own: the event is added in
the very compare-and-set that makes the batch terminal (``batches.service.transition``
calls ``add_event``), after the output and error files were recorded. So a
delivery is owed exactly when the data it announces is durable (never before,
never lost if the process dies right after), with no second write that could
fail between the two, on every store. Every later change (a replica claiming a
delivery, its outcome) is again a compare-and-set on the record, so of several
replicas one claims a delivery and nothing is lost or claimed twice, and the
stores' ``list_webhooks_due`` index (``records.webhook_due_at``) finds what is due.

The state::

    {"events":  [{"id": "evt_...", "type": "batch.completed", "created_at": 1767225600}],
     "pending": [{"event": "evt_...", "target": "server" | "batch", "attempts": 0,
                  "next_at": 1767225600.0, "error": None, "claimed_by"?: replica}],
     "done":    [{... as pending, "outcome": "delivered" | "failed" | "skipped", "at": ...}]}

``target`` names where a delivery goes, resolved when it is sent: ``server`` is
``OVERNIGHT_WEBHOOK_URL`` (skipped when none is set then), ``batch`` the batch's
own ``webhook_url``. A target's deliveries go in order: one waits until the one
before it to the same target is done. A batch has one event today (its terminal
status), but nothing here assumes it.

The same state, with the ``*_in`` functions, is kept on a console job's record
(``body["webhook_deliveries"]``; its own URL's target is ``job``): ``webhooks/jobs.py``.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import orjson

from overnight.ids import new_id
from overnight.store.records import BatchRecord

__all__ = [
    "EVENT_TYPES",
    "TARGET_BATCH",
    "TARGET_SERVER",
    "Outcome",
    "RetryRules",
    "add_event",
    "claim",
    "claim_in",
    "due_at",
    "event_body",
    "find_event_in",
    "new_event",
    "settle",
    "settle_in",
    "view",
    "view_of",
]

TARGET_SERVER = "server"
TARGET_BATCH = "batch"
#: OpenAI's batch webhook events, by the terminal status they announce.
EVENT_TYPES = {s: f"batch.{s}" for s in ("completed", "failed", "expired", "cancelled")}
#: Finished deliveries kept on the record (oldest dropped first): enough to show
#: what happened to a batch's events, bounded whatever happens.
MAX_DONE = 20


@dataclass(frozen=True)
class RetryRules:
    """How often and how long a failed delivery is tried again: exponential
    backoff from ``base_s`` doubling up to ``max_s`` with ±20% jitter (a receiver
    that came back is not hit by every replica's backlog at once), a
    ``Retry-After`` honoured up to ``max_s``, and given up after ``max_attempts``
    attempts or once the event is older than ``max_age_s`` (OpenAI retries for
    up to 72 hours)."""

    max_attempts: int = 80
    max_age_s: float = 72 * 3600.0
    base_s: float = 5.0
    max_s: float = 3600.0

    def delay_s(self, attempts: int, retry_after_s: float | None = None) -> float:
        """The wait after the ``attempts``-th failed attempt."""
        step = min(self.max_s, self.base_s * 2 ** min(max(attempts - 1, 0), 60))
        delay = step * random.uniform(0.8, 1.2)
        if retry_after_s is not None and retry_after_s > 0:
            delay = max(delay, min(retry_after_s, self.max_s))
        return delay


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to. ``sent``: the receiver answered 2xx. ``skipped``:
    nothing to send to (no URL configured for the target). ``final``: do not try
    again whatever the rules say (410 Gone: the receiver wants no more)."""

    sent: bool = False
    skipped: bool = False
    final: bool = False
    error: str | None = None
    retry_after_s: float | None = None


def new_event(
    state: dict[str, Any] | None, etype: str, targets: list[str], *, at: int, now: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of ``state`` with the event ``etype`` recorded and its deliveries to
    ``targets`` owed (due at once), and the event. For any record that keeps this
    state (a batch's ``webhook``, a console job's ``body["webhook_deliveries"]``,
    ``webhooks/jobs.py``); write it in the compare-and-set that makes the event true."""
    state = copy.deepcopy(state) if state else {}
    state.setdefault("events", [])
    state.setdefault("pending", [])
    state.setdefault("done", [])
    event = {"id": new_id("evt"), "type": etype, "created_at": int(at)}
    state["events"].append(event)
    for target in targets:
        state["pending"].append({"event": event["id"], "target": target, "attempts": 0, "next_at": float(now),
                                 "error": None})
    return state, event


def add_event(rec: BatchRecord, status: str, *, at: int, now: float) -> dict[str, Any] | None:
    """Record the ``batch.<status>`` event on ``rec`` and owe its deliveries
    (due at once). Call inside the compare-and-set that writes the status."""
    etype = EVENT_TYPES.get(status)
    if etype is None:
        return None
    targets = [TARGET_SERVER] + ([TARGET_BATCH] if (rec.options or {}).get("webhook") else [])
    rec.webhook, event = new_event(rec.webhook, etype, targets, at=at, now=now)
    return event


def event_body(batch_id: str, event: dict[str, Any]) -> bytes:
    """The delivery's JSON body, in OpenAI's shape; the same bytes on every attempt."""
    return orjson.dumps({
        "object": "event",
        "id": event["id"],
        "type": event["type"],
        "created_at": event["created_at"],
        "data": {"id": batch_id},
    })


def find_event(rec: BatchRecord, event_id: str) -> dict[str, Any] | None:
    return find_event_in(rec.webhook, event_id)


def find_event_in(state: dict[str, Any] | None, event_id: str) -> dict[str, Any] | None:
    for event in (state or {}).get("events") or ():
        if event.get("id") == event_id:
            return event
    return None


def claim(rec: BatchRecord, *, now: float, owner: str, hold_s: float) -> list[dict[str, Any]]:
    """Claim the deliveries of ``rec`` that are due (the first pending one of each
    target), in place: each gets ``next_at = now + hold_s``, so no one else sees it
    due until the claim lapses (its owner died mid-delivery). Returns copies of the
    claimed ones; write ``rec`` with compare-and-set for the claim to hold."""
    return claim_in(rec.webhook, now=now, owner=owner, hold_s=hold_s)


def claim_in(state: dict[str, Any] | None, *, now: float, owner: str, hold_s: float) -> list[dict[str, Any]]:
    """``claim`` on the state itself (in place)."""
    if not state:
        return []
    claimed = []
    seen: set[str] = set()
    for d in state.get("pending") or ():
        if d["target"] in seen:
            continue
        seen.add(d["target"])
        if d["next_at"] <= now:
            d["next_at"] = now + hold_s
            d["claimed_by"] = owner
            claimed.append(dict(d))
    return claimed


def settle(rec: BatchRecord, event_id: str, target: str, outcome: Outcome, *, now: float,
           rules: RetryRules) -> dict[str, Any] | None:
    """Apply one attempt's outcome to the pending delivery (in place): done when
    sent, skipped or given up on, else due again after the backoff. Returns the
    delivery as it now stands (with ``outcome`` when it is done), or None when it
    is no longer pending (another replica settled it after this one's claim lapsed)."""
    return settle_in(rec.webhook, event_id, target, outcome, now=now, rules=rules)


def settle_in(state: dict[str, Any] | None, event_id: str, target: str, outcome: Outcome, *, now: float,
              rules: RetryRules) -> dict[str, Any] | None:
    """``settle`` on the state itself (in place)."""
    state = state or {}
    pending = state.get("pending") or []
    for i, d in enumerate(pending):
        if d["event"] == event_id and d["target"] == target:
            break
    else:
        return None
    d = dict(d)
    d.pop("claimed_by", None)
    if outcome.skipped:
        done = {**d, "outcome": "skipped", "at": now}
    elif outcome.sent:
        done = {**d, "attempts": d["attempts"] + 1, "outcome": "delivered", "at": now, "error": None}
    else:
        d["attempts"] += 1
        d["error"] = outcome.error
        event = find_event_in(state, event_id) or {}
        deadline = float(event.get("created_at", now)) + rules.max_age_s
        next_at = now + rules.delay_s(d["attempts"], outcome.retry_after_s)
        if outcome.final or d["attempts"] >= rules.max_attempts or next_at > deadline:
            done = {**d, "outcome": "failed", "at": now}
        else:
            d["next_at"] = next_at
            pending[i] = d
            return d
    del pending[i]
    state.setdefault("done", []).append(done)
    del state["done"][:-MAX_DONE]
    return done


def view(rec: BatchRecord) -> list[dict[str, Any]]:
    """The batch's deliveries for its API object (``overnight.webhooks``): what was
    sent where, what is still owed and the last error. Deliveries skipped for want
    of a server URL are left out; the server's URL is never shown."""
    return view_of(rec.webhook)


def view_of(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``view`` of the state itself."""
    if not state:
        return []
    types = {e["id"]: e["type"] for e in state.get("events") or ()}
    out = []
    rows = [(d, d.get("outcome", "pending")) for d in state.get("done") or ()]
    rows += [(d, "pending") for d in state.get("pending") or ()]
    for d, status in rows:
        if status == "skipped":
            continue
        item: dict[str, Any] = {"event_id": d["event"], "type": types.get(d["event"]), "target": d["target"],
                                "status": status, "attempts": d["attempts"]}
        if status == "pending" and d["attempts"]:
            item["next_attempt_at"] = int(d["next_at"])
        if d.get("error"):
            item["last_error"] = d["error"]
        out.append(item)
    return out


def due_at(state: dict[str, Any] | None) -> float | None:
    """When the next delivery of ``state`` is due (None: none pending): the first
    pending one per target counts, as for a batch (``store.records.webhook_due_at``,
    which the stores index; a console job's is kept by ``webhooks/jobs.py``)."""
    due: float | None = None
    seen: set[str] = set()
    for d in (state or {}).get("pending") or ():
        if d["target"] in seen:
            continue
        seen.add(d["target"])
        at = float(d["next_at"])
        due = at if due is None else min(due, at)
    return due
