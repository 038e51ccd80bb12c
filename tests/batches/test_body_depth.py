"""A request body the dispatch serializer cannot write: validation names its line,
and dispatch (for a batch that skipped validation) fails that line alone."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from overnight.batches.validation import MAX_BODY_DEPTH, ValidationLimits, validate_input
from overnight.storage.memory import MemoryStorage
from tests.scheduler.test_loop import Harness


def _line(i: int, depth: int = 1) -> bytes:
    """A request whose body is ``depth`` levels deep (the body object is level 1)."""
    nested = b"[" * (depth - 1) + b"]" * (depth - 1) if depth > 1 else b"0"
    return (b'{"custom_id":"c%d","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":'
            b'[{"role":"user","content":"x"}],"x":%b}}\n' % (i, nested))


async def test_validation_rejects_a_body_deeper_than_dispatch_can_send_naming_the_line() -> None:
    storage = MemoryStorage()
    await storage.put_bytes("in", _line(0) + _line(1, depth=MAX_BODY_DEPTH) + _line(2, depth=MAX_BODY_DEPTH + 1)
                            + _line(3, depth=1000))
    r = await validate_input(storage, "in", endpoint="/v1/chat/completions",
                             limits=ValidationLimits(max_requests=10, max_bytes=10**6))
    assert [(e["line"], e["param"]) for e in r.errors] == [(3, "body"), (4, "body")]
    assert "nested too deeply" in r.errors[0]["message"] and str(MAX_BODY_DEPTH) in r.errors[0]["message"]


async def test_dispatch_fails_an_unsendable_line_alone(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        bid = await h.batch("a", 1)
        rec = await h.store.get_batch(bid)
        # As if validation had been skipped: lines 1 and 3 fine, line 2 unsendable.
        h.storage.objects[f"files/{rec.input_file_id}"] = (
            _line(0).replace(b'"x"}', b'"a-0"}') + _line(1, depth=600) + _line(2).replace(b'"x"}', b'"a-2"}'))
        rec.status, rec.in_progress_at, rec.total, rec.model = "in_progress", int(time.time()), 3, "m"
        await h.store.update_batch(rec)
        await h.scheduler.drain(15)
        rec = await h.store.get_batch(bid)
        assert rec.status == "completed" and (rec.completed, rec.failed) == (2, 1)
        err = orjson.loads(h.storage.objects[f"files/{rec.error_file_id}"])
        assert err["custom_id"] == "c1" and err["error"]["code"] == "invalid_request_body"
        assert "nested too deeply" in err["error"]["message"]
    finally:
        await h.scheduler.stop()
        await h.scheduler.engines.aclose()
