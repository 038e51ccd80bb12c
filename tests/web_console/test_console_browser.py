"""The web console in a real browser: headless Chromium (Debian's ``chromium``, never
a downloaded one) driven by Playwright, against ``overnight serve`` with its built-in
mock engine and API keys configured.

Screenshots land in each test's pytest tmp dir: ``<basetemp>/<test name>0/*.png``,
the base by default ``/tmp/pytest-of-$USER/pytest-<run number>/`` (``--basetemp DIR``
puts them in DIR).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (test extra)")

CHROMIUM = os.environ.get("OVERNIGHT_TEST_CHROMIUM", "/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set OVERNIGHT_TEST_CHROMIUM)"),
]

KEY = "console-key"
OTHER_KEY = "other-key"


def lines(n: int, sleep_ms: int | list[int] | None = None, prefix: str = "r") -> bytes:
    out = []
    for i in range(n):
        body: dict[str, Any] = {"model": "mock-model", "messages": [{"role": "user", "content": f"hello {i}"}]}
        ms = sleep_ms[i] if isinstance(sleep_ms, list) else sleep_ms
        if ms is not None:
            body["mock"] = {"sleep_ms": ms}
        out.append(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": body}))
    return ("\n".join(out) + "\n").encode()


class Api:
    """The same API over plain HTTP, to set up and check what the page did."""

    def __init__(self, url: str, key: str = KEY) -> None:
        self.http = httpx.Client(base_url=url + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def create_batch(self, content: bytes, name: str = "in.jsonl") -> dict[str, Any]:
        f = self.http.post("/files", files={"file": (name, content)}, data={"purpose": "batch"})
        f.raise_for_status()
        r = self.http.post("/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h"})
        r.raise_for_status()
        return r.json()

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.http.get(f"/batches/{batch_id}").raise_for_status().json()

    def file_ids(self) -> set[str]:
        return {f["id"] for f in self.http.get("/files").raise_for_status().json()["data"]}

    def wait(self, batch_id: str, statuses: set[str], timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            b = self.batch(batch_id)
            if b["status"] in statuses or time.monotonic() > deadline:
                return b
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(module_cluster):
    # engine_url=None: serve starts its built-in mock engine; 300 ms per request by default.
    return module_cluster.server(engine_url=None, env={
        "OVERNIGHT_API_KEYS": f"{KEY}:alice,{OTHER_KEY}:bob",
        "OVERNIGHT_MOCK_LATENCY_MS": "300",
    })


@pytest.fixture(scope="module")
def api(server) -> Iterator[Api]:
    a = Api(server.url)
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
def page(browser, server) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage); fails the test on a script error or a
    Content-Security-Policy violation (HTTP errors the test provokes are expected)."""
    context = browser.new_context(viewport={"width": 1024, "height": 800}, accept_downloads=True)
    context.set_default_timeout(15_000)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
          if msg.type == "error" and not msg.text.startswith("Failed to load resource: the server responded") else None)
    pg.server_url = server.url  # type: ignore[attr-defined]
    try:
        yield pg
    finally:
        context.close()
    assert not problems, problems


def sign_in(page, key: str = KEY) -> None:
    page.goto(page.server_url + "/console")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text("Batches")


def card(page, batch_id: str):
    return page.locator(f'li.batch-card[data-batch-id="{batch_id}"]')


def focused(page) -> dict[str, str]:
    return page.evaluate("""() => { const e = document.activeElement; const s = getComputedStyle(e);
        return {tag: e.tagName, id: e.id, cls: e.className, text: e.textContent.trim(),
                outline: s.outlineStyle, outlineWidth: s.outlineWidth}; }""")


