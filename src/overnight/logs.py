"""Log output for every command: lines for people, or one JSON object per line for
a log collector (``--log-format json`` / ``OVERNIGHT_LOG_FORMAT=json``).

The JSON form is the stdlib ``logging`` with ``JsonFormatter``: ``time`` (UTC,
RFC 3339 with milliseconds), ``level``, ``logger``, ``message``, then every field a
call passed in ``extra`` (``batch_id``, ``status``, ...), and ``exception`` with
the traceback when there is one. Anything a field holds that JSON cannot is
written as its ``str``. A message with newlines stays on its line (escaped).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import orjson

__all__ = ["JsonFormatter", "LogFormat", "configure_logging"]

#: Attributes every ``LogRecord`` has: anything else on a record came from ``extra``
#: (but uvicorn's ``color_message``, the message again with terminal colours).
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"}
#: Keys of the JSON object that ``extra`` may not replace.
_CORE = ("time", "level", "logger", "message")


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _CORE and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # e.g. an int beyond 64 bits: every field as text rather than no line
            return orjson.dumps({k: v if k in _CORE else str(v) for k, v in out.items()}).decode()


def configure_logging(level: str = "info", fmt: LogFormat | str = LogFormat.text, *,
                      text_format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Send every logger's records to stderr in ``fmt`` from ``level`` up (replacing
    any handler set before). A bad ``fmt`` is a ``ValueError`` naming the choices."""
    try:
        fmt = LogFormat(fmt)
    except ValueError:
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r} (--log-format / OVERNIGHT_LOG_FORMAT)") \
            from None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.json else logging.Formatter(text_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Python's own warnings as records too, so a JSON stream has no stray text lines.
    logging.captureWarnings(fmt is LogFormat.json)
