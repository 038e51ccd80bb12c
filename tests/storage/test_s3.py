"""S3 storage against a real S3 protocol server (moto in server mode), plus URL parsing.

moto runs as ``ThreadedMotoServer`` inside a child process rather than a thread of
the test process: the memory test measures this process's RSS, which must not
include the objects moto keeps in memory, and the server gets its own core.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import psutil
import pytest
from obstore.store import S3Store

from overnight.errors import NotFoundError, StorageError
from overnight.storage import open_storage
from overnight.storage.s3 import DEFAULT_PART_SIZE, MIB, S3Storage, parse_s3_url, redact_url
from tests.storage.contract import StorageContract

BUCKET = "overnight-test"
REGION = "us-east-1"
KEY_ID, SECRET = "test-key-id", "test-secret"

_MOTO_CHILD = """
import sys
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()  # returns when the test process closes the pipe or dies
server.stop()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Moto:
    endpoint: str
    client: Any  # boto3 S3 client

    def url(self, prefix: str, **params: str) -> str:
        query = {
            "endpoint_url": self.endpoint,
            "region": REGION,
            "force_path_style": "true",
            "access_key_id": KEY_ID,
            "secret_access_key": SECRET,
            **params,
        }
        return f"s3://{BUCKET}/{prefix}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def keys(self, prefix: str) -> list[str]:
        resp = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for o in resp.get("Contents", []))

    def uploads(self, prefix: str) -> list[dict[str, Any]]:
        return self.client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])

    def uploaded_parts(self, key: str) -> list[int]:
        parts: list[int] = []
        for upload in self.client.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", []):
            if upload["Key"] == key:
                resp = self.client.list_parts(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"])
                parts += [p["PartNumber"] for p in resp.get("Parts", [])]
        return parts


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_CHILD, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"moto server did not start (exit code {proc.poll()})")
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )
        client.create_bucket(Bucket=BUCKET)
        yield Moto(endpoint, client)
        client.close()
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def _open(url: str) -> S3Storage:
    storage = open_storage(url)
    assert isinstance(storage, S3Storage)
    await storage.open()
    return storage


@pytest.fixture
async def storage(moto: Moto, prefix: str) -> AsyncIterator[S3Storage]:
    # 5 MiB parts (the S3 minimum) keep multipart tests small.
    storage = await _open(moto.url(prefix, part_size_mib="5"))
    yield storage
    await storage.aclose()


class TestS3StorageContract(StorageContract):
    pass


