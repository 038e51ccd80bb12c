"""The webhook state on a batch record: the event is added in the terminal
compare-and-set and nowhere else; claims, outcomes, backoff and giving up."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from overnight.batches.service import transition
from overnight.batches.states import BatchStatus
from overnight.store.memory import MemoryStore
from overnight.store.records import webhook_due_at
from overnight.webhooks import state
from overnight.webhooks.state import MAX_DONE, Outcome, RetryRules
from tests.store.contract import make_batch

S = BatchStatus
PATHS = {
    "completed": [S.IN_PROGRESS, S.FINALIZING, S.COMPLETED],
    "failed": [S.FAILED],
    "expired": [S.IN_PROGRESS, S.EXPIRED],
    "cancelled": [S.CANCELLING, S.CANCELLED],
}
NO_JITTER = RetryRules(max_attempts=5, max_age_s=1000.0, base_s=10.0, max_s=50.0)


@pytest.fixture(autouse=True)
def _no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state.random, "uniform", lambda a, b: 1.0)


@pytest.mark.parametrize("final", sorted(PATHS))
async def test_only_the_terminal_transition_adds_the_event_in_the_same_write(final: str) -> None:
    store = MemoryStore()
    rec = make_batch(status="validating", options={"webhook": {"url": "http://h/x"}})
    await store.insert_batch(rec)
    versions = []
    for to in PATHS[final]:
        before = await store.get_batch(rec.id)
        assert before is not None and before.webhook is None  # nothing is owed before the end
        after = await transition(store, rec.id, to, now=1_700_000_000)
        versions.append(after.version)
    assert versions == list(range(1, len(PATHS[final]) + 1))  # one write per status, no extra one
    stored = await store.get_batch(rec.id)
    assert stored is not None and stored.status == final
    (event,) = stored.webhook["events"]
    assert event["type"] == f"batch.{final}" and event["id"].startswith("evt_")
    assert event["created_at"] == getattr(stored, f"{final}_at") == 1_700_000_000
    assert [(d["event"], d["target"], d["attempts"]) for d in stored.webhook["pending"]] == [
        (event["id"], "server", 0), (event["id"], "batch", 0)]
    assert [r.id for r in await store.list_webhooks_due(now=10**10)] == [rec.id]


async def test_a_batch_without_its_own_url_owes_the_server_url_only() -> None:
    store = MemoryStore()
    rec = make_batch(status="validating")
    await store.insert_batch(rec)
    done = await transition(store, rec.id, S.FAILED)
    assert [d["target"] for d in done.webhook["pending"]] == ["server"]


def test_the_body_is_openais_event_shape() -> None:
    event = {"id": "evt_1", "type": "batch.expired", "created_at": 1_700_000_123}
    assert orjson.loads(state.event_body("batch_9", event)) == {
        "object": "event", "id": "evt_1", "type": "batch.expired", "created_at": 1_700_000_123,
        "data": {"id": "batch_9"},
    }


def owed(*targets: str, at: float = 100.0) -> object:
    rec = make_batch(status="completed", options={"webhook": {"url": "http://h/x"}})
    state.add_event(rec, "completed", at=int(at), now=at)
    rec.webhook["pending"] = [d for d in rec.webhook["pending"] if d["target"] in targets]
    return rec


def test_a_claim_holds_the_delivery_until_it_lapses() -> None:
    rec = owed("server", "batch")
    claimed = state.claim(rec, now=100.0, owner="a", hold_s=30.0)
    assert [(d["target"], d["claimed_by"]) for d in claimed] == [("server", "a"), ("batch", "a")]
    assert webhook_due_at(rec) == 130.0
    assert state.claim(rec, now=129.9, owner="b", hold_s=30.0) == []
    assert [d["claimed_by"] for d in state.claim(rec, now=130.0, owner="b", hold_s=30.0)] == ["b", "b"]


def test_a_targets_deliveries_go_one_at_a_time_in_order() -> None:
    rec = owed("server")
    first = rec.webhook["pending"][0]["event"]
    state.add_event(rec, "completed", at=101, now=101.0)  # a second event (the server target again)
    rec.webhook["pending"] = [d for d in rec.webhook["pending"] if d["target"] == "server"]
    second = rec.webhook["pending"][1]["event"]
    assert [d["event"] for d in state.claim(rec, now=200.0, owner="a", hold_s=30.0)] == [first]
    assert webhook_due_at(rec) == 230.0  # the second waits behind the claimed first
    state.settle(rec, first, "server", Outcome(sent=True), now=201.0, rules=NO_JITTER)
    assert [d["event"] for d in state.claim(rec, now=201.0, owner="a", hold_s=30.0)] == [second]


def test_sent_skipped_and_failed_outcomes() -> None:
    rec = owed("server", "batch")
    evt = rec.webhook["events"][0]["id"]
    done = state.settle(rec, evt, "server", Outcome(skipped=True), now=101.0, rules=NO_JITTER)
    assert done is not None and done["outcome"] == "skipped" and done["attempts"] == 0
    failed = state.settle(rec, evt, "batch", Outcome(error="HTTP 500"), now=101.0, rules=NO_JITTER)
    assert failed is not None and "outcome" not in failed
    assert (failed["attempts"], failed["next_at"], failed["error"]) == (1, 111.0, "HTTP 500")
    sent = state.settle(rec, evt, "batch", Outcome(sent=True), now=112.0, rules=NO_JITTER)
    assert sent is not None and (sent["outcome"], sent["attempts"], sent["error"]) == ("delivered", 2, None)
    assert rec.webhook["pending"] == [] and webhook_due_at(rec) is None
    # Settling what is no longer pending (another replica finished it) changes nothing.
    assert state.settle(rec, evt, "batch", Outcome(sent=True), now=113.0, rules=NO_JITTER) is None


def test_backoff_doubles_up_to_its_cap_and_honours_retry_after() -> None:
    rules = RetryRules(max_attempts=100, max_age_s=10**9, base_s=10.0, max_s=50.0)
    assert [rules.delay_s(n) for n in range(1, 6)] == [10.0, 20.0, 40.0, 50.0, 50.0]
    assert rules.delay_s(1, retry_after_s=30.0) == 30.0
    assert rules.delay_s(1, retry_after_s=9999.0) == 50.0  # a Retry-After cannot park it forever
    assert rules.delay_s(3, retry_after_s=1.0) == 40.0


def test_jitter_stays_within_a_fifth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    rules = RetryRules(base_s=10.0, max_s=100.0)
    delays = {rules.delay_s(2) for _ in range(200)}
    assert min(delays) >= 16.0 and max(delays) <= 24.0 and len(delays) > 100


@pytest.mark.parametrize(
    ("rules", "outcome", "attempts_until_given_up"),
    [
        (RetryRules(max_attempts=3, max_age_s=10**9, base_s=1.0, max_s=1.0), Outcome(error="HTTP 500"), 3),
        # Attempts at 0, 10, 30 and 70 s: a fifth, 80 s after the fourth, would be past 100 s of age.
        (RetryRules(max_attempts=100, max_age_s=100.0, base_s=10.0, max_s=1000.0), Outcome(error="refused"), 4),
        (NO_JITTER, Outcome(error="HTTP 410", final=True), 1),
    ],
)
def test_giving_up(rules: RetryRules, outcome: Outcome, attempts_until_given_up: int) -> None:
    rec = owed("batch", at=0.0)
    evt = rec.webhook["events"][0]["id"]
    now = 0.0
    for attempt in range(1, attempts_until_given_up + 1):
        d = state.settle(rec, evt, "batch", outcome, now=now, rules=rules)
        assert d is not None and d["attempts"] == attempt
        if attempt < attempts_until_given_up:
            assert "outcome" not in d
            now = d["next_at"]
    assert d["outcome"] == "failed" and d["error"] == outcome.error
    assert rec.webhook["pending"] == [] and rec.webhook["done"][-1] == d


def test_the_done_list_is_bounded() -> None:
    rec = owed("server")
    for i in range(MAX_DONE + 5):
        state.add_event(rec, "completed", at=100 + i, now=100.0)
        evt = rec.webhook["events"][-1]["id"]
        for d in [d for d in rec.webhook["pending"] if d["event"] == evt]:
            state.settle(rec, evt, d["target"], Outcome(sent=True), now=101.0, rules=NO_JITTER)
    assert len(rec.webhook["done"]) == MAX_DONE


def test_the_api_view_hides_skipped_deliveries_and_shows_what_is_owed() -> None:
    rec = owed("server", "batch")
    evt = rec.webhook["events"][0]["id"]
    state.settle(rec, evt, "server", Outcome(skipped=True), now=101.0, rules=NO_JITTER)
    state.settle(rec, evt, "batch", Outcome(error="HTTP 503"), now=101.0, rules=NO_JITTER)
    assert state.view(rec) == [{"event_id": evt, "type": "batch.completed", "target": "batch", "status": "pending",
                                "attempts": 1, "next_attempt_at": 111, "last_error": "HTTP 503"}]
    assert state.view(dataclasses.replace(rec, webhook=None)) == []
