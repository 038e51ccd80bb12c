import asyncio

import pytest

from overnight.batches import service
from overnight.batches.states import BatchStatus
from overnight.batches.validation import ValidationLimits
from overnight.errors import ConflictError, InvalidRequestError, NotFoundError, TransitionError
from overnight.files.service import create_file
from overnight.storage.memory import MemoryStorage
from overnight.store.memory import MemoryStore
from tests.factories import request_line

import orjson

LIMITS = ValidationLimits(max_requests=100, max_bytes=10**6)


async def _chunks(data: bytes):
    yield data


@pytest.fixture
async def env():
    store, storage = MemoryStore(), MemoryStorage()
    f = await create_file(store=store, storage=storage, tenant="t", filename="in.jsonl", purpose="batch",
                          chunks=_chunks(orjson.dumps(request_line(0)) + b"\n"))
    return store, storage, f


async def _create(store, storage, f, **kw):
    body = service.BatchCreate(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", **kw)
    return await service.create_batch(store=store, storage=storage, tenant="t", body=body, limits=LIMITS)


async def test_racing_transitions_one_wins(env):
    store, storage, f = env
    b = await _create(store, storage, f)
    await service.transition(store, b.id, BatchStatus.IN_PROGRESS)
    results = await asyncio.gather(
        service.transition(store, b.id, BatchStatus.FINALIZING),
        service.transition(store, b.id, BatchStatus.CANCELLING),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, Exception)]
    losses = [r for r in results if isinstance(r, TransitionError)]
    assert len(wins) == 1 and len(losses) == 1


async def test_transition_stamps_time_and_bumps_version(env):
    store, storage, f = env
    b = await _create(store, storage, f)
    moved = await service.transition(store, b.id, BatchStatus.IN_PROGRESS, now=123)
    assert moved.in_progress_at == 123 and moved.version == b.version + 1
    with pytest.raises(TransitionError):
        await service.transition(store, b.id, BatchStatus.COMPLETED)


async def test_fenced_write_with_stale_token_is_refused(env):
    store, storage, f = env
    b = await _create(store, storage, f)
    with pytest.raises(service.LeaseLost):
        await service.transition(store, b.id, BatchStatus.IN_PROGRESS, fence=b.lease_token + 1)


async def test_cancel_is_idempotent_then_409_when_terminal(env):
    store, storage, f = env
    b = await _create(store, storage, f)
    c1 = await service.cancel_batch(store=store, tenant="t", batch_id=b.id)
    c2 = await service.cancel_batch(store=store, tenant="t", batch_id=b.id)
    assert c1.status == c2.status == "cancelling" and c1.cancelling_at
    await service.transition(store, b.id, BatchStatus.CANCELLED)
    with pytest.raises(ConflictError):
        await service.cancel_batch(store=store, tenant="t", batch_id=b.id)
    with pytest.raises(NotFoundError):
        await service.cancel_batch(store=store, tenant="other", batch_id=b.id)


@pytest.mark.parametrize("window,seconds", [("1s", 1), ("90s", 90), ("10m", 600), ("24h", 86400), ("7d", 604800)])
def test_parse_completion_window(window, seconds):
    assert service.parse_completion_window(window) == seconds


@pytest.mark.parametrize("window", ["", "24", "h", "-1h", "31d", "1.5h", "0s", " 24h", "24 h", "24h ", "24h\n",
                                    "\uff12\uff14h", "\u0662\u0664h", "24H"])
def test_bad_completion_window(window):
    with pytest.raises(InvalidRequestError):
        service.parse_completion_window(window)


def test_extension_normalizes_runtime():
    opts = service.parse_extension({"runtime": {"endpoint": "http://e:1/"}, "priority": 3})
    assert opts == {"runtime": {"type": "endpoint", "endpoint": "http://e:1", "api_key": None}, "priority": 3}


async def test_one_second_window_lasts_a_second_not_the_rest_of_one(env, monkeypatch):
    store, storage, f = env
    monkeypatch.setattr(service.time, "time", lambda: 1000.6)
    body = service.BatchCreate(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1s")
    b = await service.create_batch(store=store, storage=storage, tenant="t", body=body, limits=LIMITS)
    assert (b.created_at, b.expires_at) == (1000, 1001)  # the API keeps integer epoch seconds
    assert b.deadline == pytest.approx(1001.6)
    stored = await store.get_batch(b.id)
    assert stored is not None and stored.deadline == pytest.approx(1001.6)
