"""``console.docs``: the compare-and-set read-modify-write of document records."""

from __future__ import annotations

import dataclasses
import re

import pytest

from overnight.console.docs import new_doc_id, update_doc
from overnight.errors import ConflictError, InvalidRequestError, NotFoundError, VersionConflict
from overnight.store.memory import MemoryStore
from overnight.store.records import DocRecord


@pytest.fixture
async def store() -> MemoryStore:
    s = MemoryStore()
    await s.open()
    return s


async def _job(store: MemoryStore, status: str = "queued") -> DocRecord:
    rec = DocRecord(kind="job", id=new_doc_id("job"), tenant="acme", created_at=1.0, status=status, body={"n": 0})
    await store.insert_doc(rec)
    return rec


def test_new_doc_id_is_time_ordered_and_prefixed() -> None:
    first, second = new_doc_id("job"), new_doc_id("job")
    assert re.fullmatch(r"job_[0-9a-f]{24}", first)
    assert first < second
    assert new_doc_id("prov").startswith("prov_")


async def test_update_doc_writes_what_mutate_returns(store: MemoryStore) -> None:
    rec = await _job(store)

    def mutate(cur: DocRecord) -> DocRecord:
        cur.status = "running"
        cur.body["n"] += 1
        return cur

    written = await update_doc(store, "job", rec.id, mutate)
    assert written.status == "running" and written.body == {"n": 1} and written.version == 1
    assert await store.get_doc("job", rec.id) == written


async def test_none_from_mutate_writes_nothing_and_in_place_changes_do_not_leak(store: MemoryStore) -> None:
    rec = await _job(store)

    def look_only(cur: DocRecord) -> None:
        cur.body["n"] = 99  # changed on the copy, then thrown away
        return None

    assert await update_doc(store, "job", rec.id, look_only) == rec
    assert await store.get_doc("job", rec.id) == rec


async def test_a_lost_compare_and_set_is_retried_on_the_fresh_record(store: MemoryStore) -> None:
    rec = await _job(store)
    seen: list[int] = []

    def mutate(cur: DocRecord) -> DocRecord:
        seen.append(cur.body["n"])
        if len(seen) == 1:  # another writer lands between our read and our write
            other = dataclasses.replace(cur, body={"n": 10})
            store._docs[("job", cur.id)] = dataclasses.replace(other, version=cur.version + 1)
        cur.body = {"n": cur.body["n"] + 1}
        return cur

    written = await update_doc(store, "job", rec.id, mutate)
    assert seen == [0, 10]
    assert written.body == {"n": 11} and written.version == 2


async def test_expect_status_is_checked_on_every_attempt(store: MemoryStore) -> None:
    rec = await _job(store, status="queued")
    calls = 0

    def cancel(cur: DocRecord) -> DocRecord:
        nonlocal calls
        calls += 1
        if calls == 1:  # the job finishes while we decide
            store._docs[("job", cur.id)] = dataclasses.replace(cur, status="completed", version=cur.version + 1)
        cur.status = "cancelling"
        return cur

    with pytest.raises(ConflictError, match="is completed, not queued or running"):
        await update_doc(store, "job", rec.id, cancel, expect_status={"queued", "running"})
    assert calls == 1
    stored = await store.get_doc("job", rec.id)
    assert stored is not None and stored.status == "completed"
    with pytest.raises(ConflictError, match="is completed"):
        await update_doc(store, "job", rec.id, cancel, expect_status=())
    with pytest.raises(InvalidRequestError):
        await update_doc(store, "job", rec.id, cancel, expect_status="completed")  # a string, not a collection


async def test_missing_doc_is_not_found_and_endless_conflicts_give_up(store: MemoryStore) -> None:
    with pytest.raises(NotFoundError, match="No such job: job_x"):
        await update_doc(store, "job", "job_x", lambda cur: cur)
    rec = await _job(store)

    class Losing(MemoryStore):
        async def update_doc(self, rec: DocRecord) -> DocRecord:
            raise VersionConflict("someone else, always")

    losing = Losing()
    losing._docs = store._docs
    with pytest.raises(ConflictError, match="changing too fast"):
        await update_doc(losing, "job", rec.id, lambda cur: cur)
