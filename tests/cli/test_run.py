"""``overnight run`` as a user runs it: a real process against a real mock engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from overnight.executor.checkpoint import Checkpoint
from tests.conftest import FAST_ENV, Cluster
from tests.e2e.helpers import client_for, wait_status

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "examples" / "templates"
ENDPOINT = "/v1/chat/completions"
#: Fast checkpoints and backoff, as the service tests use.
RUN_ENV = {k: v for k, v in FAST_ENV.items() if "CHECKPOINT" in k or "BACKOFF" in k}


def write_input(path: Path, n: int, *, model: str = "mock-model", prefix: str = "req") -> Path:
    with path.open("w") as f:
        for i in range(n):
            body = {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 8}
            f.write(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": ENDPOINT, "body": body}) + "\n")
    return path


def stats(engine_url: str) -> dict[str, Any]:
    return httpx.get(engine_url + "/stats", timeout=10).json()


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_runs():
    """A failed test must not leave a run (and its engine) behind."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Run:
    """``overnight run ...`` as a child process (its own process group, like a shell job)."""

    def __init__(self, cwd: Path, *args: str, tag: str | None = None, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, **RUN_ENV, **(env or {})}
        if tag:
            env["OVERNIGHT_RUN_TEST_TAG"] = tag
        self.log = cwd / f"run-{uuid.uuid4().hex[:8]}.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "overnight.cli.main", "run", *args, "--progress-every", "0.5"],
            cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        _STARTED.append(self.proc)

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()
        return rc, self.log.read_text(errors="replace")


def run(cwd: Path, *args: str, timeout: float = 60, tag: str | None = None,
        env: dict[str, str] | None = None) -> tuple[int, str]:
    return Run(cwd, *args, tag=tag, env=env).wait(timeout)


