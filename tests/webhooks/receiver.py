"""A webhook receiver for the tests: a real HTTP server in a thread that verifies
every delivery (overnight's ``verify`` and the ``openai`` SDK's ``unwrap``, the
check an OpenAI user's receiver already runs), records it, and can be told to
fail (answer 500) or be down (its port refuses connections) for a while."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from openai import OpenAI

from overnight.webhooks import WebhookVerificationError, verify


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    event: dict[str, Any]
    #: What ``on_delivery`` saw when the delivery arrived (e.g. the batch via the API).
    seen: Any = None
    at: float = field(default_factory=time.time)


class Receiver:
    """``start()`` listens on 127.0.0.1 (a fixed port across ``down()``/``up()``)."""

    def __init__(self, secret: str, *, path: str = "/hooks/overnight",
                 on_delivery: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.secret = secret
        self.path = path
        self.on_delivery = on_delivery
        self.deliveries: list[Delivery] = []
        #: Every request that reached the handler, verified or not: (status answered, headers).
        self.attempts: list[tuple[int, dict[str, str]]] = []
        self.rejected: list[str] = []
        self.fail_with: int | None = None
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sdk = OpenAI(api_key="unused", webhook_secret=secret, base_url="http://127.0.0.1:9/v1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver._handle(self.path, headers, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def _handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            if self.fail_with is not None:
                self.attempts.append((self.fail_with, headers))
                return self.fail_with
        try:
            if path != self.path:
                raise WebhookVerificationError(f"POST to {path}, not {self.path}")
            verify(self.secret, headers, body)
            event = self._sdk.webhooks.unwrap(body, headers).to_dict()  # verifies again, the SDK's way
        except Exception as exc:  # noqa: BLE001 - any failure is a rejected delivery
            with self._lock:
                self.rejected.append(f"{type(exc).__name__}: {exc}")
                self.attempts.append((400, headers))
            return 400
        seen = self.on_delivery(orjson.loads(body)) if self.on_delivery else None
        with self._lock:
            self.deliveries.append(Delivery(headers, body, event, seen))
            self.attempts.append((200, headers))
        return 200

    def down(self) -> None:
        """Stop listening: connections to the port are refused until ``up()``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def up(self) -> None:
        self.start()

    def wait_for(self, n: int, timeout_s: float = 30.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.deliveries) >= n:
                    return list(self.deliveries)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.deliveries)} deliveries after {timeout_s}s, wanted {n}; "
                             f"attempts {[a[0] for a in self.attempts]}, rejected {self.rejected}")

    async def arrived(self, n: int, timeout_s: float = 30.0) -> list[Delivery]:
        """``wait_for`` for async tests: the event loop keeps running meanwhile."""
        import asyncio

        return await asyncio.to_thread(self.wait_for, n, timeout_s)

    def close(self) -> None:
        self.down()
