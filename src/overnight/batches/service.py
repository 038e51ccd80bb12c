"""Batch operations behind ``/v1/batches`` and the one function that changes status."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from overnight import defaults
from overnight.batches import events as batch_events
from overnight.batches.states import TERMINAL, TIMESTAMP_FIELD, BatchStatus, can_transition
from overnight.batches.validation import ValidationLimits, validate_input
from overnight.errors import (
    ConflictError,
    StoreError,
    InputError,
    InvalidRequestError,
    NotFoundError,
    TransitionError,
    VersionConflict,
)
from overnight.executor.stats import BATCH_TRANSITIONS
from overnight.files.service import get_file, parse_expires_after
from overnight.ids import new_id
from overnight.runtimes.egress import EndpointPolicy, EndpointRefused, check_endpoint_url, check_header_value
from overnight.secret_box import SecretBox
from overnight.storage.base import Storage
from overnight.store.base import Store
from overnight.store.records import BatchRecord
from overnight.webhooks import state as webhook_state
from overnight.webhooks.config import WebhookConfig, check_batch_webhook, parse_batch_webhook

log = logging.getLogger("overnight.batches")

__all__ = [
    "CONSOLE_PROVISIONED",
    "SUPPORTED_ENDPOINTS",
    "BatchCreate",
    "LeaseLost",
    "cancel_batch",
    "check_metadata",
    "create_batch",
    "get_batch",
    "list_batches",
    "parse_completion_window",
    "parse_extension",
    "transition",
    "update_batch",
]

SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
EXTENSION_KEYS = ("overnight", "aibrix")
EXTENSION_FIELDS = frozenset(
    {"runtime", "max_concurrency", "min_concurrency", "concurrency", "yield_to_others", "priority", "job_id",
     "model_template", "profile", "webhook_url", "webhook_secret", "resource_allocation"}
)
RUNTIME_FIELDS = frozenset({"endpoint", "url", "api_key", "type", "args", "shards", "namespace",
                            "request_timeout_s"})
#: Set by the server (never a field a client may send) on a batch a trusted console
#: created: the engine endpoint or ssh machine it names is that console's provision.
CONSOLE_PROVISIONED = "console_provisioned"
#: Runtime types a batch may name (the server may allow fewer: ``RuntimeRules``).
RUNTIME_TYPES = ("endpoint", "local", "mock", "kubernetes-job", "kubernetes-deployment", "ssh")
#: Runtime types that start the engine from a model_template.
TEMPLATE_RUNTIMES = ("local", "kubernetes-job", "kubernetes-deployment")
KUBERNETES_RUNTIMES = ("kubernetes-job", "kubernetes-deployment")
#: Fields each non-endpoint runtime type takes besides ``type``.
_RUNTIME_EXTRA = {"mock": {"args"}, "local": set(), "kubernetes-job": {"shards", "namespace"},
                  "kubernetes-deployment": {"namespace"}}
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)


@dataclass(frozen=True)
class RuntimeRules:
    """What the server lets batches ask for: runtime types, the default type, the
    template source and the host's GPUs (to refuse what can never run)."""

    allowed: frozenset[str] = frozenset(RUNTIME_TYPES)
    default: str | None = None
    templates: Any = None  # TemplateSource
    gpus: Any = None  # GpuPool
    #: The server has its own engine (``--engine-url`` or the built-in mock).
    default_engine: bool = True
    #: Checks a ``kubernetes-job`` batch at create by rendering its Job (an error
    #: names the template, profile or option field): ``(resolved, runtime) -> None``.
    kubernetes_check: Any = None
#: Where a runtime's api_key lives in a stored record: encrypted, never in plain text.
SEALED_API_KEY = "api_key_sealed"
#: ASCII digits then a unit, nothing else: ``\d`` would admit other scripts' digits
#: (``２４h``) and ``$`` a trailing newline.
_WINDOW_RE = re.compile(r"([0-9]+)([smhd])", re.ASCII)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: A batch window between one second and thirty days.
MAX_WINDOW_S = 30 * 86400
#: Far above any engine's useful concurrency; the server's own caps apply on top.
MAX_EXTENSION_CONCURRENCY = 1_000_000
#: Longer than any real bearer token, short enough for one header line.
MAX_API_KEY_CHARS = 4096


