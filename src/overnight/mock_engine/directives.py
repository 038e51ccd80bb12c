"""Deterministic test triggers: the ``mock`` request field and ``[[mock:...]]``
markers in the prompt.

Tests script the engine's answer without randomness in two ways:

* a top-level request field ``"mock"``: an object such as
  ``{"status": 503, "retry_after": 2}`` (or the same ``key=value`` text a
  marker holds);
* markers in the prompt text, scanned only when the text contains
  ``[[mock:``: the last chat message, the completion prompt(s), the embedding
  input(s), or the last Responses input item. Several markers may appear, and
  one marker may hold several settings separated by commas, semicolons or
  spaces, e.g. ``[[mock:status=503,retry_after=1]]``.

Settings:

``status=N``
    Answer with HTTP status N (an OpenAI-style error body unless N is 200).
``sleep_ms=N``
    Use N milliseconds as the service time instead of the computed one; it
    also applies before a scripted or random failure.
``fail_times=N``
    Fail (with 500, or with ``status`` when given) the first N times this
    request is seen, then succeed. Requests are matched by route plus their
    full prompt (all messages, the whole prompt or input), so retries of the
    same request succeed on attempt N+1; in the ``"mock"`` field an explicit
    ``key`` may be given instead.
``retry_after=S``
    Add a ``Retry-After: S`` header to the failure response.
``tokens=N``
    Generate N completion tokens per choice instead of ``output_tokens``
    (still capped by the request's max tokens).
``sse``
    Answer a 200 as ``text/event-stream`` although the request did not ask to
    stream, in the endpoint's stream shape (:mod:`overnight.mock_engine.sse`),
    as transformers ``serve`` does for ``/v1/responses``.

Failures without ``sleep_ms`` are answered immediately. A request rejected
because the queue is full is not "seen" for ``fail_times``. An unknown setting,
or a value out of range, is a 400.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from overnight.mock_engine.prep import BadRequest, Prepared

__all__ = ["Directives", "read_directives"]

_MARKER = "[[mock:"
_MARKER_RE = re.compile(r"\[\[mock:([^\]]*)\]\]")
_SETTING_SPLIT_RE = re.compile(r"[,;\s]+")
_INT_SETTINGS = ("status", "fail_times", "tokens")
_MAX_TOKENS_SETTING = 1_000_000


def _parse_settings(text: str, into: dict[str, Any]) -> None:
    for match in _MARKER_RE.finditer(text):
        for item in _SETTING_SPLIT_RE.split(match.group(1)):
            if item:
                key, _, value = item.partition("=")
                into[key.strip()] = value.strip()


class Directives:
    """The settings scripted for one request, validated."""

    __slots__ = ("status", "sleep_ms", "fail_times", "retry_after", "tokens", "key", "sse")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.status: int | None = None
        self.sleep_ms: float | None = None
        self.fail_times: int | None = None
        self.retry_after: str | None = None
        self.tokens: int | None = None
        self.key: str | None = None
        self.sse = False
        for name, value in raw.items():
            if name in _INT_SETTINGS:
                try:
                    number = int(value)
                except (TypeError, ValueError):
                    raise BadRequest(f"mock setting '{name}' must be an integer", "mock") from None
                if (
                    number < 0
                    or (name == "status" and not 100 <= number <= 599)
                    or (name == "tokens" and number > _MAX_TOKENS_SETTING)
                ):
                    raise BadRequest(f"mock setting '{name}' is out of range", "mock")
                setattr(self, name, number)
            elif name == "sleep_ms":
                try:
                    self.sleep_ms = max(0.0, float(value))
                except (TypeError, ValueError):
                    raise BadRequest("mock setting 'sleep_ms' must be a number", "mock") from None
            elif name == "retry_after":
                self.retry_after = str(value)
            elif name == "key":
                self.key = str(value)
            elif name == "sse":
                self.sse = str(value).lower() not in ("0", "false", "no", "off")
            else:
                raise BadRequest(f"unknown mock setting '{name}'", "mock")

    def request_key(self, path: str, prep: Prepared) -> bytes:
        """What identifies the request across retries, for ``fail_times``."""
        if self.key is not None:
            return b"key\x00" + self.key.encode()
        return path.encode() + b"\x00" + orjson.dumps(prep.key_source)


def read_directives(body: dict[str, Any], prep: Prepared) -> Directives | None:
    """The request's scripted settings, or None when it scripts nothing."""
    raw: dict[str, Any] | None = None
    field = body.get("mock")
    if field is not None:
        raw = {}
        if isinstance(field, dict):
            raw.update(field)
        elif isinstance(field, str):
            _parse_settings(f"[[mock:{field}]]", raw)
        else:
            raise BadRequest("'mock' must be an object or a settings string", "mock")
    for text in prep.marker_texts:
        if _MARKER in text:
            if raw is None:
                raw = {}
            _parse_settings(text, raw)
    if raw is None:
        return None
    return Directives(raw)
