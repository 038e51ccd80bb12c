"""The service with its files on a real S3 protocol server (moto in server mode)."""

from __future__ import annotations

import signal

import pytest

from tests.e2e.helpers import (
    assert_exactly_once,
    client_for,
    mock_stats,
    results,
    wait_progress,
    wait_status,
)
from tests.factories import make_input_file
from tests.storage.test_s3 import moto, prefix  # noqa: F401  (fixtures)

# Real processes end to end: the slow CI step (the default run stays short on 2 cores).
pytestmark = pytest.mark.slow


def test_batch_on_s3_storage_survives_sigkill(cluster, tmp_path, moto, prefix):  # noqa: F811
    engine = cluster.mock_engine("--latency-ms", "20")
    storage_url = moto.url(prefix)
    server = cluster.server(engine_url=engine.url, extra=("--storage", storage_url))
    client = client_for(server.url)
    n, window = 1000, 16
    path = make_input_file(tmp_path / "in.jsonl", n)
    f = client.files.create(file=path.open("rb"), purpose="batch")
    assert f"{prefix}/files/{f.id}" in moto.keys(prefix)
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_body={"overnight": {"max_concurrency": window}})
    wait_progress(client, b.id, n // 3)
    server.signal(signal.SIGKILL)
    server2 = cluster.server(engine_url=engine.url, data_dir=tmp_path / "data", extra=("--storage", storage_url))
    client2 = client_for(server2.url)
    b = wait_status(client2, b.id, timeout_s=60)
    assert b.status == "completed"
    out, err = results(client2, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    assert mock_stats(engine.url)["received_total"] - n <= window
    assert client2.files.content(f.id).content == path.read_bytes()
    keys = moto.keys(prefix)
    assert f"{prefix}/files/{b.output_file_id}" in keys
    assert not [k for k in keys if "/spool/" in k], "spool segments must be cleaned up after finalizing"
    assert moto.uploads(prefix) == []
