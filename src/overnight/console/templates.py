"""Deployment templates per model, kept in the store, and how a console job finds
its template (``/api/v1/models/{model_id}/deployment-templates``).

A tenant stores ``ModelDeploymentTemplate`` documents (the same schema, and the same
validation, as the files of ``--templates-dir``) under one of its models: doc kind
``template``, ``key`` = ``name@version`` (unique per tenant, so a name and version
mean one template whichever model it hangs under), ``status`` = the template's
status, the body holds the model id and the validated document. A template is never
edited in place (a change is a new version), so a job's resolved record and the
template it came from can never disagree.

**Why a cached catalog per tenant.** ``TemplateSource.catalog()`` is synchronous
and tenant-less (resolve() and the lookup rules are built on it), while the store
is async and per tenant. Resolving a job against the store alone and then falling
back to the server's source would need the lookup rules twice and could not see a
name defined in both places. Instead ``StoreTemplateSource`` is a real
``TemplateSource`` for one tenant whose catalog is a snapshot of that tenant's
records, read by ``await refresh()``: the job path (async) brings the snapshot up to
date first, then resolves synchronously through ``CombinedSource(server, store)``
with the usual rules (versions, active, profiles from the server). The snapshot is
re-read when it is ``max_age_s`` old (2 s, as a templates directory), at once after
a write through this process (``invalidate``), and once more when a lookup misses,
so a template just created through another replica is found too. The one thing
another replica's write can be late for (up to ``max_age_s``) is a newer version
becoming the "latest active" one.

**Both in the store and on the server.** A name and version defined both by the
tenant's store and by the server's directory/ConfigMaps is ambiguous: the job is
refused with 409 (``template_ambiguous``) naming both places, never resolved by a
silent precedence (which copy runs would depend on who wrote last). Creating a store
template whose name and version the server already has is refused the same way.
Different versions of one name may live in both places: a lookup without a version
takes the highest active one of all of them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from overnight.console.docs import new_doc_id
from overnight.console.models import get_model
from overnight.errors import ConflictError, InvalidRequestError, NotFoundError, StoreError
from overnight.store.base import Store
from overnight.store.records import DocRecord
from overnight.templates.resolve import Resolved, resolve
from overnight.templates.schema import (
    ModelDeploymentTemplate,
    TemplateSchemaError,
    parse_template,
    validation_issues,
)
from overnight.templates.source import (
    Broken,
    Catalog,
    CombinedSource,
    Loaded,
    TemplateNotFound,
    TemplateSource,
    version_key,
)

__all__ = [
    "TEMPLATE", "StoreTemplateSource", "StoreTemplates", "create_template", "delete_model_templates",
    "delete_template", "get_template", "get_template_by_name", "list_templates", "resolve_job_template",
    "template_object",
]

TEMPLATE = "template"
#: How many records one store read takes while scanning a tenant's templates.
_PAGE = 200


def _key(name: str, version: str) -> str:
    return f"{name}@{version}"


def _where(rec: DocRecord) -> str:
    return f"store: deployment template {rec.id} of model {rec.body.get('model_id')}"


def _loc_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith("function-"):
            out += ("." if out else "") + str(part)
    return out


def check_template(body: Any) -> ModelDeploymentTemplate:
    """The request body as a template; an error lists every problem and its
    ``param`` is the first field at fault (``spec.accelerator.count``)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object (a ModelDeploymentTemplate).")
    doc = dict(body)
    kind = doc.pop("kind", "ModelDeploymentTemplate")
    if kind != "ModelDeploymentTemplate":
        raise InvalidRequestError(f"'kind' must be ModelDeploymentTemplate, not {kind!r}.", param="kind")
    try:
        return ModelDeploymentTemplate.model_validate(doc)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        param = _loc_text(tuple(errors[0]["loc"])) if errors else None
        raise TemplateSchemaError(validation_issues(exc, ""), param=param or None) from None


# -- the store records -----------------------------------------------------------------------
async def _tenant_templates(store: Store, tenant: str, *, keep: Callable[[DocRecord], bool] = lambda _: True,
                            after: str | None = None, want: int | None = None) -> list[DocRecord]:
    """The tenant's templates, newest first, that ``keep`` accepts (``want`` of them
    at most). Templates are listed per tenant; the per-model filter is applied here."""
    out: list[DocRecord] = []
    while True:
        page = await store.list_docs(TEMPLATE, tenant=tenant, after=after, limit=_PAGE, order="newest")
        out += [r for r in page if keep(r)]
        if len(page) < _PAGE or (want is not None and len(out) >= want):
            return out if want is None else out[:want]
        after = page[-1].id


