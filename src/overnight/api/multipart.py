"""multipart/form-data parsed as it arrives, as a stream of events.

Starlette's ``request.form()`` spools a file part to a temporary file and returns
only when the whole body is in; an upload over the limit is then written twice and
rejected only at the end. Here python-multipart's push parser turns each received
chunk into events at once, so the caller writes file bytes straight to storage and
can stop (and drop the partial object) as soon as a limit is passed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from overnight.errors import InvalidRequestError

__all__ = ["Field", "FileStart", "FileData", "FileEnd", "form_events", "check_filename"]

#: A non-file field (``purpose``, ``expires_after[seconds]`` ...) is short.
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16


@dataclass(frozen=True)
class Field:
    name: str
    value: str


@dataclass(frozen=True)
class FileStart:
    name: str
    filename: str


@dataclass(frozen=True)
class FileData:
    data: bytes


@dataclass(frozen=True)
class FileEnd:
    pass


Event = Field | FileStart | FileData | FileEnd


#: HTML5 form encoding (browsers, httpx and so the openai SDK) escapes ``"`` and
#: control characters in names as ``%XX``; those escapes are undone, nothing else.
_HTML5_ESCAPE = re.compile(r"%(2[2]|[01][0-9A-Fa-f])")


def _decode(raw: bytes) -> str:
    # Clients send non-ASCII names as raw UTF-8 bytes.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return _HTML5_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def check_filename(name: str, param: str = "file") -> str:
    """A filename is stored and echoed in headers: no control characters."""
    bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise InvalidRequestError(
            f"The filename of '{param}' contains a control character (U+{ord(bad):04X}); rename the file.",
            param=param,
        )
    return name


def _boundary(content_type: str) -> bytes:
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise InvalidRequestError(
            f"Uploads must be multipart/form-data, got {content_type or 'no Content-Type'!r}.", param="file"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequestError("The multipart Content-Type has no boundary.", param="file")
    return boundary


class _Collector:
    """Push-parser callbacks that queue events for the async side."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.parts = 0
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._field: tuple[str, bytearray] | None = None
        self._in_file = False

    # header assembly
    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequestError(f"The upload has more than {MAX_PARTS} form parts.", param="file")
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._hname).lower()] = bytes(self._hvalue)
        self._hname.clear()
        self._hvalue.clear()

    def on_headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        _, params = parse_options_header(disposition)
        name = _decode(params.get(b"name", b""))
        if b"filename" in params:
            filename = check_filename(_decode(params[b"filename"]), name or "file")
            self._in_file = True
            self.events.append(FileStart(name, filename))
        else:
            self._field = (name, bytearray())

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.events.append(FileData(data[start:end]))
            return
        assert self._field is not None
        buf = self._field[1]
        buf += data[start:end]
        if len(buf) > MAX_FIELD_BYTES:
            raise InvalidRequestError(
                f"Form field '{self._field[0]}' is longer than {MAX_FIELD_BYTES} bytes.", param=self._field[0] or None
            )

    def on_part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            self.events.append(FileEnd())
        elif self._field is not None:
            name, buf = self._field
            self._field = None
            try:
                value = buf.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequestError(f"Form field '{name}' is not valid UTF-8.", param=name or None) from None
            self.events.append(Field(name, value))

    def callbacks(self) -> dict[str, object]:
        return {
            name: getattr(self, name)
            for name in (
                "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
                "on_headers_finished", "on_part_data", "on_part_end",
            )
        }


async def form_events(content_type: str, body: AsyncIterator[bytes]) -> AsyncIterator[Event]:
    """Parse ``body`` chunk by chunk; yields the events each chunk completes. File
    data comes as it arrives (consecutive pieces of one chunk joined)."""
    collector = _Collector()
    parser = MultipartParser(_boundary(content_type), collector.callbacks())  # type: ignore[arg-type]
    async for chunk in body:
        if not chunk:
            continue
        try:
            parser.write(chunk)
        except InvalidRequestError:
            raise
        except Exception as exc:  # python-multipart's parse errors
            raise InvalidRequestError(f"Could not parse the multipart upload: {exc}", param="file") from exc
        pending, collector.events = collector.events, []
        data: list[bytes] = []
        for ev in pending:
            if isinstance(ev, FileData):
                data.append(ev.data)
                continue
            if data:
                yield FileData(b"".join(data))
                data = []
            yield ev
        if data:
            yield FileData(b"".join(data))
    try:
        parser.finalize()
    except Exception as exc:
        raise InvalidRequestError(f"Could not parse the multipart upload: {exc}", param="file") from exc
    if parser.state != MultipartState.END:
        raise InvalidRequestError(
            "The multipart upload ended before its closing boundary (truncated or malformed).", param="file"
        )
    for ev in collector.events:
        yield ev