# -- signing in ---------------------------------------------------------------------------
def test_sign_in_with_the_keyboard_refuses_a_wrong_key_and_keeps_the_key_for_the_tab(page, tmp_path):
    page.goto(page.server_url + "/console")
    assert page.url.endswith("/console/")
    page.keyboard.press("Tab")
    assert focused(page)["cls"] == "skip-link"
    page.keyboard.press("Tab")
    assert focused(page)["id"] == "api-key"
    page.keyboard.type("not-a-key")
    page.keyboard.press("Enter")
    error = page.locator("#sign-in-error")
    sync_api.expect(error).to_contain_text("refused this key: Incorrect API key provided.")
    assert page.get_by_label("API key").get_attribute("aria-invalid") == "true"
    assert focused(page)["id"] == "api-key"
    assert page.evaluate("sessionStorage.length") == 0
    page.screenshot(path=tmp_path / "sign-in-refused.png")

    page.keyboard.press("Control+A")
    page.keyboard.type(KEY)
    page.keyboard.press("Enter")
    heading = page.get_by_role("heading", level=1)
    sync_api.expect(heading).to_have_text("Batches")
    assert focused(page)["tag"] == "H1"  # the reader is taken to the new view
    assert page.evaluate("Object.values(sessionStorage)") == [KEY]
    assert page.url.endswith("/console/#/batches")
    sync_api.expect(page.locator("#announcer")).to_have_text("Signed in.")

    page.reload()  # same tab: still signed in
    sync_api.expect(heading).to_have_text("Batches")

    # Keyboard all the way to "Sign out"; focus is visible on the way.
    sign_out = page.get_by_role("button", name="Sign out")
    for _ in range(10):
        page.keyboard.press("Tab")
        f = focused(page)
        if f["text"] == "Sign out":
            break
    assert f["text"] == "Sign out", f
    assert f["outline"] == "solid" and f["outlineWidth"] == "3px", f
    page.keyboard.press("Enter")
    sync_api.expect(sign_out).to_be_hidden()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    assert page.evaluate("sessionStorage.length") == 0
    assert focused(page)["id"] == "api-key"


def test_a_key_the_server_stops_accepting_signs_the_tab_out(page):
    sign_in(page)
    page.evaluate("sessionStorage.setItem('overnight.console.apiKey', 'revoked-key')")
    page.reload()
    sync_api.expect(page.locator("#sign-in-error")).to_contain_text("no longer accepts this key")
    sync_api.expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


# -- batches --------------------------------------------------------------------------------
def test_create_a_batch_from_a_file_watch_it_finish_and_download_the_output(page, api, tmp_path):
    sign_in(page)
    page.evaluate("window.__samePage = true")  # no reload may happen from here on
    src = tmp_path / "requests.jsonl"
    src.write_bytes(lines(8, sleep_ms=[300 * i for i in range(8)], prefix="watch-"))
    page.get_by_label("Input file (JSONL)").set_input_files(src)
    page.get_by_label("Endpoint").select_option("/v1/chat/completions")
    page.get_by_label("Completion window").fill("2h")
    page.get_by_label("Description (optional)").fill("from the console test")
    page.get_by_role("button", name="Upload and create batch").click()

    result = page.locator("form .result")
    sync_api.expect(result).to_contain_text("created from requests.jsonl")
    batch_id = result.inner_text().split()[1]
    created = api.batch(batch_id)
    assert created["completion_window"] == "2h" and created["metadata"] == {"description": "from the console test"}

    item = card(page, batch_id)
    sync_api.expect(item).to_be_visible()
    sync_api.expect(item.locator(".badge")).to_have_text("completed", timeout=30_000)
    bar = item.get_by_role("progressbar", name=f"Progress of batch {batch_id}")
    assert bar.evaluate("p => [p.value, p.max]") == [8, 8]
    sync_api.expect(item.locator(".progress-text")).to_have_text("8 of 8 requests done (100%)")
    assert bar.get_attribute("aria-describedby") == item.locator(".progress-text").get_attribute("id")
    sync_api.expect(page.locator("#announcer")).to_contain_text(f"Batch {batch_id} is now completed.")
    assert page.evaluate("window.__samePage") is True
    page.screenshot(path=tmp_path / "batches-completed.png", full_page=True)

    # Download from the list: fetched with the key, handed over as a file.
    with page.expect_download() as dl:
        item.get_by_role("button", name=f"Download the output of batch {batch_id}").click()
    download = dl.value
    assert download.suggested_filename.endswith(".jsonl")
    out = [json.loads(x) for x in Path(download.path()).read_text().splitlines()]
    assert sorted(o["custom_id"] for o in out) == [f"watch-{i}" for i in range(8)]
    assert all(o["response"]["status_code"] == 200 for o in out)
    sync_api.expect(page.locator("#announcer")).to_contain_text(f"Downloaded {download.suggested_filename}")

    # The detail: counts, usage, files with their downloads.
    item.get_by_role("link", name=batch_id).click()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text(f"Batch {batch_id}")
    assert page.url.endswith(f"#/batches/{batch_id}")
    requests = page.get_by_role("region", name="Requests")
    sync_api.expect(requests).to_contain_text("Total8")
    sync_api.expect(requests).to_contain_text("Succeeded8")
    usage = page.get_by_role("region", name="Token usage")
    total_tokens = api.batch(batch_id)["usage"]["total_tokens"]
    assert total_tokens > 0
    sync_api.expect(usage).to_contain_text(f"Total tokens{total_tokens}")
    files = page.get_by_role("region", name="Files")
    sync_api.expect(files.locator('li[data-file="input"]')).to_contain_text("requests.jsonl")
    sync_api.expect(files.locator('li[data-file="output"]')).to_contain_text(created["id"])
    sync_api.expect(page.get_by_role("region", name="Engine and runtime")).to_contain_text("reachable")
    sync_api.expect(page.get_by_role("region", name="Metadata")).to_contain_text("from the console test")
    with page.expect_download() as dl:
        files.get_by_role("button", name=f"Download the input file of batch {batch_id}").click()
    assert Path(dl.value.path()).read_bytes() == src.read_bytes()
    assert dl.value.suggested_filename == "requests.jsonl"
    page.screenshot(path=tmp_path / "batch-detail.png", full_page=True)
    page.go_back()
    sync_api.expect(page.get_by_role("heading", level=1)).to_have_text("Batches")


