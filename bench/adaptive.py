"""Adaptive concurrency against the best fixed concurrency, engine by engine.

    python bench/adaptive.py                  # every case
    python bench/adaptive.py --case knee-64   # one case (repeatable)
    python bench/adaptive.py --quick          # a quarter of the requests

Each case starts one ``overnight mock-engine`` and, on that same engine:

1. the **direct sweep**: a plain client (overnight's own HTTP/1.1 pool, used
   directly, no batch machinery) sends the case's N requests at each fixed
   concurrency of the sweep; the best rate is the bound;
2. **overnight**: the same N request lines as one batch through
   ``overnight serve`` and the official ``openai`` SDK, with no concurrency
   setting at all, once with the engine's ``/metrics`` on and once with it off
   (404, as an engine whose metrics cannot be reached).

A sampler polls the engine's ``/stats`` every 0.1 s during each run. From it:

* **rate**: requests the engine finished per second, from the batch's first
  answer to its last (the part the concurrency law controls; validation before
  and output assembly after are reported separately as end-to-end req/s);
* **t90**: when the rate over a sliding window (a twentieth of the run, at least
  0.5 s; its middle is the time) first reached 90% of the rate of the run's
  second half, as a fraction of the run (target: <= 0.10);
* **waiting**: the median of the engine's waiting queue while the batch ran,
  against max(4, 10% of the median running) (target with metrics on).

Targets: rate >= 0.90 x best fixed, t90 <= 0.10, waiting within bound with
metrics on; every run completes every line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ENDPOINT, MODEL, reset_stats, sdk_client, upload, wait_batch, workspace  # noqa: E402


@dataclass
class Case:
    name: str
    engine_args: list[str]
    n: int
    sweep: list[int]
    #: max_tokens of each line: fixed 16, or drawn from (lo, hi)
    max_tokens: tuple[int, int] = (16, 16)
    metrics_modes: tuple[str, ...] = ("vllm", "off")
    note: str = ""


CASES = [
    Case("fixed-latency", ["--latency-ms", "50"], 200_000, [256, 512, 1024],
         metrics_modes=("off",), note="today's mock: 50 ms whatever the load (no queue to measure)"),
    Case("knee-16", ["--batching", "knee-16"], 3_000, [8, 16, 24, 32, 64]),
    Case("knee-64", ["--batching", "knee-64"], 8_000, [32, 64, 96, 128]),
    Case("knee-256", ["--batching", "knee-256"], 20_000, [128, 256, 384, 512]),
    Case("h200-llama-1b", ["--batching", "h200-llama-1b"], 6_000, [64, 128, 192, 256], max_tokens=(64, 64),
         note="calibrated to transformers serve on an H200 (outputs of 24-56 tokens, so max_tokens 64)"),
    Case("429-beyond-64", ["--latency-ms", "50", "--max-concurrency", "64", "--max-queue", "0"], 20_000,
         [48, 64, 80], metrics_modes=("off",), note="429 + Retry-After: 1 beyond 64 in flight"),
    Case("mixed-max-tokens", ["--batching", "knee-64", "--step-base-ms", "2", "--step-per-seq-ms", "0.02",
                              "--output-len", "fixed:512"], 3_000, [32, 64, 96, 128], max_tokens=(4, 512),
         note="each line's max_tokens uniform in 4..512 (fast steps so the run stays short)"),
]


def write_lines(path: Path, n: int, max_tokens: tuple[int, int], seed: int = 7) -> list[bytes]:
    """The batch input and the same request bodies for the direct sweep."""
    rng = random.Random(seed)
    bodies: list[bytes] = []
    with path.open("wb") as f:
        for i in range(n):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}],
                    "max_tokens": rng.randint(*max_tokens)}
            raw = json.dumps(body, separators=(",", ":")).encode()
            bodies.append(raw)
            f.write(b'{"custom_id":"r%d","method":"POST","url":"%s","body":%s}\n' % (i, ENDPOINT.encode(), raw))
    return bodies


class Sampler:
    """Polls the mock engine's ``/stats`` in a thread while a run goes on."""

    def __init__(self, url: str, period_s: float = 0.1) -> None:
        self.url, self.period_s = url, period_s
        self.samples: list[tuple[float, int, int, int]] = []  # t, completed, running, waiting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self._stop.is_set():
                try:
                    s = c.get(self.url + "/stats").json()
                    self.samples.append((time.perf_counter(), s["completed_total"], s["running"], s["waiting"]))
                except httpx.HTTPError:
                    pass
                self._stop.wait(self.period_s)


@dataclass
class Run:
    label: str
    completed: int
    seconds: float
    rate: float
    end_to_end: float | None = None
    t90: float | None = None
    median_waiting: float | None = None
    median_running: float | None = None
    extra: dict = field(default_factory=dict)