class LeaseLost(ConflictError):
    """The caller no longer holds the batch's lease (its fencing token is stale)."""


@dataclass(kw_only=True)
class BatchCreate:
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None = None
    output_expires_after: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None
    #: The name the client used for the extension (``overnight`` or ``aibrix``), for error params.
    extension_key: str = "overnight"


def parse_completion_window(window: str) -> int:
    """``24h``, ``90s``, ``10m``, ``2d`` -> seconds."""
    m = _WINDOW_RE.fullmatch(window) if isinstance(window, str) else None
    if not m:
        raise InvalidRequestError(
            f"Invalid completion_window {window!r}: use a duration such as '24h', '90s', '10m' or '2d'.",
            param="completion_window",
        )
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if not 1 <= seconds <= MAX_WINDOW_S:
        raise InvalidRequestError(
            f"completion_window must be between 1s and {MAX_WINDOW_S // 86400}d, got {window!r}.",
            param="completion_window",
        )
    return seconds


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's metadata rules (at most 16 pairs, keys of 64 and values of 512
    characters at most); also a console job's ``metadata``."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequestError("metadata must be an object of string keys and values.", param="metadata")
    if len(metadata) > defaults.METADATA_MAX_PAIRS:
        raise InvalidRequestError(
            f"metadata may have at most {defaults.METADATA_MAX_PAIRS} pairs, got {len(metadata)}.", param="metadata"
        )
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise InvalidRequestError(f"metadata value for {k!r} must be a string.", param=f"metadata.{k}")
        if len(k) > defaults.METADATA_MAX_KEY_CHARS:
            raise InvalidRequestError(
                f"metadata key {k[:20]!r}... is longer than {defaults.METADATA_MAX_KEY_CHARS} characters.",
                param="metadata",
            )
        if len(v) > defaults.METADATA_MAX_VALUE_CHARS:
            raise InvalidRequestError(
                f"metadata value for {k!r} is longer than {defaults.METADATA_MAX_VALUE_CHARS} characters.",
                param=f"metadata.{k}",
            )
    return dict(metadata)