async def create_template(*, store: Store, tenant: str, model_id: str, body: Any,
                          server: TemplateSource | None = None) -> DocRecord:
    """Validate and store a template under the tenant's model. 409 when the tenant
    has this name and version already, or the server's templates define it."""
    await get_model(store=store, tenant=tenant, model_id=model_id)
    template = check_template(body)
    if server is not None:
        place = _server_place(server.catalog(), template.name, template.version)
        if place is not None:
            raise ConflictError(
                f"model template {template.name!r} version {template.version!r} is already defined on the "
                f"server ({place}); give this one another name or version.", code="template_exists")
    now = time.time()
    rec = DocRecord(kind=TEMPLATE, id=new_doc_id("dtpl"), tenant=tenant, created_at=now, updated_at=now,
                    status=template.status, key=_key(template.name, template.version),
                    body={"model_id": model_id, "template": template.model_dump(mode="json")})
    try:
        await store.insert_doc(rec)
    except StoreError:
        other = await store.get_doc_by_key(TEMPLATE, tenant, rec.key or "")
        if other is not None:
            raise ConflictError(
                f"model template {template.name!r} version {template.version!r} exists "
                f"({other.id}, of model {other.body.get('model_id')}); a change is a new version.",
                code="template_exists") from None
        raise
    return rec


async def get_template(*, store: Store, tenant: str, model_id: str, template_id: str) -> DocRecord:
    await get_model(store=store, tenant=tenant, model_id=model_id)
    rec = await store.get_doc(TEMPLATE, template_id)
    if rec is None or rec.tenant != tenant or rec.body.get("model_id") != model_id:
        raise NotFoundError(f"Model {model_id} has no deployment template {template_id}.",
                            code="template_not_found")
    return rec


async def get_template_by_name(*, store: Store, tenant: str, model_id: str, name: str,
                               version: str | None) -> DocRecord:
    """The model's template ``name`` at ``version``; without one, its highest active version."""
    await get_model(store=store, tenant=tenant, model_id=model_id)
    if version:
        rec = await store.get_doc_by_key(TEMPLATE, tenant, _key(name, version))
        if rec is None or rec.body.get("model_id") != model_id:
            raise NotFoundError(f"Model {model_id} has no deployment template {name!r} version {version!r}.",
                                code="template_not_found")
        return rec
    recs = await _tenant_templates(
        store, tenant, keep=lambda r: r.body.get("model_id") == model_id and r.body["template"]["name"] == name)
    active = [r for r in recs if r.status == "active"]
    if not active:
        versions = ", ".join(f"{r.body['template']['version']} ({r.status})" for r in recs)
        raise NotFoundError(f"Model {model_id} has no active deployment template {name!r}"
                            + (f" (versions: {versions}); name a version." if versions else "."),
                            code="template_not_found")
    return max(active, key=lambda r: version_key(r.body["template"]["version"]))


async def list_templates(*, store: Store, tenant: str, model_id: str, after: str | None,
                         limit: int) -> tuple[list[DocRecord], bool]:
    """One page of the model's templates, newest first (the jobs list's shape)."""
    if after is not None:
        await get_template(store=store, tenant=tenant, model_id=model_id, template_id=after)
    else:
        await get_model(store=store, tenant=tenant, model_id=model_id)
    recs = await _tenant_templates(store, tenant, keep=lambda r: r.body.get("model_id") == model_id,
                                   after=after, want=limit + 1)
    return recs[:limit], len(recs) > limit


async def delete_template(*, store: Store, tenant: str, model_id: str, template_id: str) -> None:
    """Jobs created from it keep running: each holds its own resolved copy."""
    await get_template(store=store, tenant=tenant, model_id=model_id, template_id=template_id)
    await store.delete_doc(TEMPLATE, template_id)


