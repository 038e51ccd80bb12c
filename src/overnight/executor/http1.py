"""A small HTTP/1.1 keep-alive client for talking to one engine endpoint.

Why not aiohttp: on the dispatch hot path aiohttp spent about half of the
service's CPU per request (request objects, header multidicts, payload
registry, a timer per request). An engine is one host we POST small JSON
bodies to, so this client keeps only what that needs: an ``asyncio.Protocol``
per connection, the ``httptools`` C parser (shipped with ``uvicorn[standard]``),
a LIFO pool of idle connections, and one timer sweep per pool instead of a timer
per request. HTTPS works through the event loop's TLS support.

Failures are reported as ``ConnectFailed`` (no connection at all),
``ConnectionFailed`` (a connection that broke or spoke garbage),
``ResponseTooLarge`` and ``RequestTimedOut``; the engine client turns them into
overnight's own errors. A body is bounded while it is read: past
``max_body_bytes`` the rest is not read and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

__all__ = ["ConnectFailed", "ConnectionFailed", "HttpPool", "RawReply", "RequestTimedOut", "ResponseTooLarge"]

#: Drop idle connections older than this instead of reusing them: servers close
#: idle keep-alive connections (uvicorn after 5 s), and a request written into a
#: connection the server is closing fails for nothing.
_IDLE_REUSE_S = 3.0
#: How long the addresses a ``resolve`` hook gave are used for new connections.
_RESOLVE_TTL_S = 5.0


#: RFC 9110 token characters (header names, methods).
_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Control characters other than HTAB: a CR or LF would end the header early and let
#: a value inject headers or a whole second request (request smuggling).
_CTL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _header_line(name: str, value: str) -> bytes:
    """``name: value\r\n``, or ValueError for anything that is not one header line.
    The value is never put in the message: it may be a secret."""
    try:
        n, v = name.encode("ascii"), value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"refusing to send header {name[:40]!r}: not encodable as one HTTP header") from None
    if not _TOKEN_RE.match(n) or _CTL_RE.search(v):
        raise ValueError(f"refusing to send header {name[:40]!r}: it contains control characters (CR, LF, NUL ...)")
    return b"%b: %b\r\n" % (n, v)


def _check_target(target: bytes) -> None:
    if _CTL_RE.search(target) or b" " in target or b"\t" in target:
        raise ValueError("refusing to send a request whose path contains spaces or control characters")


class ConnectionFailed(Exception):
    """No complete HTTP answer: reset, closed mid-response, or not HTTP."""


class ConnectFailed(ConnectionFailed):
    """No connection at all: refused, unknown host, or connecting timed out."""


class ResponseTooLarge(Exception):
    """The answer's body is over the pool's ``max_body_bytes``."""


class RequestTimedOut(Exception):
    """No complete answer within the request timeout."""


@dataclass(slots=True)
class RawReply:
    status: int
    body: bytes
    request_id: str | None
    retry_after: str | None
    content_type: str | None = None


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request at a time (no pipelining)."""

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.fut: asyncio.Future[RawReply] | None = None
        self.parts: list[bytes] = []
        self.request_id: str | None = None
        self.retry_after: str | None = None
        self.content_type: str | None = None
        self.content_length = 0
        self.body_bytes = 0
        self.close_after = False
        self.headers_done = False
        self.has_length = False
        self.got_bytes = False
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        self.deadline = 0.0

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # given up on (too large, timed out): drop what is still buffered
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionFailed(f"bad HTTP response from the engine: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        fut = self.fut
        if fut is None or fut.done():
            return
        if self.headers_done and not self.has_length and exc is None:
            # A body delimited by the end of the connection (no Content-Length,
            # not chunked): a clean close is the end of the message; a reset is not.
            self.on_message_complete()
            return
        err = ConnectionFailed(f"connection closed before a complete answer ({exc or 'EOF'})")
        err.retry_fresh = self.reused and not self.got_bytes  # type: ignore[attr-defined]
        self._fail(err)

    # -- httptools callbacks --------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"x-request-id":
            self.request_id = value.decode("latin-1")
        elif n == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif n == b"content-type":
            self.content_type = value.decode("latin-1")
        elif n == b"content-length":
            self.has_length = True
            if value.strip().isdigit():
                self.content_length = int(value)
        elif n == b"transfer-encoding" and b"chunked" in value.lower():
            self.has_length = True
        elif n == b"connection" and value.lower() == b"close":
            self.close_after = True

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.content_length > self.pool.max_body_bytes:
            self._too_large(self.content_length)

    def on_body(self, body: bytes) -> None:
        if self.fut is None:
            return  # the answer was already given up on; the connection is closing
        self.body_bytes += len(body)
        if self.body_bytes > self.pool.max_body_bytes:
            self._too_large(None)
            return
        self.parts.append(body)

    def _too_large(self, announced: int | None) -> None:
        size = f"{announced} bytes" if announced is not None else "more"
        self._fail(ResponseTooLarge(
            f"the engine's answer ({size}) is over the limit of {self.pool.max_body_bytes} bytes"
        ))
        self.parts = []
        self.close()  # reading the rest would only be thrown away

    def on_message_complete(self) -> None:
        fut = self.fut
        if fut is None or fut.done():
            self.close()  # an answer nobody waits for (timed out, too large)
            return
        self.fut = None
        parts = self.parts
        self.parts = []
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        reply = RawReply(self.parser.get_status_code(), body, self.request_id, self.retry_after, self.content_type)
        keep = not self.close_after and not self.closed and self.parser.should_keep_alive()
        if keep:
            self.pool._checkin(self)
        else:
            self.close()
        fut.set_result(reply)

    # -- used by the pool -----------------------------------------------------
    def start(self, head: bytes, body: bytes, deadline: float) -> asyncio.Future[RawReply]:
        self.fut = fut = self.pool.loop.create_future()
        self.parts = []
        self.request_id = self.retry_after = self.content_type = None
        self.content_length = self.body_bytes = 0
        self.headers_done = self.has_length = self.got_bytes = self.close_after = False
        self.deadline = deadline
        assert self.transport is not None
        if len(body) <= 16384:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        return fut

    def _fail(self, exc: Exception) -> None:
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HttpPool:
    """Keep-alive connections to one ``http(s)://host:port[/prefix]``.

    ``request()`` is safe to call from many tasks at once; each request uses one
    connection from start to end. At most ``max_connections`` are open; beyond
    that, requests wait for a free connection in FIFO order.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 30.0,
        max_connections: int = 4096,
        max_body_bytes: int = 1 << 62,
        resolve: Callable[[], Awaitable[list[str] | None]] | None = None,
    ) -> None:
        """``resolve``: where new connections go, asked afresh every few seconds: the
        addresses to try in turn (the host name stays in ``Host`` and in TLS's SNI), or
        None to connect by name. An ``OSError`` from it fails the connect with its
        message (a tenant's endpoint whose name now points where the policy forbids)."""
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if u.scheme == "https" else None
        self.prefix = u.path.rstrip("/").encode()
        _check_target(self.prefix)
        host = _header_line("Host", u.netloc.rsplit("@", 1)[-1])
        extra = b"".join(_header_line(k, v) for k, v in (headers or {}).items())
        self._head_tail = b"\r\n" + host + extra
        self._checked: set[tuple[str, str, bytes]] = set()
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        #: Answers with a larger body fail with ``ResponseTooLarge``.
        self.max_body_bytes = max_body_bytes
        self._idle: list[_Conn] = []
        self._busy: set[_Conn] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.resolve = resolve
        self._addrs: list[str] | None = None
        self._addrs_until = 0.0
        self._resolving: asyncio.Lock | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def open_connections(self) -> int:
        return len(self._idle) + len(self._busy) + self._opening

    async def request(
        self, method: str, path: str, body: bytes = b"", *, content_type: bytes = b"application/json",
        timeout_s: float | None = None,
    ) -> RawReply:
        """Send one request and return the whole answer, whatever its status."""
        if self._closed:
            raise ConnectionFailed("the client is closed")
        shape = (method, path, content_type)
        if shape not in self._checked:  # a few distinct shapes per pool: check each once
            _check_target(path.encode())
            if not _TOKEN_RE.match(method.encode()) or _CTL_RE.search(content_type):
                raise ValueError("refusing to send a request with a malformed method or content type")
            self._checked.add(shape)
        head = b"%b %b%b HTTP/1.1%bContent-Type: %b\r\nContent-Length: %d\r\n\r\n" % (
            method.encode(), self.prefix, path.encode(), self._head_tail, content_type, len(body),
        )
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        for fresh in (False, True):
            conn = await self._checkout(fresh)
            self._busy.add(conn)
            self._arm_sweeper()
            try:
                return await conn.start(head, body, deadline)
            except ConnectionFailed as exc:
                # A reused connection the server had already closed: nothing reached
                # the engine, so one more try on a new connection is safe.
                if fresh or not getattr(exc, "retry_fresh", False):
                    raise
            except asyncio.CancelledError:
                conn.close()  # the answer would arrive for nobody
                raise
            finally:
                self._busy.discard(conn)
        raise AssertionError("unreachable")

    async def _checkout(self, fresh: bool) -> _Conn:
        now = time.monotonic()
        idle = self._idle
        while idle and not fresh:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > _IDLE_REUSE_S:
                conn.close()
                continue
            conn.reused = True
            return conn
        while self.open_connections >= self.max_connections:
            fut = self.loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                raise
            if idle and not fresh:
                conn = idle.pop()
                if not conn.closed:
                    conn.reused = True
                    return conn
        self._opening += 1
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for hands back the
            # connect's own result or error when a cancel arrives as the connect
            # ends (a refused port ends at once), and the cancel is lost; a request
            # task stopped that way then retried on as if never cancelled.
            async with asyncio.timeout(self.connect_timeout_s):
                conn = await self._connect()
        except TimeoutError as exc:
            raise ConnectFailed(f"connecting to {self.host}:{self.port} timed out") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        finally:
            self._opening -= 1
            self._wake()
        return conn

    async def _connect(self) -> _Conn:
        addrs = await self._addresses() if self.resolve is not None else None
        if addrs is None:
            _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self.ssl)
            return conn
        err = OSError(f"no address to connect to for {self.host}")
        for addr in addrs:
            try:
                _, conn = await self.loop.create_connection(
                    lambda: _Conn(self), addr, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
                return conn
            except OSError as exc:
                err = exc
        raise err

    async def _addresses(self) -> list[str] | None:
        """The ``resolve`` hook's answer, asked once for every connection opened within
        ``_RESOLVE_TTL_S`` (a ramp opens hundreds at once); a failure is not kept."""
        assert self.resolve is not None
        if self._resolving is None:
            self._resolving = asyncio.Lock()
        async with self._resolving:
            if time.monotonic() >= self._addrs_until:
                self._addrs = await self.resolve()
                self._addrs_until = time.monotonic() + _RESOLVE_TTL_S
            return self._addrs

    def _checkin(self, conn: _Conn) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake()

    def _forget(self, conn: _Conn) -> None:
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    # -- timeouts: one sweep instead of a timer per request -------------------
    def _arm_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_every_s(), self._sweep)

    def _sweep_every_s(self) -> float:
        return max(0.005, min(1.0, self.timeout_s / 8))

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for conn in list(self._busy):
            if conn.fut is not None and conn.deadline <= now:
                conn._fail(RequestTimedOut(f"no answer from {self.host}:{self.port} in time"))
                conn.close()
        if self._busy:
            self._arm_sweeper()

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn._fail(ConnectionFailed("the client is closed"))
            conn.close()
