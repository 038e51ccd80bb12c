"""The delivery loop in process, on a real SQLite store and real HTTP receivers:
several replicas deliver each event once, failures are retried, a shutdown hands
its claims back, and what cannot be sent is given up on and logged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from overnight.batches.service import transition
from overnight.batches.states import BatchStatus
from overnight.runtimes.egress import EndpointPolicy
from overnight.secret_box import SecretBox
from overnight.store import connect_store
from overnight.store.base import Store
from overnight.webhooks import generate_secret
from overnight.webhooks.config import SEALED_SECRET, WebhookConfig
from overnight.webhooks.dispatcher import WebhookDispatcher
from overnight.webhooks.signing import parse_secrets
from overnight.webhooks.state import RetryRules
from tests.factories import fake_dns
from tests.store.contract import make_batch
from tests.webhooks.receiver import Receiver

SECRET = generate_secret()
FAST = RetryRules(max_attempts=6, max_age_s=600.0, base_s=0.1, max_s=0.3)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = connect_store(f"sqlite:///{tmp_path / 'overnight.db'}")
    await s.open()
    yield s
    await s.aclose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET).start()
    yield r
    r.close()


def config(url: str | None, **kw: object) -> WebhookConfig:
    base: dict[str, object] = {"url": url, "keys": parse_secrets(SECRET), "retry": FAST, "timeout_s": 2.0,
                               "poll_s": 0.05}
    return WebhookConfig(**{**base, **kw})  # type: ignore[arg-type]


async def finished(store: Store, status: BatchStatus = BatchStatus.FAILED, **kw: object) -> str:
    rec = make_batch(status="validating", **kw)
    await store.insert_batch(rec)
    if status is BatchStatus.CANCELLED:
        await transition(store, rec.id, BatchStatus.CANCELLING)
    await transition(store, rec.id, status)
    return rec.id


async def settled(store: Store, batch_id: str, timeout_s: float = 15.0) -> list[dict]:
    """The batch's finished deliveries, once none is pending."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = await store.get_batch(batch_id)
        assert rec is not None and rec.webhook is not None
        if not rec.webhook["pending"]:
            return rec.webhook["done"]
        await asyncio.sleep(0.05)
    raise AssertionError(f"still pending: {rec.webhook}")


async def running(*dispatchers: WebhookDispatcher) -> None:
    for d in dispatchers:
        await d.start()


async def test_three_replicas_deliver_every_event_exactly_once(store: Store, receiver: Receiver) -> None:
    replicas = [WebhookDispatcher(store=store, config=config(receiver.url), secrets=None, replica_id=f"r{i}")
                for i in range(3)]
    await running(*replicas)
    try:
        ids = [await finished(store, s) for s in [BatchStatus.FAILED, BatchStatus.CANCELLED] * 10]
        got = await receiver.arrived(len(ids))
        for batch_id in ids:
            assert [d["outcome"] for d in await settled(store, batch_id)] == ["delivered"]
        await asyncio.sleep(0.5)  # nothing more arrives
    finally:
        for d in replicas:
            await d.stop()
    assert len(receiver.deliveries) == len(ids) and not receiver.rejected
    assert Counter(d.event["data"]["id"] for d in got) == Counter(ids)
    assert len({d.headers["webhook-id"] for d in got}) == len(ids)
    claimed_by = Counter()
    for batch_id in ids:
        rec = await store.get_batch(batch_id)
        claimed_by[rec.webhook["done"][0].get("claimed_by", "-")] += 1
    assert set(claimed_by) == {"-"}  # claims never linger on finished deliveries


async def test_a_failing_receiver_gets_the_same_event_again_until_it_answers(
    store: Store, receiver: Receiver
) -> None:
    receiver.fail_with = 500
    d = WebhookDispatcher(store=store, config=config(receiver.url), secrets=None, replica_id="r")
    await d.start()
    try:
        batch_id = await finished(store, BatchStatus.FAILED)
        deadline = time.monotonic() + 10
        while len(receiver.attempts) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        receiver.fail_with = None
        (got,) = await receiver.arrived(1)
        (done,) = await settled(store, batch_id)
    finally:
        await d.stop()
    assert done["outcome"] == "delivered" and done["attempts"] == len(receiver.attempts) >= 4
    ids = {h["webhook-id"] for _, h in receiver.attempts}
    assert ids == {got.event["id"]}  # the same id on every attempt: receivers dedupe on it
    assert got.event["type"] == "batch.failed" and got.event["data"]["id"] == batch_id


