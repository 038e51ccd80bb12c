"""``overnight batch`` / ``overnight files`` as a user runs them: real processes
against a real ``overnight serve`` (its in-process mock engine, slowed down so a
batch lasts long enough to watch), and the live view under a pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pexpect
import pytest

from overnight.cli.client import Rates
from tests.conftest import Cluster, Proc, free_port

ENDPOINT = "/v1/chat/completions"
#: Each mock request takes this long: with --max-concurrency a batch of N lines
#: lasts about N / concurrency * 0.3 s.
LATENCY_MS = "300"
CLI = [sys.executable, "-m", "overnight.cli.main"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(module_cluster: Cluster) -> Proc:
    templates = module_cluster.tmp / "templates"
    templates.mkdir()
    (templates / "mock.yaml").write_text((ROOT / "examples" / "templates" / "mock.yaml").read_text())
    return module_cluster.server(engine_url=None, env={"OVERNIGHT_MOCK_LATENCY_MS": LATENCY_MS},
                                 extra=("--templates-dir", str(templates)))


def write_input(path: Path, n: int, *, body: dict[str, Any] | None = None) -> Path:
    with path.open("w") as f:
        for i in range(n):
            b = body if body is not None else {"model": "mock-model", "messages": [{"role": "user", "content": f"hi {i}"}]}
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": ENDPOINT, "body": b}) + "\n")
    return path


def cli(server: Proc | str, *args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    url = server if isinstance(server, str) else server.url
    env = {**os.environ, "OVERNIGHT_SERVER": url, "COLUMNS": "200"}
    env.pop("OVERNIGHT_API_KEY", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def one_json(proc: subprocess.CompletedProcess[str]) -> Any:
    """stdout is exactly one JSON document."""
    return json.loads(proc.stdout)


def api(server: Proc, path: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1{path}", headers={"Authorization": "Bearer x"}, timeout=10)
    r.raise_for_status()
    return r.json()


def spawn(server: Proc, *args: str, cwd: Path) -> pexpect.spawn:
    env = {**os.environ, "OVERNIGHT_SERVER": server.url}
    child = pexpect.spawn(CLI[0], [*CLI[1:], *args], cwd=str(cwd), env=env, encoding="utf-8",
                          dimensions=(40, 220), timeout=30)
    return child


# -- batch create --wait, the happy path ---------------------------------------------------


@pytest.mark.slow
def test_create_wait_json_downloads_the_output_next_to_the_input(server: Proc, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 12)
    proc = cli(server, "batch", "create", str(inp), "--endpoint", ENDPOINT, "--wait", "--json", "--interval", "0.2",
               "--metadata", "team=a", "--metadata", "run=7")
    assert proc.returncode == 0, proc.stderr
    batch = one_json(proc)
    assert batch["object"] == "batch" and batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    assert batch["metadata"] == {"team": "a", "run": "7"}
    out = tmp_path / f"in.{batch['id']}.output.jsonl"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(12))
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert not (tmp_path / f"in.{batch['id']}.errors.jsonl").exists()  # no error file on the server
    assert "\x1b[" not in proc.stdout + proc.stderr  # no colour, no progress with --json
    assert not list(tmp_path.glob(".*.part"))
    # Cancelling it now: the server's 409 is a 4xx, with its message.
    again = cli(server, "batch", "cancel", batch["id"])
    assert again.returncode == 2 and "server said 409" in again.stderr and "completed" in again.stderr


@pytest.mark.slow
def test_create_without_wait_then_watch_get_list_download(server: Proc, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "work.jsonl", 6)
    created = cli(server, "batch", "create", str(inp), "--json")  # the endpoint from the first line
    assert created.returncode == 0, created.stderr
    batch_id = one_json(created)["id"]
    assert batch_id.startswith("batch_") and one_json(created)["endpoint"] == ENDPOINT

    watched = cli(server, "batch", "watch", batch_id, "--json", "--interval", "0.2")
    assert watched.returncode == 0, watched.stderr
    final = one_json(watched)
    assert final["status"] == "completed" and final["output_file_id"]

    got = cli(server, "batch", "get", batch_id, "--json")
    assert got.returncode == 0 and one_json(got)["id"] == batch_id
    assert one_json(got)["status"] == "completed"
    human = cli(server, "batch", "get", batch_id)
    assert human.returncode == 0
    assert batch_id in human.stdout and "6 completed, 0 failed of 6" in human.stdout

    listed = cli(server, "batch", "list", "--json", "--limit", "100")
    assert listed.returncode == 0
    assert batch_id in [b["id"] for b in one_json(listed)["data"]]
    table = cli(server, "batch", "list", "--limit", "100")
    assert re.search(rf"{batch_id}\s+completed\s+{ENDPOINT}\s+6/6", table.stdout), table.stdout

    dest = tmp_path / "out"
    down = cli(server, "batch", "download", batch_id, "-o", str(dest), "--json")
    assert down.returncode == 0, down.stderr
    doc = one_json(down)
    # Named after the input file's stem, as --wait names them.
    assert doc["output"] == str(dest / f"work.{batch_id}.output.jsonl") and doc["errors"] is None
    assert len(Path(doc["output"]).read_text().splitlines()) == 6


def test_a_batch_that_fails_exits_1_with_its_errors(server: Proc, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "bad.jsonl", 3, body={"messages": []})  # no model
    proc = cli(server, "batch", "create", str(inp), "--wait", "--interval", "0.2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"batch_\w+ failed: 0 completed, 0 failed of 3", proc.stdout), proc.stdout
    assert "line 1" in proc.stdout and "model" in proc.stdout


@pytest.mark.slow  # starts the template's engine
def test_a_template_runs_the_batch_on_its_engine(server: Proc, tmp_path: Path) -> None:
    body = {"model": "mock-tiny", "messages": [{"role": "user", "content": "hi"}]}
    inp = write_input(tmp_path / "in.jsonl", 3, body=body)
    proc = cli(server, "batch", "create", str(inp), "--template", "mock-tiny", "--wait", "--json", "--interval", "0.2")
    assert proc.returncode == 0, proc.stderr
    batch = one_json(proc)
    assert batch["status"] == "completed" and batch["overnight"]["model_template"]["template"] == "mock-tiny"


def test_a_template_is_sent_as_the_overnight_extension(server: Proc, tmp_path: Path) -> None:
    # A template the server does not have: its 404 names the one the flag sent.
    inp = write_input(tmp_path / "in.jsonl", 1)
    unknown = cli(server, "batch", "create", str(inp), "--template", "no-such-template")
    assert unknown.returncode == 2
    assert "server said 404" in unknown.stderr and "no-such-template" in unknown.stderr, unknown.stderr


# -- files -------------------------------------------------------------------------------


@pytest.mark.slow
def test_files_upload_list_download_delete(server: Proc, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "up.jsonl", 4)
    up = cli(server, "files", "upload", str(inp), "--json")
    assert up.returncode == 0, up.stderr
    f = one_json(up)
    assert f["object"] == "file" and f["filename"] == "up.jsonl" and f["bytes"] == inp.stat().st_size

    listed = cli(server, "files", "list", "--purpose", "batch", "--limit", "1000", "--json")
    assert f["id"] in [x["id"] for x in one_json(listed)["data"]]
    human = cli(server, "files", "list", "--limit", "1000")
    assert re.search(rf"{f['id']}\s+up\.jsonl\s+batch\s+{f['bytes']:,}", human.stdout), human.stdout

    got = cli(server, "files", "download", f["id"], "-o", str(tmp_path / "copy.jsonl"), "--json")
    assert got.returncode == 0 and one_json(got)["bytes"] == f["bytes"]
    assert (tmp_path / "copy.jsonl").read_bytes() == inp.read_bytes()
    # Without -o: the server's filename, in the working directory.
    (tmp_path / "here").mkdir()
    assert cli(server, "files", "download", f["id"], cwd=tmp_path / "here").returncode == 0
    assert (tmp_path / "here" / "up.jsonl").read_bytes() == inp.read_bytes()

    deleted = cli(server, "files", "delete", f["id"], "--json")
    assert deleted.returncode == 0 and one_json(deleted)["deleted"] is True
    gone = cli(server, "files", "download", f["id"], "-o", str(tmp_path / "gone.jsonl"))
    assert gone.returncode == 2 and "server said 404" in gone.stderr
    assert not (tmp_path / "gone.jsonl").exists()


# -- faults ------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_down_exits_3_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = cli(url, "batch", "list")
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "cannot reach" in lines[0], proc.stderr
    as_json = cli(url, "files", "upload", str(write_input(tmp_path / "in.jsonl", 1)), "--json")
    assert as_json.returncode == 3
    assert one_json(as_json)["error"]["type"] == "unreachable" and url in one_json(as_json)["error"]["message"]


@pytest.mark.slow
def test_4xx_exits_2_with_the_servers_message(server: Proc, tmp_path: Path) -> None:
    proc = cli(server, "batch", "get", "batch_doesnotexist")
    assert proc.returncode == 2
    assert "server said 404" in proc.stderr and "batch_doesnotexist" in proc.stderr
    as_json = cli(server, "batch", "get", "batch_doesnotexist", "--json")
    assert as_json.returncode == 2
    assert one_json(as_json)["error"]["status_code"] == 404

    inp = write_input(tmp_path / "in.jsonl", 1)
    window = cli(server, "batch", "create", str(inp), "--window", "7x")
    assert window.returncode == 2 and "completion_window" in window.stderr, window.stderr


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in server: every request is recorded and answered with ``status``."""

    status = 500
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        body = json.dumps({"error": {"message": f"stand-in says {self.status}", "type": "x"}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_5xx_exits_1_with_the_message_and_the_api_key_is_sent(stand_in: tuple[str, type[_Recorder]]) -> None:
    url, handler = stand_in
    proc = cli(url, "batch", "get", "batch_1", "--api-key", "sk-flag")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "overnight: server said 500: stand-in says 500"
    # /v1 added to the server URL; the key as a Bearer token (the SDK retried the 500).
    assert handler.seen[0] == ("/v1/batches/batch_1", "Bearer sk-flag") and len(handler.seen) == 3
    handler.status = 401
    env = {**os.environ, "OVERNIGHT_SERVER": url + "/v1/", "OVERNIGHT_API_KEY": "sk-env"}
    keyed = subprocess.run([*CLI, "files", "list", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert keyed.returncode == 2 and one_json(keyed)["error"]["status_code"] == 401
    assert handler.seen[-1] == ("/v1/files?limit=20", "Bearer sk-env")


@pytest.mark.slow
def test_usage_errors_exit_2(server: Proc, tmp_path: Path) -> None:
    missing = cli(server, "batch", "create", str(tmp_path / "nope.jsonl"), "--endpoint", ENDPOINT)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    inp = write_input(tmp_path / "in.jsonl", 1)
    meta = cli(server, "batch", "create", str(inp), "--metadata", "novalue", "--json")
    assert meta.returncode == 2 and "KEY=VALUE" in one_json(meta)["error"]["message"]
    assert cli("ftp://x", "batch", "list").returncode == 2
    assert cli(server, "batch", "list", "--bogus").returncode == 2


def test_without_the_openai_sdk_one_line_names_the_extra() -> None:
    runner = textwrap.dedent(
        """
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "openai":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Blocker())
        sys.argv = ["overnight", "batch", "list", "--server", "http://127.0.0.1:9"]
        from overnight.cli.main import main

        main()
        """
    )
    proc = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "overnight: overnight batch/files need the openai SDK: pip install 'overnight[client]'"


def test_sigint_without_a_terminal_detaches(server: Proc, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 200)
    env = {**os.environ, "OVERNIGHT_SERVER": server.url}
    proc = subprocess.Popen([*CLI, "batch", "create", str(inp), "--wait", "--json", "--max-concurrency", "2",
                             "--interval", "0.2"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not [
            b for b in api(server, "/batches?limit=100")["data"] if b["status"] == "in_progress"
        ]:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    batch = json.loads(out)
    assert "detached" in err
    assert api(server, f"/batches/{batch['id']}")["status"] == "in_progress"
    httpx.post(f"{server.url}/v1/batches/{batch['id']}/cancel", timeout=10)


# -- the live view, as a person sees it --------------------------------------------------


def _screen(child: pexpect.spawn) -> str:
    return ANSI.sub("", child.before or "")


@pytest.mark.slow
def test_live_view_to_completion_then_the_summary(server: Proc, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 24)
    child = spawn(server, "batch", "create", "in.jsonl", "--endpoint", ENDPOINT, "--wait", "--max-concurrency", "4",
                  "--interval", "0.2", cwd=tmp_path)
    child.expect(r"uploading in\.jsonl")
    child.expect(r"created (batch_\w+)")
    batch_id = child.match.group(1)
    # A progress line part way: done/total, req/s, the engine's concurrency.
    child.expect(r"in_progress\s.*?\b([1-9]\d?)/24 done · 0 failed · [\d.]+ req/s · [\d,]+ tok/s · "
                 r"\d+ in flight \(limit \d+\) · ETA \d+:\d\d")
    assert 0 < int(child.match.group(1)) < 24
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    rest = _screen(child)
    # The view's last state, then the summary naming the downloaded output.
    assert "24/24 done" in rest
    assert re.search(rf"{batch_id} completed: 24 completed, 0 failed of 24 in [\d.]+ s \([\d.]+ req/s\); "
                     r"tokens [\d,]+ in / [\d,]+ out", rest), rest
    out = tmp_path / f"in.{batch_id}.output.jsonl"
    assert re.search(rf"output\s+{re.escape(str(out.name))}", rest), rest
    assert len(out.read_text().splitlines()) == 24


@pytest.mark.slow
def test_live_view_ctrl_c_then_d_detaches(server: Proc, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 200)
    child = spawn(server, "batch", "create", "in.jsonl", "--wait", "--max-concurrency", "2", "--interval", "0.2",
                  cwd=tmp_path)
    child.expect(r"created (batch_\w+)")
    batch_id = child.match.group(1)
    child.expect(r"[1-9]\d*/200 done")
    child.sendintr()
    child.expect(r"cancel the batch or detach\? \[c/d\]")
    child.send("d")
    child.expect(rf"detached; {batch_id} keeps running")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    try:
        assert api(server, f"/batches/{batch_id}")["status"] == "in_progress"
        assert not list(tmp_path.glob("in.batch_*"))  # nothing downloaded
    finally:
        httpx.post(f"{server.url}/v1/batches/{batch_id}/cancel", timeout=10)


@pytest.mark.slow
def test_live_view_ctrl_c_then_c_cancels_and_watches_to_the_end(server: Proc, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 200)
    child = spawn(server, "batch", "create", "in.jsonl", "--wait", "--max-concurrency", "2", "--interval", "0.2",
                  cwd=tmp_path)
    child.expect(r"created (batch_\w+)")
    batch_id = child.match.group(1)
    child.expect(r"[1-9]\d*/200 done")
    child.sendintr()
    child.expect(r"\[c/d\]")
    child.send("c")
    child.expect(rf"cancelling {batch_id}")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert re.search(rf"{batch_id} cancelled: \d+ completed, \d+ failed of 200", _screen(child)), _screen(child)
    batch = api(server, f"/batches/{batch_id}")
    assert batch["status"] == "cancelled"
    # Every line ends in one of the two files, downloaded next to the input.
    out = tmp_path / f"in.{batch_id}.output.jsonl"
    errors = tmp_path / f"in.{batch_id}.errors.jsonl"
    n_out = len(out.read_text().splitlines()) if out.exists() else 0
    err_lines = [json.loads(line) for line in errors.read_text().splitlines()]
    assert n_out + len(err_lines) == 200
    assert any(line["error"] and line["error"]["code"] == "batch_cancelled" for line in err_lines)


# -- the rates, from successive polls ----------------------------------------------------


def _polled(status: str, done: int, total: int, out_tokens: int, failed: int = 0) -> dict[str, Any]:
    return {"id": "batch_x", "status": status, "request_counts": {"total": total, "completed": done - failed,
                                                                    "failed": failed},
            "usage": {"input_tokens": 0, "output_tokens": out_tokens}}


def test_rates_and_eta_come_from_successive_polls() -> None:
    rates = Rates(window_s=10)
    first = rates.add(_polled("in_progress", 0, 100, 0), now=0.0)
    assert first.rate is None and first.eta_s is None  # one poll says nothing about speed
    snap = rates.add(_polled("in_progress", 20, 100, 320, failed=2), now=2.0)
    assert snap.rate == pytest.approx(10.0) and snap.tokens_rate == pytest.approx(160.0)
    assert snap.eta_s == pytest.approx(8.0) and snap.failed == 2
    # Old polls leave the window (the rate spans about its last 10 s): the poll at
    # 0 s goes once the one at 2 s is 10 s old.
    rates.add(_polled("in_progress", 30, 100, 480), now=11.0)
    late = rates.add(_polled("in_progress", 42, 100, 650), now=13.0)
    assert late.rate == pytest.approx((42 - 20) / 11)
    assert "42/100 done · 0 failed · 2.0 req/s · 30 tok/s" in late.describe()
    assert "ETA 0:29" in late.describe()
    # Ended: no rate, no ETA.
    assert rates.add(_polled("completed", 100, 100, 1600), now=14.0).describe() == "100/100 done · 0 failed"


def test_embeddings_show_input_tokens_per_second() -> None:
    rates = Rates(window_s=10)
    batch = {"id": "batch_e", "status": "in_progress", "request_counts": {"total": 10, "completed": 0, "failed": 0},
             "usage": {"input_tokens": 0, "output_tokens": 0}}
    rates.add(batch, now=0.0)
    later = {**batch, "request_counts": {"total": 10, "completed": 4, "failed": 0},
             "usage": {"input_tokens": 400, "output_tokens": 0}}
    assert "2.0 req/s · 200 input tok/s" in rates.add(later, now=2.0).describe()


@pytest.mark.slow  # restarts a server
def test_watch_rides_out_a_server_restart(cluster: Cluster, tmp_path: Path) -> None:
    env = {"OVERNIGHT_MOCK_LATENCY_MS": LATENCY_MS}
    first = cluster.server(engine_url=None, env=env)
    created = cli(first, "batch", "create", str(write_input(tmp_path / "in.jsonl", 40)), "--max-concurrency", "2",
                  "--json")
    batch_id = one_json(created)["id"]
    child = spawn(first, "batch", "watch", batch_id, "--interval", "0.2", cwd=tmp_path)
    child.expect(r"[1-9]\d*/40 done")
    first.stop()  # SIGTERM: the batch is checkpointed and resumes on the next start
    child.expect(r"server unreachable for \d+ s, retrying")
    cluster.server(engine_url=None, env=env, port=first.port, data_dir=cluster.tmp / "data")  # the same data
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0, _screen(child)
    assert re.search(rf"{batch_id} completed: 40 completed, 0 failed of 40", _screen(child)), _screen(child)
