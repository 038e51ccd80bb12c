"""Console models (``/api/v1/models``): a name a job can point at, with the name the
engine serves it under and free categories. Kept as document records (kind
``model``; the name is unique per tenant)."""

from __future__ import annotations

import time
from typing import Any

from overnight.console.docs import new_doc_id, update_doc
from overnight.errors import ConflictError, InvalidRequestError, NotFoundError, StoreError
from overnight.store.base import Store
from overnight.store.records import DocRecord

__all__ = ["MODEL", "create_model", "delete_model", "get_model", "list_models", "model_object", "update_model"]

MODEL = "model"
_FIELDS = frozenset({"name", "categories", "serving_name"})


def _check(body: Any, *, partial: bool) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidRequestError(f"Unknown field '{unknown[0]}'.", param=unknown[0])
    out: dict[str, Any] = {}
    if "name" in body or not partial:
        name = body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 128 or name != name.strip():
            raise InvalidRequestError("'name' must be a string of 1-128 characters without surrounding spaces.",
                                      param="name")
        out["name"] = name
    if "serving_name" in body:
        sn = body["serving_name"]
        if sn is not None and (not isinstance(sn, str) or not 1 <= len(sn) <= 256):
            raise InvalidRequestError("'serving_name' must be a string of 1-256 characters.", param="serving_name")
        out["serving_name"] = sn
    if "categories" in body:
        cats = body["categories"]
        if not isinstance(cats, list) or len(cats) > 32 or not all(isinstance(c, str) and 0 < len(c) <= 64
                                                                   for c in cats):
            raise InvalidRequestError("'categories' must be a list of at most 32 strings.", param="categories")
        out["categories"] = cats
    return out


async def create_model(*, store: Store, tenant: str, body: Any) -> DocRecord:
    fields = _check(body, partial=False)
    now = time.time()
    rec = DocRecord(kind=MODEL, id=new_doc_id("model"), tenant=tenant, created_at=now, updated_at=now,
                    key=fields["name"], status="active",
                    body={"name": fields["name"], "categories": fields.get("categories", []),
                          "serving_name": fields.get("serving_name")})
    try:
        await store.insert_doc(rec)
    except StoreError:
        if await store.get_doc_by_key(MODEL, tenant, fields["name"]) is not None:
            raise ConflictError(f"A model named {fields['name']!r} exists.", code="model_exists") from None
        raise
    return rec


async def get_model(*, store: Store, tenant: str, model_id: str) -> DocRecord:
    rec = await store.get_doc(MODEL, model_id)
    if rec is None or rec.tenant != tenant:
        raise NotFoundError(f"No such model: {model_id}", code="model_not_found")
    return rec


async def list_models(*, store: Store, tenant: str, after: str | None, limit: int) -> tuple[list[DocRecord], bool]:
    if after is not None:
        await get_model(store=store, tenant=tenant, model_id=after)
    recs = await store.list_docs(MODEL, tenant=tenant, after=after, limit=limit + 1, order="newest")
    return recs[:limit], len(recs) > limit


async def update_model(*, store: Store, tenant: str, model_id: str, body: Any) -> DocRecord:
    fields = _check(body, partial=True)
    await get_model(store=store, tenant=tenant, model_id=model_id)

    def mutate(rec: DocRecord) -> DocRecord:
        rec.body.update(fields)
        if "name" in fields:
            rec.key = fields["name"]
        rec.updated_at = time.time()
        return rec

    try:
        return await update_doc(store, MODEL, model_id, mutate)
    except StoreError:
        raise ConflictError(f"A model named {fields.get('name')!r} exists.", code="model_exists") from None


async def delete_model(*, store: Store, tenant: str, model_id: str) -> None:
    await get_model(store=store, tenant=tenant, model_id=model_id)
    await store.delete_doc(MODEL, model_id)


def model_object(rec: DocRecord) -> dict[str, Any]:
    b = rec.body
    return {"id": rec.id, "object": "model", "name": b["name"], "categories": b.get("categories") or [],
            "serving_name": b.get("serving_name"), "created_at": int(rec.created_at),
            "updated_at": int(rec.updated_at or rec.created_at)}
