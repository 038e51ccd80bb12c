"""Every status change is logged once at INFO with the batch id; nothing else is."""

from __future__ import annotations

import logging

from overnight.batches.service import transition
from overnight.batches.states import BatchStatus
from overnight.errors import TransitionError
from overnight.store.memory import MemoryStore
from overnight.store.records import BatchRecord


async def test_each_status_change_is_one_info_line_naming_the_batch(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="overnight")
    store = MemoryStore()
    await store.insert_batch(BatchRecord(id="batch_x1", tenant="t", endpoint="/v1/chat/completions", input_file_id="f",
                                         completion_window="24h", completion_window_s=86400, status="validating",
                                         created_at=0, expires_at=86400))
    await transition(store, "batch_x1", BatchStatus.IN_PROGRESS)
    error = {"code": "engine_unreachable", "message": "engine gone", "line": None, "param": None}
    await transition(store, "batch_x1", BatchStatus.FAILED, errors=[error])
    try:
        await transition(store, "batch_x1", BatchStatus.COMPLETED)
    except TransitionError:
        pass
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("overnight")]
    assert lines == [
        "batch batch_x1: validating -> in_progress",
        "batch batch_x1: in_progress -> failed (engine_unreachable: engine gone)",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "overnight.batches")