def test_cancel_a_slow_batch(page, api, tmp_path):
    slow = api.create_batch(lines(3, sleep_ms=60_000, prefix="slow-"), name="slow.jsonl")
    assert api.wait(slow["id"], {"in_progress"})["status"] == "in_progress"
    sign_in(page)
    item = card(page, slow["id"])
    sync_api.expect(item.locator(".badge")).to_have_text("in progress")
    cancel = item.get_by_role("button", name=f"Cancel batch {slow['id']}")

    # Saying no to the question sends nothing.
    page.once("dialog", lambda d: d.dismiss())
    cancel.click()
    page.wait_for_timeout(300)
    assert api.batch(slow["id"])["status"] == "in_progress"

    page.once("dialog", lambda d: d.accept())
    cancel.focus()
    page.keyboard.press("Enter")
    sync_api.expect(item.locator(".badge")).to_have_text("cancelled", timeout=30_000)
    sync_api.expect(cancel).to_be_hidden()
    assert focused(page)["text"] == slow["id"]  # focus moved to the batch's link, not lost
    assert api.batch(slow["id"])["status"] == "cancelled"
    sync_api.expect(page.locator("#announcer")).to_contain_text(f"Batch {slow['id']} is now cancelled.")
    sync_api.expect(item.locator(".progress-text")).to_contain_text("3 failed")
    page.screenshot(path=tmp_path / "batch-cancelled.png", full_page=True)


def test_create_errors_name_the_field_and_leave_no_upload_behind(page, api, tmp_path):
    sign_in(page)
    before = api.file_ids()
    form_error = page.locator("#view form .error")
    button = page.get_by_role("button", name="Upload and create batch")

    button.click()  # nothing chosen
    sync_api.expect(form_error).to_have_text("Choose the input file (JSONL) to upload.")
    assert focused(page)["id"] == "create-file"

    src = tmp_path / "in.jsonl"
    src.write_bytes(lines(2))
    page.get_by_label("Input file (JSONL)").set_input_files(src)
    page.get_by_label("Completion window").fill("forever")
    button.click()
    sync_api.expect(form_error).to_contain_text("must be a duration")
    assert page.get_by_label("Completion window").get_attribute("aria-invalid") == "true"
    assert focused(page)["id"] == "create-window"

    # The server's own refusal: this server has no model deployment templates.
    page.get_by_label("Completion window").fill("24h")
    page.get_by_label("Model template (optional)").fill("llama-70b")
    button.click()
    sync_api.expect(form_error).to_contain_text("The batch was not created: This server has no model deployment templates")
    assert page.get_by_label("Model template (optional)").get_attribute("aria-invalid") == "true"
    assert focused(page)["id"] == "create-template"
    sync_api.expect(button).to_be_enabled()
    deadline = time.monotonic() + 10
    while api.file_ids() != before and time.monotonic() < deadline:  # the upload is deleted again
        time.sleep(0.05)
    assert api.file_ids() == before


def test_another_tenant_and_unknown_batches(page, api):
    mine = api.create_batch(lines(1), name="mine.jsonl")
    sign_in(page, OTHER_KEY)
    sync_api.expect(page.locator(".batch-list")).to_be_attached()
    sync_api.expect(page.locator("section .hint", has_text="Loading")).to_be_hidden()
    assert card(page, mine["id"]).count() == 0
    page.goto(page.server_url + f"/console/#/batches/{mine['id']}")
    sync_api.expect(page.locator("#view > .error")).to_have_text(f"There is no batch {mine['id']} for this key.")


# -- layout and accessibility ----------------------------------------------------------------
NO_SIDEWAYS_SCROLL = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"