async def test_gone_is_given_up_at_once_and_logged(store: Store, receiver: Receiver,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    receiver.fail_with = 410
    d = WebhookDispatcher(store=store, config=config(receiver.url), secrets=None, replica_id="r")
    await d.start()
    try:
        with caplog.at_level(logging.ERROR, logger="overnight.webhooks"):
            batch_id = await finished(store)
            (done,) = await settled(store, batch_id)
    finally:
        await d.stop()
    assert (done["outcome"], done["attempts"], done["error"]) == ("failed", 1, "HTTP 410")
    assert len(receiver.attempts) == 1
    assert any("given up after 1 attempts: HTTP 410" in r.getMessage() for r in caplog.records)


async def test_a_receiver_that_never_answers_is_given_up_after_max_attempts(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    down = Receiver(SECRET).start()
    url = down.url
    down.close()  # the port refuses connections
    d = WebhookDispatcher(store=store, config=config(url), secrets=None, replica_id="r")
    await d.start()
    try:
        with caplog.at_level(logging.WARNING, logger="overnight.webhooks"):
            batch_id = await finished(store)
            (done,) = await settled(store, batch_id)
    finally:
        await d.stop()
    assert done["outcome"] == "failed" and done["attempts"] == FAST.max_attempts
    assert "cannot connect" in done["error"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum(": attempt " in m for m in messages) == FAST.max_attempts - 1
    assert any("given up after 6 attempts" in m for m in messages)
    assert await store.list_webhooks_due(now=time.time() + 10**6) == []


async def test_with_no_url_nothing_is_sent_and_nothing_stays_owed(store: Store, receiver: Receiver) -> None:
    d = WebhookDispatcher(store=store, config=config(None), secrets=None, replica_id="r")
    await d.start()
    try:
        batch_id = await finished(store)
        (done,) = await settled(store, batch_id)
    finally:
        await d.stop()
    assert done["outcome"] == "skipped" and receiver.attempts == []
    assert await store.list_webhooks_due(now=time.time() + 10**6) == []


async def test_a_batch_url_gets_its_own_secrets_signature(store: Store, receiver: Receiver) -> None:
    own_secret = generate_secret()
    own = Receiver(own_secret, path="/tenant/hook").start()
    box = SecretBox("_" * 43 + "=")
    try:
        hook = {"url": own.url, SEALED_SECRET: box.seal(own_secret)}
        d = WebhookDispatcher(store=store, config=config(receiver.url), secrets=box, replica_id="r")
        await d.start()
        try:
            batch_id = await finished(store, BatchStatus.CANCELLED, options={"webhook": hook})
            (mine,) = await own.arrived(1)
            (servers,) = await receiver.arrived(1)
            done = await settled(store, batch_id)
        finally:
            await d.stop()
    finally:
        own.close()
    assert mine.body == servers.body and mine.event["type"] == "batch.cancelled"
    assert not own.rejected and not receiver.rejected  # each verified with its own secret only
    assert sorted((x["target"], x["outcome"]) for x in done) == [("batch", "delivered"), ("server", "delivered")]


async def test_a_batch_url_the_policy_now_refuses_is_not_sent_to(store: Store, receiver: Receiver) -> None:
    cfg = config(None, policy=EndpointPolicy("none", setting="OVERNIGHT_ALLOWED_WEBHOOK_URLS"),
                 retry=RetryRules(max_attempts=2, max_age_s=60, base_s=0.05, max_s=0.05))
    d = WebhookDispatcher(store=store, config=cfg, secrets=None, replica_id="r")
    await d.start()
    try:
        batch_id = await finished(store, options={"webhook": {"url": receiver.url}})
        done = {x["target"]: x for x in await settled(store, batch_id)}
    finally:
        await d.stop()
    assert done["batch"]["outcome"] == "failed"
    assert "OVERNIGHT_ALLOWED_WEBHOOK_URLS" in done["batch"]["error"] and receiver.attempts == []


async def test_a_batch_url_is_connected_to_at_the_address_its_check_found(
        store: Store, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    # hook.test resolves only through the policy's lookup (patched): the system
    # resolver knows no such name, so a delivery arrives only if the POST goes to the
    # address the check found; the receiver still sees the name in Host. Once the
    # name points at the metadata service, nothing is sent (DNS rebinding).
    table = {"hook.test": ["127.0.0.1"]}
    fake_dns(monkeypatch, table)
    cfg = config(None, policy=EndpointPolicy("*.test", keyed=True, setting="OVERNIGHT_ALLOWED_WEBHOOK_URLS"),
                 retry=RetryRules(max_attempts=2, max_age_s=60, base_s=0.05, max_s=0.05))
    d = WebhookDispatcher(store=store, config=cfg, secrets=None, replica_id="r")
    url = f"http://hook.test:{receiver.port}{receiver.path}"
    await d.start()
    try:
        first = await finished(store, options={"webhook": {"url": url}})
        (got,) = await receiver.arrived(1)
        assert {x["target"]: x["outcome"] for x in await settled(store, first)}["batch"] == "delivered"
        table["hook.test"] = ["169.254.169.254"]
        second = await finished(store, options={"webhook": {"url": url}})
        done = {x["target"]: x for x in await settled(store, second)}["batch"]
    finally:
        await d.stop()
    assert got.event["type"] == "batch.failed" and got.event["data"]["id"] == first
    assert receiver.attempts[0][1]["host"] == f"hook.test:{receiver.port}" and len(receiver.attempts) == 1
    assert done["outcome"] == "failed" and "cloud-metadata" in done["error"], done


async def test_stopping_mid_delivery_hands_the_claim_back(store: Store) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            release.wait(10)
            self.send_response(200)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        d = WebhookDispatcher(store=store, config=config(url, timeout_s=5.0), secrets=None, replica_id="r")
        await d.start()
        batch_id = await finished(store)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            rec = await store.get_batch(batch_id)
            if rec.webhook["pending"][0].get("claimed_by") == "r":
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("never claimed")
        assert await store.list_webhooks_due(now=time.time()) == []  # held by the claim
        await d.stop()
        rec = await store.get_batch(batch_id)
        (pending,) = rec.webhook["pending"]
        assert "claimed_by" not in pending and pending["next_at"] <= time.time()
        assert [r.id for r in await store.list_webhooks_due(now=time.time())] == [batch_id]
    finally:
        release.set()
        server.shutdown()
        server.server_close()
