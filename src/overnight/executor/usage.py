"""Token usage totals in the batch object's shape.

An engine's ``usage`` is untrusted input: each count must be a non-negative whole
number no larger than ``MAX_TOKENS``; anything else is ignored and counted in
``ignored`` (a value out of the 64-bit range once made every checkpoint fail)."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["MAX_TOKENS", "Usage"]

log = logging.getLogger("overnight.executor")

#: Far above any request's token count, small enough that totals over any batch
#: stay well inside 64 bits (what JSON encoders and databases accept).
MAX_TOKENS = 2**32


def _count(value: Any) -> int | None:
    """A token count, or None when ``value`` is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_TOKENS:
        return value
    return None


class Usage:
    """Sums engine ``usage`` objects (chat/completions/embeddings/responses names)."""

    __slots__ = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "ignored")

    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        #: Usage values that were not token counts (warnings).
        self.ignored = 0

    def _get(self, d: dict[str, Any], *names: str) -> int:
        for name in names:
            value = d.get(name)
            if value is None:
                continue
            n = _count(value)
            if n is None:
                self.ignored += 1
                if self.ignored == 1:
                    log.warning("ignoring an engine usage value that is not a token count: %s=%.40r", name, value)
                return 0
            if n or name == names[-1]:
                return n
        return 0

    def add(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.input_tokens += self._get(usage, "prompt_tokens", "input_tokens")
        self.output_tokens += self._get(usage, "completion_tokens", "output_tokens")
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        if isinstance(details, dict):
            self.cached_tokens += self._get(details, "cached_tokens")
        details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
        if isinstance(details, dict):
            self.reasoning_tokens += self._get(details, "reasoning_tokens")

    def merge(self, d: dict[str, Any] | None) -> None:
        """Add another sum (a ``to_dict()``: a shard's, a checkpoint's) to this one."""
        u = Usage.from_dict(d)
        self.input_tokens += u.input_tokens
        self.output_tokens += u.output_tokens
        self.cached_tokens += u.cached_tokens
        self.reasoning_tokens += u.reasoning_tokens
        self.ignored += u.ignored

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }
        if self.ignored:
            out["ignored_values"] = self.ignored
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Usage:
        u = cls()
        if d:
            u.input_tokens = int(d.get("input_tokens", 0))
            u.output_tokens = int(d.get("output_tokens", 0))
            u.cached_tokens = int((d.get("input_tokens_details") or {}).get("cached_tokens", 0))
            u.reasoning_tokens = int((d.get("output_tokens_details") or {}).get("reasoning_tokens", 0))
            u.ignored = int(d.get("ignored_values", 0))
        return u
