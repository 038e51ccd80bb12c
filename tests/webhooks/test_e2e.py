"""Webhooks through real processes: ``overnight serve`` (the built-in mock engine
unless a test names another) POSTing to receivers in this process that verify
every delivery, and look the batch up through the API when it arrives."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from overnight.webhooks import generate_secret
from tests.e2e.helpers import client_for, wait_status
from tests.factories import make_input_file, write_lines
from tests.webhooks.receiver import Receiver

SECRET = generate_secret()


def hook_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "OVERNIGHT_WEBHOOK_URL": receiver.url,
        "OVERNIGHT_WEBHOOK_SECRET": SECRET,
        "OVERNIGHT_WEBHOOK_POLL_S": "0.1",
        "OVERNIGHT_WEBHOOK_BACKOFF_BASE_S": "0.2",
        "OVERNIGHT_WEBHOOK_BACKOFF_MAX_S": "1",
        "OVERNIGHT_WEBHOOK_TIMEOUT_S": "5",
        **extra,
    }


def looker(api: dict[str, str]):  # type: ignore[no-untyped-def]
    """What a receiver sees through the API the moment a delivery arrives."""

    def look(event: dict[str, Any]) -> dict[str, Any]:
        b = httpx.get(f"{api['url']}/v1/batches/{event['data']['id']}", timeout=10).json()
        out = None
        if b.get("output_file_id"):
            r = httpx.get(f"{api['url']}/v1/files/{b['output_file_id']}/content", timeout=10)
            out = (r.status_code, len(r.content.splitlines()))
        return {"status": b["status"], "output": out}

    return look


def create(client: openai.OpenAI, path: Path, **kw: Any) -> Any:
    with path.open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    return client.batches.create(input_file_id=fobj.id, endpoint="/v1/chat/completions",
                                 completion_window=kw.pop("completion_window", "24h"), **kw)


def webhook_view(client: openai.OpenAI, batch_id: str) -> list[dict[str, Any]]:
    return (client.batches.retrieve(batch_id).model_extra.get("overnight") or {}).get("webhooks") or []


def wait_view(client: openai.OpenAI, batch_id: str, ok, timeout_s: float = 30.0) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = webhook_view(client, batch_id)
        if ok(view):
            return view
        time.sleep(0.05)
    raise AssertionError(f"webhooks of {batch_id}: {webhook_view(client, batch_id)}")


@pytest.mark.slow
def test_every_terminal_batch_is_one_verified_delivery_sent_once_it_is_readable(cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api: dict[str, str] = {}
    receiver = Receiver(SECRET, on_delivery=looker(api)).start()
    own_secret = generate_secret()
    own = Receiver(own_secret, path="/tenant/hook").start()
    try:
        slow = cluster.mock_engine("--latency-ms", "3000")
        server = cluster.server(engine_url=None, env=hook_env(receiver))
        api["url"] = server.url
        client = client_for(server.url)

        on_slow = {"overnight": {"runtime": {"endpoint": slow.url}}}
        completed = create(client, make_input_file(tmp_path / "ok.jsonl", 5), extra_body={
            "overnight": {"webhook_url": own.url, "webhook_secret": own_secret}})
        failed = create(client, write_lines(tmp_path / "bad.jsonl", ["not json"]))
        expired = create(client, make_input_file(tmp_path / "slow1.jsonl", 20), completion_window="1s",
                         extra_body=on_slow)
        cancelled = create(client, make_input_file(tmp_path / "slow2.jsonl", 20), extra_body=on_slow)
        wait_status(client, cancelled.id, {"in_progress"})
        client.batches.cancel(cancelled.id)
        expected = {completed.id: "completed", failed.id: "failed", expired.id: "expired",
                    cancelled.id: "cancelled"}
        for batch_id, status in expected.items():
            assert wait_status(client, batch_id, timeout_s=30).status == status

        got = receiver.wait_for(4)
        (mine,) = own.wait_for(1)
        time.sleep(1.5)  # nothing more arrives: one delivery per event
        assert len(receiver.deliveries) == 4 and len(own.deliveries) == 1
        assert not receiver.rejected and not own.rejected
        assert {d.event["data"]["id"]: d.event["type"] for d in got} == {
            b: f"batch.{s}" for b, s in expected.items()}
        for d in got:
            batch = client.batches.retrieve(d.event["data"]["id"])
            assert d.event["object"] == "event" and d.event["id"].startswith("evt_")
            assert d.headers["webhook-id"] == d.event["id"]
            assert d.headers["content-type"] == "application/json"
            assert d.headers["user-agent"].startswith("overnight/")
            assert d.event["created_at"] == getattr(batch, f"{batch.status}_at")
            # Sent only once the status (and for a completed batch its output) was readable.
            assert d.seen["status"] == batch.status
            if batch.status == "completed":
                assert d.seen["output"] == (200, 5)
            view = webhook_view(client, batch.id)
            assert {(v["target"], v["status"], v["attempts"]) for v in view} >= {("server", "delivered", 1)}
        assert mine.body == next(d.body for d in got if d.event["data"]["id"] == completed.id)
        assert {v["target"]: v["status"] for v in webhook_view(client, completed.id)} == {
            "server": "delivered", "batch": "delivered"}

        with pytest.raises(openai.BadRequestError) as err:
            create(client, make_input_file(tmp_path / "x.jsonl", 1),
                   extra_body={"overnight": {"webhook_url": "http://169.254.169.254/latest/meta-data"}})
        assert err.value.body["param"] == "overnight.webhook_url"
        assert err.value.body["code"] == "webhook_url_not_allowed"
    finally:
        receiver.close()
        own.close()


@pytest.mark.slow
def test_a_receiver_that_is_down_then_failing_gets_the_event_once_it_is_back(cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(SECRET).start()
    try:
        server = cluster.server(engine_url=None, env=hook_env(receiver))
        client = client_for(server.url)
        receiver.down()  # connections refused
        b = create(client, make_input_file(tmp_path / "in.jsonl", 3))
        assert wait_status(client, b.id).status == "completed"
        view = wait_view(client, b.id, lambda v: v and v[0]["attempts"] >= 2)
        assert view[0]["status"] == "pending" and "cannot connect" in view[0]["last_error"]
        receiver.fail_with = 500
        receiver.up()  # answering, but 500
        deadline = time.monotonic() + 20
        while len(receiver.attempts) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert wait_view(client, b.id, lambda v: v[0].get("last_error") == "HTTP 500")
        receiver.fail_with = None
        (got,) = receiver.wait_for(1)
        (done,) = wait_view(client, b.id, lambda v: v[0]["status"] == "delivered")
        time.sleep(1.0)
        assert len(receiver.deliveries) == 1 and not receiver.rejected
        assert got.event["data"]["id"] == b.id and got.event["type"] == "batch.completed"
        failed_500 = sum(1 for status, _ in receiver.attempts if status == 500)
        assert failed_500 >= 2 and done["attempts"] >= failed_500 + 3  # 2+ refused, 2+ answered 500, 1 ok
        assert {h["webhook-id"] for _, h in receiver.attempts} == {got.event["id"]}
        assert "attempt 1 failed" in server.log() and "delivered (attempt" in server.log()
    finally:
        receiver.close()


@pytest.mark.slow
def test_a_pending_delivery_is_sent_after_the_service_restarts(cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(SECRET).start()
    try:
        env = hook_env(receiver)
        server = cluster.server(engine_url=None, env=env)
        client = client_for(server.url)
        receiver.down()
        b = create(client, make_input_file(tmp_path / "in.jsonl", 3))
        assert wait_status(client, b.id).status == "completed"
        wait_view(client, b.id, lambda v: v and v[0]["attempts"] >= 1)
        server.signal(signal.SIGKILL)
        receiver.up()
        time.sleep(0.5)
        assert receiver.deliveries == []  # nobody is left to send it
        again = cluster.server(engine_url=None, env=env)
        (got,) = receiver.wait_for(1, timeout_s=40)
        assert got.event["data"]["id"] == b.id and not receiver.rejected
        client = client_for(again.url)
        wait_view(client, b.id, lambda v: v[0]["status"] == "delivered")
        time.sleep(1.0)
        assert len(receiver.deliveries) == 1
    finally:
        receiver.close()