def parse_extension(ext: Any, *, key: str = "overnight") -> dict[str, Any]:
    """Check the ``extra_body={"overnight": {...}}`` extension; unknown fields are a 400."""
    if ext is None:
        return {}
    if not isinstance(ext, dict):
        raise InvalidRequestError(f"'{key}' must be an object.", param=key)
    unknown = sorted(set(ext) - EXTENSION_FIELDS)
    if unknown:
        raise InvalidRequestError(
            f"Unknown field '{key}.{unknown[0]}'; supported: {', '.join(sorted(EXTENSION_FIELDS))}.",
            param=f"{key}.{unknown[0]}",
        )
    out: dict[str, Any] = {}
    rt = None
    if "runtime" in ext and ext["runtime"] is not None:
        rt = ext["runtime"]
        if not isinstance(rt, dict):
            raise InvalidRequestError(f"'{key}.runtime' must be an object.", param=f"{key}.runtime")
        bad = sorted(set(rt) - RUNTIME_FIELDS) if rt.get("type") != "ssh" else []  # SshSpec checks its own
        if bad:
            raise InvalidRequestError(f"Unknown field '{key}.runtime.{bad[0]}'.", param=f"{key}.runtime.{bad[0]}")
        rtype = rt.get("type", "endpoint")
        if rtype not in RUNTIME_TYPES:
            raise InvalidRequestError(
                f"Unsupported runtime type {rtype!r}; supported: {', '.join(RUNTIME_TYPES)}.",
                param=f"{key}.runtime.type",
            )
        if rtype not in ("endpoint", "ssh"):
            extra = sorted(set(rt) - {"type"} - _RUNTIME_EXTRA[rtype])
            if extra:
                raise InvalidRequestError(
                    f"'{key}.runtime.{extra[0]}' does not apply to runtime type {rtype!r}.",
                    param=f"{key}.runtime.{extra[0]}",
                )
        if rtype in KUBERNETES_RUNTIMES:
            out["runtime"] = _kubernetes_runtime(rt, key, rtype)
            rt = None
        elif rtype == "ssh":
            out["runtime"] = _ssh_runtime(rt, key)
            rt = None
        elif rtype != "endpoint":
            args = rt.get("args") or []
            if not isinstance(args, list) or not all(isinstance(a, str) and len(a) < 256 for a in args) \
                    or len(args) > 64:
                raise InvalidRequestError(f"'{key}.runtime.args' must be a list of strings (mock-engine flags).",
                                          param=f"{key}.runtime.args")
            out["runtime"] = {"type": rtype, **({"args": args} if args else {})}
            rt = None
    if rt is not None:
        if "url" in rt and "endpoint" not in rt:
            rt = {**rt, "endpoint": rt["url"]}
        try:
            endpoint = check_endpoint_url(rt.get("endpoint"))
        except EndpointRefused as exc:
            raise InvalidRequestError(f"'{key}.runtime.endpoint' {exc}.", param=f"{key}.runtime.endpoint") from None
        api_key = rt.get("api_key")
        if api_key is not None:
            why = check_header_value(api_key) if isinstance(api_key, str) else "must be a string"
            if why is None and not 1 <= len(api_key) <= MAX_API_KEY_CHARS:
                why = f"must be 1-{MAX_API_KEY_CHARS} characters"
            if why:  # the value is a secret: never echo it
                raise InvalidRequestError(f"'{key}.runtime.api_key' {why}.", param=f"{key}.runtime.api_key")
        out["runtime"] = {"type": "endpoint", "endpoint": endpoint, "api_key": api_key}
        limit = rt.get("request_timeout_s")
        if limit is not None:
            # Each request's limit (an engine behind a proxy that cuts requests, e.g.
            # RunPod's at 100 s): past it the request ends as ``proxy_timeout``.
            if isinstance(limit, bool) or not isinstance(limit, int | float) or not 1 <= limit <= 3600:
                raise InvalidRequestError(f"'{key}.runtime.request_timeout_s' must be a number of seconds from 1 "
                                          "to 3600.", param=f"{key}.runtime.request_timeout_s")
            out["runtime"]["request_timeout_s"] = float(limit)
    for name in ("model_template", "profile"):
        ref = ext.get(name)
        if ref is None:
            continue
        if isinstance(ref, str):
            ref = {"name": ref}
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not ref["name"]:
            raise InvalidRequestError(f"'{key}.{name}' must be an object with a 'name'.", param=f"{key}.{name}")
        out[name] = ref
    if "profile" in out and "model_template" not in out:
        raise InvalidRequestError(f"'{key}.profile' needs a model_template.", param=f"{key}.profile")
    if ext.get("max_concurrency") is not None:
        mc = ext["max_concurrency"]
        if not isinstance(mc, int) or isinstance(mc, bool) or not 1 <= mc <= MAX_EXTENSION_CONCURRENCY:
            raise InvalidRequestError(
                f"'{key}.max_concurrency' must be an integer from 1 to {MAX_EXTENSION_CONCURRENCY}.",
                param=f"{key}.max_concurrency",
            )
        out["max_concurrency"] = mc
    for name in ("min_concurrency", "concurrency"):
        v = ext.get(name)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_EXTENSION_CONCURRENCY:
            raise InvalidRequestError(
                f"'{key}.{name}' must be an integer from 1 to {MAX_EXTENSION_CONCURRENCY}.", param=f"{key}.{name}"
            )
        out[name] = v
    if "concurrency" in out and ("min_concurrency" in out or "max_concurrency" in out):
        raise InvalidRequestError(
            f"'{key}.concurrency' fixes the number in flight; it cannot be combined with min_concurrency or "
            "max_concurrency.", param=f"{key}.concurrency",
        )
    if out.get("min_concurrency", 0) > out.get("max_concurrency", MAX_EXTENSION_CONCURRENCY):
        raise InvalidRequestError(
            f"'{key}.min_concurrency' ({out['min_concurrency']}) is above max_concurrency ({out['max_concurrency']}).",
            param=f"{key}.min_concurrency",
        )
    if ext.get("yield_to_others") is not None:
        if not isinstance(ext["yield_to_others"], bool):
            raise InvalidRequestError(f"'{key}.yield_to_others' must be true or false.", param=f"{key}.yield_to_others")
        out["yield_to_others"] = ext["yield_to_others"]
    if ext.get("priority") is not None:
        pr = ext["priority"]
        if not isinstance(pr, int) or isinstance(pr, bool) or not 0 <= pr <= 100:
            raise InvalidRequestError(
                f"'{key}.priority' must be an integer from 0 to 100.", param=f"{key}.priority"
            )
        out["priority"] = pr
    if ext.get("resource_allocation") is not None:
        out["resource_allocation"] = _resource_allocation(ext["resource_allocation"], key)
    if ext.get("job_id") is not None:
        jid = ext["job_id"]
        if not isinstance(jid, str) or len(jid) > 256:
            raise InvalidRequestError(f"'{key}.job_id' must be a string (at most 256 characters).", param=f"{key}.job_id")
        out["job_id"] = jid
    hook = parse_batch_webhook(ext, key)
    if hook is not None:
        out["webhook"] = hook
    return out


