"""Streaming validation of a batch input file. Every error names its line.

Memory stays flat in the number of lines: custom_id uniqueness is checked on
8-byte hashes kept in a compact array, and only a hash collision costs a second
pass over the file to name the lines involved.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from overnight.storage.base import Storage

__all__ = ["ValidationLimits", "ValidationResult", "validate_input", "MAX_REPORTED_ERRORS"]

#: Stop collecting after this many errors: enough to fix a file, small enough to return.
MAX_REPORTED_ERRORS = 100
#: Deepest body the dispatch serializer (orjson) writes; ``loads`` alone accepts 1,024.
MAX_BODY_DEPTH = 254


@dataclass(frozen=True, kw_only=True)
class ValidationLimits:
    max_requests: int
    max_bytes: int


@dataclass(kw_only=True)
class ValidationResult:
    total: int = 0
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _err(code: str, message: str, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "line": line, "param": param}


def _id_hash(custom_id: str) -> int:
    # Python's own string hash: fast, 64-bit here, and stable within one process,
    # which is all the two passes over one file need; equal hashes are re-checked
    # on the real strings, so a collision is never reported as a duplicate.
    return hash(custom_id) & 0xFFFF_FFFF_FFFF_FFFF


def check_line(raw: bytes, lineno: int, endpoint: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Parse and check one line; returns ``(request, None)`` or ``(None, error)``."""
    if not raw.strip():
        return None, _err("empty_line", f"Line {lineno} is empty; every line must be one JSON request.", lineno)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, _err("invalid_encoding", f"Line {lineno} is not valid UTF-8.", lineno)
        return None, _err(
            "invalid_json_line", f"Line {lineno} is not valid JSON at column {exc.colno}: {exc.msg}.", lineno
        )
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        return None, _err("invalid_json_line", f"Line {lineno} must be a JSON object, got {kind}.", lineno)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, _err(
            "missing_required_parameter" if custom_id is None else "invalid_type",
            f"Line {lineno}: 'custom_id' must be a non-empty string.",
            lineno,
            "custom_id",
        )
    method = obj.get("method")
    if method != "POST":
        return None, _err(
            "invalid_method", f"Line {lineno}: 'method' must be \"POST\", got {method!r}.", lineno, "method"
        )
    url = obj.get("url")
    if url != endpoint:
        return None, _err(
            "invalid_url",
            f"Line {lineno}: 'url' must match the batch endpoint {endpoint!r}, got {url!r}.",
            lineno,
            "url",
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        return None, _err("invalid_request", f"Line {lineno}: 'body' must be a JSON object.", lineno, "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return None, _err(
            "missing_required_parameter", f"Line {lineno}: 'body.model' must be a non-empty string.", lineno, "body.model"
        )
    if body.get("stream") is True:
        return None, _err(
            "invalid_request", f"Line {lineno}: streaming ('body.stream': true) is not supported in batches.",
            lineno, "body.stream",
        )
    try:
        orjson.dumps(body)  # exactly what dispatch does: a body it cannot send is refused here
    except orjson.JSONEncodeError:
        return None, _err(
            "invalid_request", f"Line {lineno}: 'body' is nested too deeply to send; at most "
            f"{MAX_BODY_DEPTH} levels of objects and arrays are supported.", lineno, "body",
        )
    return obj, None


async def validate_input(
    storage: Storage, key: str, *, endpoint: str, limits: ValidationLimits
) -> ValidationResult:
    """Check every line of the input object at ``key`` for ``endpoint``."""
    result = ValidationResult()
    size = await storage.size(key)
    if size > limits.max_bytes:
        result.errors.append(
            _err("file_too_large", f"The input file is {size} bytes; the limit is {limits.max_bytes} bytes.")
        )
        return result
    hashes = array("Q")
    lines = 0
    stopped = False  # hit an error cap: the file was not read to the end
    async for lineno, raw in storage.read_lines(key):
        lines = lineno
        obj, error = check_line(raw, lineno, endpoint)
        if error is not None:
            result.errors.append(error)
            if len(result.errors) >= MAX_REPORTED_ERRORS:
                stopped = True
                break
            continue
        assert obj is not None
        model = obj["body"]["model"]
        if result.model is None:
            result.model = model
        elif model != result.model:
            result.errors.append(
                _err(
                    "mismatched_model",
                    f"Line {lineno}: every request must use the same model; line uses {model!r}, "
                    f"earlier lines use {result.model!r}.",
                    lineno,
                    "body.model",
                )
            )
            if len(result.errors) >= MAX_REPORTED_ERRORS:
                stopped = True
                break
        hashes.append(_id_hash(obj["custom_id"]))
        if lineno > limits.max_requests:
            result.errors.append(
                _err(
                    "too_many_requests",
                    f"The input file has more than {limits.max_requests} requests (line {lineno}).",
                    lineno,
                )
            )
            stopped = True
            break
    if lines == 0:
        result.errors.append(_err("empty_file", "The input file is empty; it must contain at least one request."))
    result.total = lines
    if not stopped:
        # Duplicates are reported with the other errors, not only once those are fixed.
        dups = await _duplicate_errors(storage, key, hashes)
        if dups:
            merged = sorted(result.errors + dups, key=lambda e: e["line"] or 0)
            result.errors = merged[:MAX_REPORTED_ERRORS]
    return result


async def _duplicate_errors(storage: Storage, key: str, hashes: array) -> list[dict[str, Any]]:
    arr = np.frombuffer(hashes, dtype=np.uint64) if len(hashes) else np.zeros(0, dtype=np.uint64)
    if arr.size < 2:
        return []
    s = np.sort(arr)
    dup = np.unique(s[1:][s[1:] == s[:-1]])
    if dup.size == 0:
        return []
    # Rare path: a repeated hash. Walk the file again to name the lines, comparing the
    # real strings (a 64-bit hash collision between distinct ids is not an error).
    suspects = set(int(h) for h in dup)
    first_line: dict[str, int] = {}
    errors: list[dict[str, Any]] = []
    async for lineno, raw in storage.read_lines(key):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # reported by the first pass
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        if not isinstance(cid, str) or _id_hash(cid) not in suspects:
            continue
        if cid in first_line:
            errors.append(
                _err(
                    "duplicate_custom_id",
                    f"Line {lineno}: custom_id {cid!r} is already used on line {first_line[cid]}; "
                    "custom_id must be unique in the file.",
                    lineno,
                    "custom_id",
                )
            )
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        else:
            first_line[cid] = lineno
    return errors
