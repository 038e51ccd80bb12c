"""Peak memory of the service against the number of lines in a batch.

    python bench/memory.py --sizes 1000,20000,200000

For each size: a fresh mock engine (0 ms latency) and a fresh ``overnight serve``
(``OVERNIGHT_MAX_REQUESTS_PER_FILE`` raised to fit), one batch uploaded, run and
completed through the ``openai`` SDK. The server's peak RSS (``VmHWM``, exact,
from the kernel) is read after the batch completed and again after the output
file was downloaded (streamed). Prints the peak per size, the growth per line
against the smallest size, and checks the target

    peak(largest) <= 1.5 x peak(smallest) + 100 bytes x lines(largest)

``--sizes 1000,1000000`` runs a million-line batch (about two minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ENDPOINT, fmt_bytes, peak_rss_bytes, sdk_client, upload, wait_batch, workspace, write_input,
)


def measure(n: int, latency_ms: float, engine_concurrency: int) -> dict:
    with workspace() as procs:
        engine = procs.mock_engine("--latency-ms", str(latency_ms), "--max-concurrency", str(engine_concurrency))
        server = procs.server(engine_url=engine.url, env={"OVERNIGHT_MAX_REQUESTS_PER_FILE": str(max(n, 50_000))})
        client = sdk_client(server.url)
        path = write_input(procs.workdir / "in.jsonl", n)
        f = upload(client, path)
        after_upload = peak_rss_bytes(server.pid)
        t0 = time.perf_counter()
        b = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
        b = wait_batch(client, b.id, poll_s=0.25)
        seconds = time.perf_counter() - t0
        assert b.status == "completed" and b.request_counts.completed == n, b
        after_batch = peak_rss_bytes(server.pid)
        lines = 0
        with client.with_streaming_response.files.content(b.output_file_id) as resp:
            for chunk in resp.iter_bytes():
                lines += chunk.count(b"\n")
        assert lines == n
        after_download = peak_rss_bytes(server.pid)
        return {"n": n, "input_bytes": path.stat().st_size, "upload": after_upload, "batch": after_batch,
                "download": after_download, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,20000,200000")
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--engine-concurrency", type=int, default=256)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = []
    for n in sizes:
        r = measure(n, args.latency_ms, args.engine_concurrency)
        rows.append(r)
        print(f"N={n:>9,d} input {fmt_bytes(r['input_bytes']):>10}  peak RSS after upload {fmt_bytes(r['upload'])}, "
              f"after batch {fmt_bytes(r['batch'])}, after download {fmt_bytes(r['download'])}  "
              f"({n / r['seconds']:.0f} req/s)", flush=True)
    base = rows[0]
    print()
    for prev, r in zip(rows, rows[1:]):
        slope = (r["download"] - prev["download"]) / (r["n"] - prev["n"])
        print(f"N={prev['n']:,d} -> {r['n']:,d}: {slope:+.1f} bytes of peak RSS per added line")
    for r in rows[1:]:
        per_line = (r["download"] - base["download"]) / (r["n"] - base["n"])
        bound = 1.5 * base["download"] + 100 * r["n"]
        print(f"N={r['n']:,d}: peak {fmt_bytes(r['download'])} vs {fmt_bytes(base['download'])} at N={base['n']:,d}: "
              f"{per_line:+.1f} bytes/line; target <= {fmt_bytes(bound)} "
              f"(1.5 x + 100 B/line): {'met' if r['download'] <= bound else 'NOT met'}")


if __name__ == "__main__":
    main()
