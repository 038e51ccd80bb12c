"""What every fake provider API in tests/fakes/ shares: a stdlib
``ThreadingHTTPServer`` on a free 127.0.0.1 port, served from a daemon thread, so
an async test, a sync test and a subprocess (``overnight serve``) can all reach it.

A fake subclasses ``ThreadedFake``, names its request handler (``handler``, whose
``self.server.fake`` is the fake) and its thread, and gets ``start``/``stop``, the
context manager and ``port``. ``Recorded`` is what a fake keeps of each request,
and ``Fault`` an injected failure that ``take_fault`` finds for a request."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self, TypeVar

__all__ = ["FakeServer", "Fault", "Recorded", "ThreadedFake", "take_fault"]


@dataclass(kw_only=True)
class Recorded:
    """One request as the fake saw it (``at``: ``time.monotonic()``; ``status``: its answer)."""

    method: str
    path: str
    body: Any
    at: float
    query: dict[str, list[str]] = field(default_factory=dict)
    status: int = 0


@dataclass(kw_only=True)
class Fault:
    """An injected failure: the next ``times`` requests whose path starts with
    ``path`` (and of ``method``, when set) answer ``status``, with ``Retry-After``
    when set; ``after``: only once the request has taken effect (a lost answer);
    ``drop``: the connection is closed with no answer."""

    path: str
    status: int
    times: int = 1
    method: str | None = None
    retry_after: float | None = None
    after: bool = False
    drop: bool = False


F = TypeVar("F", bound=Fault)


def take_fault(faults: Iterable[F], method: str, path: str,
               applies: Callable[[F, str, str], bool] | None = None) -> F | None:
    """The first fault left for this request (one of its ``times`` used up), or None.
    ``applies``: a fake's own further condition. Call it under the fake's lock."""
    for f in faults:
        if (f.times > 0 and path.startswith(f.path) and (f.method is None or f.method == method)
                and (applies is None or applies(f, method, path))):
            f.times -= 1
            return f
    return None


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
