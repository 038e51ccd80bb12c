"""Run overnight's executor in this process against an engine, with a chosen limit.

The same dispatcher, limiter, spool and engine client the service uses, wired the
way ``scheduler/loop.py`` wires them, minus the HTTP API and the record store:
this isolates the concurrency control (a fixed limit vs. the adaptive one).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import uvloop

from overnight.executor.checkpoint import Checkpoint
from overnight.executor.engine import HttpEngineClient
from overnight.executor.engine_metrics import MetricsProbe
from overnight.executor.limiter import ConcurrencyLimits
from overnight.executor.retry import RetryPolicy
from overnight.executor.run import ExecuteParams, StopSignal, execute
from overnight.executor.sharing import EngineCapacity
from overnight.executor.writer import Spool
from overnight.storage.local import LocalStorage

ENDPOINT = "/v1/chat/completions"


async def _run(engine_url: str, input_path: Path, n: int, limits: ConcurrencyLimits, metrics: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="overnight-exec-") as tmp:
        storage = LocalStorage(f"file://{tmp}/files")
        await storage.open()
        async with storage.writer("in") as w:
            await w.write(input_path.read_bytes())
        client = HttpEngineClient(engine_url)
        capacity = EngineCapacity(limits)
        probe = None
        if metrics:
            probe = MetricsProbe(client.get, capacity.limit, active=lambda: bool(capacity.shares),
                                 inflight=lambda: capacity.inflight)
            probe.start()
        share = capacity.join(cap=limits.max, remaining=n)
        spool = Spool(spool_dir=Path(tmp) / "spool", storage=storage, batch_id="batch_bench", token=1,
                      checkpoint=Checkpoint.empty(n))
        spool.open()

        async def persist(_: bytes) -> None:
            return None

        params = ExecuteParams(endpoint=ENDPOINT, input_key="in", batch_suffix="bench", deadline=time.time() + 3600,
                               checkpoint_interval_s=1.0, persist=persist)
        t0 = time.perf_counter()
        outcome = await execute(storage=storage, spool=spool, engine=client, limiter=share, policy=RetryPolicy(),
                                params=params, stop=StopSignal())
        elapsed = time.perf_counter() - t0
        share.close()
        if probe is not None:
            await probe.stop()
        await client.aclose()
        spool.close()
        return {
            "outcome": outcome.value, "seconds": elapsed, "req_s": n / elapsed,
            "completed": spool.cp.completed, "failed": spool.cp.failed,
            "final_limit": capacity.limit.value, "cuts": capacity.limit.cuts,
        }


def run_executor(engine_url: str, input_path: Path, n: int, *, fixed: int | None = None,
                 metrics: bool = True, max_concurrency: int = 1024) -> dict:
    """One batch through the executor; ``fixed`` pins the limit (min = max = initial)."""
    if fixed:
        limits = ConcurrencyLimits(initial=fixed, min=fixed, max=fixed)
    else:
        limits = ConcurrencyLimits(max=max_concurrency)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(engine_url, input_path, n, limits, metrics and not fixed))
