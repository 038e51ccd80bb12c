"""From a batch's template and profile references to one frozen, storable answer.

``resolve(source, {"name", "version"?, "overrides"?}, {"name", "overrides"?})``
looks both up, applies the batch's overrides through an allowlist, validates the
result again, and returns a ``Resolved``: the exact template and profile the
batch runs with. Its ``to_record()`` is plain JSON to store in the batch record,
so editing a template file later never changes a batch that exists;
``Resolved.from_record()`` reads it back without the source. ``key()`` is the same
for every batch that resolves to the same template and profile (engine reuse).

Overridable, by a batch (paths as in the template document; ``spec.`` may be left
out, as AIBrix writes ``{engine_args: {...}}``):

* ``spec.engine_args``: merged into the template's (a ``null`` value removes a key);
* ``spec.engine.serve_args``: appended;
* ``spec.parallelism.dp``: more or fewer data-parallel replicas; a template that
  counts accelerators gets ``accelerator.count`` scaled to ``tp*pp*dp*ep``;
* ``spec.engine.ready_timeout_seconds`` and ``spec.keep_alive_seconds``.

Profile: ``env`` (new variables only: not one the profile sets, not one that
changes how processes load code, e.g. ``PATH``, ``LD_*``, ``PYTHON*``),
``node_selector`` (merged) and ``tolerations`` (appended).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from overnight.errors import InvalidRequestError
from overnight.templates.schema import (
    ModelDeploymentTemplate,
    Profile,
    TemplateSchemaError,
    parse_profile,
    parse_template,
)
from overnight.templates.source import TemplateSource

__all__ = ["TEMPLATE_OVERRIDES", "PROFILE_OVERRIDES", "Resolved", "check_endpoint", "resolve"]

RECORD_FORMAT = 1

#: Override path -> how it is applied.
TEMPLATE_OVERRIDES: dict[tuple[str, ...], str] = {
    ("spec", "engine_args"): "merge",
    ("spec", "engine", "serve_args"): "append",
    ("spec", "parallelism", "dp"): "set",
    ("spec", "engine", "ready_timeout_seconds"): "set",
    ("spec", "keep_alive_seconds"): "set",
}
PROFILE_OVERRIDES: dict[tuple[str, ...], str] = {
    ("env",): "add",
    ("node_selector",): "merge",
    ("tolerations",): "append",
}
# Variables that change which code a process runs, or that the runtime sets itself.
_ENV_DENY = re.compile(r"^(PATH|LD_.*|PYTHON.*|DYLD_.*|CUDA_VISIBLE_DEVICES|NVIDIA_VISIBLE_DEVICES|HOME|SHELL)$")


def _allowed_text(allow: Mapping[tuple[str, ...], str]) -> str:
    return ", ".join(".".join(p) for p in allow)


def _walk(
    value: Any,
    written: tuple[str, ...],
    effective: tuple[str, ...],
    allow: Mapping[tuple[str, ...], str],
    param: str,
    out: list[tuple[tuple[str, ...], tuple[str, ...], Any]],
) -> None:
    """Collect ``(written path, allowlisted path, value)`` for every leaf of the overrides."""
    if effective in allow:
        out.append((written, effective, value))
        return
    deeper = any(a[: len(effective)] == effective and len(a) > len(effective) for a in allow)
    if deeper and isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidRequestError(f"{param}.{'.'.join(written)}: keys must be strings", param=param)
            _walk(v, (*written, k), (*effective, k), allow, param, out)
        return
    path = f"{param}.{'.'.join(written)}"
    raise InvalidRequestError(f"{path} is not overridable (allowed: {_allowed_text(allow)})", param=path)


def _leaves(
    overrides: Any, allow: Mapping[tuple[str, ...], str], param: str, *, spec_shorthand: bool
) -> list[tuple[tuple[str, ...], tuple[str, ...], Any]]:
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise InvalidRequestError(f"{param} must be an object", param=param)
    out: list[tuple[tuple[str, ...], tuple[str, ...], Any]] = []
    for k, v in overrides.items():
        if not isinstance(k, str):
            raise InvalidRequestError(f"{param}: keys must be strings", param=param)
        effective = ("spec", k) if spec_shorthand and k != "spec" else (k,)
        _walk(v, (k,), effective, allow, param, out)
    return out


def _bad(param: str, written: tuple[str, ...], msg: str) -> InvalidRequestError:
    path = f"{param}.{'.'.join(written)}"
    return InvalidRequestError(f"{path} {msg}", param=path)


def _apply_template_overrides(doc: dict[str, Any], overrides: Any, param: str) -> None:
    spec = doc["spec"]
    for written, path, value in _leaves(overrides, TEMPLATE_OVERRIDES, param, spec_shorthand=True):
        if path == ("spec", "engine_args"):
            if not isinstance(value, Mapping):
                raise _bad(param, written, "must be an object of engine arguments")
            args = spec.setdefault("engine_args", {})
            for k, v in value.items():
                if v is None:
                    args.pop(k, None)
                else:
                    args[k] = copy.deepcopy(v)
        elif path == ("spec", "engine", "serve_args"):
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise _bad(param, written, "must be a list of strings (appended to the template's)")
            spec["engine"]["serve_args"] = [*spec["engine"].get("serve_args", []), *value]
        elif path == ("spec", "parallelism", "dp"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(param, written, f"must be an integer >= 1, not {value!r}")
            par = spec.setdefault("parallelism", {})
            old_dp = par.get("dp", 1)
            par["dp"] = value
            acc = spec["accelerator"]
            if acc.get("count", 1) > 0:
                # More replicas need more accelerators: keep the per-replica share.
                acc["count"] = acc["count"] // old_dp * value
        elif path == ("spec", "engine", "ready_timeout_seconds"):
            spec["engine"]["ready_timeout_seconds"] = value
        elif path == ("spec", "keep_alive_seconds"):
            spec["keep_alive_seconds"] = value


def _apply_profile_overrides(doc: dict[str, Any], overrides: Any, param: str) -> None:
    for written, path, value in _leaves(overrides, PROFILE_OVERRIDES, param, spec_shorthand=False):
        if path == ("env",):
            if not isinstance(value, Mapping):
                raise _bad(param, written, "must be an object of environment variables")
            env = doc.setdefault("env", {})
            for k, v in value.items():
                where = (*written, str(k))
                if k in env or k in doc.get("secrets", {}):
                    raise _bad(param, where, "is set by the profile; overrides can only add variables")
                if _ENV_DENY.match(str(k)):
                    raise _bad(param, where, "may not be set by an override")
                env[k] = v
        elif path == ("node_selector",):
            if not isinstance(value, Mapping):
                raise _bad(param, written, "must be an object of node labels")
            doc.setdefault("node_selector", {}).update(value)
        elif path == ("tolerations",):
            if not isinstance(value, list):
                raise _bad(param, written, "must be a list of tolerations (appended to the profile's)")
            doc["tolerations"] = [*doc.get("tolerations", []), *copy.deepcopy(value)]


def _ref_parts(ref: Any, param: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(ref, str):
        ref = {"name": ref}
    if not isinstance(ref, Mapping):
        raise InvalidRequestError(f"{param} must be an object with {', '.join(keys)}", param=param)
    for k in ref:
        if k not in keys:
            raise InvalidRequestError(
                f"{param}.{k} is not a field (allowed: {', '.join(keys)})", param=f"{param}.{k}"
            )
    name = ref.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{param}.name is required (a non-empty string)", param=f"{param}.name")
    out = dict(ref)
    if "version" in keys:
        version = ref.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        if version is not None and not isinstance(version, str):
            raise InvalidRequestError(f"{param}.version must be a string", param=f"{param}.version")
        out["version"] = version or None
    return out


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Resolved:
    """One template (overrides applied) and its profile, frozen.

    Built from its own JSON record: nothing here shares objects with the source, and
    ``to_record()`` hands out a fresh copy each time."""

    __slots__ = ("_json", "_keep", "_key", "profile", "template")

    def __init__(self, record: Mapping[str, Any]) -> None:
        # Private: use resolve() or from_record().
        self._json = _canonical(record)
        # ``status`` labels the catalog entry, not the engine: deprecating a version
        # must not split the batches that share its engine.
        template = {k: v for k, v in record["template"].items() if k != "status"}
        body = {"template": template, "profile": record["profile"]}
        self._key = hashlib.sha256(_canonical(body).encode()).hexdigest()[:32]
        self._keep = float(record["keep_alive_seconds"])
        self.template: ModelDeploymentTemplate = parse_template(record["template"], where="record: template")
        self.profile: Profile | None = (
            parse_profile(record["profile"], where="record: profile") if record["profile"] is not None else None
        )

    # -- what the scheduler and the runtime read -------------------------------------
    @property
    def name(self) -> str:
        """Template name; also the name the engine serves the model under."""
        return self.template.name

    @property
    def version(self) -> str:
        return self.template.version

    @property
    def profile_name(self) -> str | None:
        return self.profile.name if self.profile else None

    @property
    def gpus(self) -> int:
        return self.template.spec.accelerator.gpus

    @property
    def ready_timeout_seconds(self) -> float:
        return self.template.spec.engine.ready_timeout_seconds

    @property
    def keep_alive_seconds(self) -> float:
        """The longer of the template's and the profile's keep-alive."""
        return self._keep

    def key(self) -> str:
        """Same for every batch resolving to the same template and profile
        (``status`` aside); what engine reuse goes by."""
        return self._key

    def summary(self) -> dict[str, Any]:
        """What a batch object shows: template, version, profile and engine key."""
        return {"template": self.name, "version": self.version, "profile": self.profile_name, "key": self._key}

    # -- storage ------------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        """Plain JSON (a fresh copy): ``{format, template, profile, keep_alive_seconds,
        overrides, key}``."""
        record: dict[str, Any] = json.loads(self._json)
        record["key"] = self._key
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Resolved:
        """Read back what ``to_record()`` gave; an error names the field."""
        if not isinstance(record, Mapping) or not isinstance(record.get("template"), Mapping):
            raise TemplateSchemaError(["record: template: required (an object)"])
        profile = record.get("profile")
        if profile is not None and not isinstance(profile, Mapping):
            raise TemplateSchemaError(["record: profile: must be an object or null"])
        template = parse_template(record["template"], where="record: template")
        parsed_profile = parse_profile(profile, where="record: profile") if profile is not None else None
        keep = record.get("keep_alive_seconds")
        if isinstance(keep, bool) or not isinstance(keep, int | float) or keep < 0:
            keep = _keep_alive(template, parsed_profile)
        return cls(_record(template, parsed_profile, record.get("overrides") or {}, float(keep)))

    def __repr__(self) -> str:
        return f"Resolved({self.name!r}, version={self.version!r}, profile={self.profile_name!r}, key={self._key})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Resolved) and other._json == self._json

    def __hash__(self) -> int:
        return hash(self._json)


def _keep_alive(template: ModelDeploymentTemplate, profile: Profile | None) -> float:
    return max(template.spec.keep_alive_seconds, profile.keep_alive_seconds if profile else 0.0)


def _record(
    template: ModelDeploymentTemplate, profile: Profile | None, overrides: Mapping[str, Any], keep: float
) -> dict[str, Any]:
    return {
        "format": RECORD_FORMAT,
        "template": template.model_dump(mode="json"),
        "profile": profile.model_dump(mode="json") if profile else None,
        "keep_alive_seconds": keep,
        "overrides": json.loads(_canonical(overrides)),
    }


def resolve(
    source: TemplateSource,
    template_ref: Mapping[str, Any] | str,
    profile_ref: Mapping[str, Any] | str | None = None,
    *,
    template_param: str = "model_template",
    profile_param: str = "profile",
) -> Resolved:
    """Look up, apply overrides, validate again, freeze.

    Raises ``TemplateNotFound`` / ``ProfileNotFound`` (404), ``TemplateInvalidError``
    (the stored document is broken) and ``InvalidRequestError`` (a bad reference or
    override; ``param`` names the field, e.g. ``model_template.overrides.spec.engine.image``).
    """
    tref = _ref_parts(template_ref, template_param, ("name", "version", "overrides"))
    base = source.get_template(tref["name"], tref["version"])
    t_over = tref.get("overrides")
    template = base
    if t_over:
        doc = base.model_dump(mode="json")
        _apply_template_overrides(doc, t_over, f"{template_param}.overrides")
        where = f"{template_param}.overrides ({base.name} {base.version})"
        try:
            template = parse_template(doc, where=where)
        except TemplateSchemaError as exc:
            exc.param = f"{template_param}.overrides"
            raise
    profile = None
    p_over = None
    if profile_ref is not None:
        pref = _ref_parts(profile_ref, profile_param, ("name", "overrides"))
        profile = source.get_profile(pref["name"])
        p_over = pref.get("overrides")
        if p_over:
            pdoc = profile.model_dump(mode="json")
            _apply_profile_overrides(pdoc, p_over, f"{profile_param}.overrides")
            try:
                profile = parse_profile(pdoc, where=f"{profile_param}.overrides ({profile.name})")
            except TemplateSchemaError as exc:
                exc.param = f"{profile_param}.overrides"
                raise
    overrides = {"template": t_over or {}, "profile": p_over or {}}
    try:
        return Resolved(_record(template, profile, overrides, _keep_alive(template, profile)))
    except (TypeError, ValueError) as exc:  # overrides that are not JSON
        raise InvalidRequestError(f"{template_param}.overrides: not JSON: {exc}", param=template_param) from None


def check_endpoint(resolved: Resolved, endpoint: str) -> None:
    """Raise ``InvalidRequestError`` (param ``endpoint``) when the template does not serve ``endpoint``."""
    wanted = endpoint.rstrip("/") or "/"
    supported = resolved.template.spec.supported_endpoints
    if wanted not in supported:
        raise InvalidRequestError(
            f"model template {resolved.name!r} version {resolved.version!r} does not serve {endpoint} "
            f"(supported_endpoints: {', '.join(supported)})",
            param="endpoint",
            code="unsupported_endpoint",
        )