def lines(*paths: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in paths:
        if p.exists():
            out += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return out


def assert_each_once(got: list[dict[str, Any]], n: int, prefix: str = "req") -> None:
    counts = Counter(line["custom_id"] for line in got)
    assert {k: v for k, v in counts.items() if v > 1} == {}
    assert set(counts) == {f"{prefix}-{i}" for i in range(n)}


def wait_done(state: Path, at_least: int, proc: subprocess.Popen, timeout: float = 30) -> int:
    """Wait until the run's stored checkpoint counts ``at_least`` finished requests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was interrupted"
        try:
            head = Checkpoint.header((state / "checkpoint").read_bytes())
            done = head["completed"] + head["failed"]
            if done >= at_least:
                return done
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"fewer than {at_least} requests done after {timeout} s")


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Processes started for a run carrying ``tag`` that are engines (owner marker)."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("OVERNIGHT_RUN_TEST_TAG") == tag and "OVERNIGHT_RUNTIME_OWNER" in env:
            found.append(proc)
    return found


def shape(obj: Any) -> Any:
    """Keys (recursively, for the line and its response) without the values."""
    if isinstance(obj, dict):
        return {k: shape(v) if k in ("response",) else type(v).__name__ for k, v in obj.items()}
    return type(obj).__name__


@pytest.fixture
def engine(cluster: Cluster):
    return cluster.mock_engine("--latency-ms", "5")


@pytest.mark.slow
def test_full_run_writes_the_services_output_format(cluster: Cluster, engine, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 200)
    rc, log = run(tmp_path, str(inp), "-o", "out.jsonl", "--engine-url", engine.url)
    assert rc == 0, log
    assert "done: 200 completed, 0 failed" in log and "out.jsonl" in log
    got = lines(tmp_path / "out.jsonl")
    assert_each_once(got, 200)
    assert stats(engine.url)["received_total"] == 200
    assert not (tmp_path / "out.jsonl.overnight").exists()  # the state goes once the run is done

    # The same line as the service writes for the same request.
    server = cluster.server(engine_url=engine.url)
    client = client_for(server.url)
    with (tmp_path / "in.jsonl").open("rb") as f:
        file = client.files.create(file=f, purpose="batch")
    b = wait_status(client, client.batches.create(input_file_id=file.id, endpoint=ENDPOINT,
                                                  completion_window="24h").id)
    service_line = json.loads(client.files.content(b.output_file_id).text.splitlines()[0])
    ours = got[0]
    assert shape(ours) == shape(service_line)
    assert list(ours) == ["id", "custom_id", "response", "error"]
    assert list(ours["response"]) == ["status_code", "request_id", "body"]
    assert ours["id"].startswith("batch_req_") and ours["error"] is None
    assert ours["response"]["status_code"] == 200
    assert set(ours["response"]["body"]) == set(service_line["response"]["body"])


def test_invalid_input_sends_nothing_and_names_the_line(engine, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 5)
    text = inp.read_text().splitlines()
    text[3] = text[3].replace('"POST"', '"GET"')
    inp.write_text("\n".join(text) + "\n")
    rc, log = run(tmp_path, str(inp), "-o", "out.jsonl", "--engine-url", engine.url)
    assert rc == 2, log
    assert "Line 4" in log and "nothing was sent" in log
    assert stats(engine.url)["received_total"] == 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")) == ["in.jsonl"]


@pytest.mark.slow
def test_errors_go_to_their_own_file_or_into_the_output(cluster: Cluster, tmp_path: Path) -> None:
    engine = cluster.mock_engine("--latency-ms", "1", "--fail-rate", "0.3", "--seed", "7")
    one_try = {"OVERNIGHT_MAX_ATTEMPTS": "1"}
    inp = write_input(tmp_path / "in.jsonl", 100)
    rc, log = run(tmp_path, str(inp), "-o", "a.jsonl", "--errors", "a.err.jsonl", "--engine-url", engine.url,
                  env=one_try)
    assert rc == 0, log
    out, err = lines(tmp_path / "a.jsonl"), lines(tmp_path / "a.err.jsonl")
    assert err and all(x["response"]["status_code"] >= 400 for x in err)
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert_each_once(out + err, 100)
    assert f"{len(err)} failed" in log
    # Without --errors, every line is in the output, failed ones after the others.
    rc, log = run(tmp_path, str(inp), "-o", "b.jsonl", "--engine-url", engine.url, env=one_try)
    assert rc == 0, log
    both = lines(tmp_path / "b.jsonl")
    assert_each_once(both, 100)
    codes = [x["response"]["status_code"] for x in both]
    assert 500 in codes and codes == sorted(codes, key=lambda c: c != 200)


def test_unreachable_engine_is_an_error_before_anything_starts(tmp_path: Path) -> None:
    from tests.conftest import free_port

    inp = write_input(tmp_path / "in.jsonl", 3)
    rc, log = run(tmp_path, str(inp), "-o", "out.jsonl", "--engine-url", f"http://127.0.0.1:{free_port()}")
    assert rc == 1, log
    assert "cannot reach the engine" in log and "nothing was sent" in log
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_sigkill_then_the_same_command_finishes_resending_at_most_the_window(cluster: Cluster, tmp_path: Path) -> None:
    n, window = 1500, 16
    engine = cluster.mock_engine("--latency-ms", "40")
    inp = write_input(tmp_path / "in.jsonl", n)
    args = (str(inp), "-o", "out.jsonl", "--errors", "err.jsonl", "--engine-url", engine.url,
            "--max-concurrency", str(window))
    first = Run(tmp_path, *args)
    state = tmp_path / "out.jsonl.overnight"
    wait_done(state, n // 2, first.proc)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.wait()
    received_at_kill = stats(engine.url)["received_total"]
    assert received_at_kill < n

    # Another input with the same -o is refused while the run is unfinished; nothing is sent.
    other = write_input(tmp_path / "other.jsonl", 10, prefix="other")
    rc, log = run(tmp_path, str(other), "-o", "out.jsonl", "--engine-url", engine.url)
    assert rc == 2, log
    assert "different file" in log and "out.jsonl.overnight" in log
    assert stats(engine.url)["received_total"] == received_at_kill

    rc, log = run(tmp_path, *args)
    assert rc == 0, log
    assert "continuing:" in log
    assert "req/s" in log and "in flight" in log  # plain progress lines (not a terminal)
    assert_each_once(lines(tmp_path / "out.jsonl", tmp_path / "err.jsonl"), n)
    resent = stats(engine.url)["received_total"] - n
    assert 0 <= resent <= window, f"{resent} requests were sent again (window {window})"
    assert not state.exists()

    # A finished run, run again: nothing to do, nothing sent.
    before = stats(engine.url)["received_total"]
    rc, log = run(tmp_path, *args)
    assert rc == 0, log
    assert "nothing to do" in log
    assert stats(engine.url)["received_total"] == before
    # ... and another input with the same -o is refused.
    rc, log = run(tmp_path, str(other), "-o", "out.jsonl", "--engine-url", engine.url)
    assert rc == 2 and "does not hold the results" in log, log


def test_template_starts_runs_and_stops_its_engine(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    inp = write_input(tmp_path / "in.jsonl", 100, model="mock-tiny")
    rc, log = run(tmp_path, str(inp), "-o", "out.jsonl", "--template", "mock-tiny", "--templates-dir",
                  str(TEMPLATES), tag=tag)
    assert rc == 0, log
    assert "starting engine 'mock-tiny'" in log and "ready at http://127.0.0.1:" in log
    out = lines(tmp_path / "out.jsonl")
    assert_each_once(out, 100)
    assert {x["response"]["body"]["model"] for x in out} == {"mock-tiny"}
    assert tagged_processes(tag) == []


def test_template_model_must_match_the_lines(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3, model="something-else")
    rc, log = run(tmp_path, str(inp), "-o", "out.jsonl", "--template", "mock-tiny", "--templates-dir", str(TEMPLATES))
    assert rc == 2, log
    assert "'something-else'" in log and '"model": "mock-tiny"' in log
    rc, log = run(tmp_path, str(inp), "-o", "out.jsonl", "--template", "nope", "--templates-dir", str(TEMPLATES))
    assert rc == 2 and "nope" in log, log
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")) == ["in.jsonl"]


@pytest.mark.slow
def test_ctrl_c_stops_releases_the_engine_and_the_same_command_resumes(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    n = 1200
    inp = write_input(tmp_path / "in.jsonl", n, model="mock-tiny")
    args = (str(inp), "-o", "out.jsonl", "--template", "mock-tiny", "--templates-dir", str(TEMPLATES),
            "--max-concurrency", "8")
    first = Run(tmp_path, *args, tag=tag)
    wait_done(tmp_path / "out.jsonl.overnight", n // 4, first.proc)
    os.killpg(first.proc.pid, signal.SIGINT)
    rc, log = first.wait(timeout=60)
    assert rc == 130, log
    assert "stopped by Ctrl-C" in log and "run the same command again to continue" in log
    assert "Traceback" not in log
    assert tagged_processes(tag) == []
    done_then = Checkpoint.header((tmp_path / "out.jsonl.overnight" / "checkpoint").read_bytes())
    assert 0 < done_then["completed"] < n

    rc, log = run(tmp_path, *args, tag=tag)
    assert rc == 0, log
    assert f"continuing: {done_then['completed']} of {n}" in log or "continuing:" in log
    assert_each_once(lines(tmp_path / "out.jsonl"), n)
    assert tagged_processes(tag) == []


def test_sigterm_exits_143(engine, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3000)
    first = Run(tmp_path, str(inp), "-o", "out.jsonl", "--engine-url", engine.url, "--concurrency", "4")
    wait_done(tmp_path / "out.jsonl.overnight", 10, first.proc)
    first.proc.send_signal(signal.SIGTERM)
    rc, log = first.wait()
    assert rc == 143, log
    assert "stopped by SIGTERM" in log


@pytest.mark.slow
def test_engine_crash_mid_run_stops_with_its_log_and_the_same_command_resumes(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    n = 1200
    inp = write_input(tmp_path / "in.jsonl", n, model="mock-tiny")
    args = (str(inp), "-o", "out.jsonl", "--template", "mock-tiny", "--templates-dir", str(TEMPLATES),
            "--max-concurrency", "8")
    first = Run(tmp_path, *args, tag=tag)
    wait_done(tmp_path / "out.jsonl.overnight", n // 4, first.proc)
    engines = [p for p in tagged_processes(tag) if "_guard.py" not in " ".join(p.cmdline())]
    assert len(engines) == 1
    engines[0].kill()
    rc, log = first.wait()
    assert rc == 1, log
    assert "the engine exited with code" in log and "last lines of" in log
    assert "run the same command again to continue" in log
    assert tagged_processes(tag) == []

    rc, log = run(tmp_path, *args, tag=tag)
    assert rc == 0, log
    out = lines(tmp_path / "out.jsonl")
    assert_each_once(out, n)
    assert all(x["error"] is None for x in out)  # requests cut off by the crash were sent again
    assert tagged_processes(tag) == []


def never_ready_template(directory: Path, ready_timeout_s: float) -> Path:
    """A template whose engine runs but never answers its health endpoint."""
    directory.mkdir(exist_ok=True)
    command = json.dumps([sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(120)",
                          "--port", "{port}"])
    (directory / "slow.yaml").write_text(
        "kind: ModelDeploymentTemplate\nname: slow\nversion: '1'\nspec:\n"
        f"  engine: {{type: mock, command: {command}, ready_timeout_seconds: {ready_timeout_s}}}\n"
        "  model_source: {type: local, uri: mock}\n  accelerator: {type: cpu, count: 0}\n"
        "  supported_endpoints: [/v1/chat/completions]\n"
    )
    return directory


def test_ctrl_c_while_the_engine_starts_stops_at_once_and_releases_it(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    templates = never_ready_template(tmp_path / "templates", 60)
    inp = write_input(tmp_path / "in.jsonl", 10, model="slow")
    r = Run(tmp_path, str(inp), "-o", "out.jsonl", "--template", "slow", "--templates-dir", str(templates), tag=tag)
    deadline = time.monotonic() + 20
    while not tagged_processes(tag):
        assert time.monotonic() < deadline and r.proc.poll() is None, r.log.read_text()
        time.sleep(0.05)
    started = time.monotonic()
    os.killpg(r.proc.pid, signal.SIGINT)
    rc, log = r.wait(timeout=30)
    assert rc == 130, log
    assert time.monotonic() - started < 10
    assert "stopped by Ctrl-C" in log and "Traceback" not in log
    assert tagged_processes(tag) == []


def test_an_engine_that_is_not_ready_in_time_fails_with_its_log(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    templates = never_ready_template(tmp_path / "templates", 1)
    inp = write_input(tmp_path / "in.jsonl", 10, model="slow")
    rc, log = run(tmp_path, str(inp), "-o", "out.jsonl", "--template", "slow", "--templates-dir", str(templates),
                  tag=tag)
    assert rc == 1, log
    assert "was not ready within 1 s" in log and "loading" in log  # the engine log's tail
    assert tagged_processes(tag) == []
    assert not (tmp_path / "out.jsonl").exists()


def test_ctrl_c_during_validation_leaves_nothing_behind(tmp_path: Path) -> None:
    import asyncio

    from overnight.runfile import RunConfig, run_file

    inp = write_input(tmp_path / "in.jsonl", 100_000)
    cfg = RunConfig(input_path=inp, output_path=tmp_path / "out.jsonl", engine_url="http://127.0.0.1:9")

    async def main():
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        return await run_file(cfg)

    result = asyncio.run(main())
    assert (result.status, result.exit_code) == ("stopped", 130), result
    assert "nothing was sent" in result.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_template_needing_more_gpus_than_the_host_has_is_refused_before_starting(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "big.yaml").write_text(
        "kind: ModelDeploymentTemplate\nname: big\nversion: '1'\nspec:\n"
        "  engine: {type: mock}\n  model_source: {type: local, uri: mock}\n"
        "  accelerator: {type: nvidia-gpu, count: 512}\n  parallelism: {tp: 512}\n  supported_endpoints: [/v1/chat/completions]\n"
    )
    inp = write_input(tmp_path / "in.jsonl", 3, model="big")
    rc, log = run(tmp_path, str(inp), "-o", "out.jsonl", "--template", "big", "--templates-dir", str(templates))
    assert rc == 1, log
    assert "cannot start here" in log and "512" in log
    assert "Traceback" not in log and "starting engine" not in log
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")) == ["in.jsonl", "templates"]