def _resource_allocation(ra: Any, key: str) -> dict[str, Any]:
    """``{provision_id, provision_resource_deadline (Unix s; null: none), resource_details[]}``:
    what a planner allocated for the batch, kept and shown on it."""
    import orjson

    param = f"{key}.resource_allocation"
    if not isinstance(ra, dict) or set(ra) - {"provision_id", "provision_resource_deadline", "resource_details"}:
        raise InvalidRequestError(f"'{param}' must be an object with provision_id, provision_resource_deadline "
                                  "and resource_details.", param=param)
    pid, dl, details = ra.get("provision_id"), ra.get("provision_resource_deadline"), ra.get("resource_details")
    if pid is not None and (not isinstance(pid, str) or len(pid) > 256):
        raise InvalidRequestError(f"'{param}.provision_id' must be a string.", param=f"{param}.provision_id")
    if dl is not None and (isinstance(dl, bool) or not isinstance(dl, (int, float)) or not 0 <= dl < 1e11):
        raise InvalidRequestError(f"'{param}.provision_resource_deadline' must be Unix seconds.",
                                  param=f"{param}.provision_resource_deadline")
    if details is not None and (not isinstance(details, list) or len(details) > 64
                                or not all(isinstance(d, dict) for d in details)
                                or len(orjson.dumps(details)) > 16384):
        raise InvalidRequestError(f"'{param}.resource_details' must be a list of objects (at most 64, 16 KiB).",
                                  param=f"{param}.resource_details")
    return {"provision_id": pid, "provision_resource_deadline": dl or None, "resource_details": details or []}


def batch_id_for_job(tenant: str, job_id: str) -> str:
    """The id of the batch created for ``job_id`` (``extra_body.overnight.job_id``)."""
    import hashlib

    return "batch_" + hashlib.sha256(f"{tenant}\0{job_id}".encode()).hexdigest()[:24]


