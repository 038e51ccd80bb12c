"""Builders for test inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def request_line(i: int, *, endpoint: str = "/v1/chat/completions", model: str = "mock-model", content: str | None = None,
                 custom_id: str | None = None, **body_extra: Any) -> dict[str, Any]:
    if endpoint == "/v1/embeddings":
        body: dict[str, Any] = {"model": model, "input": content or f"text {i}"}
    elif endpoint == "/v1/completions":
        body = {"model": model, "prompt": content or f"prompt {i}"}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": content or f"hello {i}"}]}
    body.update(body_extra)
    return {"custom_id": custom_id or f"req-{i}", "method": "POST", "url": endpoint, "body": body}


def make_input_file(path: Path, n_lines: int, **kwargs: Any) -> Path:
    with path.open("w") as f:
        for i in range(n_lines):
            f.write(json.dumps(request_line(i, **kwargs)) + "\n")
    return path


def write_lines(path: Path, lines: list[Any]) -> Path:
    """Lines may be dicts (dumped as JSON), str or bytes (written as they are)."""
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            if isinstance(line, str):
                line = line.encode()
            f.write(line + b"\n")
    return path


def fake_dns(monkeypatch: Any, table: dict[str, list[str]]) -> None:
    """Names resolve, for the endpoint policy's lookups, as ``table`` says (a test
    changes it to move a name); the system resolver knows none of them."""
    import ipaddress

    from overnight.runtimes import egress

    async def resolve(host: str, port: int) -> list:
        return [ipaddress.ip_address(a) for a in table.get(host, [])]

    monkeypatch.setattr(egress, "_resolve", resolve)
