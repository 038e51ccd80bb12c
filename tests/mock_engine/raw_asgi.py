"""Driving the mock engine's ASGI app directly, so that a test can make the
client disconnect at a moment of its choosing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from overnight.mock_engine import MockEngineApp


class RawRequest:
    """One POST to ``path``; set ``disconnect`` to make the client go away."""

    def __init__(self, app: MockEngineApp, body: dict[str, Any], path: str = "/v1/chat/completions") -> None:
        self.disconnect = asyncio.Event()
        self.messages: list[dict[str, Any]] = []
        self._body = json.dumps(body).encode()
        self._sent_body = False
        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int | None:
        return self.messages[0]["status"] if self.messages else None


def _chat(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


async def check_abort_inflight_answers_503(app: MockEngineApp, settle_s: float) -> None:
    """With one request running and one waiting (both long), shutdown answers
    both 503 at once and refuses later ones that would wait."""
    running = RawRequest(app, _chat("a"))
    waiting = RawRequest(app, _chat("b"))
    await asyncio.sleep(settle_s)
    assert app.abort_inflight() == 2
    await asyncio.wait_for(asyncio.gather(running.task, waiting.task), 1)
    assert running.status == 503 and waiting.status == 503
    assert (app.stats.running, app.stats.waiting) == (0, 0)
    late = RawRequest(app, _chat("c"))
    await asyncio.wait_for(late.task, 1)
    assert late.status == 503