async def create_batch(
    *,
    store: Store,
    storage: Storage,
    tenant: str,
    body: BatchCreate,
    limits: ValidationLimits,
    validate_now: bool = False,
    policy: EndpointPolicy | None = None,
    secrets: SecretBox | None = None,
    rules: RuntimeRules | None = None,
    batch_id: str | None = None,
    webhooks: WebhookConfig | None = None,
    console: bool = False,
) -> BatchRecord:
    """Create a batch in ``validating``. With ``validate_now`` the input is checked
    before anything is recorded and a bad line is an ``InputError`` (HTTP 400).

    ``batch_id`` (a caller's own, e.g. the console planner's, derived from its job):
    creating it again returns the batch that exists, so a caller that crashed after
    the create and before noting it never makes a second batch.

    A tenant-named engine endpoint must pass ``policy`` (the SSRF allowlist); its
    ``api_key`` is stored sealed by ``secrets``, and refused when there is no key.
    A ``webhook_url`` must pass ``webhooks.policy`` likewise (``webhooks/config.py``).

    ``console``: the request came with a trusted console's key: the engine or machine
    it names is one that console provisioned, so ``policy`` does not apply to it, now
    or when the batch is claimed (``CONSOLE_PROVISIONED`` on the record)."""
    if body.endpoint not in SUPPORTED_ENDPOINTS:
        raise InvalidRequestError(
            f"Unsupported endpoint {body.endpoint!r}; supported: {', '.join(SUPPORTED_ENDPOINTS)}.",
            param="endpoint",
        )
    window_s = parse_completion_window(body.completion_window)
    metadata = check_metadata(body.metadata)
    options = parse_extension(body.extension, key=body.extension_key)
    deadline = (options.get("resource_allocation") or {}).get("provision_resource_deadline")
    if deadline:
        # The resource goes away then: the batch expires no later (AIBrix's rule).
        left = int(deadline - time.time())
        if left < 1:
            raise InvalidRequestError(f"'{body.extension_key}.resource_allocation.provision_resource_deadline' "
                                      "has passed.", param=f"{body.extension_key}.resource_allocation")
        window_s = min(window_s, left)
    _apply_runtime_rules(options, rules or RuntimeRules(), key=body.extension_key, endpoint=body.endpoint)
    rt = options.get("runtime")
    if rt is not None and console:
        options[CONSOLE_PROVISIONED] = True
        policy = None
    if rt is not None and rt.get("type", "endpoint") == "endpoint":
        await _check_runtime(rt, key=body.extension_key, policy=policy, secrets=secrets)
    if rt is not None and rt.get("type") == "ssh" and policy is not None:
        refused = ssh_target_refusal(rt, policy)
        if refused:
            key = body.extension_key
            raise InvalidRequestError(f"'{key}.runtime' {refused}.", param=f"{key}.runtime", code="endpoint_not_allowed")
    if "webhook" in options:
        options["webhook"] = await check_batch_webhook(options["webhook"], key=body.extension_key,
                                                       config=webhooks, secrets=secrets)
    out_exp = body.output_expires_after or {}
    if not isinstance(out_exp, dict):
        raise InvalidRequestError("output_expires_after must be an object.", param="output_expires_after")
    output_expires_s = parse_expires_after(
        out_exp.get("anchor"), out_exp.get("seconds"), param="output_expires_after"
    )
    try:
        f = await get_file(store=store, tenant=tenant, file_id=body.input_file_id)
    except NotFoundError:
        raise NotFoundError(f"No such File object: {body.input_file_id}", code="file_not_found") from None
    if f.purpose != "batch":
        raise InvalidRequestError(
            f"File {f.id} has purpose {f.purpose!r}; a batch input file must be uploaded with purpose 'batch'.",
            param="input_file_id",
        )
    total, model = 0, None
    if validate_now:
        result = await validate_input(storage, f.storage_key, endpoint=body.endpoint, limits=limits)
        if not result.ok:
            e = result.errors[0]
            raise InputError(e["message"], line=e.get("line"), param=e.get("param"), code=e["code"])
        total, model = result.total, result.model
    t = time.time()
    now = int(t)
    if batch_id is None and options.get("job_id"):
        # A caller's job id (the console's, or any client's idempotency key) names
        # the batch: a repeated create returns the batch made the first time.
        batch_id = batch_id_for_job(tenant, options["job_id"])
    if batch_id is not None:
        existing = await store.get_batch(batch_id)
        if existing is not None:
            if existing.tenant != tenant:
                raise ConflictError(f"batch id {batch_id} is taken")
            return existing
    rec = BatchRecord(
        id=batch_id or new_id("batch"),
        tenant=tenant,
        endpoint=body.endpoint,
        input_file_id=f.id,
        completion_window=body.completion_window,
        completion_window_s=window_s,
        status=BatchStatus.VALIDATING.value,
        created_at=now,
        expires_at=now + window_s,
        expires_at_exact=t + window_s,
        metadata=metadata,
        model=model,
        total=total,
        options=options,
        output_expires_after_s=output_expires_s,
    )
    try:
        await store.insert_batch(rec)
    except StoreError:
        if batch_id is None:
            raise
        existing = await store.get_batch(batch_id)  # created by a racing caller meanwhile
        if existing is None or existing.tenant != tenant:
            raise
        return existing
    BATCH_TRANSITIONS[rec.status] += 1
    log.info("batch %s: created -> %s", rec.id, rec.status,
             extra={"batch_id": rec.id, "status": rec.status, "tenant": tenant, "endpoint": rec.endpoint})
    return rec