def test_a_360px_window_needs_no_horizontal_scrolling(page, api, tmp_path):
    done = api.create_batch(lines(2), name="a-rather-long-input-file-name-for-a-narrow-window.jsonl")
    api.wait(done["id"], {"completed"})
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(page.server_url + "/console/")
    assert page.evaluate(NO_SIDEWAYS_SCROLL) <= 0
    page.screenshot(path=tmp_path / "narrow-sign-in.png", full_page=True)
    sign_in(page)
    sync_api.expect(card(page, done["id"]).locator(".badge")).to_have_text("completed")
    assert page.evaluate(NO_SIDEWAYS_SCROLL) <= 0
    page.screenshot(path=tmp_path / "narrow-batches.png", full_page=True)
    card(page, done["id"]).get_by_role("link", name=done["id"]).click()
    sync_api.expect(page.get_by_role("region", name="Files").locator('li[data-file="output"]')).to_be_visible()
    assert page.evaluate(NO_SIDEWAYS_SCROLL) <= 0
    page.screenshot(path=tmp_path / "narrow-detail.png", full_page=True)


A11Y_PROBLEMS = """() => {
  const problems = [];
  const shown = (e) => e.getClientRects().length > 0;
  const name = (e) => (e.getAttribute('aria-label') || '').trim()
    || (e.getAttribute('aria-labelledby') || '').split(/\\s+/).map((id) => document.getElementById(id)?.textContent || '').join('').trim()
    || Array.from(e.labels || []).map((l) => l.textContent).join('').trim()
    || (['BUTTON', 'A'].includes(e.tagName) ? e.textContent.trim() : '');
  for (const e of document.querySelectorAll('input, select, textarea, button, a[href], progress')) {
    if (shown(e) && !name(e)) problems.push('no accessible name: ' + e.outerHTML.slice(0, 120));
  }
  for (const e of document.querySelectorAll('[aria-describedby]')) {
    for (const id of e.getAttribute('aria-describedby').split(/\\s+/)) {
      if (!document.getElementById(id)) problems.push('aria-describedby points nowhere: ' + id);
    }
  }
  const ids = Array.from(document.querySelectorAll('[id]'), (e) => e.id);
  if (new Set(ids).size !== ids.length) problems.push('duplicate ids');
  if (!document.documentElement.lang) problems.push('no lang');
  const landmarks = {banner: 'body > header', navigation: 'nav[aria-label]', main: 'main', contentinfo: 'body > footer'};
  for (const [role, sel] of Object.entries(landmarks)) {
    const e = document.querySelector(sel);
    if (!e || (role !== 'navigation' && !shown(e))) problems.push('no ' + role + ' landmark');
  }
  if (document.querySelectorAll('main').length !== 1) problems.push('main is not unique');
  const live = document.querySelectorAll('[aria-live="polite"][role="status"]');
  if (live.length !== 1) problems.push('one polite live region expected, found ' + live.length);
  const headings = Array.from(document.querySelectorAll('h1, h2, h3, h4, h5, h6')).filter(shown);
  if (headings.filter((h) => h.tagName === 'H1').length !== 1) problems.push('one visible h1 expected');
  let level = 0;
  for (const h of headings) {
    const l = Number(h.tagName[1]);
    if (l > level + 1) problems.push('heading level skips to ' + h.tagName + ': ' + h.textContent.trim());
    level = l;
  }
  for (const s of document.querySelectorAll('section')) {
    if (shown(s) && !name(s)) problems.push('section without a name');
  }
  return problems;
}"""


def test_accessibility_smoke_on_every_view(page, api, tmp_path):
    running = api.create_batch(lines(2, sleep_ms=60_000), name="a11y.jsonl")
    page.goto(page.server_url + "/console/")
    assert page.evaluate(A11Y_PROBLEMS) == []
    sign_in(page)
    sync_api.expect(card(page, running["id"])).to_be_visible()
    assert page.evaluate("document.querySelector('nav a[aria-current=page]').textContent") == "Batches"
    # This server has the console's job API, so a Jobs section (test_console_jobs.py has
    # a server without it, and no Jobs link).
    assert page.locator("nav a").all_inner_texts() == ["Batches", "Jobs"]
    assert page.evaluate(A11Y_PROBLEMS) == []
    page.goto(page.server_url + f"/console/#/batches/{running['id']}")
    sync_api.expect(page.get_by_role("button", name="Cancel batch")).to_be_visible()
    assert page.evaluate(A11Y_PROBLEMS) == []
    page.screenshot(path=tmp_path / "a11y-detail.png", full_page=True)
    # The checker is not blind: an unlabelled control is caught.
    page.evaluate("document.querySelector('main').append(Object.assign(document.createElement('input'), {type: 'text'}))")
    assert any(p.startswith("no accessible name: <input") for p in page.evaluate(A11Y_PROBLEMS))
    api.http.post(f"/batches/{running['id']}/cancel").raise_for_status()
