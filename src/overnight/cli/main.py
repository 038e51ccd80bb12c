"""``overnight``: parse arguments, configure logging, call one function."""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import typer

from overnight import __version__
from overnight.cli.client import batch_app, files_app
from overnight.cli.db import db_app
from overnight.cli.jobs import jobs_app
from overnight.cli.run import run_command
from overnight.cli.templates import templates_app
from overnight.cli.worker import worker_command
from overnight.config import Settings
from overnight.logs import LogFormat

app = typer.Typer(
    name="overnight",
    help="OpenAI-compatible batch inference for self-hosted LLM engines.",
    no_args_is_help=True,
    add_completion=False,
    # Plain click help: no markup to eat "[postgres]", and readable at 80 columns.
    rich_markup_mode=None,
)
app.add_typer(db_app, name="db", help="Schema migrations for SQL stores.")
app.add_typer(templates_app, name="templates", help="Model deployment templates and profiles: list, show, validate.")
app.add_typer(batch_app, name="batch", help="Batches on a running overnight serve: create (--wait: live view), list, get, watch, cancel, download.")
app.add_typer(files_app, name="files", help="Files on a running overnight serve: list, upload, download, delete.")
app.add_typer(jobs_app, name="jobs", help="Console jobs on a running overnight serve (a resource provisioned per job): create (--wait: live view), list, get, watch, cancel.")
app.command("run")(run_command)
app.command("worker")(worker_command)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"overnight {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """OpenAI-compatible batch inference for self-hosted LLM engines."""


def _logging(level: str, fmt: LogFormat = LogFormat.text) -> None:
    from overnight.logs import configure_logging

    configure_logging(level, fmt)


def _preflight(settings: Settings) -> None:
    """Open the store and storage once before serving, so a wrong URL or an
    out-of-date schema is one clear line and exit code 2, not a traceback."""
    import asyncio

    from overnight.errors import OvernightError
    from overnight.storage import open_storage
    from overnight.store import connect_store

    async def check() -> None:
        store = connect_store(settings.resolved_store_url())
        await store.open()
        await store.aclose()
        storage = open_storage(settings.resolved_storage_url())
        await storage.open()
        await storage.aclose()

    try:
        settings.allowed_runtimes()  # a Kubernetes runtime without a cluster named
        from overnight.webhooks.config import WebhookConfig

        WebhookConfig.from_settings(settings, keyed=bool(settings.tenant_for_key()))  # a URL without a secret ...
        asyncio.run(check())
    except ValueError as exc:
        typer.secho(f"overnight serve cannot start: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    except OvernightError as exc:
        # Plain text on one line: rich markup would eat "[postgres]" in install hints.
        typer.secho(f"overnight serve cannot start: {exc.message}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


_SETTING_DEFAULTS = Settings.model_fields


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _default(name: str) -> str:
    """A setting's default as shown by ``--help`` (one source: ``Settings``)."""
    return str(_SETTING_DEFAULTS[name].default)


