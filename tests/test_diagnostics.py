"""``kill -USR1``: the service logs each asyncio task with the frame it waits in."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from overnight._diagnostics import dump_tasks, install_task_dump


async def _stuck_somewhere_recognisable() -> None:
    await asyncio.sleep(30)


async def test_the_dump_names_each_task_and_where_it_waits(caplog) -> None:
    t = asyncio.create_task(_stuck_somewhere_recognisable(), name="batch-xyz")
    await asyncio.sleep(0)
    text = dump_tasks()
    assert "--- batch-xyz" in text and "_stuck_somewhere_recognisable" in text
    assert install_task_dump()
    with caplog.at_level(logging.WARNING, logger="overnight.diagnostics"):
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if "task dump" in caplog.text:
                break
    assert "batch-xyz" in caplog.text
    asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
    t.cancel()
