"""``overnight jobs`` as a user runs it: real processes against a real ``overnight
serve`` whose console provisions each job's engine with the built-in ``fake``
provider (a mock engine process per job) from a mock template in its
``--templates-dir``, and the live view under a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
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

from tests.conftest import Cluster, Proc, free_port
from tests.factories import make_input_file, request_line, write_lines

CLI = [sys.executable, "-m", "overnight.cli.main"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TEMPLATE = """\
kind: ModelDeploymentTemplate
name: tiny
version: "1"
spec:
  engine: {type: mock, ready_timeout_seconds: 60}
  model_source: {type: local, uri: mock}
  accelerator: {type: cpu, count: 0}
  supported_endpoints: [/v1/chat/completions]
"""
TERMINAL = {"completed", "failed", "expired", "cancelled", "resource_failed", "submit_failed"}
EVENT = r"\d\d:\d\d:\d\d  "  # the clock an event line starts with


@pytest.fixture(scope="module")
def server(module_cluster: Cluster) -> Iterator[Proc]:
    templates = module_cluster.tmp / "templates"
    templates.mkdir()
    (templates / "tiny.yaml").write_text(TEMPLATE)
    data = module_cluster.tmp / "data"
    # A resource takes a second to be ready: resource_preparing is seen on the way.
    proc = module_cluster.server(engine_url=None, data_dir=data, extra=("--templates-dir", str(templates)), env={
        "OVERNIGHT_PLANNER_TICK_S": "0.2", "OVERNIGHT_PLANNER_POLL_S": "0.2", "OVERNIGHT_FAKE_PROVIDER_DELAY_S": "1"})
    yield proc
    # Every job this module made ends with its resource released at the provider.
    with httpx.Client(base_url=proc.url, timeout=10) as c:
        deadline = time.monotonic() + 60
        jobs = c.get("/api/v1/jobs", params={"limit": 100}).json()["data"]
        for j in jobs:
            if j["status"] not in TERMINAL:
                c.post(f"/api/v1/jobs/{j['id']}/cancel")
        while time.monotonic() < deadline:
            records = [json.loads(p.read_text()) for p in (data / "fake-provider").glob("*.json")]
            if all(r["status"] == "released" for r in records):
                break
            time.sleep(0.2)
        assert all(r["status"] == "released" for r in records), records


def cli(server: Proc | str, *args: str, cwd: Path | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    url = server if isinstance(server, str) else server.url
    env = {**os.environ, "OVERNIGHT_SERVER": url, "COLUMNS": "200"}
    env.pop("OVERNIGHT_API_KEY", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def one_json(proc: subprocess.CompletedProcess[str]) -> Any:
    """stdout is exactly one JSON document."""
    return json.loads(proc.stdout)


def job_api(server: Proc, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{server.url}/api/v1/jobs/{job_id}", timeout=10).raise_for_status().json()


def wait_status(server: Proc, job_id: str, statuses: set[str], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        j = job_api(server, job_id)
        if j["status"] in statuses or time.monotonic() > deadline:
            assert j["status"] in statuses, j
            return j
        time.sleep(0.1)


def slow_input(path: Path, n: int = 2) -> Path:
    """Requests that take a minute each: the job stays in progress until cancelled."""
    return make_input_file(path, n, model="tiny", mock={"sleep_ms": 60_000})


def types(job: dict[str, Any]) -> list[str]:
    return [e["type"] for e in job["events"]]


def spawn(server: Proc, *args: str, cwd: Path) -> pexpect.spawn:
    env = {**os.environ, "OVERNIGHT_SERVER": server.url}
    env.pop("OVERNIGHT_API_KEY", None)
    return pexpect.spawn(CLI[0], [*CLI[1:], *args], cwd=str(cwd), env=env, encoding="utf-8", dimensions=(40, 220),
                         timeout=60)


def answer(child: pexpect.spawn, key: str, then: str, tries: int = 20) -> None:
    """Type ``key`` at the [c/d] question until ``then`` shows. A key typed before the
    CLI has put the terminal in raw mode is discarded by that switch (the terminal
    flushes pending input), which a loaded machine makes likely: type it again."""
    for _ in range(tries):
        child.send(key)
        try:
            child.expect(then, timeout=3)
            return
        except pexpect.TIMEOUT:
            continue
    raise AssertionError(f"no {then!r} after typing {key!r} {tries} times; screen: {screen(child)!r}")


def screen(child: pexpect.spawn) -> str:
    return ANSI.sub("", child.before or "")


# -- create --wait, the happy path ------------------------------------------------------------


@pytest.mark.slow
def test_create_wait_json_runs_the_job_and_downloads_its_output_next_to_the_input(server: Proc,
                                                                                  tmp_path: Path) -> None:
    inp = make_input_file(tmp_path / "in.jsonl", 12, model="tiny")
    proc = cli(server, "jobs", "create", str(inp), "--template", "tiny", "--wait", "--json", "--interval", "0.2",
               "--name", "nightly", "--metadata", "team=a", "--priority", "7")
    assert proc.returncode == 0, proc.stderr
    job = one_json(proc)
    assert job["object"] == "job" and job["status"] == "completed"
    assert job["name"] == "nightly" and job["metadata"] == {"team": "a"} and job["priority"] == 7
    assert job["model_template_name"] == "tiny" and job["provider"] == "fake"
    assert job["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    # The watch waited for the release: the document printed says the resource is gone.
    assert job["provision"]["status"] == "released" and "release_confirmed" in types(job)
    for t in ("queued", "provision_requested", "provision_ready", "batch_created", "completed"):
        assert t in types(job), types(job)
    out = tmp_path / f"in.{job['id']}.output.jsonl"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"req-{i}" for i in range(12))
    assert all(x["response"]["status_code"] == 200 for x in lines)
    assert not (tmp_path / f"in.{job['id']}.errors.jsonl").exists()  # the job has no error dataset
    assert "\x1b[" not in proc.stdout + proc.stderr and proc.stderr == ""  # nothing but the document
    assert not list(tmp_path.glob(".*.part"))
    # The same job as the API shows it.
    assert job_api(server, job["id"])["output_dataset"] == job["output_dataset"]


@pytest.mark.slow
def test_an_input_over_a_mebibyte_goes_up_through_the_console_upload(server: Proc, tmp_path: Path) -> None:
    # Bigger than OVERNIGHT_MAX_JSON_BODY_BYTES (1 MiB): the upload is streamed, never buffered.
    inp = make_input_file(tmp_path / "big.jsonl", 24, model="tiny", content="x" * 100_000)
    assert inp.stat().st_size > 2 << 20
    proc = cli(server, "jobs", "create", str(inp), "--template", "tiny", "--wait", "--json", "--interval", "0.2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = one_json(proc)
    assert job["status"] == "completed" and job["request_counts"]["completed"] == 24


@pytest.mark.slow
def test_create_then_watch_get_and_list_without_a_terminal(server: Proc, tmp_path: Path) -> None:
    inp = make_input_file(tmp_path / "work.jsonl", 6, model="tiny")
    created = cli(server, "jobs", "create", str(inp), "--template", "tiny", "--json")  # endpoint from line 1
    assert created.returncode == 0, created.stderr
    job_id = one_json(created)["id"]
    assert job_id.startswith("job_") and one_json(created)["endpoint"] == "/v1/chat/completions"

    # No terminal: one line per event on stderr, in order, and the summary on stdout.
    watched = cli(server, "jobs", "watch", job_id, "--interval", "0.2")
    assert watched.returncode == 0, watched.stderr
    events = [line.split()[1] for line in watched.stderr.splitlines() if re.match(EVENT, line)]
    assert events[0] == "queued" and events[-1] == "release_confirmed", watched.stderr
    assert events.index("provision_requested") < events.index("provision_ready") < events.index("batch_created") \
        < events.index("completed")
    assert len(events) == len(job_api(server, job_id)["events"])  # each event once
    assert re.search(rf"^{EVENT}provision_ready\s+fake resource \S+ at http://127\.0\.0\.1:\d+$", watched.stderr,
                     re.MULTILINE), watched.stderr
    assert re.search(rf"^{job_id} completed in [\d.:]+( s)?: 6 completed, 0 failed of 6; tokens [\d,]+ in / [\d,]+ "
                     r"out; batch batch_\w+$", watched.stdout, re.MULTILINE), watched.stdout
    assert re.search(r"resource fake released; cost [\d.,]+ GPU-s", watched.stdout), watched.stdout

    got = cli(server, "jobs", "get", job_id, "--json")
    assert got.returncode == 0 and one_json(got)["id"] == job_id and one_json(got)["status"] == "completed"
    human = cli(server, "jobs", "get", job_id)
    assert human.returncode == 0
    assert re.search(r"^requests\s+6 completed, 0 failed of 6", human.stdout, re.MULTILINE), human.stdout
    assert re.search(r"^resource\s+fake released at http://", human.stdout, re.MULTILINE), human.stdout
    assert re.search(rf"^\s+{EVENT}release_confirmed", human.stdout, re.MULTILINE), human.stdout

    listed = cli(server, "jobs", "list", "--json", "--limit", "100")
    assert listed.returncode == 0
    page = one_json(listed)
    assert page["object"] == "list" and job_id in [j["id"] for j in page["data"]]
    table = cli(server, "jobs", "list", "--limit", "100")
    assert re.search(rf"{job_id}\s+-\s+completed\s+fake\s+tiny\s+6/6", table.stdout), table.stdout
    first = one_json(cli(server, "jobs", "list", "--json", "--limit", "1"))
    assert len(first["data"]) == 1 and first["has_more"]
    more = cli(server, "jobs", "list", "--limit", "1")
    assert f"more: overnight jobs list --after {first['last_id']}" in more.stdout


@pytest.mark.slow
def test_a_job_that_ends_badly_exits_1_with_its_message(server: Proc, tmp_path: Path) -> None:
    # A deadline 30 s away: the resource is ready in time, but less than a minute
    # is left for the batch, so the job is submit_failed (and its resource released).
    inp = make_input_file(tmp_path / "late.jsonl", 2, model="tiny")
    proc = cli(server, "jobs", "create", str(inp), "--template", "tiny", "--wait", "--interval", "0.2",
               "--deadline", str(int(time.time()) + 30))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"job_\w+ submit_failed in [\d.]+ s\n", proc.stdout), proc.stdout
    assert "error    less than a minute is left before the job's provision_resource_deadline" in proc.stdout
    assert re.search(rf"^{EVENT}submit_failed\s+less than a minute", proc.stderr, re.MULTILINE), proc.stderr
    assert re.search(rf"^{EVENT}release_confirmed", proc.stderr, re.MULTILINE), proc.stderr
    assert not list(tmp_path.glob("late.job_*"))  # no batch, no datasets

    # A batch that fails (no model in its lines): the job is failed, its error file downloaded.
    bad = write_lines(tmp_path / "bad.jsonl", [{"custom_id": f"x{i}", "method": "POST", "url": "/v1/chat/completions",
                                                "body": {"messages": []}} for i in range(2)])
    failed = cli(server, "jobs", "create", str(bad), "--template", "tiny", "--wait", "--json", "--interval", "0.2")
    assert failed.returncode == 1, failed.stderr
    job = one_json(failed)
    assert job["status"] == "failed" and job["error_message"], job


@pytest.mark.slow
def test_cancel_a_running_job_then_watch_it_end(server: Proc, tmp_path: Path) -> None:
    created = cli(server, "jobs", "create", str(slow_input(tmp_path / "slow.jsonl")), "--template", "tiny", "--json")
    job_id = one_json(created)["id"]
    wait_status(server, job_id, {"in_progress"})
    cancelled = cli(server, "jobs", "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert re.fullmatch(rf"{job_id} \w+(, cancel requested)?\n", cancelled.stdout), cancelled.stdout
    watched = cli(server, "jobs", "watch", job_id, "--json", "--interval", "0.2")
    assert watched.returncode == 1, watched.stderr
    job = one_json(watched)
    assert job["status"] == "cancelled" and job["provision"]["status"] == "released"
    assert types(job).index("cancel_requested") < types(job).index("release_confirmed")
    again = cli(server, "jobs", "cancel", job_id, "--json")
    assert again.returncode == 2
    err = one_json(again)["error"]
    assert err["status_code"] == 409 and "already cancelled" in err["message"]


# -- what the server refuses, and what goes wrong on the way ---------------------------------------


@pytest.mark.slow
def test_4xx_and_usage_errors_exit_2(server: Proc, tmp_path: Path) -> None:
    inp = make_input_file(tmp_path / "in.jsonl", 1, model="tiny")
    unknown = cli(server, "jobs", "create", str(inp), "--template", "no-such-template")
    assert unknown.returncode == 2
    assert "server said 404" in unknown.stderr and "no-such-template" in unknown.stderr, unknown.stderr
    provider = cli(server, "jobs", "create", str(inp), "--template", "tiny", "--provider", "runpod", "--json")
    assert provider.returncode == 2
    assert one_json(provider)["error"]["status_code"] == 400 and "runpod" in one_json(provider)["error"]["message"]
    past = cli(server, "jobs", "create", str(inp), "--template", "tiny", "--deadline", "1000")
    assert past.returncode == 2 and "provision_resource_deadline" in past.stderr, past.stderr
    missing = cli(server, "jobs", "get", "job_doesnotexist", "--json")
    assert missing.returncode == 2 and one_json(missing)["error"]["status_code"] == 404
    assert "job_doesnotexist" in one_json(missing)["error"]["message"]
    assert cli(server, "jobs", "create", str(tmp_path / "nope.jsonl"), "--template", "tiny").returncode == 2
    assert cli(server, "jobs", "create", str(inp), "--priority", "5000").returncode == 2
    meta = cli(server, "jobs", "create", str(inp), "--metadata", "novalue", "--json")
    assert meta.returncode == 2 and "KEY=VALUE" in one_json(meta)["error"]["message"]
    assert cli("ftp://x", "jobs", "list").returncode == 2


@pytest.mark.slow
def test_server_down_exits_3_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = cli(url, "jobs", "list")
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "cannot reach" in lines[0], proc.stderr
    inp = make_input_file(tmp_path / "in.jsonl", 1)
    as_json = cli(url, "jobs", "create", str(inp), "--template", "tiny", "--json")
    assert as_json.returncode == 3
    assert one_json(as_json)["error"]["type"] == "unreachable" and url in one_json(as_json)["error"]["message"]


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
def test_5xx_exits_1_401_exits_2_and_the_api_key_is_sent(stand_in: tuple[str, type[_Recorder]]) -> None:
    url, handler = stand_in
    proc = cli(url, "jobs", "get", "job_1", "--api-key", "sk-flag")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "overnight: server said 500: stand-in says 500"
    # /v1 is not part of the job API's path; the key goes as a Bearer token; a 500 is not retried.
    assert handler.seen == [("/api/v1/jobs/job_1", "Bearer sk-flag")]
    handler.status = 503  # retried twice, like the SDK's GETs
    assert cli(url + "/v1/", "jobs", "list").returncode == 1
    assert handler.seen[1:] == [("/api/v1/jobs?limit=20", None)] * 3
    handler.status = 401
    env = {**os.environ, "OVERNIGHT_SERVER": url, "OVERNIGHT_API_KEY": "sk-env"}
    keyed = subprocess.run([*CLI, "jobs", "list", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert keyed.returncode == 2 and one_json(keyed)["error"]["status_code"] == 401
    assert handler.seen[-1] == ("/api/v1/jobs?limit=20", "Bearer sk-env")


# -- the live view, as a person sees it --------------------------------------------------------------


@pytest.mark.slow
def test_live_view_shows_the_events_as_they_arrive_then_the_progress_and_the_summary(server: Proc,
                                                                                      tmp_path: Path) -> None:
    # Requests of 0.1 s to 2.3 s: the batch runs for a couple of seconds.
    write_lines(tmp_path / "in.jsonl", [request_line(i, model="tiny", mock={"sleep_ms": 100 * i}) for i in range(24)])
    child = spawn(server, "jobs", "create", "in.jsonl", "--template", "tiny", "--wait", "--interval", "0.2",
                  cwd=tmp_path)
    child.logfile_read = everything = io.StringIO()
    child.expect(r"uploading in\.jsonl")
    child.expect(r"created (job_\w+) from file-\S+ \(in\.jsonl, [\d.]+ KiB\): provider fake, template tiny 1")
    job_id = child.match.group(1)
    # One line per event, in the order they happen, while the status line moves on below them.
    child.expect(rf"{EVENT}queued\s+queued for provider fake")
    child.expect(rf"{EVENT}provision_requested\s+asking fake for the resource")
    child.expect(r"resource_preparing\s.*fake resource (requested|provisioning)")
    child.expect(rf"{EVENT}provision_ready\s+fake resource fake_\w+ at http://127\.0\.0\.1:\d+")
    child.expect(rf"{EVENT}batch_created\s+batch batch_\w+")
    child.expect(r"in_progress\s.*?\b([1-9]\d?)/24 done · 0 failed")
    assert 0 < int(child.match.group(1)) < 24
    child.expect(rf"{EVENT}completed")
    child.expect(rf"{EVENT}release_confirmed")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, screen(child)
    rest = screen(child)
    assert re.search(rf"{job_id} completed in [\d.]+ s: 24 completed, 0 failed of 24; tokens [\d,]+ in / [\d,]+ out; "
                     r"batch batch_\w+", rest), rest
    out = tmp_path / f"in.{job_id}.output.jsonl"
    assert re.search(rf"output\s+{re.escape(out.name)}", rest), rest  # the path as given, relative
    assert len(out.read_text().splitlines()) == 24
    # Each event was shown once (the status line is redrawn, the events above it are not).
    shown = re.findall(rf"{EVENT}(\w+)", ANSI.sub("", everything.getvalue()))
    assert shown[0] == "queued" and shown[-1] == "release_confirmed" and len(shown) == len(set(shown)), shown


@pytest.mark.slow
def test_live_view_ctrl_c_detaches_or_cancels_the_job(server: Proc, tmp_path: Path) -> None:
    slow_input(tmp_path / "in.jsonl")
    child = spawn(server, "jobs", "create", "in.jsonl", "--template", "tiny", "--wait", "--interval", "0.2",
                  cwd=tmp_path)
    child.expect(r"created (job_\w+)")
    job_id = child.match.group(1)
    child.expect(rf"{EVENT}batch_created")
    child.sendintr()
    child.expect(r"cancel the job or detach\? \[c/d\]")
    answer(child, "d", rf"detached; {job_id} keeps running \(overnight jobs watch {job_id}\)")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert job_api(server, job_id)["status"] not in TERMINAL
    assert not list(tmp_path.glob("in.job_*"))  # nothing downloaded

    # Watch it again, and this time cancel it from the live view.
    child = spawn(server, "jobs", "watch", job_id, "--interval", "0.2", cwd=tmp_path)
    child.expect(rf"{EVENT}batch_created")  # the events so far, once more
    child.expect(r"in_progress")
    child.sendintr()
    child.expect(r"\[c/d\]")
    answer(child, "c", rf"cancelling {job_id}")
    child.expect(rf"{EVENT}cancel_requested")
    child.expect(rf"{EVENT}cancelled")
    child.expect(rf"{EVENT}release_confirmed")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert re.search(rf"{job_id} cancelled( in [\d.:]+( s)?)?: 0 completed, 2 failed of 2", screen(child)), screen(child)
    assert job_api(server, job_id)["status"] == "cancelled"


def test_a_ctrl_c_inside_a_live_display_step_is_held_to_its_end() -> None:
    # A Ctrl-C between rich's start (or stop) steps left the display half stopped, and
    # the next stop failed with "IndexError: pop from empty list" instead of asking.
    import signal

    from overnight.cli.client import deferred_sigint

    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with deferred_sigint():  # nothing pressed: nothing raised
        pass


def test_without_httpx_one_line_names_the_extra() -> None:
    runner = textwrap.dedent(
        """
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "httpx":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Blocker())
        sys.argv = ["overnight", "jobs", "list", "--server", "http://127.0.0.1:9"]
        from overnight.cli.main import main

        main()
        """
    )
    proc = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "overnight: overnight jobs needs httpx: pip install 'overnight[client]'"