#: Most pods one batch may be sharded over.
MAX_SHARDS = 10_000


def _kubernetes_runtime(rt: dict[str, Any], key: str, rtype: str) -> dict[str, Any]:
    """``{"type": "kubernetes-job", "shards"?: int, "namespace"?: str}`` or
    ``{"type": "kubernetes-deployment", "namespace"?: str}``, checked."""
    out: dict[str, Any] = {"type": rtype}
    shards = rt.get("shards")
    if shards is not None:
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise InvalidRequestError(f"'{key}.runtime.shards' must be an integer from 1 to {MAX_SHARDS}.",
                                      param=f"{key}.runtime.shards")
        out["shards"] = shards
    ns = rt.get("namespace")
    if ns is not None:
        if not isinstance(ns, str) or not _DNS_LABEL_RE.fullmatch(ns):
            raise InvalidRequestError(
                f"'{key}.runtime.namespace' must be a Kubernetes namespace name (lower-case letters, digits "
                "and '-', at most 63).", param=f"{key}.runtime.namespace")
        out["namespace"] = ns
    return out


def _ssh_runtime(rt: dict[str, Any], key: str) -> dict[str, Any]:
    """An ``ssh`` runtime spec (what the console's SSH providers report), checked."""
    from pydantic import ValidationError

    from overnight.runtimes.ssh_common import SshSpec

    try:
        spec = SshSpec.model_validate(rt)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidRequestError(f"'{key}.runtime.{where}': {err['msg']}.", param=f"{key}.runtime.{where}") from None
    if spec.launch == "docker" and not spec.image:
        raise InvalidRequestError(f"'{key}.runtime.image' is required with launch 'docker'.",
                                  param=f"{key}.runtime.image")
    return spec.model_dump()


def ssh_target(rt: dict[str, Any]) -> str:
    """``ssh://user@host:port``: what the endpoint policy trusts for an ``ssh`` runtime."""
    return f"ssh://{rt.get('user')}@{rt.get('host')}:{rt.get('port')}"


def ssh_target_refusal(rt: dict[str, Any], policy: EndpointPolicy, *, secrets: bool = True) -> str | None:
    """Why ``policy`` does not let a batch start its engine on the ``ssh`` runtime's
    machine, or None. A machine the console provisioned (trusted while it lives) may;
    in keyed mode nothing else may. Any other machine (open mode) gets no ``secrets``
    (they are this server's environment variables; checked at create: ``secrets``)."""
    target = ssh_target(rt)
    if policy.is_trusted(target):
        return None
    if not policy.allow_any:
        return (f"names the machine {target}, which this server's console did not provision; only those are "
                f"allowed ({policy.describe}; a console running as its own process needs its key here in "
                "OVERNIGHT_TRUSTED_CONSOLE_KEYS)")
    if secrets and rt.get("secrets"):
        return (f"names the machine {target}, which this server's console did not provision, with 'secrets' "
                "(environment variables of this server): send your own values in 'env' instead")
    return None


