"""What the local runtime adds between a batch's create and its first request.

    python bench/runtime.py --repeat 5

For each repeat:

1. **the engine's own time to healthy**: start the template's engine command
   directly (``overnight mock-engine`` on a free port) and poll ``/health`` every
   5 ms until it answers 200;
2. **create to first request**: ``overnight serve`` (already running, with the
   template directory) gets a batch naming a template whose command is the same
   engine wrapped so that it writes down when its first inference request
   arrives.

The overhead is (2) minus (1): claiming, resolving the template, the guard
process, GPU bookkeeping, readiness polling and the first dispatch. Target: under
1 s. Printed per repeat and as a median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import free_port, sdk_client, upload, workspace, write_input  # noqa: E402

#: The mock engine, plus a note of when its first inference request arrived.
ENGINE = textwrap.dedent("""
    import sys, time
    import uvicorn
    from overnight.mock_engine import MockEngineConfig, create_app
    port, stamp = int(sys.argv[1]), sys.argv[2]
    app = create_app(MockEngineConfig(latency_ms=5))
    first = []
    async def noting(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/chat") and not first:
            first.append(time.time())
            open(stamp, "w").write(repr(first[0]))
        await app(scope, receive, send)
    uvicorn.run(noting, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
""")

TEMPLATE = """\
kind: ModelDeploymentTemplate
name: bench
version: "1"
spec:
  engine:
    type: mock
    command: [{python}, {script}, "{{port}}", {stamp}]
    ready_timeout_seconds: 60
  model_source: {{type: local, uri: mock}}
  accelerator: {{type: cpu, count: 0}}
  supported_endpoints: [/v1/chat/completions]
"""


def own_time_to_healthy(script: Path, stamp: Path) -> float:
    import subprocess

    port = free_port()
    t0 = time.time()
    p = subprocess.Popen([sys.executable, str(script), str(port), str(stamp)])
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.time() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
    finally:
        p.terminate()
        p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = []
    with workspace() as procs:
        script = procs.workdir / "engine.py"
        script.write_text(ENGINE)
        stamp = procs.workdir / "first-request"
        tdir = procs.workdir / "templates"
        tdir.mkdir()
        (tdir / "bench.yaml").write_text(TEMPLATE.format(python=json.dumps(sys.executable),
                                                         script=json.dumps(str(script)), stamp=json.dumps(str(stamp))))
        server = procs.server(engine_url="mock", env={"OVERNIGHT_TEMPLATES_DIR": str(tdir)})
        client = sdk_client(server.url)
        input_path = write_input(procs.workdir / "in.jsonl", 20)
        f = upload(client, input_path)
        for i in range(args.repeat):
            own = own_time_to_healthy(script, procs.workdir / "unused")
            stamp.unlink(missing_ok=True)
            t0 = time.time()
            b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                      extra_body={"overnight": {"model_template": {"name": "bench"}}})
            while not stamp.exists():
                time.sleep(0.002)
            time.sleep(0.01)
            first = float(stamp.read_text()) - t0
            while client.batches.retrieve(b.id).status not in ("completed", "failed", "cancelled", "expired"):
                time.sleep(0.05)
            rows.append((own, first, first - own))
            print(f"repeat {i + 1}: engine alone healthy after {own * 1000:.0f} ms; create -> first request "
                  f"{first * 1000:.0f} ms; overhead {(first - own) * 1000:.0f} ms", flush=True)
    med = statistics.median(r[2] for r in rows)
    print(f"\nmedian overhead of the local runtime: {med * 1000:.0f} ms (target < 1000 ms) over {len(rows)} repeats")


if __name__ == "__main__":
    main()
