"""The console's own latency: 200 jobs of 10 lines through ``/api/v1/jobs``.

    python bench/console.py --jobs 200 --lines 10

``overnight serve`` runs the console embedded, with the ``fake`` provider in its
"ready at once" mode (every resource points at one mock engine that already runs,
``OVERNIGHT_FAKE_PROVIDER_ENGINE_URL``), so what is measured is overnight's part:
the planner taking the job, the provisioning record, the provider call, the
submit, the scheduler claiming the batch, and at the end the release and its
confirmation. The client posts the jobs one after another while a second thread
polls the batch list every 50 ms or so; the job list is read every 0.5 s (job
events carry the planner's own times).

* **POST -> batch in_progress**: from the POST's answer to the first poll that
  sees the job's batch ``in_progress`` (or later), per job;
* **batch terminal -> release confirmed**: from the first poll that sees the batch
  terminal to the job's ``release_confirmed`` event (the planner's own clock), and,
  within that, from the planner seeing the batch terminal (its ``completed``
  event) to the confirmation: the release itself.

Printed as p50 / p99 / max; goal p99 < 1 s each. ``OVERNIGHT_MAX_RUNNING_BATCHES``
is raised to the number of jobs so batches do not queue for the scheduler's
running slots (that wait is the scheduler's fairness, measured elsewhere); run
with ``--running 16`` to see it included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import textwrap
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Proc, Procs, free_port, write_input  # noqa: E402

TEMPLATE = textwrap.dedent("""\
    kind: ModelDeploymentTemplate
    name: bench
    version: "1"
    spec:
      engine: {type: mock}
      model_source: {type: local, uri: mock}
      accelerator: {type: cpu, count: 0}
      supported_endpoints: [/v1/chat/completions]
