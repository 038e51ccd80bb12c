"""Exactly-once resume after SIGKILL, and how many requests are sent again.

    python bench/resume.py --n 20000 --latency-ms 20 --window 64

Runs a batch through ``overnight serve`` with the per-batch in-flight window
capped at ``--window`` (``extra_body.overnight.max_concurrency``), SIGKILLs the
server when ``--kill-at`` of the requests are done, starts a new server on the
same data directory, and waits for the batch to complete. The mock engine's
``/stats`` counts every request it received, so

    re-sent = received in total - N

which must not exceed the in-flight window; the output and error files must hold
every custom_id exactly once. A request counts as in flight from the moment it
takes a slot until its line has been handed to the kernel.

``--window 0`` leaves the window adaptive. The service's window at the kill is
not visible from outside then; the report shows the engine's view just before
the kill (requests it was running or queueing: a lower bound of the window,
since answers on their way back are in the window too) and the per-batch cap
(``OVERNIGHT_MAX_CONCURRENCY_PER_BATCH``, an upper bound).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ENDPOINT, mock_stats, sdk_client, upload, wait_batch, workspace, write_input  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--window", type=int, default=64, help="per-batch max_concurrency (0: adaptive)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction done when the server is killed")
    ap.add_argument("--cap", type=int, default=1024, help="the service's per-batch cap (for --window 0)")
    args = ap.parse_args()

    with workspace() as procs:
        engine = procs.mock_engine("--latency-ms", str(args.latency_ms))
        data_dir = procs.workdir / "data"
        env = {"OVERNIGHT_MAX_REQUESTS_PER_FILE": str(max(args.n, 50_000))}
        server = procs.server(engine_url=engine.url, data_dir=data_dir, env=env)
        client = sdk_client(server.url)
        f = upload(client, write_input(procs.workdir / "in.jsonl", args.n))
        extra = {"overnight": {"max_concurrency": args.window}} if args.window else None
        b = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h", extra_body=extra)
        target = int(args.n * args.kill_at)
        while True:
            cur = client.batches.retrieve(b.id)
            if cur.request_counts.completed + cur.request_counts.failed >= target:
                break
            time.sleep(0.01)
        before = mock_stats(engine.url)
        in_flight_at_kill = before["running"] + before["waiting"]
        server.kill(signal.SIGKILL)
        received_at_kill = mock_stats(engine.url)["received_total"]
        t_restart = time.perf_counter()
        server2 = procs.server(engine_url=engine.url, data_dir=data_dir, env=env)
        client2 = sdk_client(server2.url)
        done = wait_batch(client2, b.id)
        resumed_s = time.perf_counter() - t_restart
        stats = mock_stats(engine.url)
        resent = stats["received_total"] - args.n
        ids: Counter[str] = Counter()
        for fid in (done.output_file_id, done.error_file_id):
            if fid:
                for line in client2.files.content(fid).text.splitlines():
                    ids[json.loads(line)["custom_id"]] += 1
        missing = args.n - len(ids)
        dupes = sum(1 for v in ids.values() if v > 1)
        window = args.window or args.cap
        print(f"N={args.n} latency={args.latency_ms:g} ms window={'adaptive' if not args.window else args.window}")
        print(f"  killed (SIGKILL) at            {cur.request_counts.completed} done (reported), "
              f"{received_at_kill} received by the engine, {in_flight_at_kill} in flight at the engine")
        print(f"  after restart                  {done.status} in {resumed_s:.2f} s, "
              f"{done.request_counts.completed} ok / {done.request_counts.failed} failed")
        if args.window:
            print(f"  re-sent requests               {resent} (in-flight window {window}) -> "
                  f"{'OK' if resent <= window else 'OVER'}")
        else:
            print(f"  re-sent requests               {resent} (adaptive window: the engine saw {in_flight_at_kill} "
                  f"just before the kill; cap {window}) -> {'OK' if resent <= window else 'OVER'}")
        print(f"  duplicate ids / missing ids    {dupes} / {missing}")


if __name__ == "__main__":
    main()
