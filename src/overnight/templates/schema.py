"""Model deployment templates and profiles: the documents and their rules.

A template says how to serve one model; a profile says where workers keep state
and how they are placed. Field names follow AIBrix's ``ModelDeploymentTemplate``
so its templates can be brought over (AIBrix-only fields such as ``sku_hint`` or
``parallelism.sp`` are accepted and kept; overnight does not use them).

Every rule that spans fields raises a pydantic ``ValidationError`` located at the
field it is about, so ``parse_template`` can name the file, the document and the
field path of each problem (``spec.parallelism: tp*pp*dp*ep = 4 but ...``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from overnight.errors import InvalidRequestError

__all__ = [
    "BUILTIN_ENGINES",
    "Accelerator",
    "EngineSpec",
    "ModelDeploymentTemplate",
    "ModelSource",
    "Parallelism",
    "Profile",
    "Quantization",
    "SecretKeyRef",
    "SecretRef",
    "TemplateSchemaError",
    "TemplateSpec",
    "Toleration",
    "looks_like_secret",
    "parse_profile",
    "parse_template",
    "validation_issues",
]

#: Engine types overnight derives a command for; any other type needs ``spec.engine.command``.
BUILTIN_ENGINES = ("vllm", "sglang", "mock")

#: ``engine_args`` keys overnight sets itself, and where the value belongs instead.
_RESERVED_ENGINE_ARGS = {
    "host": "the runtime chooses the address",
    "port": "the runtime chooses the port",
    "model": "use spec.model_source.uri",
    "model_path": "use spec.model_source.uri",
    "served_model_name": "the engine serves the model under the template's name",
    "revision": "use spec.model_source.revision",
    "tensor_parallel_size": "use spec.parallelism.tp",
    "tp": "use spec.parallelism.tp",
    "tp_size": "use spec.parallelism.tp",
    "pipeline_parallel_size": "use spec.parallelism.pp",
    "pp": "use spec.parallelism.pp",
    "pp_size": "use spec.parallelism.pp",
    "data_parallel_size": "use spec.parallelism.dp",
    "dp": "use spec.parallelism.dp",
    "dp_size": "use spec.parallelism.dp",
    "ep_size": "use spec.parallelism.ep",
    "quantization": "use spec.quantization.weight",
    "kv_cache_dtype": "use spec.quantization.kv_cache",
}
#: ``serve_args`` flags overnight sets itself on the commands it derives.
_RESERVED_FLAGS = ("--host", "--port", "--served-model-name", "--model", "--model-path")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
_ARG_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# Names that hold credentials (HF_TOKEN, OPENAI_API_KEY, DB_PASSWORD ...).
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
# Well-known credential prefixes: Hugging Face, OpenAI, GitHub, GitLab, Slack, AWS keys, JWTs.
_SECRET_PREFIX = re.compile(r"^(hf_|sk-|sk_|ghp_|gho_|ghs_|github_pat_|glpat-|xox[abpr]-|AKIA|ASIA|eyJ)")
_HARMLESS = {"", "0", "1", "true", "false", "yes", "no", "on", "off", "none", "auto"}


def _class(c: str) -> int:
    return 0 if c.islower() else 1 if c.isupper() else 2


def looks_like_secret(value: str) -> bool:
    """A heuristic for credentials written where only references belong: a known
    token prefix, or a long unbroken run of letters and digits that switches
    between lower case, upper case and digits as often as random text does (a
    CamelCase name such as ``Qwen2VLForConditionalGeneration`` switches at word
    boundaries only; names, paths and model ids also break at '-', '.', '/')."""
    if _SECRET_PREFIX.match(value) and len(value) >= 12:
        return True
    for run in re.findall(r"[A-Za-z0-9]{16,}", value):
        if len({_class(c) for c in run}) < 3:
            continue
        switches = sum(_class(a) != _class(b) for a, b in zip(run, run[1:], strict=False))
        if switches / (len(run) - 1) >= 0.45:
            return True
    return False


def _secret_in_value(key: str, value: str) -> bool:
    """Is ``key: value`` a credential given by value?"""
    if looks_like_secret(value):
        return True
    return bool(_SECRET_NAME.search(key)) and value.strip().lower() not in _HARMLESS


def _raise(title: str, issues: list[tuple[tuple[str | int, ...], str]]) -> None:
    """Raise one ``ValidationError`` with an entry per (location, message)."""
    if issues:
        raise ValidationError.from_exception_data(
            title,
            [
                InitErrorDetails(type=PydanticCustomError("rule", "{msg}", {"msg": msg}), loc=loc, input=None)
                for loc, msg in issues
            ],
        )


def _stringify(value: Any) -> Any:
    """YAML reads ``OMP_NUM_THREADS: 4`` as an int; env and labels are strings."""
    if not isinstance(value, Mapping):
        return value
    out = {}
    for k, v in value.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, int | float):
            v = str(v)
        out[k] = v
    return out


class _Doc(BaseModel):
    # Unknown fields are errors (a typo must not be silently ignored); frozen so a
    # resolved template cannot be edited in place.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EngineSpec(_Doc):
    type: str = Field(min_length=1, description="vllm | sglang | mock, or any type with a `command`")
    version: str | None = None
    image: str | None = None
    invocation: Literal["http_server"] = "http_server"
    serve_args: list[str] = Field(default_factory=list)
    health_endpoint: str = "/health"
    ready_timeout_seconds: float = Field(600.0, ge=1)
    metrics_endpoint: str = "/metrics"
    port: int = Field(8000, ge=1, le=65535)
    #: Replaces the derived command (argv); ``{host}`` and ``{port}`` are filled in by the runtime.
    command: list[str] | None = Field(None, min_length=1)

    @field_validator("type")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v: Any) -> Any:
        return _version_text(v)

    @field_validator("health_endpoint", "metrics_endpoint")
    @classmethod
    def _path(cls, v: str, info: Any) -> str:
        if v == "":  # AIBrix: empty means the default
            return "/health" if info.field_name == "health_endpoint" else "/metrics"
        if not v.startswith("/"):
            raise ValueError(f"must be a path starting with '/', not {v!r}")
        return v

    @model_validator(mode="after")
    def _rules(self) -> EngineSpec:
        issues: list[tuple[tuple[str | int, ...], str]] = []
        if self.command is None and self.type not in BUILTIN_ENGINES:
            issues.append((("type",), f"overnight has no built-in command for engine type {self.type!r} "
                           f"(built in: {', '.join(BUILTIN_ENGINES)}); give spec.engine.command"))
        if self.command is not None:
            if any(not part for part in self.command):
                issues.append((("command",), "has an empty element"))
            if not any("{port}" in part for part in self.command):
                issues.append((("command",), "must contain '{port}' (e.g. \"--port\", \"{port}\"): "
                               "the runtime chooses the port and fills it in"))
        for i, arg in enumerate(self.serve_args):
            if self.command is None and any(arg == f or arg.startswith(f + "=") for f in _RESERVED_FLAGS):
                issues.append((("serve_args", i), f"{arg.split('=')[0]} is set by overnight; remove it"))
            elif looks_like_secret(arg):
                issues.append((("serve_args", i), "looks like a secret value; templates carry no secrets "
                               "(give it through a profile's secrets)"))
        _raise("EngineSpec", issues)
        return self


class ModelSource(_Doc):
    type: Literal["huggingface", "s3", "local", "tos", "hdfs"]
    uri: str = Field(min_length=1)
    revision: str | None = None
    tokenizer_path: str | None = None
    chat_template_path: str | None = None
    #: Name of a secret holding the credentials to fetch the model (a reference, not a value).
    auth_secret_ref: str | None = None

    @field_validator("revision", mode="before")
    @classmethod
    def _revision_str(cls, v: Any) -> Any:
        return _version_text(v)


class Accelerator(_Doc):
    #: Free-form (``H100``, ``A10G``, ``nvidia.com/gpu``); ``cpu`` needs no GPU whatever the count.
    type: str = Field(min_length=1)
    count: int = Field(1, ge=0)
    vram_gb: float | None = Field(None, gt=0)
    interconnect: Literal["nvlink", "pcie", "ib"] | None = None
    sku_hint: str | None = None

    @property
    def gpus(self) -> int:
        """GPUs an engine from this template holds."""
        return 0 if self.type.strip().lower() == "cpu" else self.count


class Parallelism(_Doc):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    # AIBrix's sequence and context parallelism: kept, not used.
    sp: int = Field(1, ge=1)
    cp: int = Field(1, ge=1)

    @property
    def product(self) -> int:
        return self.tp * self.pp * self.dp * self.ep


class Quantization(_Doc):
    #: Weight format: a ``--quantization`` method (fp8, awq, gptq, int8 ...), or bf16/fp16 (``--dtype``).
    weight: str | None = None
    #: KV cache dtype (auto, fp8, fp8_e4m3, fp8_e5m2, int8 ...).
    kv_cache: str | None = None
    weights_artifact_uri: str | None = None

    @field_validator("weight", "kv_cache")
    @classmethod
    def _word(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"{v!r} is not a quantization name")
        return v


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _check_engine_args(args: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    issues: list[tuple[tuple[str | int, ...], str]] = []
    for key, value in args.items():
        loc: tuple[str | int, ...] = (key,)
        if not isinstance(key, str) or not _ARG_KEY.match(key):
            issues.append((loc, "a key must be a flag name (letters, digits, '_' or '-')"))
            continue
        norm = key.replace("-", "_").lower()
        if norm in _RESERVED_ENGINE_ARGS:
            issues.append((loc, f"set by overnight: {_RESERVED_ENGINE_ARGS[norm]}"))
            continue
        ok_shape = _scalar(value) or (isinstance(value, list) and all(_scalar(x) for x in value)) or isinstance(
            value, Mapping
        )
        if not ok_shape:
            issues.append((loc, "must be a scalar, a list of scalars or a mapping"))
        elif isinstance(value, float) and not math.isfinite(value):
            issues.append((loc, "must be a finite number"))
        elif isinstance(value, str) and _secret_in_value(norm, value):
            issues.append((loc, "looks like a secret value; templates carry no secrets "
                           "(give it through a profile's secrets)"))
        elif norm == "gpu_memory_utilization" and value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1
        ):
            issues.append((loc, f"must be a number in (0, 1], not {value!r}"))
        elif norm in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size") and value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            issues.append((loc, f"must be a positive integer, not {value!r}"))
    return issues


class TemplateSpec(_Doc):
    engine: EngineSpec
    model_source: ModelSource
    accelerator: Accelerator
    parallelism: Parallelism = Field(default_factory=Parallelism)
    #: Engine flags: ``max_num_seqs: 256`` becomes ``--max-num-seqs 256`` (per-engine names, see commands.py).
    engine_args: dict[str, Any] = Field(default_factory=dict)
    quantization: Quantization = Field(default_factory=Quantization)
    supported_endpoints: list[str] = Field(min_length=1)
    deployment_mode: Literal["dedicated", "shared"] = "dedicated"
    #: Keep the engine this long after its last batch ends (a profile may set its own).
    keep_alive_seconds: float = Field(0.0, ge=0)
    service_id: str | None = None

    @field_validator("supported_endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        for e in v:
            if not e.startswith("/"):
                raise ValueError(f"{e!r} is not a path (e.g. /v1/chat/completions)")
        return [e.rstrip("/") or "/" for e in v]

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        _raise("engine_args", _check_engine_args(v))
        return v

    @model_validator(mode="after")
    def _rules(self) -> TemplateSpec:
        issues: list[tuple[tuple[str | int, ...], str]] = []
        count, prod = self.accelerator.count, self.parallelism.product
        if count > 0 and prod != count:
            p = self.parallelism
            issues.append((("parallelism",), f"tp*pp*dp*ep = {p.tp}*{p.pp}*{p.dp}*{p.ep} = {prod} "
                           f"but accelerator.count = {count}"))
        _raise("TemplateSpec", issues)
        return self


def _version_text(v: Any) -> Any:
    """``version: 2`` is fine as "2"; ``version: 1.10`` is not (YAML reads the number 1.1)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        raise ValueError(f"quote it: YAML reads it as the number {v!r} (and 1.10 as 1.1)")
    return v