# -- helpers ---------------------------------------------------------------
def _block(i: int, size: int = MIB) -> bytes:
    """Deterministic, non-repeating test data: a counter followed by filler."""
    head = i.to_bytes(8, "big")
    return head + (head * (size // 8))[: size - 8]


async def _wait_for_parts(moto: Moto, key: str, count: int, timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        parts = await asyncio.to_thread(moto.uploaded_parts, key)
        if len(parts) >= count or time.monotonic() > deadline:
            return parts
        await asyncio.sleep(0.05)


class _PeakRss:
    """Samples this process's resident memory on a thread until stopped."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


# -- S3 behaviour ------------------------------------------------------------
async def test_objects_live_under_the_url_prefix(moto: Moto, storage: S3Storage, prefix: str) -> None:
    await storage.put_bytes("files/file_1", b"data")
    assert moto.keys(prefix) == [f"{prefix}/files/file_1"]
    body = moto.client.get_object(Bucket=BUCKET, Key=f"{prefix}/files/file_1")["Body"].read()
    assert body == b"data"


async def test_small_object_is_one_put_without_multipart(moto: Moto, storage: S3Storage, prefix: str) -> None:
    w = storage.writer("small")
    await w.write(b"a" * (4 * MIB))
    assert not w.multipart
    await w.commit()
    assert moto.uploads(prefix) == []
    assert "-" not in moto.client.head_object(Bucket=BUCKET, Key=f"{prefix}/small")["ETag"]


async def test_multipart_upload_of_several_parts(moto: Moto, storage: S3Storage, prefix: str) -> None:
    # 17 MiB in odd-sized writes -> parts of 5, 5, 5 and 2 MiB.
    data = b"".join(_block(i) for i in range(17))
    w = storage.writer("big/object")
    for i in range(0, len(data), 700_001):
        await w.write(data[i : i + 700_001])
    assert w.multipart
    assert await w.commit() == len(data)

    head = moto.client.head_object(Bucket=BUCKET, Key=f"{prefix}/big/object")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-4")  # a multipart ETag names its part count
    assert moto.uploads(prefix) == []
    assert await storage.get_bytes("big/object") == data


async def test_multipart_object_is_invisible_until_commit(moto: Moto, storage: S3Storage, prefix: str) -> None:
    w = storage.writer("pending")
    for i in range(11):
        await w.write(_block(i))
    assert len(await _wait_for_parts(moto, f"{prefix}/pending", 2)) >= 2
    with pytest.raises(NotFoundError):
        await storage.size("pending")
    assert moto.keys(prefix) == []
    await w.commit()
    assert await storage.size("pending") == 11 * MIB


async def test_crash_between_parts_then_abort_leaves_no_object_and_no_upload(
    moto: Moto, storage: S3Storage, prefix: str
) -> None:
    key = f"{prefix}/crashed"
    w = storage.writer("crashed")
    for i in range(11):  # two full 5 MiB parts and the start of a third
        await w.write(_block(i))
    assert len(await _wait_for_parts(moto, key, 2)) >= 2
    assert [u["Key"] for u in moto.uploads(prefix)] == [key]

    await w.abort()

    assert moto.uploads(prefix) == []
    assert moto.keys(prefix) == []
    with pytest.raises(NotFoundError):
        await storage.size("crashed")
    with pytest.raises(StorageError):
        await w.write(b"more")


async def test_writer_abandoned_by_exception_aborts_the_multipart_upload(
    moto: Moto, storage: S3Storage, prefix: str
) -> None:
    await storage.put_bytes("survivor", b"previous version")
    key = f"{prefix}/survivor"
    with pytest.raises(RuntimeError, match="engine exploded"):
        async with storage.writer("survivor") as w:
            for i in range(11):
                await w.write(_block(i))
            assert len(await _wait_for_parts(moto, key, 2)) >= 2
            raise RuntimeError("engine exploded")

    assert moto.uploads(prefix) == []
    assert await storage.get_bytes("survivor") == b"previous version"


async def test_large_file_streams_both_ways_in_bounded_memory(moto: Moto, prefix: str) -> None:
    # Default part size and read window: this pins the memory a real writer/reader costs.
    storage = await _open(moto.url(prefix))
    assert storage.settings.part_size == DEFAULT_PART_SIZE
    blocks = 105  # MiB, i.e. > 100 MB
    written = hashlib.sha256()
    with _PeakRss() as write_rss:
        async with storage.writer("huge.jsonl") as w:
            for i in range(blocks):
                block = _block(i)
                written.update(block)
                await w.write(block)
    read = hashlib.sha256()
    total = 0
    with _PeakRss() as read_rss:
        async for chunk in storage.read("huge.jsonl"):
            read.update(chunk)
            total += len(chunk)
    assert total == blocks * MIB
    assert await storage.size("huge.jsonl") == blocks * MIB
    assert read.hexdigest() == written.hexdigest()
    # Measured ~20 MiB each way: a writer holds the part being filled plus two in
    # flight, a reader two 8 MiB windows. Buffering the object would cost > 100 MiB.
    for phase, rss in (("write", write_rss), ("read", read_rss)):
        assert rss.growth < 48 * MIB, f"{phase} grew RSS by {rss.growth / MIB:.1f} MiB for {blocks} MiB"


async def test_object_replaced_mid_read_fails_instead_of_mixing_versions(moto: Moto, prefix: str) -> None:
    storage = await _open(moto.url(prefix, read_window_mib="1"))
    await storage.put_bytes("moving", b"a" * (3 * MIB))
    reader = storage.read("moving")
    assert await reader.__anext__() == b"a" * MIB
    await storage.put_bytes("moving", b"b" * (3 * MIB))
    with pytest.raises(StorageError, match="replaced while being read"):
        async for _ in reader:
            pass


async def test_write_to_a_missing_bucket_is_a_storage_error(moto: Moto) -> None:
    url = moto.url("p").replace(f"s3://{BUCKET}/", "s3://no-such-bucket/")
    storage = await _open(url)
    with pytest.raises(StorageError) as info:
        await storage.put_bytes("k", b"x")
    assert not isinstance(info.value, NotFoundError)


async def test_upload_failing_mid_stream_surfaces_as_storage_error(moto: Moto) -> None:
    bucket = f"doomed-{uuid.uuid4().hex[:8]}"
    moto.client.create_bucket(Bucket=bucket)
    storage = await _open(moto.url("p", part_size_mib="5").replace(f"s3://{BUCKET}/", f"s3://{bucket}/"))
    w = storage.writer("obj")
    for i in range(11):
        await w.write(_block(i))
    moto.client.delete_bucket(Bucket=bucket)  # every further part upload now fails
    with pytest.raises(StorageError):
        for i in range(11, 40):
            await w.write(_block(i))
        await w.commit()
    await w.abort()  # after a failure, abort is a quiet no-op


async def test_configuration_from_aws_environment_variables(
    moto: Moto, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    storage = await _open(f"s3://{BUCKET}/{prefix}")
    assert storage.settings.endpoint == moto.endpoint
    assert storage.settings.virtual_hosted_style is False
    await storage.put_bytes("from-env", b"configured by env")
    assert moto.keys(prefix) == [f"{prefix}/from-env"]
    assert await storage.get_bytes("from-env") == b"configured by env"


async def test_virtual_hosted_style_sends_the_bucket_in_the_host_name(
    moto: Moto, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TOS-style addressing end to end: the HTTP client reaches moto through it as a
    # proxy, so moto sees Host: <bucket>.tos-s3-cn-beijing.volces.com and must find
    # the bucket from the host name alone.
    monkeypatch.setenv("HTTP_PROXY", moto.endpoint)
    monkeypatch.setenv("http_proxy", moto.endpoint)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    url = (
        f"s3://{BUCKET}/{prefix}?endpoint_url=http://tos-s3-cn-beijing.volces.com&region=cn-beijing"
        f"&virtual_hosted_style=true&access_key_id={KEY_ID}&secret_access_key={SECRET}"
    )
    storage = await _open(url)
    assert storage.settings.endpoint == f"http://{BUCKET}.tos-s3-cn-beijing.volces.com"
    await storage.put_bytes("vhost", b"via host name")
    assert moto.keys(prefix) == [f"{prefix}/vhost"]
    assert await storage.get_bytes("vhost") == b"via host name"


@pytest.mark.parametrize("key", ["", "/lead", "trail/", "a//b", "a/../b", "./a"])
async def test_malformed_keys_are_refused(storage: S3Storage, key: str) -> None:
    with pytest.raises(StorageError):
        storage.writer(key)
    with pytest.raises(StorageError):
        await storage.size(key)


async def test_commit_twice_is_refused(storage: S3Storage) -> None:
    w = storage.writer("once")
    await w.write(b"x")
    await w.commit()
    with pytest.raises(StorageError):
        await w.commit()


# -- URL parsing (no server) -------------------------------------------------
def test_tos_url_uses_virtual_hosted_style_with_bucket_in_host() -> None:
    s = parse_s3_url(
        "s3://my-bucket/batches/in?endpoint_url=https://tos-s3-cn-beijing.volces.com"
        "&region=cn-beijing&virtual_hosted_style=true",
        env={"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"},
    )
    assert s.bucket == "my-bucket"
    assert s.prefix == "batches/in"
    assert s.endpoint == "https://my-bucket.tos-s3-cn-beijing.volces.com"
    assert s.virtual_hosted_style is True
    assert s.region == "cn-beijing"
    assert s.allow_http is False
    assert (s.access_key_id, s.secret_access_key, s.session_token) == ("AK", "SK", None)
    config = s.store_config()
    assert config["virtual_hosted_style_request"] is True
    assert config["endpoint"] == "https://my-bucket.tos-s3-cn-beijing.volces.com"
    # obstore accepts the configuration (no request is made).
    store = S3Store(s.bucket, prefix=s.prefix, **config)
    assert store.config["virtual_hosted_style_request"] in (True, "true")


def test_tos_endpoint_defaults_to_virtual_hosted_style() -> None:
    s = parse_s3_url("s3://b1/p?endpoint_url=tos-s3-cn-shanghai.ivolces.com&region=cn-shanghai", env={})
    assert s.virtual_hosted_style is True
    assert s.endpoint == "https://b1.tos-s3-cn-shanghai.ivolces.com"


def test_tos_endpoint_already_naming_the_bucket_is_kept() -> None:
    s = parse_s3_url("s3://b1?endpoint_url=https://b1.tos-s3-cn-beijing.volces.com/&virtual_hosted_style=1", env={})
    assert s.endpoint == "https://b1.tos-s3-cn-beijing.volces.com"
    assert s.prefix == ""


def test_minio_url_uses_path_style_over_plain_http() -> None:
    s = parse_s3_url(
        "s3://data/overnight?endpoint_url=http://127.0.0.1:9000&region=us-east-1"
        "&force_path_style=true&virtual_hosted_style=false",
        env={},
    )
    assert s.endpoint == "http://127.0.0.1:9000"
    assert s.virtual_hosted_style is False
    assert s.allow_http is True
    assert s.store_config()["virtual_hosted_style_request"] is False
    assert s.access_key_id is None  # left to the default credential chain


def test_custom_endpoint_defaults_to_path_style() -> None:
    assert parse_s3_url("s3://b1?endpoint_url=http://minio:9000", env={}).virtual_hosted_style is False


def test_aws_defaults_to_virtual_hosted_style_except_for_dotted_buckets() -> None:
    aws = parse_s3_url("s3://plain-bucket/x", env={})
    assert (aws.endpoint, aws.virtual_hosted_style, aws.region) == (None, True, "us-east-1")
    assert parse_s3_url("s3://dotted.bucket/x", env={}).virtual_hosted_style is False


def test_environment_fills_what_the_url_leaves_out() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "http://s3-specific:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_REGION": "eu-central-1",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_SESSION_TOKEN": "TOKEN",
    }
    s = parse_s3_url("s3://b1/p", env=env)
    assert s.endpoint == "http://s3-specific:2"
    assert s.region == "eu-central-1"
    assert (s.access_key_id, s.secret_access_key, s.session_token) == ("AK", "SK", "TOKEN")

    fallback = parse_s3_url("s3://b1/p", env={"AWS_ENDPOINT_URL": "http://generic:1", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (fallback.endpoint, fallback.region) == ("http://generic:1", "eu-west-1")


def test_url_parameters_win_over_environment_and_credentials_are_not_mixed() -> None:
    env = {"AWS_REGION": "eu-central-1", "AWS_ACCESS_KEY_ID": "ENVAK", "AWS_SECRET_ACCESS_KEY": "ENVSK",
           "AWS_SESSION_TOKEN": "ENVTOKEN", "AWS_ENDPOINT_URL": "http://env:1"}
    s = parse_s3_url("s3://b1/p?region=ap-south-1&endpoint_url=http://url:2&access_key_id=AK&secret_access_key=SK", env=env)
    assert s.region == "ap-south-1"
    assert s.endpoint == "http://url:2"
    # The env session token belongs to the env key, not to the URL's key.
    assert (s.access_key_id, s.secret_access_key, s.session_token) == ("AK", "SK", None)


def test_tuning_parameters() -> None:
    s = parse_s3_url("s3://b1?part_size_mib=16&upload_concurrency=4&read_window_mib=32", env={})
    assert (s.part_size, s.upload_concurrency, s.read_window) == (16 * MIB, 4, 32 * MIB)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3:///prefix", "bucket"),
        ("s3://b1?force_path_style=true&virtual_hosted_style=true", "choose one"),
        ("s3://b1?endpoint=http://x", "unknown s3 URL parameter"),
        ("s3://b1?force_path_style=maybe", "not a boolean"),
        ("s3://b1?part_size_mib=4", "between 5 and 5120"),
        ("s3://b1?upload_concurrency=many", "not an integer"),
        ("s3://b1?access_key_id=AK", "both access_key_id and secret_access_key"),
        ("s3://b1?endpoint_url=ftp://host", "https://host"),
        ("s3://b1/a//b", "s3 prefix"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        parse_s3_url(url, env={})


def test_secrets_are_masked_in_the_storage_url() -> None:
    url = "s3://b1/p?endpoint_url=http://127.0.0.1:9000&access_key_id=AK&secret_access_key=SK&session_token=T"
    storage = open_storage(url)
    assert isinstance(storage, S3Storage)
    assert "SK" not in storage.url and "=T" not in storage.url
    assert "secret_access_key=***" in storage.url
    assert "endpoint_url=http://127.0.0.1:9000" in storage.url
    assert redact_url("s3://b1/p") == "s3://b1/p"
