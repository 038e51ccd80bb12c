"""Profile the service while it runs one batch (py-spy must be installed).

    python bench/profile.py --n 50000 --latency-ms 0 --out /tmp/overnight.svg

Starts the mock engine and ``overnight serve``, uploads N requests, attaches
``py-spy record`` to the server process for the life of the batch and writes a
flame graph (``--format speedscope`` for speedscope.app).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ENDPOINT, sdk_client, upload, wait_batch, workspace, write_input  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--engine-concurrency", type=int, default=256)
    ap.add_argument("--out", default="/tmp/overnight-profile.svg")
    ap.add_argument("--format", default="flamegraph", choices=["flamegraph", "speedscope", "raw"])
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = ap.parse_args()

    with workspace() as procs:
        engine = procs.mock_engine("--latency-ms", str(args.latency_ms),
                                   "--max-concurrency", str(args.engine_concurrency))
        server = procs.server(engine_url=engine.url, env={"OVERNIGHT_MAX_REQUESTS_PER_FILE": str(max(args.n, 50_000))})
        client = sdk_client(server.url)
        f = upload(client, write_input(procs.workdir / "in.jsonl", args.n))
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.pid), "--rate", str(args.rate),
                                "--format", args.format, "--output", args.out, "--nonblocking"])
        time.sleep(1.0)
        t0 = time.perf_counter()
        b = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
        b = wait_batch(client, b.id)
        elapsed = time.perf_counter() - t0
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        print(f"{b.status}: {args.n / elapsed:.0f} req/s; profile in {args.out}")


if __name__ == "__main__":
    main()
