"""Fixtures for the record store tests: a fresh namespace per test on real servers.

- PostgreSQL (127.0.0.1:5432, database ``test``): a new schema per test
  (``?schema=``), dropped afterwards.
- Redis (127.0.0.1:6379): a new key prefix per test (``?prefix=``); its keys are
  deleted afterwards.
- MongoDB: no ``mongod`` can be installed here, so the tests run the real
  ``MongoStore`` (real ``pymongo.AsyncMongoClient``, real wire protocol) against
  SecantusDB, a single-node MongoDB-compatible server on WiredTiger that starts
  in-process from PyPI (``pip install SecantusDB``). Set ``OVERNIGHT_TEST_MONGO_URL``
  to use a real server instead; each test gets its own database either way.

A test whose server is unreachable (or whose stand-in is not installed) is
skipped with the reason, never failed.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

PG_HOST, PG_PORT, PG_DB = "127.0.0.1", 5432, "test"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _token() -> str:
    return uuid.uuid4().hex[:12]


# -- PostgreSQL --------------------------------------------------------------
@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """URL of a fresh, empty (un-migrated) schema in the ``test`` database."""
    if not _reachable(PG_HOST, PG_PORT):
        pytest.skip(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT}")
    asyncpg = pytest.importorskip("asyncpg")
    schema = f"overnight_test_{_token()}"
    yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{PG_DB}?schema={schema}"
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user="postgres", database=PG_DB)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# -- Redis -------------------------------------------------------------------
@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """URL with a fresh key prefix; every key under it is deleted afterwards."""
    if not _reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip(f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}")
    aioredis = pytest.importorskip("redis.asyncio")
    prefix = f"overnight-test-{_token()}:"
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/0?prefix={prefix}"
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# -- MongoDB -----------------------------------------------------------------
@pytest.fixture(scope="session")
def mongo_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB server for the session: ``OVERNIGHT_TEST_MONGO_URL`` or SecantusDB."""
    explicit = os.environ.get("OVERNIGHT_TEST_MONGO_URL")
    if explicit:
        yield explicit.rstrip("/")
        return
    secantus = pytest.importorskip("secantus", reason="the MongoDB stand-in SecantusDB is not installed")
    server = secantus.SecantusDBServer(
        storage_path=str(tmp_path_factory.mktemp("secantus")),
        cache_size="128M",
        ttl_sweep_seconds=3600.0,
    )
    server.start()
    try:
        yield server.uri.rstrip("/")
    finally:
        server.stop()


@pytest.fixture
async def mongo_url(mongo_server_url: str) -> AsyncIterator[str]:
    """URL naming a fresh database on the session's server; dropped afterwards."""
    pymongo = pytest.importorskip("pymongo")
    database = f"overnight_test_{_token()}"
    base, _, query = mongo_server_url.partition("?")
    yield f"{base}/{database}" + (f"?{query}" if query else "")
    client = pymongo.AsyncMongoClient(mongo_server_url, serverSelectionTimeoutMS=5000)
    try:
        await client.drop_database(database)
    finally:
        await client.close()
