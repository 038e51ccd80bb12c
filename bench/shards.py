"""One batch sharded over 4 pods against the same batch in 1 pod (the kubernetes-job runtime).

    python bench/shards.py --lines 12000 --latency-ms 100 --engine-concurrency 32

Everything is real but the cluster: ``overnight serve`` creates the Indexed Job
in the fake API server of the tests (real HTTP, the real ``kubernetes_asyncio``
client), and the test kubelet (``tests/kubernetes/kubelet.py``) runs each pod as
an ``overnight worker`` process beside its own mock engine process, on a shared
SQLite store and local storage. Each mock engine serves at most
``--engine-concurrency`` requests at once (``--max-concurrency``, queueing the
rest) with ``--latency-ms`` each, and each batch asks for that concurrency, so an
engine is the limit, not this 2-core machine's CPU: 32 / 0.1 s = 320 req/s per
engine.

Measured per run, from the batch's request counts polled every 0.1 s:

* **steady throughput**: requests per second while the batch is between 10 % and
  90 % done (the least-squares slope of the counts; what sharding multiplies;
  target: 4 shards >= 0.90 x 4 x 1 shard);
* **end to end**: lines / (create -> completed), which adds the fixed costs of a
  Job batch (the pods' start, the engines' health, the final merge).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Proc, free_port, sdk_client, upload, write_input  # noqa: E402
from tests.kubernetes.fake_apiserver import FakeApiServer  # noqa: E402
from tests.kubernetes.kubelet import Kubelet  # noqa: E402

TEMPLATE = """\
kind: ModelDeploymentTemplate
name: bench
version: "1"
spec:
  engine:
    type: mock
    ready_timeout_seconds: 60
  model_source: {{type: local, uri: mock}}
  accelerator: {{type: cpu, count: 0}}
  supported_endpoints: [/v1/chat/completions]
---
kind: Profile
name: bench
store_url: "sqlite:///{db}"
storage_url: "file://{files}"
"""


def run_once(work: Path, *, lines: int, shards: int, latency_ms: int, conc: int) -> dict[str, float]:
    work.mkdir(parents=True)
    db, files = work / "overnight.db", work / "files"
    (work / "templates").mkdir()
    (work / "templates" / "t.yaml").write_text(TEMPLATE.format(db=db, files=files))
    api = FakeApiServer().start()
    kubelet = Kubelet(api, work / "pods", engine_args=("--latency-ms", str(latency_ms), "--max-concurrency", str(conc),
                                                       "--max-queue", "100000")).start()
    port = free_port()
    env = {
        "OVERNIGHT_RUNTIMES": "endpoint,kubernetes-job", "OVERNIGHT_KUBERNETES":
        f"kubeconfig:{api.write_kubeconfig(work / 'kubeconfig')}", "OVERNIGHT_KUBERNETES_POLL_S": "0.1",
        "OVERNIGHT_STORE_URL": f"sqlite:///{db}", "OVERNIGHT_STORAGE_URL": f"file://{files}",
        "OVERNIGHT_CHECKPOINT_INTERVAL_S": "0.2",
    }
    serve = Proc("serve", [sys.executable, "-m", "overnight.cli.main", "serve", "--port", str(port), "--data-dir",
                           str(work / "data"), "--templates-dir", str(work / "templates"), "--log-level", "warning"],
                 port, work / "serve.log", env=env).start()
    try:
        client = sdk_client(serve.url)
        path = write_input(work / "in.jsonl", lines)
        fid = upload(client, path).id
        t0 = time.monotonic()
        b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h",
                                  extra_body={"overnight": {"model_template": {"name": "bench"},
                                                            "profile": {"name": "bench"},
                                                            "runtime": {"type": "kubernetes-job", "shards": shards},
                                                            "max_concurrency": conc}})
        samples: list[tuple[float, int]] = []
        while True:
            b = client.batches.retrieve(b.id)
            done = b.request_counts.completed + b.request_counts.failed
            samples.append((time.monotonic() - t0, done))
            if b.status in ("completed", "failed", "cancelled", "expired"):
                break
            time.sleep(0.1)
        end_to_end = samples[-1][0]
        if b.status != "completed" or b.request_counts.completed != lines:
            raise RuntimeError(f"batch ended {b.status} with {b.request_counts}: see {work}")
        # The slope of done-vs-time (least squares) over the samples between 10 % and
        # 90 % done: counts move in checkpoint-sized steps, so two end points alone
        # would carry a step's error.
        mid = [(t, d) for t, d in samples if 0.1 * lines <= d <= 0.9 * lines]
        mt = sum(t for t, _ in mid) / len(mid)
        md = sum(d for _, d in mid) / len(mid)
        slope = sum((t - mt) * (d - md) for t, d in mid) / sum((t - mt) ** 2 for t, _ in mid)
        return {"steady_rps": slope, "end_to_end_s": end_to_end, "end_to_end_rps": lines / end_to_end}
    finally:
        serve.stop()
        kubelet.stop()
        api.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=12_000)
    ap.add_argument("--latency-ms", type=int, default=100)
    ap.add_argument("--engine-concurrency", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    results: dict[int, list[dict[str, float]]] = {1: [], 4: []}
    with tempfile.TemporaryDirectory(prefix="overnight-bench-shards-") as tmp:
        for r in range(args.repeat):
            for shards in (1, 4):
                res = run_once(Path(tmp) / f"r{r}-s{shards}", lines=args.lines, shards=shards,
                               latency_ms=args.latency_ms, conc=args.engine_concurrency)
                results[shards].append(res)
                print(f"run {r + 1}, {shards} shard(s): {json.dumps({k: round(v, 2) for k, v in res.items()})}",
                      flush=True)
    bound = args.engine_concurrency / (args.latency_ms / 1000)
    one = statistics.median(x["steady_rps"] for x in results[1])
    four = statistics.median(x["steady_rps"] for x in results[4])
    e1 = statistics.median(x["end_to_end_rps"] for x in results[1])
    e4 = statistics.median(x["end_to_end_rps"] for x in results[4])
    print(f"engine bound: {bound:.0f} req/s per engine")
    print(f"steady: 1 shard {one:.0f} req/s ({one / bound:.3f} of its engine's bound), 4 shards {four:.0f} req/s")
    print(f"steady ratio 4 shards / (4 x 1 shard): {four / (4 * one):.3f} (target >= 0.90)")
    print(f"end to end: 1 shard {e1:.0f} req/s, 4 shards {e4:.0f} req/s, ratio {e4 / (4 * e1):.3f}")


if __name__ == "__main__":
    main()
