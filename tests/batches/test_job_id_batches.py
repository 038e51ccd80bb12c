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


async def test_a_resource_allocation_is_kept_and_its_deadline_bounds_the_window() -> None:
    import time

    from overnight.errors import InvalidRequestError

    store, storage = MemoryStore(), MemoryStorage()
    fid = await _file(store, storage, "a")
    deadline = int(time.time()) + 600
    ra = {"provision_id": "prov_1", "provision_resource_deadline": deadline,
          "resource_details": [{"provider": "fake", "gpu_type": "H100"}]}
    rec = await create_batch(store=store, storage=storage, tenant="a", limits=LIMITS, body=BatchCreate(
        input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h",
        extension={"resource_allocation": ra}))
    assert rec.options["resource_allocation"] == ra
    assert rec.expires_at <= deadline + 1  # not 24 h: the resource is gone by then
    for bad, param in (({"provision_id": 5}, "provision_id"), ({"provision_resource_deadline": "soon"},
                       "provision_resource_deadline"), ({"nope": 1}, "resource_allocation")):
        with pytest.raises(InvalidRequestError) as err:
            await create_batch(store=store, storage=storage, tenant="a", limits=LIMITS, body=BatchCreate(
                input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h",
                extension={"resource_allocation": bad}))
        assert param in err.value.param