async def delete_model_templates(*, store: Store, tenant: str, model_id: str) -> int:
    """Delete every template of a model (the model is being deleted); how many went."""
    recs = await _tenant_templates(store, tenant, keep=lambda r: r.body.get("model_id") == model_id)
    for r in recs:
        await store.delete_doc(TEMPLATE, r.id)
    return len(recs)


def template_object(rec: DocRecord) -> dict[str, Any]:
    t = rec.body["template"]
    return {"id": rec.id, "object": "deployment_template", "model_id": rec.body.get("model_id"),
            "name": t["name"], "version": t["version"], "status": t["status"], "spec": t["spec"],
            "created_at": int(rec.created_at)}


# -- the template source ---------------------------------------------------------------------
class StoreTemplateSource(TemplateSource):
    """One tenant's stored templates as a ``TemplateSource`` (no profiles: those
    are the server's). ``catalog()`` is the snapshot of the last ``refresh()``; see
    the module docstring for when it is re-read."""

    def __init__(self, store: Store, tenant: str, *, max_age_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.tenant, self.max_age_s = store, tenant, max_age_s
        self._clock = clock
        self._catalog = Catalog()
        #: (name, version) -> model id, for the snapshot's good templates.
        self._models: dict[tuple[str, str], str] = {}
        self._read_at = -math.inf
        self._generation = 0  # bumped by invalidate(); a refresh that raced one stays stale
        self._fresh_generation = -1
        self._lock = asyncio.Lock()

    def catalog(self) -> Catalog:
        return self._catalog

    def invalidate(self) -> None:
        """A template of this tenant was written: re-read before the next lookup."""
        self._generation += 1

    def stale(self) -> bool:
        return self._fresh_generation != self._generation or self._clock() - self._read_at >= self.max_age_s

    async def ensure_fresh(self) -> bool:
        """Re-read when stale; True when this call read the store."""
        if not self.stale():
            return False
        async with self._lock:
            if not self.stale():  # another caller just read it
                return False
            await self._read()
            return True

    async def refresh(self) -> None:
        async with self._lock:
            await self._read()

    async def _read(self) -> None:
        generation = self._generation
        recs = await _tenant_templates(self.store, self.tenant)
        good: list[tuple[str, ModelDeploymentTemplate]] = []
        broken: list[Broken] = []
        issues: list[str] = []
        models: dict[tuple[str, str], str] = {}
        for rec in reversed(recs):  # oldest first, as a directory reads its files in order
            where = _where(rec)
            try:
                t = parse_template(rec.body.get("template"), where=where)
            except TemplateSchemaError as exc:  # stored under an older schema: its lookups fail, saying why
                issues += exc.issues
                name, _, version = (rec.key or "").rpartition("@")
                if name:
                    broken.append(Broken("template", name, version or None, tuple(exc.issues)))
                continue
            good.append((where, t))
            models[(t.name, t.version)] = str(rec.body.get("model_id"))
        self._catalog = Catalog.build([Loaded(templates=tuple(good), broken=tuple(broken), issues=tuple(issues))])
        self._models = models
        self._read_at = self._clock()
        self._fresh_generation = generation

    def model_of(self, name: str, version: str) -> str | None:
        """The model a stored template hangs under (None: not a stored template)."""
        return self._models.get((name, version))

    def model_templates(self, model_id: str) -> list[ModelDeploymentTemplate]:
        cat = self._catalog
        return [cat.templates[n][v][1] for (n, v), m in self._models.items()
                if m == model_id and v in cat.templates.get(n, {})]


class StoreTemplates:
    """A ``StoreTemplateSource`` per tenant (the console keeps one of these)."""

    def __init__(self, store: Store, *, max_age_s: float = 2.0) -> None:
        self.store, self.max_age_s = store, max_age_s
        self._sources: dict[str, StoreTemplateSource] = {}

    def source(self, tenant: str) -> StoreTemplateSource:
        src = self._sources.get(tenant)
        if src is None:
            src = self._sources[tenant] = StoreTemplateSource(self.store, tenant, max_age_s=self.max_age_s)
        return src

    def invalidate(self, tenant: str) -> None:
        self.source(tenant).invalidate()


# -- a job's template ------------------------------------------------------------------------
def _server_place(cat: Catalog, name: str, version: str) -> str | None:
    """Where the server's catalog defines ``name`` at ``version`` (good or broken)."""
    hit = cat.templates.get(name, {}).get(version)
    if hit is not None:
        return hit[0]
    for b in cat.broken_templates.get(name, []):
        if b.version == version:
            return b.issues[0].split(": ")[0] if b.issues else "the server's templates"
    return None


def _pick_version(name: str, version: str | None, server: Catalog | None, store: Catalog) -> str | None:
    """The version a lookup of ``name`` lands on (None: leave it to the lookup,
    which reports what is wrong); ``ConflictError`` when both places define it."""
    if version is None:
        if name in store.broken_templates or (server is not None and name in server.broken_templates):
            return None
        active = [v for cat in (server, store) if cat is not None
                  for v, (_, t) in cat.templates.get(name, {}).items() if t.status == "active"]
        if not active:
            return None
        version = max(active, key=version_key)
    if server is not None and version in store.templates.get(name, {}):
        place = _server_place(server, name, version)
        if place is not None:
            raise ConflictError(
                f"model template {name!r} version {version!r} is defined both on the server ({place}) and in "
                f"this tenant's store ({store.templates[name][version][0]}); delete one, or name a version "
                "only one of them has.", code="template_ambiguous")
    return version


def _model_choice(src: StoreTemplateSource, model_id: str, version: str | None) -> str:
    """The template name a job naming only ``model_id`` runs: the model's one
    active template name, or with ``version`` the one name that has it (several
    names: the job has to say which)."""
    ts = [t for t in src.model_templates(model_id)
          if (t.status == "active" if version is None else t.version == version)]
    names = sorted({t.name for t in ts})
    if not names:
        what = f"deployment template of version {version!r}" if version else "active deployment template"
        raise TemplateNotFound(
            f"model {model_id} has no {what}; create one "
            f"(POST /api/v1/models/{model_id}/deployment-templates) or name model_template_name.")
    if len(names) > 1:
        raise InvalidRequestError(
            f"model {model_id} has active deployment templates under several names ({', '.join(names)}); "
            "name one in model_template_name.", param="model_template_name")
    return names[0]


def _resolve(src: StoreTemplateSource, server: TemplateSource | None, *, name: str | None, version: str | None,
             model_id: str | None, default: str | None, profile: str | None) -> Resolved:
    from_default = False
    if name is None and model_id is not None:
        name = _model_choice(src, model_id, version)
    elif name is None:
        if not default:
            raise InvalidRequestError("Name a model_template_name or a model_id (this server has no "
                                      "DEFAULT_BATCH_MODEL_DEPLOYMENT_TEMPLATE).", param="model_template_name")
        name, from_default = default, True
    chosen = _pick_version(name, version, server.catalog() if server is not None else None, src.catalog())
    source: TemplateSource = CombinedSource(server, src) if server is not None else src
    try:
        resolved = resolve(source, {"name": name, "version": chosen or version},
                           {"name": profile} if profile else None,
                           template_param="model_template_name", profile_param="profile")
    except TemplateNotFound as exc:
        if from_default:
            raise TemplateNotFound(f"{exc.message} (the server's DEFAULT_BATCH_MODEL_DEPLOYMENT_TEMPLATE)") from None
        raise
    owner = src.model_of(resolved.name, resolved.version)
    if model_id is not None and owner is not None and owner != model_id:
        raise InvalidRequestError(
            f"model template {resolved.name!r} version {resolved.version!r} is a deployment template of model "
            f"{owner}, not of model_id {model_id}.", param="model_template_name")
    return resolved


async def resolve_job_template(*, templates: StoreTemplates, server: TemplateSource | None, tenant: str,
                               name: str | None, version: str | None, model_id: str | None,
                               default: str | None, profile: str | None) -> Resolved:
    """The template and profile a console job runs with: the one it names (the
    tenant's stored templates and the server's), else its model's active one, else
    the server's default. ``TemplateNotFound`` (404) names what was looked for;
    ``ConflictError`` (409) when both places define it."""
    src = templates.source(tenant)
    fresh = await src.ensure_fresh()

    def attempt() -> Resolved:
        return _resolve(src, server, name=name, version=version, model_id=model_id, default=default,
                        profile=profile)

    try:
        return attempt()
    except TemplateNotFound:
        if fresh:
            raise
    await src.refresh()  # perhaps written a moment ago through another replica
    return attempt()
