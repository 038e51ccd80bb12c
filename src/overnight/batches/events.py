"""In-process notice of batch status changes.

``transition`` (batches/service.py) publishes every status change it wrote; a
subscriber in the same process (the console's planner, following the batches of
its jobs) hears of it at once instead of at its next poll. A notice is a hint,
never the truth: a subscriber reads the store, and polls anyway for changes made
by other processes (another replica, a Kubernetes worker)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from overnight.store.records import BatchRecord

__all__ = ["publish", "subscribe"]

log = logging.getLogger("overnight.batches")

_listeners: list[Callable[[BatchRecord], None]] = []


def subscribe(listener: Callable[[BatchRecord], None]) -> Callable[[], None]:
    """Call ``listener(rec)`` after each status change written in this process;
    returns the unsubscribe function. Listeners must be quick and not block."""
    _listeners.append(listener)

    def unsubscribe() -> None:
        if listener in _listeners:
            _listeners.remove(listener)

    return unsubscribe


def publish(rec: BatchRecord) -> None:
    for listener in _listeners:
        try:
            listener(rec)
        except Exception:  # a listener's bug never fails the write it hears about
            log.exception("batch status listener failed")
