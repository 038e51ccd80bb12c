from overnight.batches.service import BatchCreate, create_batch
from overnight.batches.validation import ValidationLimits
from overnight.files.retention import sweep_expired
from overnight.files.service import create_file
from overnight.storage.memory import MemoryStorage
from overnight.store.memory import MemoryStore


async def _chunks(data: bytes):
    yield data


async def test_sweeper_deletes_expired_but_not_files_in_use():
    store, storage = MemoryStore(), MemoryStorage()
    def mk(expires_after_s):
        return create_file(store=store, storage=storage, tenant="t", filename="a", purpose="batch",
                           chunks=_chunks(b"x"), expires_after_s=expires_after_s)

    expired, in_use, fresh = await mk(3600), await mk(3600), await mk(None)
    await create_batch(store=store, storage=storage, tenant="t",
                       body=BatchCreate(input_file_id=in_use.id, endpoint="/v1/chat/completions", completion_window="1h"),
                       limits=ValidationLimits(max_requests=10, max_bytes=100))
    removed = await sweep_expired(store=store, storage=storage, now=expired.created_at + 3601)
    assert removed == 1
    assert await store.get_file(expired.id) is None and expired.storage_key not in storage.objects
    assert await store.get_file(in_use.id) is not None
    assert await store.get_file(fresh.id) is not None
