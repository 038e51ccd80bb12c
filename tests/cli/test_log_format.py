"""``--log-format json`` / ``OVERNIGHT_LOG_FORMAT=json``: every line a process writes is
one JSON object (time, level, logger, message, fields); one line per batch state
change, none per request."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import datetime

import pytest

from overnight.logs import JsonFormatter, configure_logging
from tests.e2e.helpers import client_for, wait_status
from tests.factories import request_line, write_lines


def record(msg: str, *args, level: int = logging.INFO, exc_info=None, **extra) -> logging.LogRecord:
    r = logging.LogRecord("overnight.test", level, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_json_formatter_writes_core_keys_and_extra_fields() -> None:
    line = JsonFormatter().format(record("batch %s: %s", "batch_1", "done", batch_id="batch_1", status="completed"))
    obj = json.loads(line)
    assert obj["level"] == "INFO" and obj["logger"] == "overnight.test"
    assert obj["message"] == "batch batch_1: done"
    assert obj["batch_id"] == "batch_1" and obj["status"] == "completed"
    assert obj["time"].endswith("Z") and datetime.fromisoformat(obj["time"].replace("Z", "+00:00"))
    assert set(obj) == {"time", "level", "logger", "message", "batch_id", "status"}


def test_json_formatter_keeps_one_line_and_never_fails() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        exc = sys.exc_info()
    line = JsonFormatter().format(record("two\nlines", level=logging.ERROR, exc_info=exc,
                                         path=object(), big=1 << 70, level_=3, message_x={1: "a"}))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "two\nlines" and obj["level"] == "ERROR"
    assert "RuntimeError: boom" in obj["exception"]
    assert obj["big"] == str(1 << 70) and obj["path"].startswith("<object")
    # An extra field cannot replace a core key.
    obj = json.loads(JsonFormatter().format(record("m", logger="not me", time="never")))
    assert obj["logger"] == "overnight.test" and obj["time"] != "never"


def test_configure_logging_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'text' or 'json'.*OVERNIGHT_LOG_FORMAT"):
        configure_logging("info", "yaml")


def _parse_all(text: str) -> list[dict]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines
    out = []
    for ln in lines:
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {ln!r}")
        assert isinstance(obj, dict) and {"time", "level", "logger", "message"} <= set(obj), ln
        out.append(obj)
    return out


def test_serve_with_json_logs_writes_only_json_and_one_line_per_state_change(cluster, tmp_path) -> None:
    server = cluster.server(engine_url=None, extra=("--log-format", "json"))
    client = client_for(server.url)
    lines = [request_line(i) for i in range(40)] + [request_line(40, mock={"status": 400})]
    with write_lines(tmp_path / "in.jsonl", lines).open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    b = client.batches.create(input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait_status(client, b.id)
    assert b.status == "completed" and b.request_counts.failed == 1
    server.stop()
    records = _parse_all(server.log())
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's own lines too
    assert not any("color_message" in r for r in records)
    assert any(r["logger"] == "overnight.serve" and "is serving" in r["message"] for r in records)
    mine = [r for r in records if b.id in r["message"] or r.get("batch_id") == b.id]
    changes = [r for r in mine if "status" in r]
    assert [r["status"] for r in changes] == ["validating", "in_progress", "finalizing", "completed"]
    assert all(r["batch_id"] == b.id and r["level"] == "INFO" for r in changes)
    assert [r.get("from_status") for r in changes[1:]] == ["validating", "in_progress", "finalizing"]
    # No line per request: 41 requests, a handful of lines about the batch.
    assert len([r for r in mine if r["level"] == "INFO"]) <= len(changes) + 2


def test_run_with_json_logs_from_the_environment(cluster, tmp_path) -> None:
    engine = cluster.mock_engine("--latency-ms", "1")
    src = write_lines(tmp_path / "in.jsonl", [request_line(i) for i in range(20)])
    proc = subprocess.run(
        [sys.executable, "-m", "overnight.cli.main", "run", str(src), "-o", str(tmp_path / "out.jsonl"),
         "--engine-url", engine.url, "--progress-every", "0.01"],
        env={**os.environ, "OVERNIGHT_LOG_FORMAT": "json"}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    records = _parse_all(proc.stdout + proc.stderr)
    final = records[-1]
    assert final["logger"] == "overnight.run" and final["status"] == "completed" and final["exit_code"] == 0


def test_text_is_still_the_default(cluster, tmp_path) -> None:
    engine = cluster.mock_engine("--latency-ms", "1")
    src = write_lines(tmp_path / "in.jsonl", [request_line(i) for i in range(3)])
    env = {k: v for k, v in os.environ.items() if k != "OVERNIGHT_LOG_FORMAT"}
    proc = subprocess.run(
        [sys.executable, "-m", "overnight.cli.main", "run", str(src), "-o", str(tmp_path / "out.jsonl"),
         "--engine-url", engine.url], env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("overnight run: ")
