"""Adaptive concurrency against the best fixed concurrency, on an engine that refuses.

    python bench/adaptive.py --n 20000 --engine-concurrency 64 --latency-ms 50

The mock engine serves ``--engine-concurrency`` requests at once and answers 429
(``Retry-After: 1``) beyond that (``--max-queue 0``). The benchmark

1. sweeps fixed limits through overnight's executor (same dispatcher, spool and
   engine client as the service; the limit pinned) and keeps the best;
2. runs the adaptive limit through the same executor, with the engine's vLLM
   metrics and without them (latency and 429s only);
3. runs the same N requests as a batch through ``overnight serve`` (adaptive,
   the default configuration);

and prints req/s, the ratio to the best fixed limit, and the engine's 429 count
for each. Every run must complete every request (no lost lines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import mock_stats, reset_stats, workspace, write_input  # noqa: E402
from _executor import run_executor  # noqa: E402
from dispatch import run_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--engine-concurrency", type=int, default=64)
    ap.add_argument("--sweep", default="0.5,0.875,1,1.125,1.5",
                    help="fixed limits to try, as multiples of the engine concurrency")
    args = ap.parse_args()
    c = args.engine_concurrency

    with workspace() as procs:
        engine = procs.mock_engine("--latency-ms", str(args.latency_ms), "--max-concurrency", str(c),
                                   "--max-queue", "0")
        input_path = write_input(procs.workdir / "in.jsonl", args.n)
        rows: list[tuple[str, dict, int]] = []

        def record(label: str, result: dict) -> None:
            stats = mock_stats(engine.url)
            refused = stats["by_status"].get("429", 0)
            assert result["completed"] == args.n, (label, result)
            rows.append((label, result, refused))
            print(f"{label:38s} {result['req_s']:8.0f} req/s  {result['seconds']:6.2f} s  429s {refused:6d}", flush=True)

        fixed: dict[int, float] = {}
        for m in (float(x) for x in args.sweep.split(",")):
            level = max(1, round(c * m))
            reset_stats(engine.url)
            r = run_executor(engine.url, input_path, args.n, fixed=level)
            fixed[level] = r["req_s"]
            record(f"fixed {level}", r)
        best = max(fixed, key=fixed.__getitem__)

        reset_stats(engine.url)
        record("adaptive (executor, vLLM metrics)", run_executor(engine.url, input_path, args.n))
        reset_stats(engine.url)
        record("adaptive (executor, no metrics)", run_executor(engine.url, input_path, args.n, metrics=False))
        reset_stats(engine.url)
        r = run_batch(procs, engine.url, input_path, args.n)
        record("adaptive (overnight serve + openai SDK)", {**r, "completed": r["completed"]})

        print()
        print(f"N={args.n} latency={args.latency_ms:g} ms, engine serves {c} at once and answers 429 beyond")
        print(f"  best fixed limit        {best} -> {fixed[best]:.0f} req/s")
        for label, result, refused in rows:
            if label.startswith("adaptive"):
                print(f"  {label:38s} {result['req_s'] / fixed[best]:6.3f} x best fixed, {refused} x 429, "
                      f"{result['completed']} / {args.n} completed")


if __name__ == "__main__":
    main()
