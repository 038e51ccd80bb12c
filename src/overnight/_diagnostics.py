"""``kill -USR1 <pid>`` makes a running service log every asyncio task with its
stack: what each batch, engine watch and background loop is waiting on. For
finding a stall in production without a debugger."""

from __future__ import annotations

import asyncio
import io
import logging
import signal

__all__ = ["install_task_dump", "dump_tasks"]

log = logging.getLogger("overnight.diagnostics")


def dump_tasks() -> str:
    """Every task of the running loop, with the frames it is suspended in."""
    buf = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    buf.write(f"{len(tasks)} asyncio tasks\n")
    for t in tasks:
        buf.write(f"--- {t.get_name()}: {t!r:.300}\n")
        t.print_stack(limit=12, file=buf)
    return buf.getvalue()


def install_task_dump(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Log :func:`dump_tasks` on SIGUSR1. False where signals cannot be hooked
    (not the main thread, or a platform without SIGUSR1)."""
    loop = loop or asyncio.get_running_loop()
    sig = getattr(signal, "SIGUSR1", None)
    if sig is None:
        return False
    try:
        loop.add_signal_handler(sig, lambda: log.warning("task dump (SIGUSR1):\n%s", dump_tasks()))
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True