class ModelDeploymentTemplate(_Doc):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[^\s{}]+$")
    version: str = Field("v1.0.0", min_length=1, max_length=64, pattern=r"^[^\s]+$")
    status: Literal["active", "deprecated", "draft"] = "active"
    spec: TemplateSpec

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v: Any) -> Any:
        return _version_text(v)


class SecretKeyRef(_Doc):
    """A key of a Kubernetes Secret."""

    name: str = Field(pattern=_K8S_NAME.pattern)
    key: str = Field(pattern=_SECRET_KEY.pattern)


class SecretRef(_Doc):
    """Where a secret comes from: exactly one of an environment variable of the
    overnight process (``env``) or a Kubernetes Secret (``secret_key_ref``)."""

    env: str | None = Field(None, pattern=_ENV_NAME.pattern)
    secret_key_ref: SecretKeyRef | None = Field(
        None, validation_alias=AliasChoices("secret_key_ref", "secretKeyRef")
    )

    @model_validator(mode="before")
    @classmethod
    def _by_reference(cls, v: Any) -> Any:
        if not isinstance(v, Mapping):
            # Never echo the value: it may be the secret itself.
            raise ValueError("a secret is given by reference ({env: VAR} or {secret_key_ref: {name, key}}), "
                             "never by value")
        return v

    @model_validator(mode="after")
    def _one(self) -> SecretRef:
        if (self.env is None) == (self.secret_key_ref is None):
            raise ValueError("give exactly one of env or secret_key_ref")
        return self


