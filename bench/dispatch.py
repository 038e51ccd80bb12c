"""Batch throughput against three bounds, in one run on this machine.

    python bench/dispatch.py --n 20000 --latency-ms 50 --engine-concurrency 256

1. starts ``overnight mock-engine`` (``--max-concurrency`` = engine concurrency);
2. sends the N requests straight to it at the engine's concurrency, first with
   overnight's own HTTP client used directly (``executor/http1.py``'s ``HttpPool``,
   what ``HttpEngineClient`` sends through), then with a minimal aiohttp client;
   ``--sweep`` tries 0.5x to 2x that concurrency with overnight's client and keeps
   the best level;
3. starts ``overnight serve`` (fresh data dir) against the same engine and runs
   the same N requests as one batch through the ``openai`` SDK (upload, create,
   poll until completed);
4. prints the batch's rate against each bound: the physical bound (Little's law:
   at most ``engine concurrency`` requests in service, each taking the engine's
   latency, so ``concurrency / latency`` req/s; none at 0 ms), the best direct
   client, overnight's client and aiohttp; then the service's CPU-seconds per
   1,000 requests and its peak RSS.

The direct clients and the batch share the machine's cores with the mock engine.
A direct client is a measured bound, not a true one: on a loaded machine the
slower client can fall below the batch (a ratio above 1); the physical bound
cannot be beaten.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ENDPOINT,
    cpu_seconds,
    direct_load,
    direct_load_http1,
    fmt_bytes,
    mock_stats,
    peak_rss_bytes,
    reset_stats,
    sdk_client,
    upload,
    wait_batch,
    workspace,
    write_input,
)


def run_batch(procs, engine_url: str, input_path: Path, n: int, *, env: dict[str, str] | None = None,
              verify: bool = True, poll_s: float = 0.05) -> dict:
    """One batch through a fresh ``overnight serve``; returns its measurements."""
    env = {"OVERNIGHT_MAX_REQUESTS_PER_FILE": str(max(n, 50_000)), **(env or {})}
    server = procs.server(engine_url=engine_url, data_dir=procs.workdir / f"data-{time.monotonic_ns()}", env=env)
    client = sdk_client(server.url)
    f = upload(client, input_path)
    rss_idle = peak_rss_bytes(server.pid)
    cpu0 = cpu_seconds(server.pid)
    t0 = time.perf_counter()
    b = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
    phases = {"validating": t0}
    b = wait_batch(client, b.id, poll_s=poll_s, phases=phases)
    elapsed = time.perf_counter() - t0
    if b.status != "completed":
        raise SystemExit(f"batch ended {b.status}: {b.errors}")
    cpu = cpu_seconds(server.pid) - cpu0
    rss_peak = peak_rss_bytes(server.pid)
    result = {
        "status": b.status,
        "seconds": elapsed,
        "req_s": n / elapsed,
        "cpu_s": cpu,
        "cpu_s_per_1000": cpu / n * 1000,
        "peak_rss": rss_peak,
        "rss_after_upload": rss_idle,
        "phases_s": {k: round(v - t0, 3) for k, v in phases.items()},
        "completed": b.request_counts.completed,
        "failed": b.request_counts.failed,
    }
    if verify:
        ids: Counter[str] = Counter()
        for fid in (b.output_file_id, b.error_file_id):
            if fid:
                for line in client.files.content(fid).text.splitlines():
                    ids[json.loads(line)["custom_id"]] += 1
        result["exactly_once"] = len(ids) == n and max(ids.values(), default=0) == 1
    server.stop()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="requests")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="mock engine service time")
    ap.add_argument("--engine-concurrency", type=int, default=256, help="mock engine --max-concurrency")
    ap.add_argument("--sweep", action="store_true",
                    help="measure overnight's client at 0.5x, 1x, 1.5x and 2x the engine concurrency and keep the best")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    with workspace(keep=args.keep) as procs:
        engine = procs.mock_engine("--latency-ms", str(args.latency_ms),
                                   "--max-concurrency", str(args.engine_concurrency))
        input_path = write_input(procs.workdir / "in.jsonl", args.n)

        c = args.engine_concurrency
        levels = sorted({max(1, c // 2), c, c * 3 // 2, c * 2}) if args.sweep else [c]
        own: dict[int, float] = {}
        for level in levels:
            reset_stats(engine.url)
            seconds, statuses = direct_load_http1(engine.url, args.n, level)
            own[level] = args.n / seconds
            print(f"direct   concurrency {level:5d}: {own[level]:8.0f} req/s  ({seconds:.2f} s, replies {statuses}) "
                  "with overnight's HTTP client")
        best_c = max(own, key=own.__getitem__)
        aiohttp_rate: float | None = None
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            print("direct   aiohttp not installed (pip install -e '.[bench]'): skipped")
        else:
            reset_stats(engine.url)
            seconds, statuses = direct_load(engine.url, args.n, best_c)
            aiohttp_rate = args.n / seconds
            print(f"direct   concurrency {best_c:5d}: {aiohttp_rate:8.0f} req/s  ({seconds:.2f} s, replies {statuses}) "
                  "with aiohttp")

        reset_stats(engine.url)
        r = run_batch(procs, engine.url, input_path, args.n)
        stats = mock_stats(engine.url)
        print(f"batch    {r['status']}: {r['req_s']:8.0f} req/s  ({r['seconds']:.2f} s create->completed, "
              f"{r['completed']} ok / {r['failed']} failed, exactly once: {r.get('exactly_once')})")
        print(f"phases   first seen at (s after create): {r['phases_s']}")
        print(f"engine   received {stats['received_total']}, 429s {stats['by_status'].get('429', 0)}, "
              f"max running {stats['max_running_seen']}, max waiting {stats['max_waiting_seen']}")
        print()
        print(f"N={args.n} latency={args.latency_ms:g} ms engine concurrency={c}")
        for line in summary(
            batch=r["req_s"], latency_ms=args.latency_ms, engine_concurrency=c,
            own=own[best_c], own_concurrency=best_c, aiohttp=aiohttp_rate,
        ):
            print(line)
        print(f"  service CPU                    {r['cpu_s_per_1000']:8.3f} CPU-s per 1,000 requests "
              f"({r['cpu_s'] / args.n * 1000:.3f} CPU-ms per request)")
        print(f"  service peak RSS               {fmt_bytes(r['peak_rss'])}")


def physical_bound(latency_ms: float, engine_concurrency: int) -> float | None:
    """Little's law: at most ``engine_concurrency`` in service, each for ``latency_ms``.
    None at 0 ms, where the engine's own CPU is the only limit."""
    return engine_concurrency / (latency_ms / 1000) if latency_ms > 0 else None


