"""Read-modify-write of document records, the way ``batches/service.py`` does it
for batches: read, let the caller decide, write with compare-and-set, and read
again when another writer got there first."""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection

from overnight.errors import ConflictError, NotFoundError, VersionConflict
from overnight.ids import new_id
from overnight.store.base import Store
from overnight.store.records import DocRecord, check_doc_statuses

__all__ = ["new_doc_id", "update_doc"]

#: How many lost compare-and-sets in a row before giving up (as ``update_batch``).
_ATTEMPTS = 100


def new_doc_id(prefix: str) -> str:
    """A time-ordered id for a new doc: ``prefix`` + ``_`` + 24 hex digits."""
    return new_id(prefix)


async def update_doc(
    store: Store,
    kind: str,
    id: str,
    mutate: Callable[[DocRecord], DocRecord | None],
    *,
    expect_status: Collection[str] | None = None,
    current: DocRecord | None = None,
) -> DocRecord:
    """Read-modify-write with compare-and-set, retried on conflict.

    ``mutate`` gets a copy of the current record and returns the new one (or None
    to write nothing: the current record is returned). It may run more than once,
    so it must not do anything outside the record. With ``expect_status``, the
    write only happens while the doc is in one of those statuses (checked on every
    attempt); otherwise ``ConflictError`` naming the status it is in. Raises
    ``NotFoundError`` when the doc does not exist. ``current``: the record as the
    caller last read it; the first attempt writes on it without reading again (the
    compare-and-set still refuses it if it is stale, and the next attempt reads)."""
    expected = check_doc_statuses(expect_status)  # a bare string is refused, not read as letters
    for _ in range(_ATTEMPTS):
        fresh = current is None
        cur, current = (await store.get_doc(kind, id), None) if fresh else (current, None)
        if cur is None:
            raise NotFoundError(f"No such {kind}: {id}")
        if expected is not None and cur.status not in expected:
            if not fresh:
                continue  # the caller's copy may be stale: read before refusing
            wanted = " or ".join(expected) or "(none)"
            raise ConflictError(f"{kind} {id} is {cur.status or '(no status)'}, not {wanted}.")
        new = mutate(copy.deepcopy(cur))
        if new is None:
            return cur
        try:
            return await store.update_doc(new)
        except VersionConflict:
            continue
    raise ConflictError(f"{kind} {id} is changing too fast to update")
