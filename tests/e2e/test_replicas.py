"""Several `overnight serve` replicas sharing one store and one storage."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import pytest

from overnight.store import connect_store
from tests.e2e.helpers import (
    assert_exactly_once,
    client_for,
    mock_stats,
    results,
    wait_progress,
    wait_status,
)
from tests.factories import make_input_file

# Real processes end to end: the slow CI step (the default run stays short on 2 cores).
pytestmark = pytest.mark.slow


def _reachable(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("redis", marks=pytest.mark.redis)])
def shared_store_url(request):
    """A fresh PostgreSQL schema (migrated) or Redis prefix, dropped afterwards."""
    token = uuid.uuid4().hex[:10]
    if request.param == "postgres":
        if not _reachable(5432):
            pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
        from overnight.store.postgres import upgrade

        url = f"postgresql://postgres@127.0.0.1:5432/test?schema=replicas_{token}"
        asyncio.run(upgrade(url))
        yield url
        import asyncpg

        async def drop() -> None:
            conn = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="test")
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "replicas_{token}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())
    else:
        if not _reachable(6379):
            pytest.skip("Redis is not reachable on 127.0.0.1:6379")
        prefix = f"replicas-{token}:"
        yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
        import redis

        r = redis.Redis(host="127.0.0.1", port=6379)
        keys = list(r.scan_iter(match=prefix + "*", count=500))
        if keys:
            r.delete(*keys)
        r.close()


def _replicas(cluster, tmp_path, store_url, engine_url):
    storage = f"file://{tmp_path / 'shared-files'}"
    common = ("--store", store_url, "--storage", storage)
    a = cluster.server(engine_url=engine_url, data_dir=tmp_path / "a", extra=common)
    b = cluster.server(engine_url=engine_url, data_dir=tmp_path / "b", extra=common)
    return a, b


async def _owner(store_url: str, batch_id: str) -> tuple[str | None, int]:
    store = connect_store(store_url)
    await store.open()
    try:
        rec = await store.get_batch(batch_id)
        return rec.lease_owner, rec.completed + rec.failed
    finally:
        await store.aclose()


async def test_replica_killed_mid_batch_is_taken_over_exactly_once(cluster, tmp_path, shared_store_url):
    engine = cluster.mock_engine("--latency-ms", "20")
    a, b = _replicas(cluster, tmp_path, shared_store_url, engine.url)
    ca, cb = client_for(a.url), client_for(b.url)
    replica_of = {client_for(p.url)._client.get(p.url + "/health").json()["replica"]: p for p in (a, b)}
    n, window = 1500, 16
    f = ca.files.create(file=make_input_file(tmp_path / "in.jsonl", n).open("rb"), purpose="batch")
    batch = cb.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_body={"overnight": {"max_concurrency": window}})
    # Any replica answers any call with the same state.
    assert ca.batches.retrieve(batch.id).id == batch.id
    wait_progress(ca, batch.id, n // 3)
    owner_id, _ = await _owner(shared_store_url, batch.id)
    owner = replica_of[owner_id]
    survivor = b if owner is a else a
    owner.signal(signal.SIGKILL)
    sent_at_kill = mock_stats(engine.url)["received_total"]
    _, persisted_done = await _owner(shared_store_url, batch.id)
    client = client_for(survivor.url)
    done = wait_status(client, batch.id, timeout_s=60)
    assert done.status == "completed", done
    out, err = results(client, done)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    assert not err
    resent = mock_stats(engine.url)["received_total"] - n
    # The survivor re-sends only what the dead replica sent but had not checkpointed.
    assert resent <= sent_at_kill - persisted_done, (resent, sent_at_kill, persisted_done)
    new_owner, _ = await _owner(shared_store_url, batch.id)
    assert new_owner is None  # released at the end


async def test_cancel_on_one_replica_stops_batch_running_on_the_other(cluster, tmp_path, shared_store_url):
    engine = cluster.mock_engine("--latency-ms", "50")
    a, b = _replicas(cluster, tmp_path, shared_store_url, engine.url)
    replica_of = {client_for(p.url)._client.get(p.url + "/health").json()["replica"]: p for p in (a, b)}
    ca = client_for(a.url)
    n = 2000
    f = ca.files.create(file=make_input_file(tmp_path / "in.jsonl", n).open("rb"), purpose="batch")
    batch = ca.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_body={"overnight": {"max_concurrency": 8}})
    wait_progress(ca, batch.id, 20)
    owner_id, _ = await _owner(shared_store_url, batch.id)
    other = b if replica_of[owner_id] is a else a
    client = client_for(other.url)
    t0 = time.monotonic()
    client.batches.cancel(batch.id)
    done = wait_status(client, batch.id, timeout_s=20)
    assert done.status == "cancelled"
    assert time.monotonic() - t0 < 5
    out, err = results(client, done)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    assert len(out) < n
