"""Retry policy and the one place that decides retry-or-fail."""

from __future__ import annotations

from overnight.executor.limiter import Signal
from overnight.executor.retry import Decision, RetryPolicy, classify_no_answer, classify_status, overload_signal


def test_statuses_are_classified() -> None:
    assert classify_status(200) is Decision.SUCCESS
    assert classify_status(429) is classify_status(503) is Decision.RETRY_UNTIL_DEADLINE
    assert classify_status(500) is classify_status(408) is Decision.RETRY
    assert classify_status(400) is classify_status(404) is Decision.FAIL


def test_no_answer_is_an_outage_or_a_counted_retry() -> None:
    assert classify_no_answer("engine_unreachable") is Decision.RETRY_UNTIL_DEADLINE
    assert classify_no_answer("request_timeout") is Decision.RETRY
    assert classify_no_answer("connection_error") is Decision.RETRY
    assert classify_no_answer("response_too_large") is Decision.FAIL


def test_only_overload_statuses_are_concurrency_signals() -> None:
    assert [overload_signal(s) for s in (429, 502, 503, 504)] == [Signal.OVERLOAD] * 4
    assert overload_signal(500) is None and overload_signal(400) is None


def test_backoff_grows_to_its_cap_and_never_undercuts_retry_after() -> None:
    p = RetryPolicy(max_attempts=5, base_delay_s=0.5, max_delay_s=4.0)
    assert 0.25 <= p.delay_s(1) <= 0.5
    assert 2.0 <= p.delay_s(10) <= 4.0
    assert p.delay_s(1, retry_after_s=60.0) == 60.0