def _env(name: str) -> dict[str, Any]:
    """Read by click from the same ``OVERNIGHT_*`` variable that ``Settings`` reads."""
    return {"envvar": f"OVERNIGHT_{name.upper()}", "show_envvar": True}


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.", **_env("host"))] = _default("host"),
    port: Annotated[int, typer.Option(help="Port to listen on.", **_env("port"))] = int(_default("port")),
    data_dir: Annotated[
        Path, typer.Option(help="Where records, files and the spool live.", **_env("data_dir"))
    ] = Path(_default("data_dir")),
    engine_url: Annotated[
        Optional[str],
        typer.Option(
            help="Default OpenAI-compatible engine (http://host:port) for batches that name none, "
            "or 'mock' for the built-in one.",
            show_default="mock, the built-in engine, in-process",
            **_env("engine_url"),
        ),
    ] = None,
    engine_api_key: Annotated[
        Optional[str],
        typer.Option(help="Bearer key sent to the default engine.", show_default="none", **_env("engine_api_key")),
    ] = None,
    store: Annotated[
        Optional[str],
        typer.Option(
            help="Record store URL: sqlite://, postgresql://, redis:// or mongodb://.",
            show_default="sqlite:///<data-dir>/overnight.db",
            **_env("store_url"),
        ),
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option(
            help="File storage URL: file:// or s3://.", show_default="file://<data-dir>/files", **_env("storage_url")
        ),
    ] = None,
    replica_id: Annotated[
        Optional[str],
        typer.Option(
            help="Name of this replica, the owner of its batch leases.",
            show_default="generated once, kept in <data-dir>/replica-id",
            **_env("replica_id"),
        ),
    ] = None,
    templates_dir: Annotated[
        Optional[Path],
        typer.Option(help="Directory of model deployment templates and profiles (YAML) batches may name.",
                     show_default="none", **_env("templates_dir")),
    ] = None,
    kubernetes: Annotated[
        Optional[str],
        typer.Option(help="Run batches on Kubernetes (the kubernetes-job and kubernetes-deployment runtimes): "
                          "in-cluster, kubeconfig, or kubeconfig:PATH.", show_default="off", **_env("kubernetes")),
    ] = None,
    log_level: Annotated[LogLevel, typer.Option(help="Lowest level of log lines printed.", case_sensitive=False)] = (
        LogLevel.info
    ),
    access_log: Annotated[bool, typer.Option(help="Log every HTTP request.")] = False,
    log_format: Annotated[LogFormat, typer.Option(
        help="Log lines as text, or as one JSON object per line (time, level, logger, message, fields).",
        case_sensitive=False, envvar="OVERNIGHT_LOG_FORMAT", show_envvar=True)] = LogFormat.text,
) -> None:
    """Run the OpenAI-compatible Files + Batches service."""
    import uvicorn

    from overnight.api.app import create_app

    _logging(log_level, log_format)
    overrides = {
        "host": host,
        "port": port,
        "data_dir": data_dir,
        "engine_url": engine_url,
        "engine_api_key": engine_api_key,
        "store_url": store,
        "storage_url": storage,
        "replica_id": replica_id,
        "templates_dir": templates_dir,
        "kubernetes": kubernetes,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    # One command must work on a fresh machine: with no engine named, run the
    # built-in mock engine (the banner says so).
    mock_by_default = settings.engine_url is None
    if mock_by_default:
        settings = settings.model_copy(update={"engine_url": "mock"})
    _preflight(settings)
    fastapi_app = create_app(settings)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                # After the lifespan ran: the in-process mock engine's URL is known.
                running = getattr(fastapi_app.state, "settings", settings)
                banner = serve_banner(settings, running.engine_url, mock_by_default=mock_by_default)
                if log_format is LogFormat.json:  # every line of the output is JSON then
                    head, *rows = banner.splitlines()
                    logging.getLogger("overnight.serve").info(head, extra={"details": [r.strip() for r in rows]})
                else:
                    typer.echo(banner)
                sys.stdout.flush()

    server = _Server(
        uvicorn.Config(
            fastapi_app,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            log_level=log_level.value,
            access_log=access_log,
            timeout_graceful_shutdown=30,
            # JSON: uvicorn's loggers go to the root handler instead of its own text ones.
            **({"log_config": None} if log_format is LogFormat.json else {}),
        )
    )
    server.run()
    if not server.started:
        raise typer.Exit(3)  # what uvicorn.run exits with when startup fails (e.g. port in use)


@app.command("console")
def console_command(
    host: Annotated[str, typer.Option(help="Interface to listen on.", **_env("host"))] = _default("host"),
    port: Annotated[int, typer.Option(help="Port to listen on.", **_env("port"))] = 8001,
    data_dir: Annotated[
        Path, typer.Option(help="Where the console's store (jobs, models) and the fake provider's state live.",
                           **_env("data_dir"))
    ] = Path("./overnight-console-data"),
    metadata_service_url: Annotated[
        Optional[str],
        typer.Option(help="The batches service (an overnight serve) batches are created and files kept at, "
                          "over its OpenAI-compatible API: http://host:port.",
                     show_default="none; required", envvar=["METADATA_SERVICE_URL", "OVERNIGHT_METADATA_SERVICE_URL"],
                     show_envvar=True),
    ] = None,
    templates_dir: Annotated[
        Optional[Path],
        typer.Option(help="Directory of model deployment templates and profiles (YAML) jobs may name.",
                     show_default="none", **_env("templates_dir")),
    ] = None,
    store: Annotated[
        Optional[str],
        typer.Option(help="The console's record store URL: sqlite://, postgresql://, redis:// or mongodb://.",
                     show_default="sqlite:///<data-dir>/overnight.db", **_env("store_url")),
    ] = None,
    log_level: Annotated[LogLevel, typer.Option(help="Lowest level of log lines printed.", case_sensitive=False)] = (
        LogLevel.info
    ),
) -> None:
    """Run the console (/api/v1: jobs, models, file proxy, catalog, and the planner) as its own process,
    talking to the batches service only through its OpenAI-compatible API."""
    import uvicorn

    _logging(log_level)
    try:
        import openai  # noqa: F401
    except ImportError:
        typer.secho("overnight console needs the openai SDK: pip install 'overnight[client]'", err=True,
                    fg=typer.colors.RED)
        raise typer.Exit(2) from None
    if not metadata_service_url:
        typer.secho("overnight console cannot start: give --metadata-service-url or METADATA_SERVICE_URL "
                    "(the http://host:port of an overnight serve)", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    overrides = {"host": host, "port": port, "data_dir": data_dir, "metadata_service_url": metadata_service_url,
                 "templates_dir": templates_dir, "store_url": store}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        typer.secho(f"overnight console cannot start: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    reachable = _console_preflight(settings)

    from overnight.api.console_app import create_console_app

    fastapi_app = create_console_app(settings)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                typer.echo(console_banner(settings, reachable))
                sys.stdout.flush()

    server = _Server(uvicorn.Config(fastapi_app, host=settings.host, port=settings.port, loop="uvloop",
                                    http="httptools", log_level=log_level.value, access_log=False,
                                    timeout_graceful_shutdown=30))
    server.run()
    if not server.started:
        raise typer.Exit(3)


def _console_preflight(settings: Settings) -> bool:
    """What ``overnight console`` checks before serving: every tenant has a key at
    the batches service, the store opens (exit 2 naming the problem otherwise).
    Returns whether the batches service answers now; it need not (jobs wait)."""
    import asyncio

    import httpx

    from overnight.console.remote import check_mds_keys
    from overnight.errors import OvernightError
    from overnight.store import connect_store

    async def check() -> None:
        s = connect_store(settings.resolved_store_url())
        await s.open()
        await s.aclose()

    try:
        check_mds_keys(settings.tenant_for_key(), settings.console_mds_key_map())
        from overnight.webhooks.config import WebhookConfig

        WebhookConfig.from_settings(settings, keyed=bool(settings.tenant_for_key()))  # job.* webhooks: as serve
        asyncio.run(check())
    except ValueError as exc:
        typer.secho(f"overnight console cannot start: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    except OvernightError as exc:
        typer.secho(f"overnight console cannot start: {exc.message}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    try:
        return httpx.get(f"{settings.metadata_service_url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def console_banner(settings: Settings, reachable: bool) -> str:
    """What ``console`` prints once it listens."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    keys = settings.tenant_for_key()
    if keys:
        auth = (f"keyed mode: {len(keys)} API key{'s' if len(keys) != 1 else ''} from OVERNIGHT_API_KEYS; "
                "each tenant acts at the batches service with its key from OVERNIGHT_CONSOLE_MDS_KEYS")
    else:
        auth = "open mode: no OVERNIGHT_API_KEYS, any API key is accepted and all requests share one tenant"
    mds = _redact(settings.metadata_service_url or "")
    rows = [
        ("api", f"http://{host}:{settings.port}/api/v1"),
        ("batches", mds + ("" if reachable else "  (not answering now: jobs wait for it)")),
        ("data dir", str(settings.data_dir.resolve())),
        ("store", _redact(settings.resolved_store_url())),
        ("auth", auth),
    ]
    return f"overnight {__version__} console is serving\n" + "\n".join(f"  {k:<9} {v}" for k, v in rows)


def _redact(url: str) -> str:
    """``url`` without a password or secret query values, for printing."""
    parts = urlsplit(url)
    if "@" not in parts.netloc and not parts.query:
        return url  # nothing to hide; urlunsplit would also drop sqlite:////'s empty host
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{hostport}"
    query = "&".join(
        f"{k}=***" if any(word in k.lower() for word in ("secret", "password", "token", "key")) else f"{k}={v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def serve_banner(settings: Settings, engine_url: str | None, *, mock_by_default: bool = False) -> str:
    """What ``serve`` prints once it listens: where, with what, in which mode."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    if settings.engine_url == "mock":
        where = f" at {engine_url}" if engine_url and engine_url != "mock" else ""
        why = "; no --engine-url / OVERNIGHT_ENGINE_URL given" if mock_by_default else ""
        engine = f"built-in mock engine, in-process{where} (answers any model name{why})"
    else:
        engine = _redact(engine_url or "none")
    keys = len(settings.tenant_for_key())
    if keys:
        auth = f"keyed mode: {keys} API key{'s' if keys != 1 else ''} from OVERNIGHT_API_KEYS; other keys get 401"
    else:
        auth = "open mode: no OVERNIGHT_API_KEYS, any API key is accepted and all requests share one tenant"
    rows = [
        ("base_url", f"http://{host}:{settings.port}/v1  (OpenAI(base_url=..., api_key=...))"),
        ("data dir", str(settings.data_dir.resolve())),
        ("store", _redact(settings.resolved_store_url())),
        ("storage", _redact(settings.resolved_storage_url())),
        ("engine", engine),
        ("auth", auth),
    ]
    return f"overnight {__version__} is serving\n" + "\n".join(f"  {k:<9} {v}" for k, v in rows)


@app.command("mock-engine")
def mock_engine(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8100,
    latency_ms: Annotated[float, typer.Option(help="Base service time per request.")] = 50.0,
    jitter_ms: Annotated[float, typer.Option(help="Uniform +/- jitter on the latency.")] = 0.0,
    fail_rate: Annotated[float, typer.Option(help="Fraction of requests answered 500 or 429.")] = 0.0,
    max_concurrency: Annotated[
        Optional[int], typer.Option(
            help="Requests served at once; beyond it a bounded queue, then 429.", show_default="unlimited"
        )
    ] = None,
    max_queue: Annotated[Optional[int], typer.Option(
            help="Waiting requests allowed beyond --max-concurrency.", show_default="equal to --max-concurrency"
        )] = None,
    ms_per_output_token: Annotated[float, typer.Option(help="Extra service time per generated token.")] = 0.0,
    load_slowdown: Annotated[float, typer.Option(help="Latency growth with load (x running/max).")] = 0.0,
    output_tokens: Annotated[int, typer.Option(help="Completion tokens per request.")] = 16,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for jitter and failures.", show_default="random")] = None,
    model: Annotated[str, typer.Option(help="Model name listed first by /v1/models (any name is accepted).")] = "mock-model",
    batching: Annotated[Optional[str], typer.Option(
        help="Model a continuous-batching engine: a preset (h200-llama-1b, knee-16, knee-64, knee-256) "
        "or 'custom'; latency, jitter, concurrency, queue and output-token options are then unused.",
        show_default="off",
    )] = None,
    step_base_ms: Annotated[Optional[float], typer.Option(
        help="Batching: fixed time of one engine step, ms.", show_default="from the preset")] = None,
    step_per_seq_ms: Annotated[Optional[float], typer.Option(
        help="Batching: step time added per running request, ms.", show_default="from the preset")] = None,
    step_per_prefill_token_ms: Annotated[Optional[float], typer.Option(
        help="Batching: step time added per prompt token prefilled in the step, ms.",
        show_default="from the preset")] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option(
        help="Batching: requests running at once (the throughput knee); the rest wait.",
        show_default="from the preset")] = None,
    max_num_batched_tokens: Annotated[Optional[int], typer.Option(
        help="Batching: prompt tokens prefilled per step; later arrivals wait a step.",
        show_default="from the preset")] = None,
    kv_cache_tokens: Annotated[Optional[int], typer.Option(
        help="Batching: KV-cache size in tokens (prompt + generated of every running request); "
        "when full the newest running request is preempted and recomputed.",
        show_default="from the preset")] = None,
    max_waiting: Annotated[Optional[int], typer.Option(
        help="Batching: waiting requests beyond the free running slots; more get 429 with Retry-After.",
        show_default="from the preset")] = None,
    output_len: Annotated[Optional[str], typer.Option(
        help="Batching: tokens a request generates before max_tokens caps it: "
        "fixed:N, uniform:LO:HI, exp:MEAN or lognormal:MEDIAN:SIGMA.",
        show_default="from the preset")] = None,
    metrics: Annotated[str, typer.Option(
        help="/metrics flavour: vllm, sglang, or off (404, as an engine whose metrics are unreachable).")] = "vllm",
) -> None:
    """Run a fast OpenAI-compatible mock engine (for trying overnight, tests and benchmarks)."""
    from overnight.mock_engine import MockEngineConfig, run

    _logging("warning")
    shape = _batching_shape(
        batching,
        step_base_ms=step_base_ms,
        step_per_seq_ms=step_per_seq_ms,
        step_per_prefill_token_ms=step_per_prefill_token_ms,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_tokens=kv_cache_tokens,
        max_waiting=max_waiting,
        output_len=output_len,
    )
    if metrics not in ("vllm", "sglang", "off"):
        raise typer.BadParameter(f"must be vllm, sglang or off, not {metrics!r}", param_hint="--metrics")
    config = MockEngineConfig(
        latency_ms=latency_ms,
        jitter_ms=jitter_ms,
        fail_rate=fail_rate,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        ms_per_output_token=ms_per_output_token,
        load_slowdown=load_slowdown,
        output_tokens=output_tokens,
        seed=seed,
        model=model,
        batching=shape,
        metrics=metrics,
    )
    if shape is None:
        typer.echo(f"overnight mock engine on http://{host}:{port} (latency {latency_ms} ms, metrics {metrics})")
    else:
        typer.echo(f"overnight mock engine on http://{host}:{port} (batching {batching}, metrics {metrics})")
        typer.echo(f"  {shape.describe()}")
    run(config, host=host, port=port)


def _batching_shape(name: Optional[str], **overrides: object) -> "BatchingParams | None":  # noqa: F821
    """The batching engine's shape from --batching and its overrides (bad values: exit 2)."""
    from overnight.mock_engine.batching import OutputLength, preset

    given = [k for k, v in overrides.items() if v is not None]
    if name is None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise typer.BadParameter(f"{flags} apply only with --batching", param_hint="--batching")
        return None
    spec = overrides.get("output_len")
    if spec is not None:
        try:
            overrides["output_len"] = OutputLength.parse(str(spec))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--output-len") from None
    try:
        return preset(name, **overrides)
    except (ValueError, TypeError) as exc:
        # Point at the override the message names, if any.
        hint = next(("--" + k.replace("_", "-") for k in given if k in str(exc)), "--batching")
        raise typer.BadParameter(str(exc), param_hint=hint) from None


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)



def main() -> None:
    app()


if __name__ == "__main__":
    main()
