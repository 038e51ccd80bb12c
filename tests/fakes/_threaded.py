"""What every fake provider API in tests/fakes/ shares: a stdlib
``ThreadingHTTPServer`` on a free 127.0.0.1 port, served from a daemon thread, so
an async test, a sync test and a subprocess (``overnight serve``) can all reach it.

A fake subclasses ``ThreadedFake``, names its request handler (``handler``, whose
``self.server.fake`` is the fake) and its thread, and gets ``start``/``stop``, the
context manager and ``port``."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

__all__ = ["FakeServer", "ThreadedFake"]


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: Any


class ThreadedFake:
    handler: ClassVar[type[BaseHTTPRequestHandler]]
    thread_name: ClassVar[str] = "fake-api"
    _httpd: FakeServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Self:
        httpd = FakeServer(("127.0.0.1", 0), self.handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() the fake first"
        return int(self._httpd.server_address[1])
