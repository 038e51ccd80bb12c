"""Token usage totals in the batch object's shape."""

from __future__ import annotations

from typing import Any

__all__ = ["Usage"]


class Usage:
    """Sums engine ``usage`` objects (chat/completions/embeddings/responses names)."""

    __slots__ = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")

    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0
        self.reasoning_tokens = 0

    def add(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        get = usage.get
        self.input_tokens += int(get("prompt_tokens") or get("input_tokens") or 0)
        self.output_tokens += int(get("completion_tokens") or get("output_tokens") or 0)
        details = get("prompt_tokens_details") or get("input_tokens_details")
        if isinstance(details, dict):
            self.cached_tokens += int(details.get("cached_tokens") or 0)
        details = get("completion_tokens_details") or get("output_tokens_details")
        if isinstance(details, dict):
            self.reasoning_tokens += int(details.get("reasoning_tokens") or 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Usage:
        u = cls()
        if d:
            u.input_tokens = int(d.get("input_tokens", 0))
            u.output_tokens = int(d.get("output_tokens", 0))
            u.cached_tokens = int((d.get("input_tokens_details") or {}).get("cached_tokens", 0))
            u.reasoning_tokens = int((d.get("output_tokens_details") or {}).get("reasoning_tokens", 0))
        return u
