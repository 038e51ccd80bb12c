"""The web console's Jobs section in a real browser (headless Chromium through
Playwright, as ``test_console_browser.py``), against ``overnight serve`` whose
console provisions each job's engine with the built-in ``fake`` provider from a
mock template: create a job from the page and watch it complete with its events,
cancel one held in ``resource_preparing``, download its datasets, and the same
accessibility checks as the batches. After the module every resource the provider
started is released.

Screenshots land in each test's pytest tmp dir (see ``test_console_browser.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Cluster, Proc
from tests.web_console.test_console_browser import A11Y_PROBLEMS, CHROMIUM, NO_SIDEWAYS_SCROLL, focused, sync_api

pytestmark = [
    pytest.mark.slow,  # many browser steps on a real job: in the slow CI step
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set OVERNIGHT_TEST_CHROMIUM)"),
]

KEY = "jobs-key"
OTHER_KEY = "jobs-other-key"
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


def lines(n: int, prefix: str = "j") -> bytes:
    out = [json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "tiny", "messages": [{"role": "user", "content": f"hello {i}"}]}})
           for i in range(n)]
    return ("\n".join(out) + "\n").encode()


class JobsApi:
    """The job API over plain HTTP, to set up and check what the page did."""

    def __init__(self, url: str, key: str = KEY) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def create(self, content: bytes, name: str = "in.jsonl", **extra: Any) -> dict[str, Any]:
        f = self.http.post("/api/v1/files/upload", files={"file": (name, content)}, data={"purpose": "batch"})
        f.raise_for_status()
        r = self.http.post("/api/v1/jobs", json={"input_dataset": f.json()["id"], "endpoint": "/v1/chat/completions",
                                                 "model_template_name": "tiny", **extra})
        r.raise_for_status()
        return r.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/api/v1/jobs/{job_id}").raise_for_status().json()

    def wait(self, job_id: str, done: Any, timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            j = self.job(job_id)
            if done(j) or time.monotonic() > deadline:
                assert done(j), j
                return j
            time.sleep(0.1)


def released(job: dict[str, Any]) -> bool:
    return not job["provision_id"] or any(e["type"] == "release_confirmed" for e in job["events"])


def start(cluster: Cluster, name: str, **env: str) -> Proc:
    templates = cluster.tmp / f"templates-{name}"
    templates.mkdir()
    (templates / "tiny.yaml").write_text(TEMPLATE)
    return cluster.server(engine_url=None, data_dir=cluster.tmp / f"data-{name}",
                          extra=("--templates-dir", str(templates)),
                          env={"OVERNIGHT_API_KEYS": f"{KEY}:alice,{OTHER_KEY}:bob", "OVERNIGHT_PLANNER_TICK_S": "0.2",
                               "OVERNIGHT_PLANNER_POLL_S": "0.2", **env})


def all_released(cluster: Cluster, name: str) -> None:
    """Every resource the server's fake provider started is released (waits for the last releases)."""
    deadline = time.monotonic() + 60
    while True:
        records = [json.loads(p.read_text()) for p in (cluster.tmp / f"data-{name}" / "fake-provider").glob("*.json")]
        if all(r["status"] == "released" for r in records) or time.monotonic() > deadline:
            assert all(r["status"] == "released" for r in records), records
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(module_cluster: Cluster) -> Iterator[Proc]:
    # A resource is ready a second after it is asked for.
    proc = start(module_cluster, "main", OVERNIGHT_FAKE_PROVIDER_DELAY_S="1")
    yield proc
    all_released(module_cluster, "main")


@pytest.fixture(scope="module")
def slow_server(module_cluster: Cluster) -> Iterator[Proc]:
    # A resource takes 60 s: a job is held in resource_preparing long enough to cancel it there.
    proc = start(module_cluster, "slow", OVERNIGHT_FAKE_PROVIDER_DELAY_S="60")
    yield proc
    all_released(module_cluster, "slow")


@pytest.fixture(scope="module")
def api(server: Proc) -> Iterator[JobsApi]:
    a = JobsApi(server.url)
    yield a
    a.http.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    """A fresh tab; fails the test on a script error or a CSP violation."""
    context = browser.new_context(viewport={"width": 1024, "height": 800}, accept_downloads=True)
    context.set_default_timeout(15_000)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
          if msg.type == "error" and not msg.text.startswith("Failed to load resource: the server responded") else None)
    try:
        yield pg
    finally:
        context.close()
    assert not problems, problems


def sign_in_to_jobs(page, url: str, key: str = KEY) -> None:
    page.goto(url + "/console")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text("Batches")
    page.get_by_role("navigation", name="Sections").get_by_role("link", name="Jobs").click()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text("Jobs")


def card(page, job_id: str):
    return page.locator(f'li.job-card[data-job-id="{job_id}"]')