def analyse(label: str, samples: list[tuple[float, int, int, int]], n: int) -> Run:
    active = [s for s in samples if 0 < s[1] < n] or samples
    first = next(s for s in samples if s[1] > 0)
    last = next((s for s in samples if s[1] >= n), samples[-1])
    span = max(1e-9, last[0] - first[0])
    rate = (last[1] - first[1]) / span
    # t90 against the second half's rate, 2 s windows
    half = first[0] + span / 2
    done_half = next(s for s in samples if s[0] >= half)
    final = (last[1] - done_half[1]) / max(1e-9, last[0] - done_half[0])
    # The rate over a sliding window of a twentieth of the run; its time is the
    # window's middle.
    window = max(0.5, span / 20)
    t90 = 1.0
    for i, s in enumerate(samples):
        if s[0] < first[0]:
            continue
        j = next((k for k in range(i, len(samples)) if samples[k][0] >= s[0] + window), None)
        if j is None:
            break
        if (samples[j][1] - s[1]) / (samples[j][0] - s[0]) >= 0.9 * final:
            t90 = ((s[0] + samples[j][0]) / 2 - first[0]) / span
            break
    waiting = statistics.median(s[3] for s in active)
    running = statistics.median(s[2] for s in active)
    return Run(label, last[1], span, rate, t90=t90, median_waiting=waiting, median_running=running)


async def _direct(url: str, bodies: list[bytes], concurrency: int) -> int:
    from overnight.executor.http1 import HttpPool

    pool = HttpPool(url)
    next_i = 0
    done = 0

    async def worker() -> None:
        nonlocal next_i, done
        while next_i < len(bodies):
            i = next_i
            next_i += 1
            while True:
                r = await pool.request("POST", ENDPOINT, bodies[i])
                if r.status == 200:
                    done += 1
                    break
                await asyncio.sleep(1.0 if r.status == 429 else 0.05)  # as Retry-After: 1 says

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await pool.aclose()
    return done


def direct(url: str, bodies: list[bytes], concurrency: int) -> Run:
    import uvloop

    reset_stats(url)
    with Sampler(url) as s, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_direct(url, bodies, concurrency))
        time.sleep(0.15)
    return analyse(f"fixed {concurrency}", s.samples, len(bodies))


def batch(procs, engine_url: str, input_path: Path, n: int, label: str) -> Run:  # type: ignore[no-untyped-def]
    env = {"OVERNIGHT_MAX_REQUESTS_PER_FILE": str(max(n, 50_000))}
    server = procs.server(engine_url=engine_url, data_dir=procs.workdir / f"data-{time.monotonic_ns()}", env=env)
    client = sdk_client(server.url)
    f = upload(client, input_path)
    reset_stats(engine_url)
    with Sampler(engine_url) as s:
        t0 = time.perf_counter()
        b = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
        b = wait_batch(client, b.id, poll_s=0.1)
        elapsed = time.perf_counter() - t0
    if b.status != "completed" or b.request_counts.completed != n:
        raise SystemExit(f"{label}: batch ended {b.status} with {b.request_counts}: {b.errors}")
    ids: set[str] = set()
    for line in client.files.content(b.output_file_id).text.splitlines():
        cid = json.loads(line)["custom_id"]
        assert cid not in ids, f"duplicate {cid}"
        ids.add(cid)
    assert len(ids) == n, f"{label}: {len(ids)} of {n} lines in the output"
    server.stop()
    run = analyse(label, s.samples, n)
    run.end_to_end = n / elapsed
    return run


def run_case(case: Case, scale: float) -> list[str]:
    n = max(500, int(case.n * scale))
    out: list[str] = []
    with workspace() as procs:
        input_path = procs.workdir / "in.jsonl"
        bodies = write_lines(input_path, n, case.max_tokens)
        results: list[tuple[str, Run]] = []
        best: Run | None = None
        for mode in case.metrics_modes:
            engine = procs.mock_engine(*case.engine_args, "--metrics", mode)
            if best is None:
                for level in case.sweep:
                    r = direct(engine.url, bodies, level)
                    print(f"  {case.name:18s} {r.label:28s} {r.rate:9.1f} req/s", flush=True)
                    if best is None or r.rate > best.rate:
                        best = r
            r = batch(procs, engine.url, input_path, n, f"overnight, metrics {mode}")
            print(f"  {case.name:18s} {r.label:28s} {r.rate:9.1f} req/s  t90 {r.t90:.3f}  "
                  f"waiting {r.median_waiting:g} running {r.median_running:g}", flush=True)
            results.append((mode, r))
            engine.stop()
        assert best is not None
        for mode, r in results:
            bound = max(4.0, 0.10 * (r.median_running or 0))
            waiting_ok = "n/a" if mode == "off" else ("yes" if (r.median_waiting or 0) <= bound else "NO")
            ok = r.rate >= 0.90 * best.rate and (r.t90 or 1) <= 0.10 and waiting_ok != "NO"
            out.append(
                f"| {case.name} | {n} | {best.label.split()[1]}: {best.rate:.1f} | {mode} | {r.rate:.1f} | "
                f"**{r.rate / best.rate:.3f}** | {r.end_to_end:.1f} | {r.t90:.3f} | "
                f"{r.median_waiting:g} / {bound:g} ({waiting_ok}) | {'yes' if ok else 'NO'} |"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=[c.name for c in CASES], help="run only these cases")
    ap.add_argument("--quick", action="store_true", help="a quarter of the requests per case")
    args = ap.parse_args()
    scale = 0.25 if args.quick else 1.0
    rows: list[str] = []
    for case in CASES:
        if args.case and case.name not in args.case:
            continue
        print(f"{case.name}: {case.note or ' '.join(case.engine_args)}", flush=True)
        rows.extend(run_case(case, scale))
    print()
    print("| case | N | best fixed (level: req/s) | engine metrics | overnight req/s | ratio | end-to-end req/s "
          "| t90 | median waiting / bound | meets all |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