def _apply_runtime_rules(options: dict[str, Any], rules: RuntimeRules, *, key: str, endpoint: str) -> None:
    """Resolve and freeze the batch's template and profile, pick its runtime type
    and check that this server allows it and this host can ever run it."""
    rt = options.get("runtime")
    tref = options.pop("model_template", None)
    pref = options.pop("profile", None)
    if tref is not None:
        if rules.templates is None:
            raise InvalidRequestError(
                "This server has no model deployment templates (start it with --templates-dir).",
                param=f"{key}.model_template",
            )
        from overnight.templates.resolve import check_endpoint, resolve

        resolved = resolve(rules.templates, tref, pref, template_param=f"{key}.model_template",
                           profile_param=f"{key}.profile")
        check_endpoint(resolved, endpoint)
        if rt is None:
            rt = options["runtime"] = {"type": rules.default if rules.default in TEMPLATE_RUNTIMES else "local"}
        if rt.get("type") not in TEMPLATE_RUNTIMES:
            raise InvalidRequestError(
                f"A model_template is started by one of the runtimes {', '.join(TEMPLATE_RUNTIMES)}, "
                f"not {rt.get('type')!r}.",
                param=f"{key}.runtime.type",
            )
        if rt.get("type") in KUBERNETES_RUNTIMES:
            if rt["type"] in rules.allowed:
                if rules.kubernetes_check is None:
                    raise InvalidRequestError(
                        "This server was started without Kubernetes (OVERNIGHT_KUBERNETES).",
                        param=f"{key}.runtime.type", code="runtime_not_allowed")
                if rt["type"] == "kubernetes-job" and "shards" not in rt:
                    rt["shards"] = max(1, int(resolved.template.spec.parallelism.dp or 1))
                rules.kubernetes_check(resolved, rt)
        elif rules.gpus is not None and resolved.gpus > rules.gpus.total:
            raise InvalidRequestError(
                f"Model template {resolved.name!r} needs {resolved.gpus} GPUs; this host has {rules.gpus.total}.",
                param=f"{key}.model_template",
            )
        options["template"] = resolved.to_record()
    elif rt is not None and rt.get("type") in TEMPLATE_RUNTIMES:
        raise InvalidRequestError(f"Runtime type {rt.get('type')!r} needs a {key}.model_template to start.",
                                  param=f"{key}.runtime.type")
    if rt is None:
        if rules.default and rules.default not in ("endpoint", *TEMPLATE_RUNTIMES):
            rt = options["runtime"] = {"type": rules.default}
        elif not rules.default_engine:
            raise InvalidRequestError(
                "No engine is configured: start the server with --engine-url, or pass "
                f"extra_body={{'{key}': {{'runtime': {{'endpoint': URL}}}}}} or a model_template.",
                param=f"{key}.runtime", code="no_engine",
            )
    kind = rt.get("type", "endpoint") if rt is not None else "endpoint"
    if rt is not None and kind in KUBERNETES_RUNTIMES and kind not in rules.allowed \
            and rules.kubernetes_check is None:
        raise InvalidRequestError(
            f"Runtime type {kind!r} needs Kubernetes, and this server was started without it "
            "(--kubernetes / OVERNIGHT_KUBERNETES).", param=f"{key}.runtime.type", code="runtime_not_allowed",
        )
    if rt is not None and kind not in rules.allowed:
        raise InvalidRequestError(
            f"Runtime type {kind!r} is not enabled on this server (OVERNIGHT_RUNTIMES="
            f"{','.join(sorted(rules.allowed))}).", param=f"{key}.runtime.type", code="runtime_not_allowed",
        )


def engine_log_tail(rec: BatchRecord, engines: Any, lines: int) -> str | None:
    """The tail of the log of the engine started for ``rec`` (running or not);
    404 when overnight started none for it."""
    from overnight.runtimes.local import read_tail

    handle = (rec.runtime or {}).get("handle") or {}
    if engines is not None:
        key = engines.key_for(rec.options)
        if key is not None:
            text = engines.log_tail(key, lines)
            if text is not None:
                return text
    path = handle.get("log_path")
    if not path:
        raise NotFoundError(f"Batch {rec.id} has no engine started by overnight.", code="no_engine_log")
    return read_tail(path, lines)


async def _check_runtime(
    rt: dict[str, Any], *, key: str, policy: EndpointPolicy | None, secrets: SecretBox | None
) -> None:
    if policy is not None:
        try:
            rt["endpoint"] = await policy.check(rt["endpoint"])
        except EndpointRefused as exc:
            raise InvalidRequestError(
                f"'{key}.runtime.endpoint' {exc}.", param=f"{key}.runtime.endpoint", code="endpoint_not_allowed"
            ) from None
    api_key = rt.pop("api_key", None)
    if api_key is None:
        return
    if secrets is None or not secrets.enabled:
        raise InvalidRequestError(
            f"'{key}.runtime.api_key' cannot be stored: this server has no OVERNIGHT_SECRET_KEY to encrypt "
            "it with. Ask the operator to set one, or send the batch without an api_key.",
            param=f"{key}.runtime.api_key",
        )
    rt[SEALED_API_KEY] = secrets.seal(api_key)


async def get_batch(*, store: Store, tenant: str, batch_id: str) -> BatchRecord:
    rec = await store.get_batch(batch_id)
    if rec is None or rec.tenant != tenant:
        raise NotFoundError(f"No such Batch object: {batch_id}")
    return rec


