"""S3 and S3-compatible storage (AWS S3, MinIO, Volcengine TOS): ``s3://bucket/prefix``.

Built on ``obstore`` (Rust ``object_store``): every request is async and never blocks
the event loop, and the library retries transient HTTP failures itself.

Configuration
-------------

The URL names the bucket and an optional key prefix; every object key is stored
under ``<prefix>/<key>``. Each setting comes from a URL query parameter first, then
from the standard AWS environment variable:

| URL parameter          | Environment variable (fallback)                 | Meaning |
|------------------------|-------------------------------------------------|---------|
| `endpoint_url`         | `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`  | S3 API endpoint; unset = AWS S3. `http://` allowed. |
| `region`               | `AWS_REGION`, then `AWS_DEFAULT_REGION`         | Signing region; default `us-east-1`. |
| `access_key_id`        | `AWS_ACCESS_KEY_ID`                             | Static credentials, taken as a group: all from |
| `secret_access_key`    | `AWS_SECRET_ACCESS_KEY`                         | the URL if it names a key, otherwise all from |
| `session_token`        | `AWS_SESSION_TOKEN`                             | the environment. |
| `force_path_style`     | -                                               | `true`: requests go to `<endpoint>/<bucket>/<key>`. |
| `virtual_hosted_style` | -                                               | `true`: requests go to `<bucket>.<endpoint host>/<key>`. |
| `part_size_mib`        | -                                               | Multipart part size, 5..5120; default 8. |
| `upload_concurrency`   | -                                               | Parts uploaded at once per writer; default 2. |
| `read_window_mib`      | -                                               | Bytes per ranged GET; default 8. |

Unknown parameters are rejected (a typo must not silently fall back to a default).

Without static credentials the usual AWS credential chain of ``object_store`` applies
(web identity / IRSA, ECS/EKS container credentials, EC2 instance metadata); note that
``~/.aws/credentials`` profiles are *not* read. Secrets in the URL work but end up
wherever the URL is written; prefer the environment. ``self.url`` has them masked.

Addressing style: ``virtual_hosted_style`` and ``force_path_style`` are mutually
exclusive; when neither is given, AWS S3 (no endpoint) uses virtual-hosted style,
endpoints on ``volces.com``/``ivolces.com``/``bytepluses.com`` (TOS) use virtual-hosted
style, and every other endpoint uses path style. For virtual-hosted style with an
endpoint, the bucket is prepended to the endpoint's host name.

AWS S3::

    s3://my-bucket/overnight?region=eu-west-1
    # credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN),
    # or an IAM role (IRSA, instance profile). No endpoint needed.

MinIO (and most self-hosted S3 servers; path style, plain HTTP is fine)::

    s3://my-bucket/overnight?endpoint_url=http://127.0.0.1:9000&region=us-east-1&force_path_style=true
    # credentials: AWS_ACCESS_KEY_ID=<MinIO access key>, AWS_SECRET_ACCESS_KEY=<secret key>

Volcengine TOS through its S3-compatible endpoint (TOS accepts *only* virtual-hosted
style and SigV4; the S3 endpoint is ``tos-s3-<region>.volces.com``, inside Volcengine
``tos-s3-<region>.ivolces.com`` -- not the native ``tos-<region>.volces.com``)::

    s3://my-bucket/overnight?endpoint_url=https://tos-s3-cn-beijing.volces.com&region=cn-beijing&virtual_hosted_style=true
    # requests go to https://my-bucket.tos-s3-cn-beijing.volces.com/overnight/<key>
    # credentials: AWS_ACCESS_KEY_ID=<Volcengine AccessKey ID>, AWS_SECRET_ACCESS_KEY=<SecretAccessKey>

Behaviour
---------

* Reads are ranged GETs of ``read_window_mib`` each, the next window fetched while the
  current one is consumed, pinned to the ETag seen at the start so an object replaced
  mid-read fails loudly instead of mixing two versions. Memory per reader is about two
  windows, and a slow consumer never holds an HTTP response open.
* Writes buffer up to one part in memory. An object that stays below one part is sent
  with a single PUT on ``commit()``. A larger one streams through a multipart upload
  (parts of ``part_size_mib``, all but the last exactly that size); memory per writer is
  about ``(upload_concurrency + 2) * part_size``. The object becomes visible only when
  ``commit()`` completes the upload; ``abort()`` (or an exception inside ``async with``)
  aborts it. A process that dies mid-write leaves an incomplete multipart upload, which
  is invisible but billed: configure a bucket lifecycle rule that aborts incomplete
  multipart uploads after a day or so.
* Largest object: 10,000 parts (an S3 limit), i.e. about 78 GiB at the default part size.
* ``delete()`` reports whether the object existed with a HEAD before the DELETE (S3's
  DELETE does not say); a concurrent writer can make that answer stale.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import obstore
import obstore.exceptions as obs_exc
from obstore.store import S3Store

from overnight.defaults import READ_CHUNK_BYTES
from overnight.errors import NotFoundError, OvernightError, StorageError
from overnight.storage.base import Storage, StorageWriter

__all__ = ["S3Settings", "S3Storage", "parse_s3_url", "redact_url"]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: S3's own limits: every part but the last is at least 5 MiB, at most 5 GiB.
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5120 * MIB
#: 8 MiB parts: big enough that a 10 GB file needs ~1,200 requests, small enough that
#: a writer costs tens of MiB even with a few parts in flight.
DEFAULT_PART_SIZE = 8 * MIB
#: Two parts in flight keep one upload busy while the next part fills, without letting
#: many concurrent writers multiply memory.
DEFAULT_UPLOAD_CONCURRENCY = 2
#: One ranged GET per 8 MiB: amortises S3's first-byte latency; small enough that each
#: request finishes well inside the HTTP client's timeout whatever the consumer does.
DEFAULT_READ_WINDOW = 8 * MIB
#: Writes are handed to the upload in batches of this size: one hand-off per line
#: would cost a Rust/Python round trip per line.
_FEED_BYTES = 1 * MIB
_FEED_QUEUE_DEPTH = 4
#: Hosts that accept only virtual-hosted-style requests (Volcengine / BytePlus TOS).
_VIRTUAL_HOSTED_ONLY_SUFFIXES = (".volces.com", ".ivolces.com", ".bytepluses.com", ".ibytepluses.com")

_SECRET_PARAMS = frozenset({"secret_access_key", "session_token"})
_KNOWN_PARAMS = (
    "endpoint_url",
    "region",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "force_path_style",
    "virtual_hosted_style",
    "part_size_mib",
    "upload_concurrency",
    "read_window_mib",
)


@dataclass(frozen=True)
class S3Settings:
    """Everything needed to talk to one bucket, resolved from the URL and environment."""

    bucket: str
    prefix: str
    #: Final endpoint handed to the client (for virtual-hosted style it includes the
    #: bucket); None means AWS S3's regional endpoint.
    endpoint: str | None
    region: str
    virtual_hosted_style: bool
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    part_size: int = DEFAULT_PART_SIZE
    upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY
    read_window: int = DEFAULT_READ_WINDOW

    @property
    def allow_http(self) -> bool:
        return self.endpoint is not None and self.endpoint.startswith("http://")

    def store_config(self) -> dict[str, Any]:
        """Keyword arguments for ``obstore.store.S3Store`` (without the bucket)."""
        config: dict[str, Any] = {
            "region": self.region,
            "virtual_hosted_style_request": self.virtual_hosted_style,
        }
        if self.endpoint is not None:
            # object_store lets AWS_ENDPOINT_URL_S3 from the environment win over
            # ``endpoint``; setting both keeps the URL's choice authoritative.
            config["endpoint"] = self.endpoint
            config["aws_endpoint_url_s3"] = self.endpoint
        if self.access_key_id is not None:
            config["access_key_id"] = self.access_key_id
            config["secret_access_key"] = self.secret_access_key
            if self.session_token:
                config["session_token"] = self.session_token
        return config


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise StorageError(f"s3 URL parameter {name}={value!r} is not a boolean (use true or false)")


def _parse_int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise StorageError(f"s3 URL parameter {name}={value!r} is not an integer") from None
    if not lo <= number <= hi:
        raise StorageError(f"s3 URL parameter {name}={number} must be between {lo} and {hi}")
    return number


def _normalize_endpoint(raw: str) -> str:
    endpoint = raw.strip().rstrip("/")
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"s3 endpoint {raw!r} must look like https://host[:port]")
    return endpoint


def _with_bucket_host(endpoint: str, bucket: str) -> str:
    """``https://host`` -> ``https://bucket.host`` (unless the bucket is already there)."""
    parts = urlsplit(endpoint)
    if parts.netloc.startswith(bucket + "."):
        return endpoint
    return urlunsplit(parts._replace(netloc=f"{bucket}.{parts.netloc}"))


