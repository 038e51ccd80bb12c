"""``overnight run``: one JSONL file through an engine, without a server (``overnight.runfile``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["run_command"]


def run_command(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="The batch input: one OpenAI batch request per line.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where the output lines go (one per request).",
                                       show_default="none")],
    errors: Annotated[
        Optional[Path],
        typer.Option("--errors", help="Failed requests' lines go here instead of into the output.",
                     show_default="none: into the output file"),
    ] = None,
    engine_url: Annotated[
        Optional[str], typer.Option("--engine-url", help="An OpenAI-compatible engine that runs already (http://host:port).",
                                    show_default="none: give it or --template")
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option("--api-key", envvar="OVERNIGHT_ENGINE_API_KEY", show_envvar=True,
                     help="Bearer key sent to --engine-url.", show_default="none"),
    ] = None,
    template: Annotated[
        Optional[str], typer.Option("--template", help="Start this model deployment template's engine here, run, stop it.",
                                    show_default="none: give it or --engine-url")
    ] = None,
    template_version: Annotated[
        Optional[str], typer.Option("--template-version", help="The template's version.", show_default="latest active")
    ] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", help="A profile (env, secrets by reference).", show_default="none")] = None,
    templates_dir: Annotated[
        Optional[Path],
        typer.Option("--templates-dir", envvar="OVERNIGHT_TEMPLATES_DIR", show_envvar=True,
                     help="Directory of template and profile YAML files.", show_default="none"),
    ] = None,
    max_concurrency: Annotated[
        Optional[int], typer.Option("--max-concurrency", help="Most requests in flight; the adaptive limit stays below.",
                                    show_default="OVERNIGHT_MAX_CONCURRENCY_PER_BATCH (1024)")
    ] = None,
    concurrency: Annotated[
        Optional[int], typer.Option("--concurrency", help="Exactly this many in flight: no adaptation.",
                                    show_default="adaptive")
    ] = None,
    endpoint: Annotated[
        Optional[str], typer.Option("--endpoint", help="The endpoint every line must name (e.g. /v1/chat/completions).",
                                    show_default="the url of the input's first line")
    ] = None,
    state_dir: Annotated[
        Optional[Path], typer.Option("--state-dir", help="Where the run keeps its checkpoint and spool.",
                                     show_default="<output>.overnight")
    ] = None,
    keep_state: Annotated[bool, typer.Option("--keep-state", help="Keep the state directory after the run.")] = False,
    progress_every: Annotated[
        float, typer.Option("--progress-every", help="Seconds between progress lines when stderr is not a terminal.")
    ] = 5.0,
) -> None:
    """Run a batch input file against an engine and write the output file, as
    `vllm run-batch` does, with overnight's validation, adaptive concurrency,
    retries and output format. Run the same command again after a crash or
    Ctrl-C to continue; finished requests are never sent again."""
    import asyncio

    from overnight.runfile import RunConfig, reporter_for, run_file

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = RunConfig(
        input_path=input_path, output_path=output, errors_path=errors, engine_url=engine_url, api_key=api_key,
        template=template, template_version=template_version, profile=profile, templates_dir=templates_dir,
        max_concurrency=max_concurrency, concurrency=concurrency, endpoint=endpoint, state_dir=state_dir,
        keep_state=keep_state,
    )
    report = reporter_for(sys.stderr, plain_every_s=progress_every)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(run_file(cfg, report=report))
    if result.exit_code == 0:
        typer.echo(f"overnight run: {result.message}")
    else:
        typer.secho(f"overnight run: {result.message}", err=True,
                    fg=typer.colors.YELLOW if result.status == "stopped" else typer.colors.RED)
    raise typer.Exit(result.exit_code)