def test_create_a_job_watch_it_complete_with_its_events_and_download_the_results(page, server, api, tmp_path):
    sign_in_to_jobs(page, server.url)
    assert page.url.endswith("#/jobs")
    assert focused(page)["tag"] == "H1"
    assert page.evaluate("document.querySelector('nav a[aria-current=page]').textContent") == "Jobs"
    page.evaluate("window.__samePage = true")  # no reload from here on
    src = tmp_path / "requests.jsonl"
    src.write_bytes(lines(8, prefix="web-"))
    page.get_by_label("Input file (JSONL)").set_input_files(src)
    page.get_by_label("Model template").fill("tiny")
    provider = page.get_by_label("Provider")
    sync_api.expect(provider.locator("option[value=fake]")).to_be_attached()  # from the server's catalog
    provider.select_option("fake")
    page.get_by_label("Completion window").fill("2h")
    page.get_by_label("Name (optional)").fill("browser job")
    page.get_by_label("Priority (optional)").fill("5")
    page.get_by_role("button", name="Upload and create job").click()

    result = page.locator("form .result")
    sync_api.expect(result).to_contain_text("created from requests.jsonl")
    job_id = result.inner_text().split()[1]
    created = api.job(job_id)
    assert created["name"] == "browser job" and created["provider"] == "fake" and created["priority"] == 5
    assert created["model_template_name"] == "tiny" and created["completion_window"] == "2h"

    item = card(page, job_id)
    sync_api.expect(item).to_be_visible()
    sync_api.expect(item.locator(".badge")).to_have_text("completed", timeout=60_000)
    bar = item.get_by_role("progressbar", name=f"Progress of job {job_id}")
    sync_api.expect(item.locator(".progress-text")).to_have_text("8 of 8 requests done (100%)")
    assert bar.evaluate("p => [p.value, p.max]") == [8, 8]
    assert bar.get_attribute("aria-describedby") == item.locator(".progress-text").get_attribute("id")
    sync_api.expect(page.locator("#announcer")).to_contain_text("Job browser job is now completed.")
    sync_api.expect(item).to_contain_text("Providerfake")
    sync_api.expect(item).to_contain_text("Templatetiny version 1")
    assert page.evaluate("window.__samePage") is True
    assert page.evaluate(A11Y_PROBLEMS) == []
    page.screenshot(path=tmp_path / "jobs-completed.png", full_page=True)

    with page.expect_download() as dl:
        item.get_by_role("button", name=f"Download the output of job {job_id}").click()
    out = [json.loads(x) for x in Path(dl.value.path()).read_text().splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"web-{i}" for i in range(8))
    assert dl.value.suggested_filename == f"{job_id}_output.jsonl"

    # The detail: the events as a timeline, the provision record, the cost, the datasets.
    item.get_by_role("link", name=job_id).click()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text(f"Job {job_id}")
    assert page.url.endswith(f"#/jobs/{job_id}")
    events = page.get_by_role("region", name="Events")
    sync_api.expect(events.locator('li[data-type="release_confirmed"]')).to_be_visible(timeout=30_000)
    shown = events.locator("li").evaluate_all("items => items.map((li) => li.dataset.type)")
    want = api.wait(job_id, released)
    assert shown == [e["type"] for e in want["events"]]  # every event, oldest first
    for t in ("queued", "provision_requested", "provision_ready", "batch_created", "completed"):
        assert t in shown, shown
    assert shown.index("provision_ready") < shown.index("batch_created") < shown.index("completed") \
        < shown.index("release_confirmed")
    sync_api.expect(events.locator('li[data-type="provision_ready"]')).to_contain_text("provision ready fake resource")
    resource = page.get_by_role("region", name="Resource")
    sync_api.expect(resource).to_contain_text("Statusreleased")
    sync_api.expect(resource).to_contain_text(want["provision"]["endpoint"])
    sync_api.expect(resource).to_contain_text(want["provision"]["resource_ids"][0])
    cost = page.get_by_role("region", name="Cost")
    sync_api.expect(cost).to_contain_text("GPU-seconds")
    assert want["cost"]["gpu_seconds"] > 0
    sync_api.expect(page.get_by_role("region", name="Requests and tokens")).to_contain_text("Succeeded8")
    datasets = page.get_by_role("region", name="Datasets")
    sync_api.expect(datasets.locator('li[data-dataset="output"]')).to_contain_text(want["output_dataset"])
    with page.expect_download() as dl:
        datasets.get_by_role("button", name=f"Download the input dataset of job {job_id}").click()
    assert Path(dl.value.path()).read_bytes() == src.read_bytes()
    assert page.evaluate(A11Y_PROBLEMS) == []
    page.screenshot(path=tmp_path / "job-detail.png", full_page=True)

    # Its batch is an ordinary batch, one link away.
    page.get_by_role("region", name="Status").get_by_role("link", name=want["batch_id"]).click()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text(f"Batch {want['batch_id']}")
    page.go_back()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text(f"Job {job_id}")

    # A narrow window needs no sideways scrolling.
    page.set_viewport_size({"width": 360, "height": 740})
    sync_api.expect(events.locator('li[data-type="release_confirmed"]')).to_be_visible()
    assert page.evaluate(NO_SIDEWAYS_SCROLL) <= 0
    page.screenshot(path=tmp_path / "narrow-job-detail.png", full_page=True)


