"""``overnight``: parse arguments, configure logging, call one function."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from overnight import __version__
from overnight.cli.db import db_app

app = typer.Typer(
    name="overnight",
    help="OpenAI-compatible batch inference for self-hosted LLM engines.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(db_app, name="db", help="Schema migrations for SQL stores.")


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _preflight(settings: "Settings") -> None:  # noqa: F821
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
        asyncio.run(check())
    except OvernightError as exc:
        # Plain text on one line: rich markup would eat "[postgres]" in install hints.
        typer.secho(f"overnight serve cannot start: {exc.message}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on.")] = None,
    data_dir: Annotated[
        Optional[Path], typer.Option(help="Where records and files live. [env: OVERNIGHT_DATA_DIR]")
    ] = None,
    engine_url: Annotated[
        Optional[str],
        typer.Option(help="Default OpenAI-compatible engine, or 'mock' for the built-in one. [env: OVERNIGHT_ENGINE_URL]"),
    ] = None,
    engine_api_key: Annotated[Optional[str], typer.Option(help="[env: OVERNIGHT_ENGINE_API_KEY]")] = None,
    store: Annotated[Optional[str], typer.Option(help="Record store URL. [env: OVERNIGHT_STORE_URL]")] = None,
    storage: Annotated[Optional[str], typer.Option(help="File storage URL. [env: OVERNIGHT_STORAGE_URL]")] = None,
    replica_id: Annotated[Optional[str], typer.Option(help="Name of this replica (lease owner).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every HTTP request.")] = False,
) -> None:
    """Run the OpenAI-compatible Files + Batches service."""
    import uvicorn

    from overnight.api.app import create_app
    from overnight.config import Settings

    _logging(log_level)
    overrides = {
        "host": host,
        "port": port,
        "data_dir": data_dir,
        "engine_url": engine_url,
        "engine_api_key": engine_api_key,
        "store_url": store,
        "storage_url": storage,
        "replica_id": replica_id,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if settings.engine_url is None:
        # One command must work on a fresh machine: with no engine named, run the
        # built-in mock engine and say so loudly.
        logging.getLogger("overnight").warning(
            "no --engine-url / OVERNIGHT_ENGINE_URL given: using the built-in mock engine"
        )
        settings = settings.model_copy(update={"engine_url": "mock"})
    _preflight(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=30,
    )


@app.command("mock-engine")
def mock_engine(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8100,
    latency_ms: Annotated[float, typer.Option(help="Base service time per request.")] = 50.0,
    jitter_ms: Annotated[float, typer.Option(help="Uniform +/- jitter on the latency.")] = 0.0,
    fail_rate: Annotated[float, typer.Option(help="Fraction of requests answered 500 or 429.")] = 0.0,
    max_concurrency: Annotated[
        Optional[int], typer.Option(help="Requests served at once; beyond it a bounded queue, then 429.")
    ] = None,
    max_queue: Annotated[Optional[int], typer.Option(help="Waiting requests allowed beyond --max-concurrency.")] = None,
    ms_per_output_token: Annotated[float, typer.Option(help="Extra service time per generated token.")] = 0.0,
    load_slowdown: Annotated[float, typer.Option(help="Latency growth with load (x running/max).")] = 0.0,
    output_tokens: Annotated[int, typer.Option(help="Completion tokens per request.")] = 16,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for jitter and failures.")] = None,
    model: Annotated[str, typer.Option(help="Model name in /v1/models.")] = "mock-model",
) -> None:
    """Run a fast OpenAI-compatible mock engine (for trying overnight, tests and benchmarks)."""
    from overnight.mock_engine import MockEngineConfig, run

    _logging("warning")
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
    )
    typer.echo(f"overnight mock engine on http://{host}:{port} (latency {latency_ms} ms)")
    run(config, host=host, port=port)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)



def main() -> None:
    app()


if __name__ == "__main__":
    main()
