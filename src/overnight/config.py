"""Service settings: built once (by the CLI or a test) and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, PositiveFloat, PositiveInt, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from overnight import defaults
from overnight.executor.limiter import ConcurrencyLimits

__all__ = ["Settings"]


def parse_tenant_keys(value: str) -> dict[str, str]:
    """``tenant:key,tenant2:key2`` (``OVERNIGHT_CONSOLE_MDS_KEYS``) -> ``{tenant: key}``;
    a malformed item is a ValueError naming its tenant part, never the key."""
    out: dict[str, str] = {}
    for n, item in enumerate(filter(None, (p.strip() for p in value.split(","))), 1):
        tenant, sep, key = (s.strip() for s in item.partition(":"))
        if not sep or not tenant or not key:
            raise ValueError(f"OVERNIGHT_CONSOLE_MDS_KEYS: item {n} is not tenant:key")
        if tenant in out:
            raise ValueError(f"OVERNIGHT_CONSOLE_MDS_KEYS names tenant {tenant!r} twice")
        out[tenant] = key
    return out


class Settings(BaseSettings):
    """Everything ``overnight serve`` can be told. Environment variables use the
    ``OVERNIGHT_`` prefix (``OVERNIGHT_DATA_DIR``, ``OVERNIGHT_ENGINE_URL`` ...)."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("./overnight-data")
    #: Default engine for batches that name none; ``mock`` starts the built-in mock engine.
    engine_url: str | None = None
    engine_api_key: str | None = None
    #: Record store URL; default ``sqlite:///<data_dir>/overnight.db``.
    store_url: str | None = None
    #: File storage URL; default ``file://<data_dir>/files``.
    storage_url: str | None = None
    #: ``key:tenant,key2:tenant2``. Empty: open mode, where no key is checked and every
    #: request (whatever key it sends, or none) shares one tenant. Tenants exist only
    #: with configured keys.
    api_keys: str = ""
    #: Largest JSON request body (``POST /v1/batches`` ...); larger ones get 413.
    max_json_body_bytes: int = defaults.MAX_JSON_BODY_BYTES
    #: Require an API key for ``/metrics`` (when keys are configured).
    metrics_require_key: bool = False
    #: Serve ``/docs``, ``/redoc`` and ``/openapi.json`` without a key; false requires one.
    public_docs: bool = True

    max_requests_per_file: int = defaults.MAX_REQUESTS_PER_FILE
    max_input_bytes: int = defaults.MAX_INPUT_BYTES
    #: Validate the input while creating the batch and answer 400 instead of a
    #: ``failed`` batch.
    validate_on_create: bool = False

    initial_concurrency: int = defaults.INITIAL_CONCURRENCY
    #: Floor of each engine's adaptive limit (requests in flight).
    min_concurrency: int = defaults.MIN_CONCURRENCY
    #: Fixed requests in flight per engine: no adaptation (unset: adaptive).
    concurrency: int | None = None
    max_concurrency_per_batch: int = defaults.MAX_CONCURRENCY_PER_BATCH
    max_concurrency_global: int = defaults.MAX_CONCURRENCY_GLOBAL
    max_attempts: int = defaults.MAX_ATTEMPTS
    backoff_base_s: float = defaults.BACKOFF_BASE_S
    backoff_max_s: float = defaults.BACKOFF_MAX_S
    request_timeout_s: float = defaults.REQUEST_TIMEOUT_S
    #: An engine answer with a larger body is not read; its line fails with
    #: ``response_too_large``.
    max_response_bytes: PositiveInt = defaults.MAX_RESPONSE_BYTES
    lease_s: float = defaults.LEASE_S
    heartbeat_s: float = defaults.HEARTBEAT_S
    checkpoint_interval_s: float = defaults.CHECKPOINT_INTERVAL_S
    scheduler_poll_s: float = defaults.SCHEDULER_POLL_S
    max_running_batches: int = defaults.MAX_RUNNING_BATCHES
    #: A batch whose engine has been unreachable this long without a break fails.
    engine_unreachable_timeout_s: PositiveFloat = defaults.ENGINE_UNREACHABLE_TIMEOUT_S
    #: A batch waiting for an unreachable engine is tried again after this long.
    engine_recheck_s: PositiveFloat = defaults.ENGINE_RECHECK_S
    #: Default lifetime of batch output/error files (seconds); None keeps them.
    output_expires_after_s: int | None = None
    #: How often expired files are deleted.
    sweep_interval_s: float = 60.0
    #: Options for the in-process mock engine (``--engine-url mock``).
    mock_latency_ms: float = 50.0
    #: Replica name used as lease owner; default host:pid.
    replica_id: str | None = None
    #: Which ``runtime.endpoint`` tenants may name (``runtimes/egress.py``): unset =
    #: any in open mode, none in keyed mode; ``*``; ``none``; or a comma-separated
    #: list of URL prefixes, hosts (``*.suffix``) and IP ranges.
    allowed_endpoints: str | None = None
    #: API keys (comma-separated, each one of ``api_keys`` in keyed mode) that a console
    #: running as its own process (``overnight console``) uses here: their batches may
    #: name any engine endpoint or ``ssh`` machine, with this server's ``secrets``, as
    #: the embedded console's may (what a console names is what it provisioned).
    trusted_console_keys: str = ""
    #: Fernet key(s), comma-separated (first encrypts), for secrets stored in records.
    secret_key: str | None = None
    #: Directory of model deployment template and profile YAML files (docs/templates.md).
    templates_dir: Path | None = None
    #: Namespaces (comma-separated) whose labelled ConfigMaps hold templates and
    #: profiles too (needs ``kubernetes``); docs/templates.md.
    templates_configmaps: str = ""
    templates_configmap_selector: str = "overnight.dev/templates=true"
    #: Runtime types batches may ask for (``extra_body.overnight.runtime.type``).
    runtimes: str = "endpoint,mock,local"
    #: Runtime type for batches that name none (unset: the default engine, or
    #: ``local`` for a batch with a model_template).
    default_runtime: str | None = None

    # -- the console (/api/v1) and its planner ------------------------------------------
    #: Serve the console's job API and run its planner in this process.
    console: bool = True
    #: The provider jobs use when they name none (``fake``: mock engines on this host).
    provisioner: str = Field("fake", validation_alias=AliasChoices("PROVISIONER", "OVERNIGHT_PROVISIONER"))
    planning_policy: str = Field("fifo", validation_alias=AliasChoices("PLANNING_POLICY",
                                                                       "OVERNIGHT_PLANNING_POLICY"))
    planner_worker_count: PositiveInt = Field(10, validation_alias=AliasChoices("PLANNER_WORKER_COUNT",
                                                                                "OVERNIGHT_PLANNER_WORKER_COUNT"))
    default_batch_model_deployment_template: str | None = Field(
        None, validation_alias=AliasChoices("DEFAULT_BATCH_MODEL_DEPLOYMENT_TEMPLATE",
                                            "OVERNIGHT_DEFAULT_BATCH_MODEL_DEPLOYMENT_TEMPLATE"))
    #: Tags every provider resource; unset: one kept in the store (same for all replicas).
    installation_id: str | None = None
    #: A provision not running by then fails its job (``resource_failed``).
    provision_timeout_s: PositiveFloat = 1800.0
    #: Terminal jobs (and their released provision records) are removed this long
    #: after they ended; 0 keeps them forever. A job whose resource is not confirmed
    #: released is never removed.
    console_job_retention_s: float = Field(30 * 86400.0, ge=0)
    planner_tick_s: PositiveFloat = 0.5
    #: Jobs being provisioned at once (0: no limit); the rest wait in ``queued``.
    planner_max_provisioning: int = Field(0, ge=0, validation_alias=AliasChoices(
        "PLANNER_MAX_PROVISIONING", "OVERNIGHT_PLANNER_MAX_PROVISIONING"))
    planner_poll_s: PositiveFloat = 1.0
    #: The fake provider: seconds before a resource runs, and its price per hour.
    fake_provider_delay_s: float = 0.0
    fake_provider_price_per_hour: float | None = None
    #: Latency of the fake provider's mock engines.
    fake_provider_latency_ms: int = 5
    #: Set: the fake provider's resources all point at this engine, ready at once.
    fake_provider_engine_url: str | None = None

    # -- Webhooks (webhooks/; README "Webhooks") ----------------------------------------
    #: Every batch's batch.completed/failed/expired/cancelled event is POSTed here.
    webhook_url: str | None = None
    #: Standard Webhooks signing secret(s), ``whsec_<base64>``; comma-separated to
    #: rotate (every one signs). Required with ``webhook_url``.
    webhook_secret: str | None = None
    #: Which ``webhook_url`` a batch may name: as ``allowed_endpoints`` (unset = any
    #: in open mode, none in keyed mode; ``*``; ``none``; URL prefixes, hosts, ranges).
    allowed_webhook_urls: str | None = None
    #: One delivery attempt's limit.
    webhook_timeout_s: PositiveFloat = 15.0
    #: A delivery is given up after this many attempts or once its event is this old.
    webhook_max_attempts: PositiveInt = 80
    webhook_max_age_s: PositiveFloat = 72 * 3600.0
    #: Backoff between attempts: from base, doubling, up to max (±20% jitter).
    webhook_backoff_base_s: PositiveFloat = 5.0
    webhook_backoff_max_s: PositiveFloat = 3600.0
    #: How often each replica looks for due deliveries.
    webhook_poll_s: PositiveFloat = 1.0

    # -- ``overnight console`` as its own process (README "The console as its own process")
    #: The batches service (an ``overnight serve``) the console creates batches and
    #: keeps files at, over its OpenAI-compatible API: ``http://host:port`` (``/v1`` added).
    metadata_service_url: str | None = Field(
        None, validation_alias=AliasChoices("METADATA_SERVICE_URL", "OVERNIGHT_METADATA_SERVICE_URL"))
    #: ``tenant:key,...``: the key the console uses at the metadata service for each
    #: of its tenants (one that service maps to the same tenant).
    console_mds_keys: str = ""
    #: One call to the metadata service (connect, each read and write) gives up after this.
    console_mds_timeout_s: PositiveFloat = 60.0

    # -- Neoclouds: RunPod and Lambda Cloud (docs/runpod.md, docs/lambda-cloud.md) --------
    #: The private key every SSH connect uses (the machines' authorized key is the
    #: provider's public key setting); refused when group or others can read it.
    ssh_key_file: str | None = Field(None, validation_alias=AliasChoices(
        "OVERNIGHT_SSH_KEY_FILE", "AIBRIX_BATCH_SSH_KEY_FILE"))
    #: Set: the ``runpod`` provider is offered (``RUNPOD_SSH_PUBLIC_KEY`` then required).
    runpod_api_key: str | None = Field(None, validation_alias=AliasChoices("RUNPOD_API_KEY"))
    runpod_ssh_public_key: str | None = Field(None, validation_alias=AliasChoices("RUNPOD_SSH_PUBLIC_KEY"))
    #: Its last path segment picks the REST version: ``/v2`` (default) or ``/v1``.
    runpod_base_url: str = Field("https://api.runpod.io/v2", validation_alias=AliasChoices("RUNPOD_BASE_URL"))
    #: Comma-separated data center ids (empty: any).
    runpod_data_centers: str = Field("", validation_alias=AliasChoices("RUNPOD_DATA_CENTERS"))
    runpod_image: str = Field("vllm/vllm-openai:latest", validation_alias=AliasChoices("RUNPOD_IMAGE"))
    runpod_cloud_type: str = Field("SECURE", validation_alias=AliasChoices("RUNPOD_CLOUD_TYPE"))
    runpod_ssh_user: str = Field("root", validation_alias=AliasChoices("RUNPOD_SSH_USER"))
    #: ``ssh`` (engine on 127.0.0.1, dispatch through an SSH port-forward) or ``proxy``
    #: (RunPod's public HTTP proxy, 100 s per request, random --api-key).
    runpod_endpoint_mode: str = Field("ssh", validation_alias=AliasChoices("RUNPOD_ENDPOINT_MODE"))
    runpod_proxy_url_template: str = Field("https://{pod_id}-{port}.proxy.runpod.net",
                                           validation_alias=AliasChoices("RUNPOD_PROXY_URL_TEMPLATE"))
    runpod_ready_timeout_s: PositiveFloat = Field(1800.0, validation_alias=AliasChoices("RUNPOD_READY_TIMEOUT_S"))
    #: Each pod's container disk (the image, the model download, logs); no volume disk is made.
    runpod_container_disk_gb: int = Field(100, ge=1, le=10_000,
                                          validation_alias=AliasChoices("RUNPOD_CONTAINER_DISK_GB"))
    #: Set: the ``lambdaCloud`` provider is offered (``LAMBDA_CLOUD_SSH_KEYS`` then required).
    lambda_cloud_api_key: str | None = Field(None, validation_alias=AliasChoices("LAMBDA_CLOUD_API_KEY"))
    #: The SSH key name(s) registered with Lambda; the launch API takes exactly one (the first).
    lambda_cloud_ssh_keys: str = Field("", validation_alias=AliasChoices("LAMBDA_CLOUD_SSH_KEYS"))
    lambda_cloud_base_url: str = Field("https://cloud.lambda.ai/api/v1",
                                       validation_alias=AliasChoices("LAMBDA_CLOUD_BASE_URL"))
    lambda_cloud_region: str | None = Field(None, validation_alias=AliasChoices("LAMBDA_CLOUD_REGION"))
    lambda_cloud_ssh_user: str = Field("ubuntu", validation_alias=AliasChoices("LAMBDA_CLOUD_SSH_USER"))
    lambda_cloud_ssh_port: int = Field(22, ge=1, le=65535, validation_alias=AliasChoices("LAMBDA_CLOUD_SSH_PORT"))
    #: The engine image ``docker run`` starts when the template names none.
    lambda_cloud_image: str = Field("vllm/vllm-openai:latest", validation_alias=AliasChoices("LAMBDA_CLOUD_IMAGE"))
    lambda_cloud_ready_timeout_s: PositiveFloat = Field(
        1800.0, validation_alias=AliasChoices("LAMBDA_CLOUD_READY_TIMEOUT_S"))

    # -- Kubernetes (the kubernetes-job and kubernetes-deployment runtimes) -------------
    #: How to reach a cluster: ``in-cluster`` (the pod's service account),
    #: ``kubeconfig`` (``$KUBECONFIG`` or ``~/.kube/config``) or ``kubeconfig:PATH``.
    #: Unset: no Kubernetes; a batch asking for it gets a 400 at create.
    kubernetes: str | None = None
    #: Namespace batches' Jobs and engines are created in (a batch may name another one).
    kubernetes_namespace: str = "default"
    #: Other namespaces batches may name (``runtime.namespace``), comma-separated;
    #: the orphan sweep looks in these and the default one.
    kubernetes_namespaces: str = ""
    #: Where the service sends a kubernetes-deployment engine's requests: formatted
    #: with ``name``, ``namespace`` and ``port`` of its Service (the cluster DNS name
    #: by default; something else from outside the cluster).
    kubernetes_service_url: str = "http://{name}.{namespace}.svc:{port}"
    #: overnight's own container image: the worker in every Job pod.
    kubernetes_image: str = "ghcr.io/overnight-dev/overnight:latest"
    #: Secrets the workers read the store / storage URLs from when a profile names
    #: none (``name:key``).
    kubernetes_store_secret: str | None = None
    kubernetes_storage_secret: str | None = None
    #: A batch whose pods stay unschedulable this long fails (and its Job is deleted).
    kubernetes_unschedulable_timeout_s: PositiveFloat = 600.0
    #: How often a running Job's shards are summed into the batch.
    kubernetes_poll_s: PositiveFloat = 2.0
    #: Orphan sweep: how often, and how old a labelled object of a terminal or
    #: unknown batch must be before it is deleted.
    kubernetes_sweep_interval_s: PositiveFloat = 300.0
    kubernetes_sweep_grace_s: float = 300.0
    #: Retries per shard before the index fails (Job ``backoffLimitPerIndex``).
    kubernetes_backoff_limit_per_index: int = 2

    model_config = SettingsConfigDict(env_prefix="OVERNIGHT_", extra="ignore", populate_by_name=True)

    @field_validator("allowed_endpoints")
    @classmethod
    def _check_allowed_endpoints(cls, v: str | None) -> str | None:
        if v is not None:
            from overnight.runtimes.egress import EndpointPolicy

            EndpointPolicy(v)  # a bad entry is a ValueError naming it, at start
        return v

    @field_validator("allowed_webhook_urls")
    @classmethod
    def _check_allowed_webhook_urls(cls, v: str | None) -> str | None:
        if v is not None:
            from overnight.runtimes.egress import EndpointPolicy

            EndpointPolicy(v, setting="OVERNIGHT_ALLOWED_WEBHOOK_URLS")  # a bad entry fails at start
        return v

    @field_validator("runtimes")
    @classmethod
    def _check_runtimes(cls, v: str) -> str:
        known = ("endpoint", "mock", "local", "kubernetes-job", "kubernetes-deployment", "ssh")
        for t in (x.strip() for x in v.split(",")):
            if t and t not in known:
                raise ValueError(f"unknown runtime type {t!r}; known: {', '.join(known)}")
        return v

    @field_validator("default_runtime")
    @classmethod
    def _check_default_runtime(cls, v: str | None) -> str | None:
        known = ("endpoint", "mock", "local", "kubernetes-job", "kubernetes-deployment")
        if v and v not in known:
            raise ValueError(f"unknown runtime type {v!r}; known: {', '.join(known)}")
        return v or None

    @field_validator("engine_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        return v.rstrip("/")

    @field_validator("metadata_service_url")
    @classmethod
    def _check_metadata_service_url(cls, v: str | None) -> str | None:
        if not v:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"METADATA_SERVICE_URL={v!r}: use the http(s) URL of an overnight serve, "
                             "such as http://10.0.0.5:8000")
        return v.rstrip("/")

    @field_validator("planning_policy")
    @classmethod
    def _check_policy(cls, v: str) -> str:
        if v not in ("fifo", "priority"):
            raise ValueError(f"PLANNING_POLICY={v!r}: use fifo or priority")
        return v

    @field_validator("kubernetes")
    @classmethod
    def _check_kubernetes(cls, v: str | None) -> str | None:
        if not v:
            return None
        if v not in ("in-cluster", "kubeconfig") and not v.startswith("kubeconfig:"):
            raise ValueError(f"OVERNIGHT_KUBERNETES={v!r}: use in-cluster, kubeconfig or kubeconfig:PATH")
        return v

    def allowed_runtimes(self) -> frozenset[str]:
        """Runtime types batches may ask for: ``runtimes``, plus the Kubernetes ones
        when a cluster is configured and ``ssh`` when a neocloud provider (RunPod, Lambda
        Cloud) is, while ``runtimes`` was left at its default: choosing a provider turns
        on the runtime it needs."""
        allowed = {t.strip() for t in self.runtimes.split(",") if t.strip()}
        kube = {"kubernetes-job", "kubernetes-deployment"}
        if self.kubernetes and "runtimes" not in self.model_fields_set:
            allowed |= kube
        neocloud = bool(self.runpod_api_key or self.lambda_cloud_api_key) \
            or self.provisioner in ("runpod", "lambdaCloud")
        if neocloud and "runtimes" not in self.model_fields_set:
            allowed.add("ssh")
        if allowed & kube and not self.kubernetes:
            raise ValueError(f"OVERNIGHT_RUNTIMES lists {', '.join(sorted(allowed & kube))} but no cluster is "
                             "configured: set OVERNIGHT_KUBERNETES (in-cluster, kubeconfig or kubeconfig:PATH)")
        return frozenset(allowed)

    def kube_config(self):  # type: ignore[no-untyped-def]
        """The client configuration ``kubernetes`` names."""
        from overnight.runtimes.kubernetes.client import KubeConfig

        v = self.kubernetes or ""
        if v == "in-cluster":
            return KubeConfig(in_cluster=True, namespace=self.kubernetes_namespace)
        path = v.partition(":")[2] or None
        return KubeConfig(kubeconfig=path, namespace=self.kubernetes_namespace)

    def concurrency_limits(self) -> ConcurrencyLimits:
        """The per-engine concurrency bounds these settings ask for."""
        # An outage pauses sends with the same backoff as a retried request.
        backoff = {"outage_backoff_base_s": self.backoff_base_s, "outage_backoff_max_s": self.backoff_max_s}
        if self.concurrency:
            n = max(1, self.concurrency)
            return ConcurrencyLimits(initial=n, min=n, max=n, fixed=True, **backoff)
        top = max(1, self.max_concurrency_per_batch)
        low = min(max(1, self.min_concurrency), top)
        return ConcurrencyLimits(initial=min(max(self.initial_concurrency, low), top), min=low, max=top, **backoff)

    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{(self.data_dir / 'overnight.db').resolve()}"

    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'files').resolve()}"

    def spool_dir(self) -> Path:
        return (self.data_dir / "spool").resolve()

    def console_mds_key_map(self) -> dict[str, str]:
        """``console_mds_keys`` as ``{tenant: key}``."""
        return parse_tenant_keys(self.console_mds_keys)

    def console_key_set(self) -> frozenset[str]:
        """``trusted_console_keys`` as a set; in keyed mode each must be an API key."""
        entries = [k.strip() for k in self.trusted_console_keys.split(",") if k.strip()]
        known = self.tenant_for_key()
        for i, key in enumerate(entries, 1):
            if known and key not in known:
                raise ValueError(f"OVERNIGHT_TRUSTED_CONSOLE_KEYS entry {i} is not one of OVERNIGHT_API_KEYS: "
                                 "a console's key is an ordinary key of the tenant it acts for")
        return frozenset(entries)

    def tenant_for_key(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.api_keys.split(","))):
            key, _, tenant = item.partition(":")
            out[key] = tenant or key
        return out
