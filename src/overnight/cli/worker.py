"""``overnight worker``: one shard of a batch inside a Kubernetes Job pod (``overnight.worker``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from overnight.logs import LogFormat, configure_logging

__all__ = ["worker_command"]


def worker_command(
    podinfo_dir: Annotated[
        Path,
        typer.Option("--podinfo-dir", envvar="OVERNIGHT_PODINFO_DIR", show_envvar=True,
                     help="The pod's downwardAPI volume: its 'annotations' file names the batch, the shard count "
                     "and the engine's port and health path."),
    ] = Path("/etc/overnight/podinfo"),
    index: Annotated[
        Optional[int],
        typer.Option("--index", help="The shard to run (0-based).",
                     show_default="env JOB_COMPLETION_INDEX, else the pod's job-completion-index annotation"),
    ] = None,
    engine_url: Annotated[
        Optional[str],
        typer.Option("--engine-url", envvar="OVERNIGHT_WORKER_ENGINE_URL", show_envvar=True,
                     help="The engine to send the shard's requests to.",
                     show_default="http://127.0.0.1:<the engine-port annotation>"),
    ] = None,
    ready_timeout: Annotated[
        float,
        typer.Option("--ready-timeout", envvar="OVERNIGHT_WORKER_READY_TIMEOUT_S", show_envvar=True,
                     help="Seconds the engine's health endpoint may take to answer 200; then exit 1."),
    ] = 600.0,
    busy_timeout: Annotated[
        Optional[float],
        typer.Option("--busy-timeout", envvar="OVERNIGHT_WORKER_BUSY_TIMEOUT_S", show_envvar=True,
                     help="Seconds to wait while another pod holds the shard's lease; then exit 1.",
                     show_default="3 lease periods (OVERNIGHT_LEASE_S)"),
    ] = None,
    progress_every: Annotated[
        float, typer.Option("--progress-every", help="Seconds between progress lines.")
    ] = 5.0,
    log_format: Annotated[
        LogFormat,
        typer.Option("--log-format", envvar="OVERNIGHT_LOG_FORMAT", show_envvar=True, case_sensitive=False,
                     help="Log lines as text, or as one JSON object per line (time, level, logger, message, fields)."),
    ] = LogFormat.text,
) -> None:
    """Run one shard of a batch against the engine in the same pod: what each pod of
    a batch's Indexed Job runs (the kubernetes runtime). Store and storage come from
    OVERNIGHT_STORE_URL and OVERNIGHT_STORAGE_URL. Exits 0 when the shard is done
    (or there is nothing to do), 42 for an error no retry can fix, 143 on SIGTERM
    after a checkpoint, 1 otherwise (the index is retried)."""
    import asyncio

    from overnight.config import Settings
    from overnight.worker import EXIT_UNRECOVERABLE, WorkerConfig, run_worker

    configure_logging("info", log_format)
    for name, value in (("--ready-timeout", ready_timeout), ("--progress-every", progress_every)):
        if not value > 0:
            raise typer.BadParameter(f"must be > 0, not {value}", param_hint=name)
    if busy_timeout is not None and busy_timeout < 0:
        raise typer.BadParameter(f"must be >= 0, not {busy_timeout}", param_hint="--busy-timeout")
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic's ValidationError names the variable
        logging.getLogger("overnight.worker").error("exit %d: bad OVERNIGHT_* settings: %s", EXIT_UNRECOVERABLE, exc)
        raise typer.Exit(EXIT_UNRECOVERABLE) from None
    cfg = WorkerConfig(podinfo_dir=podinfo_dir, index=index, engine_url=engine_url, ready_timeout_s=ready_timeout,
                       busy_timeout_s=busy_timeout, progress_every_s=progress_every, settings=settings)
    raise typer.Exit(asyncio.run(run_worker(cfg)))
