"""The whole flow through real processes and the official openai SDK."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.helpers import (
    assert_exactly_once,
    client_for,
    mock_stats,
    results,
    wait_progress,
    wait_status,
)
from tests.factories import make_input_file, request_line, write_lines

# Real processes end to end: the slow CI step (the default run stays short on 2 cores).
pytestmark = pytest.mark.slow


@pytest.fixture
def engine(cluster):
    return cluster.mock_engine("--latency-ms", "5")


@pytest.fixture
def server(cluster, engine):
    return cluster.server(engine_url=engine.url)


def upload(client, path: Path, purpose: str = "batch"):
    with path.open("rb") as f:
        return client.files.create(file=f, purpose=purpose)


def test_full_flow_chat_completions(server, engine, tmp_path):
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 200))
    assert f.object == "file" and f.purpose == "batch" and f.bytes == (tmp_path / "in.jsonl").stat().st_size
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"team": "a"}
    )
    assert b.status == "validating" and b.metadata == {"team": "a"} and b.endpoint == "/v1/chat/completions"
    b = wait_status(client, b.id)
    assert b.status == "completed", b
    assert b.request_counts.total == 200 and b.request_counts.completed == 200 and b.request_counts.failed == 0
    assert b.model == "mock-model"
    assert b.usage.input_tokens > 0 and b.usage.output_tokens == 200 * 16
    assert b.usage.total_tokens == b.usage.input_tokens + b.usage.output_tokens
    assert b.error_file_id is None
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(200)})
    line = out[0]
    assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
    assert line["id"].startswith("batch_req_")
    assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
    assert line["response"]["body"]["object"] == "chat.completion"
    assert len({row["id"] for row in out}) == 200
    out_file = client.files.retrieve(b.output_file_id)
    assert out_file.purpose == "batch_output"
    assert mock_stats(engine.url)["received_total"] == 200


@pytest.mark.parametrize("endpoint", ["/v1/embeddings", "/v1/completions", "/v1/responses"])
def test_other_endpoints_complete(server, tmp_path, endpoint):
    client = client_for(server.url)
    if endpoint == "/v1/responses":
        lines = [{"custom_id": f"r{i}", "method": "POST", "url": endpoint, "body": {"model": "m", "input": f"hi {i}"}}
                 for i in range(20)]
        path = write_lines(tmp_path / "in.jsonl", lines)
    else:
        path = make_input_file(tmp_path / "in.jsonl", 20, endpoint=endpoint)
    f = upload(client, path)
    b = wait_status(client, client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h").id)
    assert b.status == "completed" and b.request_counts.completed == 20
    out, err = results(client, b)
    assert len(out) == 20 and not err
    assert b.usage.input_tokens > 0


def test_statuses_and_timestamps(server, tmp_path):
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 50))
    created = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait_status(client, created.id)
    assert b.status == "completed"
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    assert b.expires_at == b.created_at + 24 * 3600
    assert b.failed_at is None and b.cancelled_at is None and b.expired_at is None and b.cancelling_at is None


def test_engine_failures_are_retried_and_every_id_lands_once(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "2", "--fail-rate", "0.3", "--seed", "7")
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    lines = [request_line(i) for i in range(300)]
    # Scripted: fails twice with 500 then succeeds; a 400 the engine answers is final.
    lines[5] = request_line(5, content="flaky [[mock:fail_times=2]]")
    lines[6] = request_line(6, content="bad [[mock:status=400]]")
    f = upload(client, write_lines(tmp_path / "in.jsonl", lines))
    b = wait_status(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h").id)
    assert b.status == "completed"
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(300)})
    by_id = {row["custom_id"]: row for row in out + err}
    assert by_id["req-5"]["response"]["status_code"] == 200
    assert by_id["req-6"]["response"]["status_code"] == 400
    assert by_id["req-6"]["response"]["body"]["error"]["message"]
    assert b.request_counts.failed == len(err) and b.request_counts.completed == len(out)
    # With a 30% failure rate and up to 5 attempts, retries happened and nearly all succeed.
    assert mock_stats(engine.url)["received_total"] > 300
    assert len(err) < 10


def test_cancel_mid_run_keeps_finished_and_errors_the_rest(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "100", "--max-concurrency", "8")
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 400))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_body={"overnight": {"max_concurrency": 8}})
    wait_progress(client, b.id, 20)
    c = client.batches.cancel(b.id)
    assert c.status in ("cancelling", "cancelled")
    b = wait_status(client, b.id, timeout_s=20)
    assert b.status == "cancelled" and b.cancelling_at and b.cancelled_at
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(400)})
    assert 20 <= len(out) < 400
    cancelled = [row for row in err if row["error"] and row["error"]["code"] == "batch_cancelled"]
    assert len(cancelled) == len(err) and len(err) == 400 - len(out)
    assert cancelled[0]["response"] is None
    assert b.request_counts.completed == len(out) and b.request_counts.failed == len(err)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(b.id)


def test_expiry_with_short_window(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "200", "--max-concurrency", "4")
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 300))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="2s",
                              extra_body={"overnight": {"max_concurrency": 4}})
    assert b.expires_at == b.created_at + 2
    b = wait_status(client, b.id, timeout_s=30)
    assert b.status == "expired" and b.expired_at
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(300)})
    assert len(out) > 0
    assert all(row["error"]["code"] == "batch_expired" for row in err)


def test_list_pagination(server, tmp_path):
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 3))
    ids = [client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
           for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    page2 = client.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in page2.data] == ids[::-1][2:4] and page2.has_more
    page3 = client.batches.list(limit=2, after=page2.data[-1].id)
    assert [b.id for b in page3.data] == ids[:1] and not page3.has_more
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # SDK auto-pagination
    raw = httpx.get(server.url + "/v1/batches", params={"limit": 2}, headers={"Authorization": "Bearer test-key"}).json()
    assert raw["first_id"] == ids[-1] and raw["last_id"] == ids[-2] and raw["has_more"] is True
    files = [upload(client, make_input_file(tmp_path / f"f{i}.jsonl", 1)).id for i in range(3)]
    listed = client.files.list(purpose="batch", limit=2)
    assert [x.id for x in listed.data] == [files[2], files[1]]
    asc = client.files.list(purpose="batch", order="asc")
    assert [x.id for x in asc.data][:1] == [f.id]


def test_file_delete_and_content(server, tmp_path):
    client = client_for(server.url)
    path = make_input_file(tmp_path / "in.jsonl", 3)
    f = upload(client, path)
    assert client.files.content(f.id).content == path.read_bytes()
    deleted = client.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(f.id)


def test_deleting_input_of_running_batch_is_refused(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "100", "--max-concurrency", "2")
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 100))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.ConflictError) as exc:
        client.files.delete(f.id)
    assert b.id in str(exc.value)
    client.batches.cancel(b.id)
    wait_status(client, b.id)
    assert client.files.delete(f.id).deleted


def test_other_tenant_sees_nothing(cluster, engine, tmp_path):
    # Tenants exist only with configured keys (open mode is one shared tenant).
    server = cluster.server(engine_url=engine.url, env={"OVERNIGHT_API_KEYS": "ka:alice,kb:bob"})
    alice, bob = client_for(server.url, "ka"), client_for(server.url, "kb")
    f = upload(alice, make_input_file(tmp_path / "in.jsonl", 2))
    b = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(b.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert bob.batches.list().data == [] and bob.files.list().data == []


def test_runtime_extension_routes_to_another_engine(cluster, engine, server, tmp_path):
    other = cluster.mock_engine("--latency-ms", "1", "--model", "other")
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 30))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_body={"aibrix": {"runtime": {"endpoint": other.url}, "job_id": "j1", "priority": 5}})
    assert wait_status(client, b.id).status == "completed"
    assert mock_stats(other.url)["received_total"] == 30
    assert mock_stats(engine.url)["received_total"] == 0


def test_restart_keeps_files_and_batches(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "1")
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 10))
    b = wait_status(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h").id)
    # uvicorn re-raises SIGTERM after a clean shutdown, so -15 is a graceful exit too.
    assert server.signal(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()
    server2 = cluster.server(engine_url=engine.url, port=server.port)
    client2 = client_for(server2.url)
    assert client2.batches.retrieve(b.id).status == "completed"
    assert client2.files.retrieve(f.id).bytes == f.bytes
    out, err = results(client2, client2.batches.retrieve(b.id))
    assert len(out) == 10


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_mid_batch_then_restart_resumes_exactly_once(cluster, tmp_path, sig):
    window = 16
    engine = cluster.mock_engine("--latency-ms", "20")
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    n = 2000
    f = upload(client, make_input_file(tmp_path / "in.jsonl", n))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_body={"overnight": {"max_concurrency": window}})
    wait_progress(client, b.id, n // 3)
    server.signal(sig)
    sent_before = mock_stats(engine.url)["received_total"]
    assert sent_before < n
    server2 = cluster.server(engine_url=engine.url)
    client2 = client_for(server2.url)
    b = wait_status(client2, b.id, timeout_s=60)
    assert b.status == "completed", b
    out, err = results(client2, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    assert not err
    resent = mock_stats(engine.url)["received_total"] - n
    assert resent <= window, f"{resent} requests re-sent; the in-flight window was {window}"


def test_validate_on_create_rejects_synchronously(cluster, engine, tmp_path):
    server = cluster.server(engine_url=engine.url, env={"OVERNIGHT_VALIDATE_ON_CREATE": "true"})
    client = client_for(server.url)
    f = upload(client, write_lines(tmp_path / "in.jsonl", [request_line(0), {"custom_id": "x"}]))
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert exc.value.body["line"] == 2 and exc.value.body["code"] == "invalid_method"
    assert client.batches.list().data == []
    ok = upload(client, make_input_file(tmp_path / "ok.jsonl", 5))
    b = client.batches.create(input_file_id=ok.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.request_counts.total == 5 and b.model == "mock-model"
    assert wait_status(client, b.id).status == "completed"


def test_mock_engine_inside_the_service(cluster, tmp_path):
    server = cluster.server(engine_url="mock", env={"OVERNIGHT_MOCK_LATENCY_MS": "1"})
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 20))
    b = wait_status(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h").id)
    assert b.status == "completed" and b.request_counts.completed == 20
    assert [m.id for m in client.models.list().data] == ["mock-model"]


def test_several_batches_run_at_once(cluster, tmp_path):
    engine = cluster.mock_engine("--latency-ms", "50")
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    ids = []
    for k in range(3):
        f = upload(client, make_input_file(tmp_path / f"in{k}.jsonl", 100))
        ids.append(client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h", extra_body={"overnight": {"max_concurrency": 4}}).id)
    for bid in ids:
        assert wait_status(client, bid).status == "completed"
    # Each batch is capped at 4 in flight: more than 4 at the engine at once means the
    # batches ran side by side.
    assert mock_stats(engine.url)["max_running_seen"] > 4


def test_engine_outage_then_recovery_loses_nothing(cluster, tmp_path):
    from tests.conftest import free_port

    port = free_port()
    server = cluster.server(engine_url=f"http://127.0.0.1:{port}")
    client = client_for(server.url)
    f = upload(client, make_input_file(tmp_path / "in.jsonl", 100))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_status(client, b.id, {"in_progress"})
    __import__("time").sleep(1.5)  # the engine is down: nothing may be written off as failed
    b = client.batches.retrieve(b.id)
    assert b.status == "in_progress" and b.request_counts.failed == 0 and b.request_counts.completed == 0
    engine = cluster.mock_engine("--latency-ms", "1", port=port)
    b = wait_status(client, b.id, timeout_s=30)
    assert b.status == "completed" and b.request_counts.completed == 100
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(100)})
    assert mock_stats(engine.url)["received_total"] >= 100
