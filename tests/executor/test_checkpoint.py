"""The checkpoint format: done bitmap + segments + counts, encoded compactly."""

from __future__ import annotations

import random

import pytest

from overnight.executor.checkpoint import Bitmap, Checkpoint, Segment


def test_bitmap_marks_each_index_once() -> None:
    bm = Bitmap(20)
    assert bm.add(3) and not bm.add(3)
    assert 3 in bm and 4 not in bm
    assert bm.add(19) and bm.count == 2 and bm.missing() == 18


def test_encode_decode_round_trip() -> None:
    cp = Checkpoint.empty(10_003)
    rng = random.Random(5)
    done = set(rng.sample(range(10_003), 4000))
    for i in done:
        cp.done.add(i)
    cp.completed, cp.failed = 3990, 10
    cp.usage = {"input_tokens": 7, "output_tokens": 9}
    cp.segments = [Segment("out", "spool/b/1-000000.out", 1234, 3990), Segment("err", "spool/b/1-000000.err", 99, 10)]
    cp.next_seq = 1
    back = Checkpoint.decode(cp.encode())
    assert {i for i in range(10_003) if i in back.done} == done
    assert back.done.count == 4000
    assert (back.total, back.completed, back.failed, back.next_seq) == (10_003, 3990, 10, 1)
    assert back.usage == cp.usage and back.segments == cp.segments


def test_header_reads_counts_without_the_bitmap() -> None:
    cp = Checkpoint.empty(5)
    cp.completed = 4
    head = Checkpoint.header(cp.encode())
    assert head["completed"] == 4 and head["total"] == 5


def test_a_million_requests_checkpoint_in_a_few_kilobytes() -> None:
    cp = Checkpoint.empty(1_000_000)
    for i in range(600_000):  # done indices cluster: the dispatcher goes in order
        cp.done.add(i)
    assert len(cp.encode()) < 4_000
    assert len(cp.done.bits) == 125_000  # one bit per request in memory


def test_unknown_format_version_is_refused() -> None:
    data = Checkpoint.empty(1).encode().replace(b'"v":1', b'"v":99')
    with pytest.raises(ValueError):
        Checkpoint.decode(data)
