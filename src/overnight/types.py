"""Shared type aliases. A leaf module: it imports nothing from overnight."""

from __future__ import annotations

from typing import Protocol

__all__ = ["BatchId", "FileId", "TenantId", "RequestIndex", "ProgressSink", "NULL_PROGRESS"]

BatchId = str
FileId = str
TenantId = str
#: 0-based position of a request line in its input file.
RequestIndex = int


class ProgressSink(Protocol):
    def __call__(self, completed: int, failed: int) -> None: ...


def _no_progress(completed: int, failed: int) -> None:
    return None


NULL_PROGRESS: ProgressSink = _no_progress