class Toleration(_Doc):
    """A Kubernetes toleration (Kubernetes' own field names)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None  # noqa: N815 - Kubernetes' spelling


def _url_secret_issue(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a URL"
    if parts.password:
        return "has a password in it; give credentials through the profile's secrets"
    for key, value in parse_qsl(parts.query):
        if re.search(r"(secret|token|password|passwd|credential)", key, re.I) and value:
            return f"has a credential in its {key!r} parameter; give credentials through the profile's secrets"
    return None


class Profile(_Doc):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[^\s]+$")
    #: Record store and file storage URLs for workers (no credentials in them).
    store_url: str | None = None
    storage_url: str | None = None
    #: Environment variable name in the engine/worker -> where its value comes from.
    secrets: dict[str, SecretRef] = Field(default_factory=dict)
    #: The same, for a Kubernetes Job's worker container only: the store's and the
    #: storage's credentials (``PGPASSWORD``, ``AWS_*``), which the engine, running a
    #: model's code, never needs. Other runtimes have no worker and ignore them.
    worker_secrets: dict[str, SecretRef] = Field(default_factory=dict)
    service_account: str | None = Field(None, pattern=_K8S_NAME.pattern)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    #: Kubernetes Secrets (names) the kubelet uses to pull the engine and worker images.
    image_pull_secrets: list[Annotated[str, Field(pattern=_K8S_NAME.pattern)]] = Field(default_factory=list)
    #: Kueue LocalQueue a Kubernetes Job is submitted to (label ``kueue.x-k8s.io/queue-name``);
    #: Kueue then decides when the Job starts.
    queue_name: str | None = Field(None, pattern=_LABEL_VALUE.pattern, max_length=63)
    #: Plain settings for the engine's environment (credentials go in ``secrets``).
    env: dict[str, str] = Field(default_factory=dict)
    keep_alive_seconds: float = Field(0.0, ge=0)

    @field_validator("env", "node_selector", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:
        return _stringify(v)

    @field_validator("store_url", "storage_url")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        problem = v and _url_secret_issue(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, v: dict[str, SecretRef]) -> dict[str, SecretRef]:
        _raise("secrets", [((n,), "must be an environment variable name") for n in v if not _ENV_NAME.match(n)])
        return v

    @field_validator("worker_secrets")
    @classmethod
    def _worker_secret_names(cls, v: dict[str, SecretRef], info: ValidationInfo) -> dict[str, SecretRef]:
        secrets = info.data.get("secrets") or {}
        issues: list[tuple[tuple[str | int, ...], str]] = []
        for n in v:
            if not _ENV_NAME.match(n):
                issues.append(((n,), "must be an environment variable name"))
            elif n in secrets:
                issues.append(((n,), "is also in secrets; give it in one place"))
            elif n in ("OVERNIGHT_STORE_URL", "OVERNIGHT_STORAGE_URL"):
                issues.append(((n,), "goes in secrets (OVERNIGHT_* names reach the worker only)"))
        _raise("worker_secrets", issues)
        return v

    @field_validator("env")
    @classmethod
    def _plain_env(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        secrets = {**(info.data.get("worker_secrets") or {}), **(info.data.get("secrets") or {})}
        issues: list[tuple[tuple[str | int, ...], str]] = []
        for name, value in v.items():
            if not _ENV_NAME.match(name):
                issues.append(((name,), "must be an environment variable name"))
            elif name in secrets:
                where = "secrets" if name in (info.data.get("secrets") or {}) else "worker_secrets"
                issues.append(((name,), f"is also in {where}; give it in one place"))
            elif _secret_in_value(name, value):
                issues.append(((name,), f"looks like a secret value; declare it under secrets "
                               f"(e.g. {name}: {{env: {name}}})"))
        _raise("env", issues)
        return v

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        _raise("node_selector", [((k,), "looks like a secret value") for k, x in v.items() if looks_like_secret(x)])
        return v


class TemplateSchemaError(InvalidRequestError):
    """A template or profile document breaks the schema. ``issues`` holds one
    located line per problem: ``<where>: <field path>: <message>``."""

    code = "invalid_template"

    def __init__(self, issues: list[str], *, param: str | None = None) -> None:
        super().__init__("\n".join(issues), param=param)
        self.issues = list(issues)


def _loc_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_issues(exc: ValidationError, where: str) -> list[str]:
    """One ``<where>: <field path>: <message>`` line per error, never quoting the input."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        # Drop pydantic's tagged-union / wrapper parts of the location that name no field.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        path = _loc_text(loc)
        lines.append(": ".join(x for x in (where, path, msg) if x))
    return lines


def parse_template(data: Any, *, where: str = "") -> ModelDeploymentTemplate:
    """Validate one template document; ``TemplateSchemaError`` lists every problem."""
    try:
        return ModelDeploymentTemplate.model_validate(data)
    except ValidationError as exc:
        raise TemplateSchemaError(validation_issues(exc, where)) from None


def parse_profile(data: Any, *, where: str = "") -> Profile:
    """Validate one profile document; ``TemplateSchemaError`` lists every problem."""
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise TemplateSchemaError(validation_issues(exc, where)) from None
