"""Engine answers that are not plain JSON, through real processes and the openai SDK:
a stream nobody asked for is assembled and its usage counted; an answer over
OVERNIGHT_MAX_RESPONSE_BYTES lands in the error file."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import assert_exactly_once, client_for, results, wait_status
from tests.factories import request_line, write_lines

# Real processes end to end: the slow CI step (the default run stays short on 2 cores).
pytestmark = pytest.mark.slow


@pytest.fixture
def engine(cluster):
    return cluster.mock_engine("--latency-ms", "1")


def _batch(client, tmp_path, endpoint: str, lines: list[dict]):
    path = write_lines(tmp_path / "in.jsonl", lines)
    with path.open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    b = client.batches.create(input_file_id=fobj.id, endpoint=endpoint, completion_window="24h")
    return wait_status(client, b.id)


@pytest.mark.parametrize("endpoint", ["/v1/responses", "/v1/chat/completions"])
def test_an_event_stream_answer_is_assembled_with_its_usage(cluster, engine, tmp_path, endpoint):
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    if endpoint == "/v1/responses":
        lines = [{"custom_id": f"r{i}", "method": "POST", "url": endpoint,
                  "body": {"model": "m", "input": f"hi {i}" + (" [[mock:sse]]" if i % 2 else "")}}
                 for i in range(10)]
    else:
        lines = [request_line(i, custom_id=f"r{i}", content=f"hi {i}" + (" [[mock:sse]]" if i % 2 else ""))
                 for i in range(10)]
    b = _batch(client, tmp_path, endpoint, lines)
    assert b.status == "completed" and b.request_counts.completed == 10, b
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"r{i}" for i in range(10)})
    assert not err
    kind = "response" if endpoint == "/v1/responses" else "chat.completion"
    for line in out:
        body = line["response"]["body"]
        assert isinstance(body, dict) and body["object"] == kind, line
        assert body["usage"]
    assert b.usage.output_tokens == 10 * 16  # the streamed half counted too


def test_an_answer_over_the_size_limit_goes_to_the_error_file(cluster, engine, tmp_path):
    server = cluster.server(engine_url=engine.url, env={"OVERNIGHT_MAX_RESPONSE_BYTES": "20000"})
    client = client_for(server.url)
    lines = [request_line(i, custom_id=f"r{i}", content="big [[mock:tokens=50000]]" if i == 3 else f"hi {i}")
             for i in range(6)]
    b = _batch(client, tmp_path, "/v1/chat/completions", lines)
    assert b.status == "completed" and b.request_counts.completed == 5 and b.request_counts.failed == 1, b
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"r{i}" for i in range(6)})
    assert err[0]["custom_id"] == "r3" and err[0]["response"] is None
    assert err[0]["error"]["code"] == "response_too_large" and "20000" in err[0]["error"]["message"]
