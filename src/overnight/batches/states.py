"""The batch state machine: statuses and the one table of allowed transitions."""

from __future__ import annotations

from enum import Enum

__all__ = ["BatchStatus", "TRANSITIONS", "TERMINAL", "TIMESTAMP_FIELD", "can_transition"]


class BatchStatus(str, Enum):
    VALIDATING = "validating"  #: input file is being checked line by line
    FAILED = "failed"  #: input was invalid (or the batch could not run at all)
    IN_PROGRESS = "in_progress"  #: requests are being dispatched
    FINALIZING = "finalizing"  #: all requests done; output/error files being assembled
    COMPLETED = "completed"  #: output/error files are ready
    EXPIRED = "expired"  #: completion window passed; undone requests are in the error file
    CANCELLING = "cancelling"  #: cancel requested; in-flight requests being aborted
    CANCELLED = "cancelled"  #: cancelled; finished requests kept in the output file


S = BatchStatus

TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset({S.IN_PROGRESS, S.FAILED, S.CANCELLING, S.EXPIRED}),
    S.IN_PROGRESS: frozenset({S.FINALIZING, S.EXPIRED, S.CANCELLING, S.FAILED}),
    S.FINALIZING: frozenset({S.COMPLETED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}

TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)

#: The batch-object timestamp set when a status is entered.
TIMESTAMP_FIELD: dict[BatchStatus, str] = {
    S.IN_PROGRESS: "in_progress_at",
    S.FINALIZING: "finalizing_at",
    S.COMPLETED: "completed_at",
    S.FAILED: "failed_at",
    S.EXPIRED: "expired_at",
    S.CANCELLING: "cancelling_at",
    S.CANCELLED: "cancelled_at",
}


def can_transition(src: str | BatchStatus, dst: str | BatchStatus) -> bool:
    return BatchStatus(dst) in TRANSITIONS[BatchStatus(src)]
