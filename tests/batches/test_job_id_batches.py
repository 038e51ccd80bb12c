"""``extra_body.overnight.job_id`` names the batch: a repeated create (a client or
the console's planner retrying after a crash) returns the batch made the first time."""

from __future__ import annotations

import pytest

from overnight.batches.service import BatchCreate, batch_id_for_job, create_batch
from overnight.batches.validation import ValidationLimits
from overnight.files.service import create_file
from overnight.storage.memory import MemoryStorage
from overnight.store.memory import MemoryStore

LIMITS = ValidationLimits(max_requests=100, max_bytes=10**6)


async def _file(store, storage, tenant: str) -> str:
    async def chunks():
        yield b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n'

    return (await create_file(store=store, storage=storage, tenant=tenant, filename="in.jsonl", purpose="batch",
                              chunks=chunks())).id


@pytest.mark.parametrize("job_id", ["job-1", "ünïcode job"])
async def test_the_same_job_id_gives_the_same_batch_per_tenant(job_id: str) -> None:
    store, storage = MemoryStore(), MemoryStorage()
    fa, fb = await _file(store, storage, "a"), await _file(store, storage, "b")

    def body(fid: str) -> BatchCreate:
        return BatchCreate(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h",
                           extension={"job_id": job_id})

    first = await create_batch(store=store, storage=storage, tenant="a", body=body(fa), limits=LIMITS)
    again = await create_batch(store=store, storage=storage, tenant="a", body=body(fa), limits=LIMITS)
    other = await create_batch(store=store, storage=storage, tenant="b", body=body(fb), limits=LIMITS)
    assert first.id == again.id == batch_id_for_job("a", job_id)
    assert other.id != first.id and other.tenant == "b"
    assert len(await store.list_batches(tenant="a")) == 1