def test_cancel_a_job_held_in_resource_preparing(page, slow_server, tmp_path):
    api = JobsApi(slow_server.url)
    job = api.create(lines(3), name="held.jsonl")
    api.wait(job["id"], lambda j: j["status"] == "resource_preparing" and j["provision"]["status"] != "requested")
    sign_in_to_jobs(page, slow_server.url)
    item = card(page, job["id"])
    sync_api.expect(item.locator(".badge")).to_have_text("resource preparing")
    sync_api.expect(item.locator(".progress-text")).to_contain_text("Preparing a fake resource")
    assert item.get_by_role("progressbar").evaluate("p => p.hasAttribute('value')") is False  # indeterminate
    page.screenshot(path=tmp_path / "job-preparing.png", full_page=True)
    cancel = item.get_by_role("button", name=f"Cancel job {job['id']}")

    page.once("dialog", lambda d: d.dismiss())  # saying no sends nothing
    cancel.click()
    page.wait_for_timeout(300)
    assert api.job(job["id"])["status"] == "resource_preparing"

    page.once("dialog", lambda d: d.accept())
    cancel.focus()
    page.keyboard.press("Enter")
    sync_api.expect(item.locator(".badge")).to_have_text("cancelled", timeout=30_000)
    sync_api.expect(cancel).to_be_hidden()
    assert focused(page)["text"] == job["id"]  # focus moved to the job's link, not lost
    sync_api.expect(page.locator("#announcer")).to_contain_text(f"Job {job['id']} is now cancelled.")
    done = api.wait(job["id"], released)
    assert done["status"] == "cancelled" and done["batch_id"] is None
    page.screenshot(path=tmp_path / "job-cancelled.png", full_page=True)

    item.get_by_role("link", name=job["id"]).click()
    events = page.get_by_role("region", name="Events")
    sync_api.expect(events.locator('li[data-type="cancel_requested"]')).to_be_visible()
    sync_api.expect(events.locator('li[data-type="release_confirmed"]')).to_be_visible()
    sync_api.expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    sync_api.expect(page.get_by_role("region", name="Datasets").locator('li[data-dataset="input"]')).to_be_visible()
    assert page.evaluate(A11Y_PROBLEMS) == []
    page.screenshot(path=tmp_path / "job-cancelled-detail.png", full_page=True)
    api.http.close()


def test_create_errors_name_the_field(page, server, tmp_path):
    sign_in_to_jobs(page, server.url)
    form_error = page.locator("#view form .error")
    button = page.get_by_role("button", name="Upload and create job")
    button.click()
    sync_api.expect(form_error).to_have_text("Choose the input file (JSONL) to upload.")
    assert focused(page)["id"] == "job-file"

    src = tmp_path / "in.jsonl"
    src.write_bytes(lines(2))
    page.get_by_label("Input file (JSONL)").set_input_files(src)
    page.get_by_label("Priority (optional)").fill("high")
    button.click()
    sync_api.expect(form_error).to_contain_text("whole number from -1000 to 1000")
    assert page.get_by_label("Priority (optional)").get_attribute("aria-invalid") == "true"
    assert focused(page)["id"] == "job-priority"

    # The server's own refusal, on the field it is about.
    page.get_by_label("Priority (optional)").fill("")
    page.get_by_label("Model template").fill("no-such-template")
    button.click()
    sync_api.expect(form_error).to_contain_text("The job was not created: model template 'no-such-template' not found")
    assert page.get_by_label("Model template").get_attribute("aria-invalid") == "true"
    assert focused(page)["id"] == "job-template"
    sync_api.expect(button).to_be_enabled()


def test_another_tenant_sees_no_job_and_unknown_jobs_say_so(page, server, api):
    mine = api.create(lines(1), name="mine.jsonl")
    sign_in_to_jobs(page, server.url, OTHER_KEY)
    sync_api.expect(page.locator(".job-list")).to_be_attached()
    sync_api.expect(page.locator("section .hint", has_text="Loading")).to_be_hidden()
    assert card(page, mine["id"]).count() == 0
    page.goto(server.url + f"/console/#/jobs/{mine['id']}")
    sync_api.expect(page.locator("#view > .error")).to_have_text(f"There is no job {mine['id']} for this key.")
    api.wait(mine["id"], lambda j: j["status"] in TERMINAL and released(j))


def test_a_server_without_the_console_has_no_jobs_section(page, module_cluster):
    bare = module_cluster.server(engine_url=None, data_dir=module_cluster.tmp / "data-bare",
                                 env={"OVERNIGHT_API_KEYS": f"{KEY}:alice", "OVERNIGHT_CONSOLE": "false"})
    page.goto(bare.url + "/console")
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Sign in").click()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text("Batches")
    assert page.locator("nav a").all_inner_texts() == ["Batches"]
    page.goto(bare.url + "/console/#/jobs")
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text("Not found")
