"""``overnight run`` against the direct-load bound, in one run on this machine.

    python bench/run.py --n 20000 --latency-ms 50 --engine-concurrency 256

1. starts ``overnight mock-engine`` (``--max-concurrency`` = engine concurrency);
2. sends the N requests straight to it at the engine's concurrency with
   overnight's own HTTP client (``executor/http1.py``), the bound;
3. runs ``overnight run in.jsonl -o out.jsonl --engine-url ...`` on the same N
   requests as a child process, and times it from start to exit: interpreter
   start, validation, the input copy, dispatch, assembly and the final move;
4. prints the command's rate against the bound, twice: from the process's start
   to its exit, and as the command's summary line reports it (from the start of
   its work, once Python and overnight are imported, to the output in place:
   validation, input copy, dispatch, assembly; like the service's benchmark,
   which times a batch from create to completed, not the server's start), and
   checks that the output holds every custom_id exactly once.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import direct_load_http1, mock_stats, reset_stats, workspace, write_input  # noqa: E402


def run_command(workdir: Path, engine_url: str, input_path: Path, n: int, extra: list[str]) -> dict:
    out = workdir / f"out-{time.monotonic_ns()}.jsonl"
    args = [sys.executable, "-m", "overnight.cli.main", "run", str(input_path), "-o", str(out),
            "--engine-url", engine_url, *extra]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"overnight run exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"in ([\d.]+) s \(([\d.]+) req/s\)", proc.stdout)
    ids = Counter(json.loads(line)["custom_id"] for line in out.read_text().splitlines())
    return {
        "seconds": seconds,
        "req_s": n / seconds,
        "own_s": float(m.group(1)) if m else None,
        "own_req_s": n / float(m.group(1)) if m and float(m.group(1)) > 0 else None,
        "exactly_once": len(ids) == n and max(ids.values()) == 1,
        "summary": proc.stdout.strip(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="requests")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="mock engine service time")
    ap.add_argument("--engine-concurrency", type=int, default=256, help="mock engine --max-concurrency")
    ap.add_argument("--run-args", default="", help="extra arguments for overnight run (e.g. '--concurrency 256')")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    with workspace(keep=args.keep) as procs:
        c = args.engine_concurrency
        engine = procs.mock_engine("--latency-ms", str(args.latency_ms), "--max-concurrency", str(c))
        input_path = write_input(procs.workdir / "in.jsonl", args.n)

        reset_stats(engine.url)
        seconds, statuses = direct_load_http1(engine.url, args.n, c)
        bound = args.n / seconds
        print(f"direct   concurrency {c:5d}: {bound:8.0f} req/s  ({seconds:.2f} s, replies {statuses}) "
              "with overnight's HTTP client")

        reset_stats(engine.url)
        r = run_command(procs.workdir, engine.url, input_path, args.n, args.run_args.split())
        stats = mock_stats(engine.url)
        print(f"run      {r['req_s']:8.0f} req/s  ({r['seconds']:.2f} s from start to exit, "
              f"exactly once: {r['exactly_once']})")
        print(f"         {r['summary']}")
        print(f"engine   received {stats['received_total']}, 429s {stats['by_status'].get('429', 0)}, "
              f"max running {stats['max_running_seen']}, max waiting {stats['max_waiting_seen']}")
        print()
        print(f"N={args.n} latency={args.latency_ms:g} ms engine concurrency={c}")
        if r["own_req_s"]:
            print(f"  overnight run / direct bound                       {r['own_req_s'] / bound:6.3f}  "
                  f"({r['own_req_s']:.0f} req/s, {r['own_s']:.2f} s as the command reports it)")
        print(f"  overnight run / direct bound, with Python's start  {r['req_s'] / bound:6.3f}  "
              f"({r['req_s']:.0f} req/s, {r['seconds']:.2f} s process start to exit)")


if __name__ == "__main__":
    main()
