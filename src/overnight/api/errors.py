"""Map overnight's errors (and FastAPI's) to OpenAI's error JSON."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from overnight.errors import (
    ConflictError,
    InputError,
    InvalidRequestError,
    NotFoundError,
    OvernightError,
    StorageError,
    StorageFullError,
    StoreError,
)

__all__ = ["error_response", "install_error_handlers"]

log = logging.getLogger("overnight.api")


def error_response(
    status: int, message: str, *, type_: str | None = None, param: str | None = None, code: str | None = None,
    line: int | None = None,
) -> JSONResponse:
    err = {
        "message": message,
        "type": type_ or ("invalid_request_error" if status < 500 else "server_error"),
        "param": param,
        "code": code,
    }
    if line is not None:
        err["line"] = line
    return JSONResponse({"error": err}, status_code=status)


def _status_for(exc: OvernightError) -> int:
    if exc.code == "invalid_api_key":
        return 401
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, InvalidRequestError):
        return 400
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, StorageFullError):
        return 507
    if isinstance(exc, (StoreError, StorageError)):
        return 503
    return 500


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OvernightError)
    async def _overnight(_: Request, exc: OvernightError) -> JSONResponse:
        status = _status_for(exc)
        if status >= 500:
            log.error("request failed: %s", exc)
        return error_response(
            status,
            exc.message,
            param=getattr(exc, "param", None),
            code=exc.code,
            line=exc.line if isinstance(exc, InputError) else None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            # FastAPI's loc is a character offset; name the line and column instead.
            doc = exc.body if isinstance(exc.body, str) else ""
            pos = first["loc"][-1] if isinstance(first["loc"][-1], int) else 0
            line = doc.count("\n", 0, pos) + 1
            col = pos - (doc.rfind("\n", 0, pos) + 1) + 1
            reason = (first.get("ctx") or {}).get("error") or "invalid JSON"
            return error_response(
                400, f"The request body is not valid JSON: {reason} at line {line}, column {col}.",
                code="invalid_json", line=line,
            )
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        msg = first.get("msg", "Invalid request")
        if first.get("type") == "missing":
            msg = f"Missing required parameter: '{param}'."
        elif param:
            msg = f"Invalid value for '{param}': {msg}."
        return error_response(400, msg, param=param, code="missing_required_parameter" if first.get("type") == "missing" else "invalid_value")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Anything unplanned still answers in OpenAI's shape (never plain text).
        log.error("unhandled error: %r", exc)  # the server logs the traceback
        return error_response(500, "The server had an error while processing your request.", code="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=None)