async def list_batches(
    *, store: Store, tenant: str, after: str | None, limit: int
) -> tuple[list[BatchRecord], bool]:
    recs = await store.list_batches(tenant=tenant, after=after, limit=limit + 1)
    return recs[:limit], len(recs) > limit


async def update_batch(
    store: Store,
    batch_id: str,
    mutate: Callable[[BatchRecord], BatchRecord | None],
    *,
    fence: int | None = None,
    checkpoint: bytes | None = None,
) -> BatchRecord:
    """Read-modify-write with compare-and-set, retried on conflict.

    ``mutate`` gets the current record and returns the new one (or None to write
    nothing). With ``fence``, the write only happens while the caller's lease token
    is still the batch's current one; otherwise ``LeaseLost``.
    """
    for _ in range(100):
        cur = await store.get_batch(batch_id)
        if cur is None:
            raise NotFoundError(f"No such Batch object: {batch_id}")
        if fence is not None and cur.lease_token != fence:
            raise LeaseLost(f"lease on {batch_id} lost (token {fence}, current {cur.lease_token})")
        new = mutate(dataclasses.replace(cur))
        if new is None:
            return cur
        try:
            return await store.update_batch(new, checkpoint=checkpoint)
        except VersionConflict:
            continue
    raise ConflictError(f"batch {batch_id} is changing too fast to update")


async def transition(
    store: Store,
    batch_id: str,
    to: BatchStatus,
    *,
    fence: int | None = None,
    checkpoint: bytes | None = None,
    now: int | None = None,
    **changes: Any,
) -> BatchRecord:
    """The one place a batch changes status: checks the transition table, stamps the
    status timestamp and writes atomically (CAS on version). Raises
    ``TransitionError`` when the current status does not allow ``to``."""

    came_from: list[str] = []

    def mutate(rec: BatchRecord) -> BatchRecord:
        if not can_transition(rec.status, to):
            raise TransitionError(
                f"Batch {rec.id} is {rec.status}; it cannot become {to.value}.", code="invalid_state"
            )
        came_from[:] = [rec.status]
        rec.status = to.value
        ts = TIMESTAMP_FIELD.get(to)
        at = now if now is not None else int(time.time())
        if ts:
            setattr(rec, ts, at)
        for k, v in changes.items():
            setattr(rec, k, v)
        if to in TERMINAL:
            # In this same compare-and-set: the event is owed exactly when it is true.
            webhook_state.add_event(rec, to.value, at=at, now=time.time())
        return rec

    rec = await update_batch(store, batch_id, mutate, fence=fence, checkpoint=checkpoint)
    # One line per status change (never per request), written once it is durable.
    why = f" ({rec.errors[0].get('code')}: {rec.errors[0].get('message')})" if to is BatchStatus.FAILED and rec.errors else ""
    prev = came_from[0] if came_from else None
    BATCH_TRANSITIONS[to.value] += 1
    log.info("batch %s: %s -> %s%s", batch_id, prev or "?", to.value, why,
             extra={"batch_id": batch_id, "status": to.value, "from_status": prev})
    batch_events.publish(rec)
    return rec


async def cancel_batch(*, store: Store, tenant: str, batch_id: str) -> BatchRecord:
    """Ask a batch to stop. Idempotent while cancelling; 409 once terminal."""
    rec = await get_batch(store=store, tenant=tenant, batch_id=batch_id)
    if rec.status == BatchStatus.CANCELLING.value:
        return rec
    if BatchStatus(rec.status) in TERMINAL or rec.status == BatchStatus.FINALIZING.value:
        raise ConflictError(
            f"Cannot cancel batch {batch_id}: it is already {rec.status}.", code="batch_not_cancellable"
        )
    try:
        return await transition(store, batch_id, BatchStatus.CANCELLING)
    except TransitionError as exc:
        latest = await store.get_batch(batch_id)
        if latest is not None and latest.status == BatchStatus.CANCELLING.value:
            return latest
        raise ConflictError(f"Cannot cancel batch {batch_id}: {exc.message}", code="batch_not_cancellable") from exc
