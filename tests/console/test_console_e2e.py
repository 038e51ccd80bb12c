"""The console over HTTP with the ``fake`` provider: a job goes from ``queued`` to
``completed`` through a real provision (a mock engine process the provider starts,
which outlives the service like a cloud GPU), a real batch and a verified release.
After every test the provider holds no live resource for any job."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from overnight.batches.service import batch_id_for_job
from tests.conftest import Cluster
from tests.factories import make_input_file

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


class Console:
    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.cluster, self.tmp = cluster, tmp
        self.data = tmp / "data"
        tdir = tmp / "templates"
        tdir.mkdir(exist_ok=True)
        (tdir / "t.yaml").write_text(TEMPLATE)
        self.tdir = tdir
        self.server = None

    def start(self, **env: str):
        self.server = self.cluster.server(engine_url=None, data_dir=self.data, extra=("--templates-dir", str(self.tdir)),
                                          env={"OVERNIGHT_PLANNER_TICK_S": "0.2", "OVERNIGHT_PLANNER_POLL_S": "0.2",
                                               **env})
        return self.server

    def http(self, key: str = "k") -> httpx.Client:
        assert self.server is not None
        return httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def upload(self, c: httpx.Client, n: int, name: str = "in.jsonl") -> str:
        path = make_input_file(self.tmp / name, n, model="tiny")
        r = c.post("/api/v1/files/upload", files={"file": (name, path.read_bytes())}, data={"purpose": "batch"})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    def job(self, c: httpx.Client, n: int = 20, **extra) -> dict:
        body = {"input_dataset": self.upload(c, n), "endpoint": "/v1/chat/completions", "completion_window": "24h",
                "model_template_name": "tiny", "name": "test job", **extra}
        r = c.post("/api/v1/jobs", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, c: httpx.Client, job_id: str, statuses=TERMINAL, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            j = c.get(f"/api/v1/jobs/{job_id}").json()
            if j["status"] in statuses:
                return j
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still {j['status']}: {j['events']}")

    def wait_released(self, c: httpx.Client, job_id: str, timeout_s: float = 30) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            j = c.get(f"/api/v1/jobs/{job_id}").json()
            if not j["provision_id"] or any(e["type"] == "release_confirmed" for e in j["events"]):
                return j
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id}: no release_confirmed: {j['events']}")

    def batches_of(self, c: httpx.Client, job_id: str) -> list[dict]:
        """Every batch made for the job (its ``metadata.overnight_job_id``), at ``c``'s ``/v1``."""
        out, after = [], None
        while True:
            page = c.get("/v1/batches", params={"limit": 100, **({"after": after} if after else {})}).json()
            out += [b for b in page["data"] if (b["metadata"] or {}).get("overnight_job_id") == job_id]
            if not page["has_more"]:
                return out
            after = page["last_id"]

    def wait_batch_unrecorded(self, c: httpx.Client, job: httpx.Client, job_id: str, timeout_s: float = 30) -> dict:
        """Wait until the job's batch exists (at ``c``: the batches API) while the job (at ``job``) is
        still ``submitting`` without it: the window ``OVERNIGHT_FAKE_SUBMIT_PAUSE_S`` holds open."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.batches_of(c, job_id)
            if found:
                j = job.get(f"/api/v1/jobs/{job_id}").json()
                assert j["status"] == "submitting" and j["batch_id"] is None, j
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.05)
        raise TimeoutError(f"no batch for job {job_id}: {job.get(f'/api/v1/jobs/{job_id}').json()['events']}")

    def clean_up(self) -> list[dict]:
        """What the provider still holds at the end of a test, then killed, so that a
        failed test does not leave mock engines running for the next ones."""
        left = self.live_resources()
        for item in left:
            pid = item.get("process") or item.get("pid")
            if pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        return left

    def live_resources(self) -> list[dict]:
        """What the fake provider still holds: records not released, and their processes."""
        out = []
        for p in sorted((self.data / "fake-provider").glob("*.json")):
            rec = json.loads(p.read_text())
            if rec["status"] != "released":
                out.append(rec)
        for proc in psutil.process_iter(["pid"]):
            try:
                env = proc.environ()
            except (psutil.Error, OSError):
                continue
            res = env.get("OVERNIGHT_FAKE_RESOURCE")
            if res and (self.data / "fake-provider" / f"{res}.json").exists() and proc.status() != "zombie":
                out.append({"process": proc.pid, "resource": res})
        return out


@pytest.fixture
def console(cluster: Cluster, tmp_path: Path):
    c = Console(cluster, tmp_path)
    yield c
    cluster.close()
    left = c.clean_up()
    assert not left, left


def _types(job: dict) -> list[str]:
    return [e["type"] for e in job["events"]]


@pytest.mark.slow
def test_a_job_runs_its_whole_life_and_its_resource_is_released(console: Console) -> None:
    console.start(OVERNIGHT_FAKE_PROVIDER_PRICE_PER_HOUR="3.6")
    with console.http() as c:
        j = console.job(c, 50, metadata={"team": "a"})
        assert j["status"] == "queued" and j["provider"] == "fake"
        done = console.wait(c, j["id"])
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
        done = console.wait_released(c, j["id"])
        types = _types(done)
        for t in ("queued", "provision_requested", "provision_ready", "submitting", "batch_created", "in_progress",
                  "completed", "release_requested", "release_confirmed"):
            assert t in types, (t, types)
        assert types.index("provision_ready") < types.index("batch_created") < types.index("completed") \
            < types.index("release_confirmed")
        assert done["provision"]["provider"] == "fake" and done["provision"]["status"] == "released"
        assert done["cost"]["gpu_seconds"] >= 0 and done["cost"]["usd"] is not None
        out = c.get(f"/api/v1/files/{done['output_dataset']}/content")
        assert out.status_code == 200 and len(out.text.splitlines()) == 50
        # the batch is an ordinary batch of the same tenant
        b = c.get(f"/v1/batches/{done['batch_id']}").json()
        assert b["status"] == "completed" and b["metadata"]["overnight_job_id"] == j["id"]


@pytest.mark.slow
def test_cancel_while_the_resource_is_being_prepared_releases_it(console: Console) -> None:
    console.start(OVERNIGHT_FAKE_PROVIDER_DELAY_S="3")
    with console.http() as c:
        j = console.job(c)
        console.wait(c, j["id"], {"resource_preparing"})
        time.sleep(0.5)  # the provider has accepted it
        assert c.post(f"/api/v1/jobs/{j['id']}/cancel").status_code == 200
        done = console.wait(c, j["id"])
        assert done["status"] == "cancelled" and done["batch_id"] is None
        done = console.wait_released(c, j["id"])
        assert "cancel_requested" in _types(done) and "release_confirmed" in _types(done)


@pytest.mark.slow
def test_cancel_while_the_batch_runs_cancels_it_then_releases(console: Console) -> None:
    console.start(OVERNIGHT_FAKE_PROVIDER_LATENCY_MS="200")
    with console.http() as c:
        j = console.job(c, 3000, name="slow")
        console.wait(c, j["id"], {"in_progress"})
        c.post(f"/api/v1/jobs/{j['id']}/cancel")
        done = console.wait(c, j["id"])
        assert done["status"] == "cancelled"
        assert c.get(f"/v1/batches/{done['batch_id']}").json()["status"] == "cancelled"
        done = console.wait_released(c, j["id"])
        assert _types(done).index("cancel_requested") < _types(done).index("release_confirmed")


def test_a_provider_that_refuses_fails_the_job_with_its_message(console: Console) -> None:
    console.start(OVERNIGHT_FAKE_REFUSE="1")
    with console.http() as c:
        done = console.wait(c, console.job(c)["id"])
        assert done["status"] == "resource_failed" and "is not offered" in done["error_message"]


@pytest.mark.slow
def test_no_capacity_is_retried_until_the_provisioning_timeout(console: Console) -> None:
    console.start(OVERNIGHT_FAKE_FAIL_PROVISION="always", OVERNIGHT_PROVISION_TIMEOUT_S="2")
    with console.http() as c:
        done = console.wait(c, console.job(c)["id"])
        assert done["status"] == "resource_failed" and "no capacity" in done["error_message"]
        assert "provisioning timeout" in done["error_message"]
        assert _types(done).count("provision_retry") >= 1


@pytest.mark.slow
def test_a_batch_that_cannot_be_created_is_submit_failed_and_released(console: Console) -> None:
    console.start(OVERNIGHT_FAKE_PROVIDER_DELAY_S="2")
    with console.http() as c:
        j = console.job(c)
        assert c.delete(f"/v1/files/{j['input_dataset']}").status_code == 200  # gone before the submit
        done = console.wait(c, j["id"])
        assert done["status"] == "submit_failed" and "could not be created" in done["error_message"]
        console.wait_released(c, j["id"])


@pytest.mark.slow
def test_a_failing_release_is_retried_until_the_provider_confirms(console: Console) -> None:
    console.start(OVERNIGHT_FAKE_FAIL_RELEASE="2")
    with console.http() as c:
        j = console.job(c)
        console.wait(c, j["id"])
        done = console.wait_released(c, j["id"], timeout_s=30)
        assert _types(done).count("release_failed") == 2 and "release_confirmed" in _types(done)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["resource_preparing", "in_progress"])
def test_the_planner_killed_at_a_stage_continues_after_a_restart(console: Console, stage: str) -> None:
    env = {"OVERNIGHT_FAKE_PROVIDER_DELAY_S": "2"} if stage == "resource_preparing" else \
        {"OVERNIGHT_FAKE_PROVIDER_LATENCY_MS": "500"}
    server = console.start(**env)
    with console.http() as c:
        j = console.job(c, 2000 if stage == "in_progress" else 20)
        console.wait(c, j["id"], {stage})
    server.signal(signal.SIGKILL)
    console.start(**env)
    with console.http() as c:
        done = console.wait(c, j["id"], timeout_s=90)
        assert done["status"] == "completed", done
        out = c.get(f"/api/v1/files/{done['output_dataset']}/content").text.splitlines()
        ids = [json.loads(x)["custom_id"] for x in out]
        assert len(ids) == len(set(ids)) == done["request_counts"]["total"]
        console.wait_released(c, j["id"])
    # one resource for the job, never a second
    assert len(list((console.data / "fake-provider").glob("*.json"))) == 1


@pytest.mark.slow
def test_the_planner_killed_between_starting_a_resource_and_recording_it_leaks_nothing(console: Console) -> None:
    """SIGKILL after the provider started the resource's process and before it
    recorded the pid (held open by ``OVERNIGHT_FAKE_SPAWN_PAUSE_S``): the restarted
    planner's same request gets the same resource, the job completes on it, and
    the release finds the process by its marker and stops it."""
    server = console.start(OVERNIGHT_FAKE_SPAWN_PAUSE_S="60")
    with console.http() as c:
        j = console.job(c, 20)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        live = console.live_resources()
        procs = [x for x in live if "process" in x]
        if procs:
            break
        time.sleep(0.05)
    (rec,) = [x for x in live if "process" not in x]
    assert rec["pid"] is None and procs == [{"process": procs[0]["process"], "resource": rec["id"]}], live
    server.signal(signal.SIGKILL)
    console.start()  # no pause this time
    with console.http() as c:
        done = console.wait(c, j["id"], timeout_s=60)
        assert done["status"] == "completed", done
        console.wait_released(c, j["id"])
    assert console.live_resources() == []
    assert len(list((console.data / "fake-provider").glob("*.json"))) == 1  # one resource, never a second


def check_cancel_while_submitting(console: Console, batches_http: Callable[[], httpx.Client]) -> None:
    """The cancel arrives while the job is ``submitting``, its batch created but not
    yet recorded on the job (held there by the fake provider's submit pause): the
    planner records the batch, cancels it, ends the job cancelled and releases.
    ``batches_http``: a client of the batches API (the same server, or the batches
    service the console process submits to)."""
    # Enough work that the batch cannot finish inside the pause (the adaptive limit
    # goes far above 1,000 in flight on the mock engine).
    console.start(OVERNIGHT_FAKE_SUBMIT_PAUSE_S="3", OVERNIGHT_FAKE_PROVIDER_LATENCY_MS="2000")
    with console.http() as c, batches_http() as m:
        j = console.job(c, 20000, name="slow")
        batch = console.wait_batch_unrecorded(m, c, j["id"])
        r = c.post(f"/api/v1/jobs/{j['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "submitting", r.json()
        done = console.wait(c, j["id"])
        assert done["status"] == "cancelled" and done["batch_id"] == batch["id"], done
        b = m.get(f"/v1/batches/{batch['id']}").json()
        assert b["status"] == "cancelled" and b["request_counts"]["completed"] < 20000, b
        assert [x["id"] for x in console.batches_of(m, j["id"])] == [batch["id"]]
        done = console.wait_released(c, j["id"])
        t = _types(done)
        assert t.index("submitting") < t.index("cancel_requested") < t.index("batch_created") \
            < t.index("cancelled") < t.index("release_confirmed"), t
    assert console.live_resources() == []


def check_killed_while_submitting(console: Console, batches_http: Callable[[], httpx.Client]) -> None:
    """SIGKILL right after the batch was created and before the job recorded it: the
    restarted planner creates it again, which returns the same batch (its id derived
    from the job's), and the job completes once, with one batch, one resource and
    every line once."""
    server = console.start(OVERNIGHT_FAKE_SUBMIT_PAUSE_S="60", OVERNIGHT_FAKE_PROVIDER_LATENCY_MS="100")
    with console.http() as c, batches_http() as m:
        j = console.job(c, 400)
        batch = console.wait_batch_unrecorded(m, c, j["id"])
    server.signal(signal.SIGKILL)
    console.start()  # no pause this time
    with console.http() as c, batches_http() as m:
        done = console.wait(c, j["id"], timeout_s=90)
        assert done["status"] == "completed", done
        assert done["batch_id"] == batch["id"] == batch_id_for_job("anonymous", j["id"])
        assert [x["id"] for x in console.batches_of(m, j["id"])] == [batch["id"]]
        assert _types(done).count("batch_created") == 1
        out = c.get(f"/api/v1/files/{done['output_dataset']}/content").text.splitlines()
        ids = [json.loads(x)["custom_id"] for x in out]
        assert len(ids) == len(set(ids)) == done["request_counts"]["total"] == 400
        console.wait_released(c, j["id"])
    assert console.live_resources() == []
    assert len(list((console.data / "fake-provider").glob("*.json"))) == 1  # one resource, never a second


@pytest.mark.slow
def test_cancel_while_submitting_cancels_the_batch_that_got_created(console: Console) -> None:
    check_cancel_while_submitting(console, console.http)


@pytest.mark.slow
def test_the_planner_killed_while_submitting_finds_its_batch_after_a_restart(console: Console) -> None:
    check_killed_while_submitting(console, console.http)


@pytest.mark.slow
def test_a_deadline_too_close_for_the_provider_fails_the_job(console: Console) -> None:
    console.start(OVERNIGHT_FAKE_PROVIDER_DELAY_S="30")
    with console.http() as c:
        j = console.job(c, provision_resource_deadline=int(time.time()) + 3)
        done = console.wait(c, j["id"], timeout_s=30)
        assert done["status"] == "resource_failed" and "provision_resource_deadline" in done["error_message"]
        console.wait_released(c, j["id"])


@pytest.mark.slow
def test_pages_hold_every_job_once_while_jobs_change_state(console: Console) -> None:
    console.start()
    with console.http() as c:
        ids = {console.job(c, 5)["id"] for _ in range(12)}
        seen, after = [], None
        while True:
            params = {"limit": 5, **({"after": after} if after else {})}
            page = c.get("/api/v1/jobs", params=params).json()
            seen += [j["id"] for j in page["data"]]
            time.sleep(0.3)  # jobs move on between pages
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert len(seen) == len(set(seen)) == 12 and set(seen) == ids
        for jid in ids:
            console.wait(c, jid)
            console.wait_released(c, jid)


@pytest.mark.slow
def test_one_tenant_never_sees_or_touches_another_tenants_jobs(console: Console) -> None:
    console.start(OVERNIGHT_API_KEYS="ka:alice,kb:bob")
    with console.http("ka") as a, console.http("kb") as b:
        j = console.job(a)
        assert b.get(f"/api/v1/jobs/{j['id']}").status_code == 404
        assert b.post(f"/api/v1/jobs/{j['id']}/cancel").status_code == 404
        assert b.get("/api/v1/jobs").json()["data"] == []
        assert b.get(f"/api/v1/files/{j['input_dataset']}/content").status_code == 404
        m = a.post("/api/v1/models", json={"name": "qwen", "categories": ["chat"]}).json()
        assert b.get(f"/api/v1/models/{m['id']}").status_code == 404
        assert httpx.get(console.server.url + "/api/v1/jobs").status_code == 401
        # keyed mode refuses tenant-named endpoints; the console's own resource is not one
        assert console.wait(a, j["id"])["status"] == "completed"
        console.wait_released(a, j["id"])


def test_unknown_template_or_model_is_a_404_naming_it(console: Console) -> None:
    console.start()
    with console.http() as c:
        fid = console.upload(c, 3)
        r = c.post("/api/v1/jobs", json={"input_dataset": fid, "endpoint": "/v1/chat/completions",
                                         "model_template_name": "nope"})
        assert r.status_code == 404 and "nope" in r.text
        r = c.post("/api/v1/jobs", json={"input_dataset": fid, "endpoint": "/v1/chat/completions",
                                         "model_template_name": "tiny", "model_id": "model_x"})
        assert r.status_code == 404 and "model_x" in r.text
        r = c.post("/api/v1/jobs", json={"input_dataset": fid, "endpoint": "/v1/chat/completions",
                                         "model_template_name": "tiny", "provider": "runpod"})
        assert r.status_code == 400 and "runpod" in r.text


@pytest.mark.slow
def test_jobs_wait_queued_for_a_provisioning_slot_and_a_queued_cancel_asks_nothing_of_the_provider(
        console: Console) -> None:
    console.start(PLANNER_MAX_PROVISIONING="1", OVERNIGHT_FAKE_PROVIDER_DELAY_S="3")
    with console.http() as c:
        first = console.job(c)
        console.wait(c, first["id"], {"resource_preparing"})
        second = console.job(c)
        time.sleep(1.0)
        assert c.get(f"/api/v1/jobs/{second['id']}").json()["status"] == "queued"  # waits its turn
        done = c.post(f"/api/v1/jobs/{second['id']}/cancel").json()
        assert done["status"] == "cancelled" and done["provision_id"] is None
        assert "provision_requested" not in _types(done)
        assert console.wait(c, first["id"])["status"] == "completed"
        console.wait_released(c, first["id"])
    assert len(list((console.data / "fake-provider").glob("*.json"))) == 1  # only the first job's


@pytest.mark.slow
def test_a_queued_job_survives_the_planner_killed_and_runs_after_the_restart(console: Console) -> None:
    env = {"PLANNER_MAX_PROVISIONING": "1", "OVERNIGHT_FAKE_PROVIDER_DELAY_S": "2"}
    server = console.start(**env)
    with console.http() as c:
        first = console.job(c)
        console.wait(c, first["id"], {"resource_preparing"})
        second = console.job(c)
        assert c.get(f"/api/v1/jobs/{second['id']}").json()["status"] == "queued"
    server.signal(signal.SIGKILL)
    console.start(**env)
    with console.http() as c:
        for j in (first, second):
            assert console.wait(c, j["id"], timeout_s=90)["status"] == "completed"
            console.wait_released(c, j["id"])
    assert len(list((console.data / "fake-provider").glob("*.json"))) == 2  # one each, never a second
