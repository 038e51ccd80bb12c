"""``overnight run``: one JSONL file through an engine, without a server (``overnight.runfile``)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from overnight.logs import LogFormat, configure_logging

__all__ = ["run_command"]


class _LogReporter:
    """Progress as log records, one every ``every_s`` seconds (``--log-format json``:
    the numbers as fields, and no text line in the JSON stream)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = 0.0
        self.log = logging.getLogger("overnight.run")

    def message(self, text: str) -> None:
        self.log.info(text)

    def start(self, total: int, done: int) -> None:
        self._last = time.monotonic()

    def update(self, p: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.log.info("%d/%d done", p.done, p.total, extra={
                "done": p.done, "total": p.total, "failed": p.failed, "rate": round(p.rate, 1),
                "concurrency": p.concurrency, "inflight": p.inflight})

    def stop(self) -> None:
        return None


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
    log_format: Annotated[
        LogFormat,
        typer.Option("--log-format", envvar="OVERNIGHT_LOG_FORMAT", show_envvar=True, case_sensitive=False,
                     help="Log lines as text, or as one JSON object per line (time, level, logger, message, fields)."),
    ] = LogFormat.text,
) -> None:
    """Run a batch input file against an engine and write the output file, as
    `vllm run-batch` does, with overnight's validation, adaptive concurrency,
    retries and output format. Run the same command again after a crash or
    Ctrl-C to continue; finished requests are never sent again."""
    import asyncio

    from overnight.runfile import RunConfig, reporter_for, run_file

    json_logs = log_format is LogFormat.json
    # Text: warnings only, beside the progress bar; JSON: progress is INFO records.
    configure_logging("info" if json_logs else "warning", log_format,
                      text_format="%(levelname)s %(name)s: %(message)s")
    cfg = RunConfig(
        input_path=input_path, output_path=output, errors_path=errors, engine_url=engine_url, api_key=api_key,
        template=template, template_version=template_version, profile=profile, templates_dir=templates_dir,
        max_concurrency=max_concurrency, concurrency=concurrency, endpoint=endpoint, state_dir=state_dir,
        keep_state=keep_state,
    )
    report = _LogReporter(progress_every) if json_logs else reporter_for(sys.stderr, plain_every_s=progress_every)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(run_file(cfg, report=report))
    if json_logs:
        logging.getLogger("overnight.run").log(logging.INFO if result.exit_code == 0 else logging.ERROR,
                                               result.message, extra={"status": result.status,
                                                                      "exit_code": result.exit_code})
    elif result.exit_code == 0:
        typer.echo(f"overnight run: {result.message}")
    else:
        typer.secho(f"overnight run: {result.message}", err=True,
                    fg=typer.colors.YELLOW if result.status == "stopped" else typer.colors.RED)
    raise typer.Exit(result.exit_code)
