"""Uploads stream to storage and stop at the limit; names survive the round trip;
every failure is OpenAI-shaped JSON."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from overnight.api.app import create_app
from overnight.config import Settings

LIMIT = 4 * 1024 * 1024
BOUNDARY = "b0undary"


@pytest.fixture
async def app(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9", max_input_bytes=LIMIT))
    async with app.router.lifespan_context(app):
        yield app


def http(app, **kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **kw), base_url="http://t", timeout=60)


def sdk(app) -> AsyncOpenAI:
    return AsyncOpenAI(base_url="http://t/v1", api_key="k", http_client=http(app), max_retries=0)


def files_on_disk(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.parent.name == "files"]


class Huge:
    """A multipart body with a ``size``-byte file, generated as it is sent."""

    def __init__(self, size: int, *, filename: bytes = b"big.jsonl", purpose_first: bool = True) -> None:
        self.size, self.filename, self.purpose_first, self.sent = size, filename, purpose_first, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        purpose = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode()
        if self.purpose_first:
            yield purpose
        yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
               + self.filename + b'"\r\nContent-Type: application/octet-stream\r\n\r\n')
        block = b'{"custom_id": "x"}\n' * 3449  # ~64 KiB
        while self.sent < self.size:
            chunk = block[: self.size - self.sent]
            self.sent += len(chunk)
            yield chunk
        yield f"\r\n".encode()
        if not self.purpose_first:
            yield purpose
        yield f"--{BOUNDARY}--\r\n".encode()


HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def test_2gb_upload_stops_at_the_limit(app, tmp_path):
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    body = Huge(2 * 1024**3)
    async with http(app) as c:
        r = await c.post("/v1/files", content=body, headers=HEADERS)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "file" and str(LIMIT) in err["message"]
    # Read no more than the limit plus what was in flight, wrote nothing that stays.
    assert body.sent <= LIMIT + 2 * 65536
    assert files_on_disk(tmp_path) == []
    assert set(os.listdir(tempfile.gettempdir())) - tmp_before == set()


async def test_storage_sees_at_most_the_limit(app, monkeypatch):
    storage = app.state.storage
    written = []
    real_writer = storage.writer

    def counting_writer(key):
        w = real_writer(key)
        real_write = w.write

        async def write(data):
            written.append(len(data))
            await real_write(data)

        w.write = write
        return w

    monkeypatch.setattr(storage, "writer", counting_writer)
    async with http(app) as c:
        r = await c.post("/v1/files", content=Huge(64 * 1024**2), headers=HEADERS)
    assert r.status_code == 400
    assert sum(written) <= LIMIT


async def test_purpose_after_the_file_still_enforces_the_batch_limit(app, tmp_path):
    async with http(app) as c:
        r = await c.post("/v1/files", content=Huge(LIMIT + 1, purpose_first=False), headers=HEADERS)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert files_on_disk(tmp_path) == []


async def test_upload_at_the_limit_is_accepted(app):
    async with http(app) as c:
        r = await c.post("/v1/files", content=Huge(LIMIT), headers=HEADERS)
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == LIMIT


async def test_truncated_multipart_is_400_and_leaves_nothing(app, tmp_path):
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{{}}\n').encode()
    async with http(app) as c:
        r = await c.post("/v1/files", content=body, headers=HEADERS)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert files_on_disk(tmp_path) == []


@pytest.mark.parametrize("name", ["数据集.jsonl", 'say "hi".jsonl', "back\\slash;%20.jsonl", "émoji 🚀.jsonl"])
async def test_names_round_trip_through_the_sdk_and_content_disposition(app, name):
    client = sdk(app)
    f = await client.files.create(file=(name, b"{}\n"), purpose="batch")
    assert f.filename == name
    async with http(app) as c:
        r = await c.get(f"/v1/files/{f.id}/content")
    assert r.status_code == 200 and r.content == b"{}\n"
    cd = r.headers["content-disposition"]
    assert cd.startswith("attachment; ")
    ext = cd.split("filename*=", 1)[1]
    assert ext.startswith("UTF-8''") and unquote(ext[7:], errors="strict") == name
    fallback = cd.split('filename="', 1)[1].split('"', 1)[0]
    assert fallback.isascii() and '"' not in fallback


@pytest.mark.parametrize("raw", [b"a\x00b.jsonl", b"line\nbreak.jsonl", b"tab\x7f.jsonl"])
async def test_control_characters_in_a_filename_are_400_naming_file(app, tmp_path, raw):
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="').encode() + raw + (
            f'"\r\n\r\n{{}}\n\r\n--{BOUNDARY}--\r\n').encode()
    async with http(app) as c:
        r = await c.post("/v1/files", content=body, headers=HEADERS)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "file" and "control character" in r.json()["error"]["message"]
    assert files_on_disk(tmp_path) == []


async def test_nul_escaped_by_the_sdk_is_400_too(app):
    with pytest.raises(openai.BadRequestError) as exc:
        await sdk(app).files.create(file=("a\x00b.jsonl", b"{}\n"), purpose="batch")
    assert exc.value.body["param"] == "file"


async def test_disk_full_is_507_json(app, monkeypatch, tmp_path):
    from overnight.storage import local

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local._LocalWriter, "_open", full)
    with pytest.raises(openai.APIStatusError) as exc:
        await sdk(app).files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    assert exc.value.status_code == 507
    assert exc.value.body["code"] == "insufficient_storage" and "space" in exc.value.body["message"]
    assert files_on_disk(tmp_path) == []


async def test_unexpected_error_is_500_openai_json(app, monkeypatch):
    async def boom(**_kw):
        raise RuntimeError("bug")

    monkeypatch.setattr(app.state.store, "list_files", boom)
    async with http(app, raise_app_exceptions=False) as c:
        r = await c.get("/v1/files")
    assert r.status_code == 500
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    assert "bug" not in err["message"]