def parse_s3_url(url: str, env: Mapping[str, str] | None = None) -> S3Settings:
    """Resolve ``s3://bucket/prefix?params`` plus AWS environment variables into settings."""
    env = os.environ if env is None else env
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise StorageError(f"not an s3 URL: {redact_url(url)!r}")
    bucket = parts.netloc
    if not bucket or "@" in bucket:
        raise StorageError("s3 URL needs a bucket: s3://bucket/prefix (credentials go in parameters or env)")
    prefix = parts.path.strip("/")
    if prefix:
        _check_key(prefix, what="s3 prefix")

    params: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _KNOWN_PARAMS:
            raise StorageError(f"unknown s3 URL parameter {name!r}; known: {', '.join(_KNOWN_PARAMS)}")
        params[name] = value

    def from_env(*names: str) -> str | None:
        for name in names:
            if env.get(name):
                return env[name]
        return None

    raw_endpoint = params.get("endpoint_url") or from_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    endpoint = _normalize_endpoint(raw_endpoint) if raw_endpoint else None
    region = params.get("region") or from_env("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1"

    path_style = _parse_bool("force_path_style", params["force_path_style"]) if "force_path_style" in params else None
    vhost = (
        _parse_bool("virtual_hosted_style", params["virtual_hosted_style"])
        if "virtual_hosted_style" in params
        else None
    )
    if path_style and vhost:
        raise StorageError("s3 URL sets both force_path_style and virtual_hosted_style; choose one")
    if vhost is None:
        if path_style is not None:
            vhost = not path_style
        elif endpoint is None:
            # AWS: virtual-hosted is the recommended style, but a dotted bucket name
            # would not match the TLS certificate of <bucket>.s3.<region>.amazonaws.com.
            vhost = "." not in bucket
        else:
            host = urlsplit(endpoint).hostname or ""
            vhost = host.endswith(_VIRTUAL_HOSTED_ONLY_SUFFIXES)
    if vhost and endpoint is not None:
        endpoint = _with_bucket_host(endpoint, bucket)

    if "access_key_id" in params or "secret_access_key" in params:
        key_id, secret = params.get("access_key_id"), params.get("secret_access_key")
        token = params.get("session_token")
        if not key_id or not secret:
            raise StorageError("s3 URL must give both access_key_id and secret_access_key, or neither")
    else:
        key_id, secret = from_env("AWS_ACCESS_KEY_ID"), from_env("AWS_SECRET_ACCESS_KEY")
        token = from_env("AWS_SESSION_TOKEN")
        if not (key_id and secret):  # leave it to the default credential chain
            key_id = secret = token = None

    return S3Settings(
        bucket=bucket,
        prefix=prefix,
        endpoint=endpoint,
        region=region,
        virtual_hosted_style=vhost,
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=token or None,
        part_size=_parse_int("part_size_mib", params["part_size_mib"], MIN_PART_SIZE // MIB, MAX_PART_SIZE // MIB) * MIB
        if "part_size_mib" in params
        else DEFAULT_PART_SIZE,
        upload_concurrency=_parse_int("upload_concurrency", params["upload_concurrency"], 1, 64)
        if "upload_concurrency" in params
        else DEFAULT_UPLOAD_CONCURRENCY,
        read_window=_parse_int("read_window_mib", params["read_window_mib"], 1, 1024) * MIB
        if "read_window_mib" in params
        else DEFAULT_READ_WINDOW,
    )


def redact_url(url: str) -> str:
    """The URL with secret query parameters masked, for logs and status pages."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = [(k, "***" if k in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(pairs, safe="/:*", quote_via=quote)))


def _check_key(key: str, *, what: str = "storage key") -> None:
    # object_store silently drops leading/trailing slashes and rejects the rest with a
    # ValueError; refusing them here keeps keys and object names one-to-one.
    segments = key.split("/")
    if not key or any(seg in ("", ".", "..") for seg in segments):
        raise StorageError(f"{what} must be non-empty segments separated by single slashes: {key!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 400 else line[:400] + "..."


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Done-callback marking a future's exception as seen (no "never retrieved" noise)."""
    if not fut.cancelled():
        fut.exception()


class _Aborted(Exception):
    """Raised inside the upload stream so obstore aborts the multipart upload."""


_END = object()
_ABORT = object()


class _S3Writer(StorageWriter):
    """Buffers up to one part; past that, feeds a multipart upload running in obstore.

    The upload is one ``put_async`` call consuming an async generator fed from a
    bounded queue (backpressure: ``write`` waits while parts are in flight). Ending
    the generator completes the upload (commit); raising in it makes obstore abort
    the upload (abort).
    """

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._settings = storage.settings
        self._buf = bytearray()
        self._size = 0
        self._queue: asyncio.Queue[object] | None = None
        self._upload: asyncio.Future[Any] | None = None
        self._closed = False

    @property
    def multipart(self) -> bool:
        """True once the object is streaming through a multipart upload."""
        return self._upload is not None

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise StorageError(f"write to {self._key} after commit or abort")
        if not data:
            return
        self._buf += data
        self._size += len(data)
        if self._upload is None:
            if len(self._buf) < self._settings.part_size:
                return
            self._start_upload()
        if len(self._buf) >= _FEED_BYTES:
            await self._feed(self._take())

    async def commit(self) -> int:
        if self._closed:
            raise StorageError(f"writer for {self._key} was already committed or aborted")
        self._closed = True
        store, path = self._storage._client(), self._storage._path(self._key)
        if self._upload is None:
            try:
                await obstore.put_async(store, path, self._take(), use_multipart=False)
            except Exception as exc:
                raise self._storage._translate(exc, "put", self._key) from exc
            return self._size
        upload = self._upload
        ended = False
        try:
            if self._buf:
                await self._feed(self._take())
            await self._feed(_END)
            ended = True
            # Shielded: a cancelled caller must not drop the upload half-way through
            # completing it; obstore finishes (or aborts) it on its own, so a commit
            # cancelled at this point may still publish the object.
            await asyncio.shield(upload)
        except BaseException as exc:
            if not ended:
                self._signal_abort()
            if isinstance(exc, (OvernightError, asyncio.CancelledError)) or not isinstance(exc, Exception):
                raise
            raise self._storage._translate(exc, "multipart upload", self._key) from exc
        return self._size

    async def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buf = bytearray()
        upload = self._upload
        if upload is None or upload.done():  # nothing started, or obstore already gave up (and aborted)
            return
        self._signal_abort()
        try:
            await asyncio.shield(upload)
        except _Aborted:
            pass
        except Exception as exc:  # the object is invisible either way; only an orphaned upload remains
            log.warning("could not abort the multipart upload of %s: %s", self._key, _first_line(exc))

    # -- internals -----------------------------------------------------------
    def _take(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def _start_upload(self) -> None:
        self._queue = asyncio.Queue(maxsize=_FEED_QUEUE_DEPTH)
        upload = asyncio.ensure_future(
            obstore.put_async(
                self._storage._client(),
                self._storage._path(self._key),
                self._stream(self._queue),
                use_multipart=True,
                chunk_size=self._settings.part_size,
                max_concurrency=self._settings.upload_concurrency,
            )
        )
        # Mark the outcome as seen so an abandoned writer does not log "exception was
        # never retrieved"; commit/abort read it themselves.
        upload.add_done_callback(_retrieve)
        self._upload = upload

    @staticmethod
    async def _stream(queue: asyncio.Queue[object]) -> AsyncIterator[bytes]:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted("upload aborted by the writer")
            assert isinstance(item, bytes)
            yield item

    async def _feed(self, item: object) -> None:
        """Hand ``item`` to the upload, waiting for room; fails if the upload died."""
        queue, upload = self._queue, self._upload
        assert queue is not None and upload is not None
        if upload.done():
            raise self._upload_failure()
        if not queue.full():
            queue.put_nowait(item)
            return
        put = asyncio.ensure_future(queue.put(item))
        try:
            await asyncio.wait({put, upload}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
        if put.cancelled():
            raise self._upload_failure()

    def _upload_failure(self) -> OvernightError:
        upload = self._upload
        assert upload is not None and upload.done()
        exc = None if upload.cancelled() else upload.exception()
        if exc is None:
            return StorageError(f"multipart upload of {self._key} ended before the writer finished")
        error = self._storage._translate(exc, "multipart upload", self._key)
        error.__cause__ = exc
        return error

    def _signal_abort(self) -> None:
        """Make the upload stream raise at its next pull (pending data is discarded)."""
        queue = self._queue
        if queue is None:
            return
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_ABORT)


class S3Storage(Storage):
    """Objects in an S3 (or S3-compatible) bucket under a key prefix; see the module docs."""

    def __init__(self, url: str) -> None:
        self.url = redact_url(url)
        self.settings = parse_s3_url(url)
        self._store: S3Store | None = None

    async def open(self) -> None:
        self._client()

    async def aclose(self) -> None:
        self._store = None

    def _client(self) -> S3Store:
        if self._store is None:
            s = self.settings
            try:
                self._store = S3Store(
                    s.bucket,
                    prefix=s.prefix or None,
                    client_options={"allow_http": s.allow_http},
                    **s.store_config(),
                )
            except Exception as exc:
                raise StorageError(f"invalid s3 configuration for {self.url}: {_first_line(exc)}") from exc
        return self._store

    def _path(self, key: str) -> str:
        _check_key(key)
        return key

    def _translate(self, exc: BaseException, op: str, key: str) -> OvernightError:
        if isinstance(exc, OvernightError):
            return exc
        # A 404 on a write or delete means the bucket is missing, not the object.
        if isinstance(exc, (obs_exc.NotFoundError, FileNotFoundError)) and op in ("head", "get"):
            return NotFoundError(f"object {key} not found")
        where = f"s3://{self.settings.bucket}/{self.settings.prefix + '/' if self.settings.prefix else ''}{key}"
        return StorageError(f"s3 {op} of {where} failed: {type(exc).__name__}: {_first_line(exc)}")

    async def _head(self, key: str) -> Any:
        try:
            return await obstore.head_async(self._client(), self._path(key))
        except Exception as exc:
            raise self._translate(exc, "head", key) from exc

    async def read(self, key: str, *, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]:
        meta = await self._head(key)
        size: int = meta["size"]
        etag: str | None = meta.get("e_tag")
        if size == 0:
            return
        window = max(self.settings.read_window, chunk_bytes)
        store, path = self._client(), self._path(key)

        async def fetch(start: int) -> memoryview:
            end = min(start + window, size)
            options: dict[str, Any] = {"range": (start, end)}
            if etag:
                options["if_match"] = etag
            try:
                result = await obstore.get_async(store, path, options=options)  # type: ignore[arg-type]
                data = memoryview(await result.bytes_async())
            except obs_exc.PreconditionError as exc:
                raise StorageError(f"object {key} was replaced while being read") from exc
            except Exception as exc:
                raise self._translate(exc, "get", key) from exc
            if len(data) != end - start:
                raise StorageError(f"object {key} changed size while being read")
            return data

        def prefetch(start: int) -> asyncio.Task[memoryview]:
            task = asyncio.ensure_future(fetch(start))
            # A reader abandoned early never awaits its prefetch: mark the outcome seen.
            task.add_done_callback(_retrieve)
            return task

        nxt: asyncio.Task[memoryview] | None = prefetch(0)
        try:
            for start in range(0, size, window):
                assert nxt is not None
                data = await nxt
                # Fetch the next window while this one is consumed.
                nxt = prefetch(start + window) if start + window < size else None
                for i in range(0, len(data), chunk_bytes):
                    yield data[i : i + chunk_bytes].tobytes()
                del data
        finally:
            if nxt is not None:
                nxt.cancel()

    def writer(self, key: str) -> _S3Writer:
        self._path(key)  # reject a bad key before any bytes are buffered
        return _S3Writer(self, key)

    async def size(self, key: str) -> int:
        meta = await self._head(key)
        return int(meta["size"])

    async def delete(self, key: str) -> bool:
        try:
            await self._head(key)
        except NotFoundError:
            return False
        try:
            await obstore.delete_async(self._client(), self._path(key))
        except Exception as exc:
            raise self._translate(exc, "delete", key) from exc
        return True