""")


#: The planner's events between a job's POST and its batch, in order (their ``at``).
STAGES = ("queued", "provision_requested", "provision_ready", "submitting", "batch_created")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--lines", type=int, default=10)
    ap.add_argument("--running", type=int, default=0, help="OVERNIGHT_MAX_RUNNING_BATCHES (0: = --jobs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="overnight-bench-console-") as tmp:
        work = Path(tmp)
        procs = Procs(work)
        try:
            engine = procs.mock_engine("--latency-ms", "5")
            (work / "templates").mkdir()
            (work / "templates" / "t.yaml").write_text(TEMPLATE)
            port = free_port()
            serve = Proc("serve", [sys.executable, "-m", "overnight.cli.main", "serve", "--port", str(port),
                                   "--data-dir", str(work / "data"), "--templates-dir", str(work / "templates"),
                                   "--log-level", "warning"], port, work / "serve.log", env={
                "OVERNIGHT_FAKE_PROVIDER_ENGINE_URL": engine.url,
                "OVERNIGHT_MAX_RUNNING_BATCHES": str(args.running or args.jobs),
                "OVERNIGHT_PLANNER_TICK_S": os.environ.get("OVERNIGHT_PLANNER_TICK_S", "0.5"),
                "OVERNIGHT_PLANNER_POLL_S": os.environ.get("OVERNIGHT_PLANNER_POLL_S", "1.0"),
                "OVERNIGHT_SCHEDULER_POLL_S": "0.1",
            })
            procs.procs.append(serve)
            serve.start()
            c = httpx.Client(base_url=serve.url, headers={"Authorization": "Bearer bench"}, timeout=60)
            path = write_input(work / "in.jsonl", args.lines)
            from overnight.api.edge import OPEN_TENANT
            from overnight.batches.service import batch_id_for_job

            posted: dict[str, float] = {}
            batch_of: dict[str, str] = {}
            running_at: dict[str, float] = {}
            terminal_at: dict[str, float] = {}
            planner_terminal: dict[str, float] = {}
            created_at: dict[str, float] = {}
            released: dict[str, float] = {}
            stage_at: dict[str, dict[str, float]] = {}
            deadline = time.time() + 600
            done = threading.Event()

            def pages(client: httpx.Client, path: str) -> list[dict]:
                out, after = [], None
                while True:
                    page = client.get(path, params={"limit": 100, **({"after": after} if after else {})}).json()
                    out += page["data"]
                    if not page["has_more"]:
                        return out
                    after = page["last_id"]

            def watch_batches() -> None:
                # Polls while the jobs are still being posted: a job's clock starts at its
                # own POST, not when the last one was posted.
                with httpx.Client(base_url=serve.url, headers={"Authorization": "Bearer bench"}, timeout=60) as wc:
                    while not done.is_set() and time.time() < deadline:
                        now = time.time()
                        seen = {b["id"]: b["status"] for b in pages(wc, "/v1/batches")}
                        for jid, bid in list(batch_of.items()):
                            st = seen.get(bid)
                            if st and st != "validating" and jid not in running_at:
                                running_at[jid] = now
                            if st in ("completed", "failed", "expired", "cancelled") and jid not in terminal_at:
                                terminal_at[jid] = now
                        time.sleep(float(os.environ.get("BENCH_POLL_S", "0.05")))

            watcher = threading.Thread(target=watch_batches, name="watch-batches", daemon=True)
            watcher.start()
            for _ in range(args.jobs):
                fid = c.post("/api/v1/files/upload", files={"file": ("in.jsonl", path.read_bytes())},
                             data={"purpose": "batch"}).json()["id"]
                r = c.post("/api/v1/jobs", json={"input_dataset": fid, "endpoint": "/v1/chat/completions",
                                                 "model_template_name": "bench"})
                r.raise_for_status()
                jid = r.json()["id"]
                posted[jid] = time.time()
                batch_of[jid] = batch_id_for_job(OPEN_TENANT, jid)
            while len(released) < args.jobs and time.time() < deadline:
                for j in pages(c, "/api/v1/jobs"):
                    for e in j["events"]:
                        if e["type"] == "release_confirmed":
                            released.setdefault(j["id"], e["at"])
                        if e["type"] in ("completed", "failed", "expired", "cancelled"):
                            planner_terminal.setdefault(j["id"], e["at"])
                        if e["type"] == "batch_created":
                            created_at.setdefault(j["id"], e["at"])
                        if e["type"] in STAGES:
                            stage_at.setdefault(j["id"], {}).setdefault(e["type"], e["at"])
                time.sleep(0.5)  # the events carry the planner's own times: no need to poll hard
            done.set()
            watcher.join(timeout=10)
            if len(released) < args.jobs:
                raise SystemExit(f"only {len(released)} of {args.jobs} jobs released in time; see {work}")
            to_running = [running_at[j] - posted[j] for j in posted if j in running_at]
            to_release = [max(0.0, released[j] - terminal_at[j]) for j in posted if j in terminal_at]
            release_only = [released[j] - planner_terminal[j] for j in posted if j in planner_terminal]
            print(f"{args.jobs} jobs of {args.lines} lines, max running batches {args.running or args.jobs}")
            to_created = [created_at[j] - posted[j] for j in posted if j in created_at]
            for name, xs in (("POST -> batch in_progress", to_running), ("  of which POST -> batch created",
                                                                        to_created),
                             ("batch terminal (seen by the client) -> release confirmed", to_release),
                             ("planner sees the batch terminal -> release confirmed", release_only)):
                print(f"{name}: p50 {statistics.median(xs) * 1000:.0f} ms, p99 {pct(xs, 99) * 1000:.0f} ms, "
                      f"max {max(xs) * 1000:.0f} ms (n={len(xs)})")
            # Where the time to batch created goes, stage by stage (the planner's clock).
            for a, b in zip(STAGES, STAGES[1:]):
                xs = [stage_at[j][b] - stage_at[j][a] for j in posted
                      if a in stage_at.get(j, {}) and b in stage_at.get(j, {})]
                if xs:
                    print(f"  {a} -> {b}: p50 {statistics.median(xs) * 1000:.0f} ms, "
                          f"p99 {pct(xs, 99) * 1000:.0f} ms")
        finally:
            procs.close()


if __name__ == "__main__":
    main()
