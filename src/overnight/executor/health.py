"""Whether an engine answers at all, as this replica sees it.

``EngineHealth`` is fed by every request sent to one engine (``TrackedEngine``
wraps its client): any HTTP answer, whatever its status, means reachable; no
answer (refused, reset, timed out) counts as a failure. The state flips to
unreachable only after failures with no answer in between for a moment (or a
few in a row), so one reset among thousands of answers is not an outage. Each
flip is logged once (WARNING when it goes, INFO when it comes back), never per
request. Batches read it to show their engine's state, to give up their running
slot while it is down, and to fail once it has been down too long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from overnight import defaults
from overnight.errors import EngineError, RetryableEngineError
from overnight.executor.engine import EngineClient, EngineReply

__all__ = ["EngineHealth", "TrackedEngine"]

log = logging.getLogger("overnight.engine")

#: Failures in a row that mean unreachable even within ``OUTAGE_AFTER_S``.
_FAILURES_IN_A_ROW = 5
#: Error codes that mean no HTTP answer came back (``executor/engine.py``).
NO_ANSWER_CODES = frozenset({"engine_unreachable", "connection_error", "request_timeout"})


class EngineHealth:
    """Reachability of one engine endpoint (wall-clock times, epoch seconds)."""

    def __init__(self, url: str, *, wall: Callable[[], float] = time.time) -> None:
        self.url = url
        self.wall = wall
        #: None until the first request ended; then True/False.
        self.reachable: bool | None = None
        #: Start of the current run of failures with no answer in between.
        self.failing_since: float | None = None
        self.failures_in_a_row = 0
        #: When it became unreachable (the start of the run of failures).
        self.unreachable_since: float | None = None
        self.last_error: str | None = None
        self.last_failure_at: float | None = None
        self.last_answer_at: float | None = None

    def answered(self) -> None:
        """An HTTP answer came back (any status)."""
        now = self.wall()
        self.last_answer_at = now
        self.failing_since = None
        self.failures_in_a_row = 0
        if self.reachable is False:
            down = now - (self.unreachable_since or now)
            log.info("engine %s is reachable again (it was unreachable for %.0f s)", self.url, down)
        self.reachable = True
        self.unreachable_since = None

    def failed(self, message: str) -> None:
        """A request got no HTTP answer."""
        now = self.wall()
        self.last_error = message
        self.last_failure_at = now
        if self.failing_since is None:
            self.failing_since = now
        self.failures_in_a_row += 1
        if self.reachable is False:
            return
        if now - self.failing_since >= defaults.OUTAGE_AFTER_S or self.failures_in_a_row >= _FAILURES_IN_A_ROW:
            self._down(self.failing_since, message)

    def adopt(self, since: float, error: str | None) -> None:
        """Take over an outage seen earlier (by this batch on another replica, or
        before it gave its slot up), unless an answer came after it began."""
        if self.last_answer_at is not None and self.last_answer_at >= since:
            return
        if self.reachable is False and self.unreachable_since is not None and self.unreachable_since <= since:
            return
        self.last_error = self.last_error or error
        if self.failing_since is None or since < self.failing_since:
            self.failing_since = since
        if self.reachable is False:
            self.unreachable_since = since
        else:
            self._down(since, self.last_error or "unknown error")

    def _down(self, since: float, message: str) -> None:
        self.reachable = False
        self.unreachable_since = since
        log.warning("engine %s is unreachable: %s", self.url, message)

    def unreachable_for(self, now: float | None = None) -> float:
        """Seconds it has been unreachable without a break (0 when reachable)."""
        if self.reachable is not False or self.unreachable_since is None:
            return 0.0
        return max(0.0, (self.wall() if now is None else now) - self.unreachable_since)

    def view(self) -> dict[str, Any]:
        """The state as shown in a batch object's ``overnight.engine``."""
        state = {None: "unknown", True: "reachable", False: "unreachable"}[self.reachable]
        return {
            "state": state,
            "unreachable_since": int(self.unreachable_since) if self.unreachable_since is not None else None,
            "last_error": self.last_error if self.reachable is False else None,
        }


class TrackedEngine:
    """An ``EngineClient`` that reports every send's fate to an ``EngineHealth``."""

    def __init__(self, inner: EngineClient, health: EngineHealth) -> None:
        self.inner = inner
        self.health = health

    async def send(self, path: str, body: bytes) -> EngineReply:
        try:
            reply = await self.inner.send(path, body)
        except RetryableEngineError as exc:
            if exc.code in NO_ANSWER_CODES:
                self.health.failed(exc.message)
            raise
        except EngineError:
            self.health.answered()  # an answer we will not take (too large) is still an answer
            raise
        self.health.answered()
        return reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # get / get_json of HTTP clients

    async def aclose(self) -> None:
        await self.inner.aclose()
