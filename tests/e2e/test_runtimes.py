"""Engines overnight starts itself: a batch naming a model template gets a local
engine, shared with batches on the same template, released when they end; the
mock runtime; engine failures; service shutdown. Real processes throughout, and
the process table is checked for survivors after each test."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest

from tests.e2e.helpers import assert_exactly_once, client_for, results, wait_status
from tests.factories import make_input_file

# Real processes end to end: the slow CI step (the default run stays short on 2 cores).
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "templates"

MOCK_TEMPLATE = """\
kind: ModelDeploymentTemplate
name: {name}
version: "1"
spec:
  engine:
    type: mock
    serve_args: ["--latency-ms", "{latency}"]
    ready_timeout_seconds: {ready}
{command}  model_source: {{type: local, uri: mock}}
  accelerator: {{type: cpu, count: 0}}
  supported_endpoints: [/v1/chat/completions]
  keep_alive_seconds: {keep}
"""


def _templates(tmp_path: Path, *docs: str) -> Path:
    d = tmp_path / "templates"
    d.mkdir(exist_ok=True)
    for i, doc in enumerate(docs):
        (d / f"t{i}.yaml").write_text(doc)
    return d


def _mock_template(name: str, *, latency: int = 5, ready: int = 30, keep: float = 0, command: list[str] | None = None):
    cmd = ""
    if command is not None:
        cmd = "    command: [" + ", ".join(f'"{c}"' for c in command) + "]\n"
    return MOCK_TEMPLATE.format(name=name, latency=latency, ready=ready, keep=keep, command=cmd)


def _owned_engines() -> set[int]:
    pids = set()
    for p in psutil.process_iter(["pid"]):
        try:
            if "OVERNIGHT_RUNTIME_OWNER" in p.environ():
                pids.add(p.pid)
        except (psutil.Error, OSError):
            continue
    return pids


def _wait_gone(pids: set[int], timeout_s: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    left = pids
    while time.monotonic() < deadline:
        left = {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        if not left:
            return set()
        time.sleep(0.1)
    return left


def _create(client, tmp_path: Path, n: int, name: str = "in.jsonl", model: str = "m", **ext):
    with make_input_file(tmp_path / name, n, model=model).open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    return client.batches.create(input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 extra_body={"overnight": ext})


@pytest.fixture
def no_leftovers():
    before = _owned_engines()
    yield
    left = _wait_gone(_owned_engines() - before)
    assert not left, f"engine processes survived: {left}"


def test_a_template_batch_starts_its_engine_runs_and_releases_it(cluster, tmp_path, no_leftovers):
    tdir = _templates(tmp_path, _mock_template("tiny"))
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    b = _create(client, tmp_path, 60, model="tiny", model_template={"name": "tiny"})
    b = wait_status(client, b.id, timeout_s=60)
    assert b.status == "completed", b.errors
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(60)})
    assert not err
    extra = b.model_extra["overnight"]
    assert extra["model_template"]["template"] == "tiny" and extra["model_template"]["version"] == "1"
    assert extra["runtime"]["type"] == "local" and extra["runtime"]["restarts"] == 0
    # the engine's log is readable through the API (tenant-scoped)
    logs = client.get(f"/batches/{b.id}/engine/logs", cast_to=object)
    assert logs["object"] == "engine.log" and logs["lines"]


def test_two_batches_on_one_template_share_one_engine(cluster, tmp_path, no_leftovers):
    tdir = _templates(tmp_path, _mock_template("tiny", latency=20, keep=0))
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    a = _create(client, tmp_path, 200, "a.jsonl", model="tiny", model_template={"name": "tiny"})
    b = _create(client, tmp_path, 200, "b.jsonl", model="tiny", model_template={"name": "tiny"})
    a, b = wait_status(client, a.id, timeout_s=60), wait_status(client, b.id, timeout_s=60)
    assert a.status == b.status == "completed"
    pa, pb = a.model_extra["overnight"]["runtime"], b.model_extra["overnight"]["runtime"]
    assert pa["pid"] == pb["pid"] and pa["port"] == pb["port"]


def test_keep_alive_lets_the_next_batch_reuse_the_engine(cluster, tmp_path, no_leftovers):
    tdir = _templates(tmp_path, _mock_template("tiny", keep=30))
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    a = wait_status(client, _create(client, tmp_path, 20, "a.jsonl", model="tiny",
                                    model_template={"name": "tiny"}).id, timeout_s=60)
    b = wait_status(client, _create(client, tmp_path, 20, "b.jsonl", model="tiny",
                                    model_template={"name": "tiny"}).id, timeout_s=60)
    assert a.status == b.status == "completed"
    assert a.model_extra["overnight"]["runtime"]["pid"] == b.model_extra["overnight"]["runtime"]["pid"]
    # still up (keep-alive 30 s) until the service stops, which releases it
    assert psutil.pid_exists(a.model_extra["overnight"]["runtime"]["pid"])
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)


def test_an_engine_that_never_comes_up_fails_the_batch_with_its_log(cluster, tmp_path, no_leftovers):
    script = tmp_path / "broken_engine.py"
    script.write_text("import sys\nprint('loading weights... out of memory', flush=True)\nsys.exit(3)\n")
    tdir = _templates(tmp_path, _mock_template("broken", command=[sys.executable, str(script), "{port}"]))
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    b = wait_status(client, _create(client, tmp_path, 10, model="broken",
                                    model_template={"name": "broken"}).id, timeout_s=60)
    assert b.status == "failed"
    assert b.errors.data[0].code == "engine_failed"
    assert "exit" in b.errors.data[0].message and "out of memory" in b.errors.data[0].message
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(10)})
    assert {e["error"]["code"] for e in err} == {"engine_failed"}


def test_sigterm_of_the_service_stops_the_engine(cluster, tmp_path, no_leftovers):
    tdir = _templates(tmp_path, _mock_template("slow", latency=200))
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    b = _create(client, tmp_path, 2000, model="slow", model_template={"name": "slow"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rt = (client.batches.retrieve(b.id).model_extra.get("overnight") or {}).get("runtime") or {}
        if rt.get("pid"):
            break
        time.sleep(0.1)
    pid = rt["pid"]
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    assert not _wait_gone({pid})


def test_sigkill_of_the_service_takes_the_engine_with_it_and_a_restart_finishes(cluster, tmp_path, no_leftovers):
    tdir = _templates(tmp_path, _mock_template("slow", latency=100))
    data = tmp_path / "data"
    server = cluster.server(engine_url=None, data_dir=data, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    b = _create(client, tmp_path, 600, model="slow", model_template={"name": "slow"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cur = client.batches.retrieve(b.id)
        if cur.request_counts.completed > 50:
            break
        time.sleep(0.1)
    pid = cur.model_extra["overnight"]["runtime"]["pid"]
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    assert not _wait_gone({pid}, 15)  # the guard saw its parent die
    again = cluster.server(engine_url=None, data_dir=data, port=server.port, extra=("--templates-dir", str(tdir)))
    b = wait_status(client_for(again.url), b.id, timeout_s=120)
    assert b.status == "completed"
    out, err = results(client_for(again.url), b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(600)})


def test_the_mock_runtime_and_runtime_switches(cluster, tmp_path, no_leftovers):
    tdir = _templates(tmp_path, _mock_template("tiny"))
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)),
                            env={"OVERNIGHT_RUNTIMES": "endpoint,mock"})
    client = client_for(server.url)
    b = wait_status(client, _create(client, tmp_path, 20, runtime={"type": "mock"}).id, timeout_s=60)
    assert b.status == "completed"
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, tmp_path, 5, "x.jsonl", model="tiny", model_template={"name": "tiny"})
    assert info.value.body["param"] == "overnight.runtime.type"
    assert "not enabled" in info.value.body["message"]


def test_template_errors_at_create(cluster, tmp_path):
    tdir = _templates(tmp_path, _mock_template("tiny"))
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    with pytest.raises(openai.NotFoundError) as nf:
        _create(client, tmp_path, 5, model="x", model_template={"name": "nope"})
    assert "nope" in nf.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        _create(client, tmp_path, 5, "b.jsonl", model="x", model_template={"name": "tiny", "version": "9"})
    with pytest.raises(openai.BadRequestError) as bad:
        _create(client, tmp_path, 5, "c.jsonl", model="x",
                model_template={"name": "tiny", "overrides": {"spec": {"engine": {"image": "evil"}}}})
    assert "not overridable" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError) as ep:
        fobj = client.files.create(file=make_input_file(tmp_path / "e.jsonl", 3).open("rb"), purpose="batch")
        client.batches.create(input_file_id=fobj.id, endpoint="/v1/embeddings", completion_window="24h",
                              extra_body={"overnight": {"model_template": {"name": "tiny"}}})
    assert ep.value.body["param"] == "endpoint"


def test_more_gpus_than_the_host_has_is_a_400(cluster, tmp_path):
    doc = _mock_template("big").replace("accelerator: {type: cpu, count: 0}", "accelerator: {type: H100, count: 8}") \
        .replace("    type: mock\n", "    type: mock\n    command: [\"x\", \"{port}\"]\n")
    tdir = _templates(tmp_path, doc.replace("\n  supported_endpoints", "\n  parallelism: {tp: 8}\n  supported_endpoints"))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho '0, NVIDIA H100, 81559'\necho '1, NVIDIA H100, 81559'\n")
    (fake / "nvidia-smi").chmod(0o755)
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)),
                            env={"PATH": f"{fake}:{os.environ['PATH']}"})
    client = client_for(server.url)
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, tmp_path, 5, model="big", model_template={"name": "big"})
    assert "needs 8 GPUs" in info.value.body["message"] and "has 2" in info.value.body["message"]


def test_example_templates_resolve(tmp_path):
    from overnight.templates.resolve import resolve
    from overnight.templates.source import DirectorySource

    src = DirectorySource(EXAMPLES)
    assert resolve(src, {"name": "mock-tiny"}).gpus == 0
    assert shutil.which(sys.executable)


FLAKY_ENGINE = """\
import os, subprocess, sys, time
port, marker, always = sys.argv[1], sys.argv[2], sys.argv[3] == "always"
p = subprocess.Popen([sys.executable, "-m", "overnight.cli.main", "mock-engine", "--port", port, "--latency-ms", "200"])
if always or not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(1.5)
    print("RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
    p.kill()
    sys.exit(7)
sys.exit(p.wait())
"""


def _flaky_template(tmp_path: Path, name: str, always: bool) -> Path:
    script = tmp_path / "flaky_engine.py"
    script.write_text(FLAKY_ENGINE)
    marker = tmp_path / f"{name}.crashed"
    cmd = [sys.executable, str(script), "{port}", str(marker), "always" if always else "once"]
    return _templates(tmp_path, _mock_template(name, command=cmd))


def test_an_engine_that_crashes_mid_batch_is_restarted_and_nothing_is_lost(cluster, tmp_path, no_leftovers):
    tdir = _flaky_template(tmp_path, "flaky", always=False)
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    n = 300  # 16 at a time, 200 ms each: it outlives the engine's crash 1.5 s in
    b = wait_status(client, _create(client, tmp_path, n, model="flaky", model_template={"name": "flaky"},
                                    max_concurrency=16).id,
                    timeout_s=120)
    assert b.status == "completed", b.errors
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    assert not err
    assert b.model_extra["overnight"]["runtime"]["restarts"] == 1


@pytest.mark.slow
def test_an_engine_that_keeps_crashing_fails_the_batch_naming_the_exit_code(cluster, tmp_path, no_leftovers):
    # (Its batch may notice the engine down, and leave, before the engine watch
    # does: the death must be counted either way, or it restarts for ever.)
    tdir = _flaky_template(tmp_path, "doomed", always=True)
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    n = 3000  # 16 at a time, 200 ms each: far more than four short engine lives can serve
    b = wait_status(client, _create(client, tmp_path, n, model="doomed", model_template={"name": "doomed"},
                                    max_concurrency=16).id,
                    timeout_s=120)
    assert b.status == "failed"
    msg = b.errors.data[0].message
    assert b.errors.data[0].code == "engine_failed" and "exit code was 7" in msg and "illegal memory access" in msg
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})


GPU_ENGINE = """\
import os, subprocess, sys
port, out = sys.argv[1], sys.argv[2]
with open(out + "." + port, "w") as f:
    f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
os.execvp(sys.executable, [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--port", port,
                           "--latency-ms", "300"])
"""


def test_gpus_are_shared_out_and_a_batch_waits_for_a_free_one(cluster, tmp_path, no_leftovers):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho '0, NVIDIA H100, 81559'\necho '1, NVIDIA H100, 81559'\n")
    (fake / "nvidia-smi").chmod(0o755)
    script = tmp_path / "gpu_engine.py"
    script.write_text(GPU_ENGINE)
    seen = tmp_path / "seen"
    docs = []
    for name in ("g1", "g2", "g3"):
        doc = _mock_template(name, command=[sys.executable, str(script), "{port}", str(seen)])
        docs.append(doc.replace("accelerator: {type: cpu, count: 0}", "accelerator: {type: H100, count: 1}"))
    tdir = _templates(tmp_path, *docs)
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)),
                            env={"PATH": f"{fake}:{os.environ['PATH']}"})
    client = client_for(server.url)
    ids = [_create(client, tmp_path, 40, f"{n}.jsonl", model=n, model_template={"name": n}).id
           for n in ("g1", "g2", "g3")]
    # While two engines run, the third batch has no engine: at most 2 GPUs in use at once.
    max_running = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        bs = [client.batches.retrieve(i) for i in ids]
        running = sum(1 for b in bs if (b.model_extra.get("overnight") or {}).get("runtime", {}).get("pid")
                      and b.status == "in_progress")
        max_running = max(max_running, running)
        if all(b.status == "completed" for b in bs):
            break
        time.sleep(0.1)
    assert all(b.status == "completed" for b in bs), [b.status for b in bs]
    devices = sorted(p.read_text() for p in tmp_path.glob("seen.*"))
    assert len(devices) == 3 and set(devices) <= {"0", "1"} and set(devices) == {"0", "1"}
    assert max_running <= 2


def test_cancelling_a_template_batch_releases_its_engine(cluster, tmp_path, no_leftovers):
    tdir = _templates(tmp_path, _mock_template("slow", latency=300))
    server = cluster.server(engine_url=None, extra=("--templates-dir", str(tdir)))
    client = client_for(server.url)
    b = _create(client, tmp_path, 500, model="slow", model_template={"name": "slow"}, max_concurrency=8)
    deadline = time.monotonic() + 30
    pid = None
    while time.monotonic() < deadline and pid is None:
        cur = client.batches.retrieve(b.id)
        pid = ((cur.model_extra.get("overnight") or {}).get("runtime") or {}).get("pid")
        time.sleep(0.05)
    assert pid is not None
    client.batches.cancel(b.id)
    b = wait_status(client, b.id, timeout_s=60)
    assert b.status == "cancelled"
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(500)})
    assert not _wait_gone({pid}, 20), "the engine outlived its cancelled batch"
