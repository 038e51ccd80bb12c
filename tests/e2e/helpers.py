"""Helpers for driving the service with the official openai SDK."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
from openai import OpenAI

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def client_for(url: str, key: str = "test-key") -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def wait_status(client: OpenAI, batch_id: str, statuses: set[str] = TERMINAL, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status in statuses:
            return b
        time.sleep(0.05)
    raise TimeoutError(f"batch {batch_id} still {seen[-1]} after {timeout_s}s (saw {seen})")


def wait_progress(client: OpenAI, batch_id: str, at_least: int, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        done = b.request_counts.completed + b.request_counts.failed
        if done >= at_least or b.status in TERMINAL:
            return b
        time.sleep(0.02)
    raise TimeoutError(f"batch {batch_id} made no progress to {at_least}")


def results(client: OpenAI, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = err = []
    if batch.output_file_id:
        out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    if batch.error_file_id:
        err = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    return out, err


def assert_exactly_once(out: list[dict[str, Any]], err: list[dict[str, Any]], expected_ids: set[str]) -> None:
    counts = Counter(line["custom_id"] for line in out + err)
    dupes = {k: v for k, v in counts.items() if v > 1}
    assert not dupes, f"duplicated custom_ids: {list(dupes.items())[:5]}"
    missing = expected_ids - set(counts)
    assert not missing, f"{len(missing)} custom_ids missing, e.g. {sorted(missing)[:5]}"
    extra = set(counts) - expected_ids
    assert not extra, f"unexpected custom_ids {sorted(extra)[:5]}"


def mock_stats(engine_url: str) -> dict[str, Any]:
    return httpx.get(engine_url + "/stats", timeout=5).json()
