"""Serving the mock engine: uvicorn in the running loop (:func:`serve`) or in
a loop of its own (:func:`run`), quiet about requests and about its own start
and stop."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
from typing import Any, Callable

from overnight.mock_engine.app import create_app
from overnight.mock_engine.config import MockEngineConfig

__all__ = ["run", "serve"]


def _bind(host: str, port: int) -> socket.socket:
    """A bound, non-blocking TCP socket (errors surface as OSError, not SystemExit)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    config: MockEngineConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8100,
    started: asyncio.Event | None = None,
) -> None:
    """Serve the mock engine with uvicorn in the running event loop.

    ``started`` is set once the socket is listening. Returns when the server
    exits (e.g. on SIGINT/SIGTERM). Cancelling the coroutine shuts the server
    down: waiting and sleeping requests are answered with 503 at once, then the
    server closes and the cancellation propagates.
    """
    import uvicorn

    app = create_app(config)
    http: Any
    access_log = True
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        class _Protocol(HttpToolsProtocol):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.access_log = False  # never log requests, whatever the process configured

        http = _Protocol
    except ImportError:  # pragma: no cover - uvicorn[standard] ships httptools
        http = "auto"
        access_log = False
    # No log_config / log_level: uvicorn would otherwise reconfigure the process-wide
    # "uvicorn.*" loggers, which matters when the engine runs inside another
    # uvicorn-served process. Warnings and errors still reach the root logger.
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http,
        ws="none",
        lifespan="off",
        log_config=None,
        log_level=None,
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=5,
        backlog=4096,
    )

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and started is not None:
                started.set()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            app.abort_inflight()
            await super().shutdown(sockets=sockets)
            await app.aclose()

    server = _Server(uv_config)
    sock = _bind(host, port)
    _install_quiet_filter()
    context = contextvars.copy_context()
    context.run(_QUIET.set, True)
    runner = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), context=context)
    try:
        await asyncio.shield(runner)
    except asyncio.CancelledError:
        server.should_exit = True
        while not runner.done():
            try:
                await asyncio.shield(runner)
            except asyncio.CancelledError:
                server.force_exit = True  # cancelled again: stop waiting for connections
        raise
    finally:
        sock.close()


#: True inside the task serving the mock engine: uvicorn's INFO lines about its start
#: and stop go to the shared "uvicorn.error" logger and, when the engine runs inside
#: ``overnight serve``, would repeat the service's own lines.
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("overnight_mock_quiet", default=False)


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not _QUIET.get()


def _install_quiet_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietFilter) for f in logger.filters):
        logger.addFilter(_QuietFilter())


def run(config: MockEngineConfig, *, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Serve the mock engine until interrupted (blocking; uses uvloop when available)."""
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] ships it
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(config, host=host, port=port))
    except KeyboardInterrupt:
        pass
