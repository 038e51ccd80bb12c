"""Retry policy and the one function that decides retry-or-fail."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from overnight import defaults
from overnight.executor.limiter import Signal

__all__ = ["Decision", "RetryPolicy", "TIMEOUT_CODES", "UNSENDABLE_CODES", "classify_status", "classify_no_answer",
           "overload_signal"]

#: Answers that mean "the engine (or a proxy in front of it) is full or restarting":
#: they shrink the concurrency limit. Other errors are about the request itself.
OVERLOAD_STATUSES = frozenset({429, 502, 503, 504})
#: No answer because the request cannot be sent at all (the engine may not be used,
#: the body cannot be serialized): another attempt would end the same way.
UNSENDABLE_CODES = frozenset({"engine_unusable", "endpoint_not_allowed", "secret_unavailable", "no_engine"})
#: No answer in time (ours, or a proxy's limit such as RunPod's 100 s): each counts
#: against the request's attempts and is a timeout signal to the concurrency limit.
TIMEOUT_CODES = frozenset({"request_timeout", "proxy_timeout"})
#: An answer over the size limit: another attempt would only read it again.
TOO_LARGE_CODES = frozenset({"response_too_large"})


class Decision(Enum):
    SUCCESS = "success"  #: 2xx: write to the output file
    RETRY = "retry"  #: worth another attempt; counts against max_attempts
    RETRY_UNTIL_DEADLINE = "retry_until_deadline"  #: overload/outage: retry until the batch deadline
    FAIL = "fail"  #: the engine's answer is final: write it to the error file


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = defaults.MAX_ATTEMPTS
    base_delay_s: float = defaults.BACKOFF_BASE_S
    max_delay_s: float = defaults.BACKOFF_MAX_S

    def delay_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Backoff before attempt ``attempt + 1``: exponential with jitter, never
        shorter than the engine's ``Retry-After`` (the batch deadline bounds any wait)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** max(0, attempt - 1)))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return delay


def classify_status(status: int) -> Decision:
    if 200 <= status < 300:
        return Decision.SUCCESS
    if status in (429, 503):
        # Overload: the engine is healthy but full. Giving up would lose work the
        # engine will happily do a moment later.
        return Decision.RETRY_UNTIL_DEADLINE
    if status in (408, 409) or status >= 500:
        return Decision.RETRY
    return Decision.FAIL


def classify_no_answer(code: str | None) -> Decision:
    """No usable HTTP answer. Only an engine no connection could be opened to is an
    outage (waited for until the deadline). A connection that was accepted and then
    reset, cut short or answered garbage, and a timeout, may be caused by the request
    itself, so they count against the attempts."""
    if code in UNSENDABLE_CODES or code in TOO_LARGE_CODES:
        return Decision.FAIL
    return Decision.RETRY_UNTIL_DEADLINE if code == "engine_unreachable" else Decision.RETRY


def overload_signal(status: int) -> str | None:
    """The concurrency signal an HTTP status carries (``limiter.Signal``), if any."""
    return Signal.OVERLOAD if status in OVERLOAD_STATUSES else None