def summary(*, batch: float, latency_ms: float, engine_concurrency: int, own: float, own_concurrency: int,
            aiohttp: float | None) -> list[str]:
    """The report's bound and ratio lines (req/s in, text out)."""
    physical = physical_bound(latency_ms, engine_concurrency)
    best = max(own, aiohttp or 0.0)
    rows = []
    if physical is None:
        rows.append("  physical bound                      none (0 ms latency: the engine's CPU is the limit)")
    else:
        rows.append(f"  physical bound                 {physical:8.0f} req/s ({engine_concurrency} in service "
                    f"/ {latency_ms:g} ms, Little's law)")
    rows.append(f"  direct, overnight's client     {own:8.0f} req/s (concurrency {own_concurrency})")
    if aiohttp is not None:
        rows.append(f"  direct, aiohttp                {aiohttp:8.0f} req/s (concurrency {own_concurrency})")
    rows.append(f"  batch through service          {batch:8.0f} req/s")
    if physical is not None:
        rows.append(f"  ratio to the physical bound    {batch / physical:8.3f}")
    rows.append(f"  ratio to the best direct       {batch / best:8.3f}")
    rows.append(f"  ratio to overnight's client    {batch / own:8.3f}")
    if aiohttp is not None:
        rows.append(f"  ratio to aiohttp               {batch / aiohttp:8.3f}")
    return rows

if __name__ == "__main__":
    main()
