"""Every input rule, with the line it names; create-time errors; bad bytes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.helpers import client_for, wait_status
from tests.factories import make_input_file, request_line, write_lines

# Real processes end to end: the slow CI step (the default run stays short on 2 cores).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(module_cluster):
    return module_cluster.mock_engine("--latency-ms", "1")


@pytest.fixture(scope="module")
def server(module_cluster, engine):
    return module_cluster.server(engine_url=engine.url, env={"OVERNIGHT_MAX_REQUESTS_PER_FILE": "50"})


@pytest.fixture
def client(server):
    return client_for(server.url)


def run_lines(client, tmp_path: Path, lines, endpoint="/v1/chat/completions"):
    path = write_lines(tmp_path / "in.jsonl", lines)
    with path.open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    b = client.batches.create(input_file_id=fobj.id, endpoint=endpoint, completion_window="24h")
    return wait_status(client, b.id, timeout_s=30)


def first_error(batch):
    assert batch.status == "failed", batch
    assert batch.failed_at and batch.errors and batch.errors.data
    return batch.errors.data[0]


GOOD = request_line(0)


@pytest.mark.parametrize(
    ("bad", "code", "param", "needle"),
    [
        (b"{not json", "invalid_json_line", None, "not valid JSON"),
        (b"[1, 2, 3]", "invalid_json_line", None, "must be a JSON object"),
        (b'"just a string"', "invalid_json_line", None, "must be a JSON object"),
        ({"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}, "missing_required_parameter", "custom_id", "custom_id"),
        ({**request_line(9), "custom_id": 5}, "invalid_type", "custom_id", "custom_id"),
        ({**request_line(9), "method": "GET"}, "invalid_method", "method", "POST"),
        ({**request_line(9), "url": "/v1/embeddings"}, "invalid_url", "url", "/v1/chat/completions"),
        ({**request_line(9), "body": "text"}, "invalid_request", "body", "'body' must be a JSON object"),
        ({**request_line(9), "body": {"messages": []}}, "missing_required_parameter", "body.model", "body.model"),
        (request_line(9, model="other"), "mismatched_model", "body.model", "same model"),
        (request_line(9, stream=True), "invalid_request", "body.stream", "stream"),
        (request_line(0), "duplicate_custom_id", "custom_id", "line 1"),
        (b"", "empty_line", None, "empty"),
        (b"\xff\xfe{bad bytes", "invalid_encoding", None, "UTF-8"),
    ],
)
def test_bad_line_fails_batch_naming_the_line(client, tmp_path, bad, code, param, needle):
    lines = [GOOD, request_line(1), bad, request_line(3)]
    err = first_error(run_lines(client, tmp_path, lines))
    assert err.code == code
    assert err.line == 3
    assert err.param == param
    assert needle in err.message and "3" in err.message


def test_several_errors_are_all_reported(client, tmp_path):
    lines = [GOOD, b"{", request_line(2), {**request_line(3), "method": "PUT"}]
    b = run_lines(client, tmp_path, lines)
    assert [(e.line, e.code) for e in b.errors.data] == [(2, "invalid_json_line"), (4, "invalid_method")]


def test_empty_file_fails(client, tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"")
    with (tmp_path / "in.jsonl").open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    b = client.batches.create(input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="24h")
    err = first_error(wait_status(client, b.id))
    assert err.code == "empty_file" and err.line is None


def test_too_many_requests(client, tmp_path):
    err = first_error(run_lines(client, tmp_path, [request_line(i) for i in range(51)]))
    assert err.code == "too_many_requests" and err.line == 51 and "50" in err.message


def test_ten_megabyte_line_is_handled(client, server, tmp_path):
    big = request_line(1, content="x" * (10 * 1024 * 1024))
    b = run_lines(client, tmp_path, [GOOD, big, request_line(2)])
    assert b.status == "completed" and b.request_counts.completed == 3
    # and a 10 MB line of garbage is a clean error, the server stays up
    err = first_error(run_lines(client, tmp_path, [GOOD, b"{" + b"x" * (10 * 1024 * 1024)]))
    assert err.line == 2 and err.code == "invalid_json_line"
    assert httpx.get(server.url + "/health").status_code == 200


def test_missing_input_file_is_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    body = exc.value.body
    assert "file-nope" in body["message"] and body["type"] == "invalid_request_error"


@pytest.fixture
def input_file(client, tmp_path):
    with make_input_file(tmp_path / "ok.jsonl", 2).open("rb") as f:
        return client.files.create(file=f, purpose="batch")


def test_wrong_purpose_is_400(client, tmp_path):
    with make_input_file(tmp_path / "ok.jsonl", 2).open("rb") as f:
        fobj = client.files.create(file=f, purpose="user_data")
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert exc.value.body["param"] == "input_file_id" and "purpose" in exc.value.body["message"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"endpoint": "/v1/images/generations"}, "endpoint"),
        ({"completion_window": "soon"}, "completion_window"),
        ({"completion_window": "0s"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"extra_body": {"overnight": {"gpu": "h100"}}}, "overnight.gpu"),
        ({"extra_body": {"overnight": {"max_concurrency": 0}}}, "overnight.max_concurrency"),
        ({"extra_body": {"overnight": {"runtime": {"endpoint": "ftp://x"}}}}, "overnight.runtime.endpoint"),
        ({"extra_body": {"aibrix": {"unknown": 1}}}, "aibrix.unknown"),
        ({"extra_body": {"output_expires_after": {"anchor": "created_at", "seconds": 5}}}, "output_expires_after.seconds"),
    ],
)
def test_bad_create_requests_are_400_naming_the_param(client, input_file, kwargs, param):
    args = {"input_file_id": input_file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **kwargs}
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(**args)
    assert exc.value.body["param"] == param, exc.value.body
    assert exc.value.body["message"]


def test_missing_field_is_400(server):
    r = httpx.post(server.url + "/v1/batches", json={"endpoint": "/v1/chat/completions", "completion_window": "24h"},
                   headers={"Authorization": "Bearer k"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id"
    r = httpx.post(server.url + "/v1/batches", content=b"{oops", headers={"Authorization": "Bearer k",
                                                                         "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize("window,seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("24h", 86400)])
def test_completion_windows(client, input_file, window, seconds):
    b = client.batches.create(input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window=window)
    assert b.expires_at - b.created_at == seconds and b.completion_window == window


def test_file_upload_errors(client, server, tmp_path):
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("x.jsonl", b"{}"), purpose="not-a-purpose")
    assert exc.value.body["param"] == "purpose"
    r = httpx.post(server.url + "/v1/files", data={"purpose": "batch"}, headers={"Authorization": "Bearer k"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("x.jsonl", b"{}"), purpose="batch",
                            expires_after={"anchor": "last_active_at", "seconds": 7200})
    assert exc.value.body["param"] == "expires_after.anchor"


def test_file_expires_after(client):
    f = client.files.create(file=("x.jsonl", b"{}\n"), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 7200})
    assert f.expires_at == f.created_at + 7200


def test_server_stays_up_after_bad_input(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.batches.list().object == "list"


def test_bom_trailing_blank_lines_and_u2028_run_to_completion(client, tmp_path):
    first = json.dumps(request_line(0, custom_id="a\u2028b"), ensure_ascii=False).encode()
    lines = [b"\xef\xbb\xbf" + first, json.dumps(request_line(1)), b"", b"  \r"]
    b = run_lines(client, tmp_path, lines)
    assert b.status == "completed", b.errors
    assert b.request_counts.total == 2 and b.request_counts.completed == 2
    out = [json.loads(x) for x in client.files.content(b.output_file_id).content.splitlines() if x]
    assert sorted(r["custom_id"] for r in out) == sorted(["a\u2028b", "req-1"])


def test_one_second_window_is_not_cut_short_by_whole_second_timestamps(client, tmp_path):
    import time

    path = write_lines(tmp_path / "slow.jsonl", [request_line(0, content="[[mock:sleep_ms=5000]]")])
    with path.open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    while time.time() % 1 < 0.8:  # late in a second: whole-second deadlines would leave < 0.2 s
        time.sleep(0.02)
    t0 = time.monotonic()
    b = client.batches.create(input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="1s")
    b = wait_status(client, b.id, timeout_s=30)
    assert b.status == "expired", b
    assert time.monotonic() - t0 >= 0.95
