"""A batch's own webhook_url / webhook_secret at create, through the HTTP edge in
process: what is refused (a 400 naming the field) and what is stored."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from overnight.api.app import create_app
from overnight.config import Settings
from overnight.webhooks import generate_secret
from overnight.webhooks.config import SEALED_SECRET, WebhookConfig

SECRET = generate_secret()


async def _app(tmp_path, **settings: Any):  # type: ignore[no-untyped-def]
    app = create_app(Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9", **settings))
    return app


async def create(app, ext: dict[str, Any] | None, key: str = "k") -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        f = await c.post("/v1/files", headers=headers, data={"purpose": "batch"},
                         files={"file": ("in.jsonl", b'{"custom_id": "a", "method": "POST", "url": '
                                b'"/v1/chat/completions", "body": {"model": "m", "messages": []}}\n')})
        assert f.status_code == 200, f.text
        body: dict[str, Any] = {"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
                                "completion_window": "24h"}
        if ext is not None:
            body["overnight"] = ext
        return await c.post("/v1/batches", headers=headers, json=body)


@pytest.fixture
async def open_app(tmp_path):  # type: ignore[no-untyped-def]
    app = await _app(tmp_path, webhook_secret=SECRET)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def keyed_app(tmp_path):  # type: ignore[no-untyped-def]
    app = await _app(tmp_path, api_keys="k:alice", webhook_secret=SECRET,
                     allowed_webhook_urls="https://hooks.example.com,10.1.0.0/16",
                     secret_key="_" * 43 + "=")
    async with app.router.lifespan_context(app):
        yield app


@pytest.mark.parametrize(
    ("ext", "param", "words"),
    [
        ({"webhook_url": "http://169.254.169.254/latest"}, "overnight.webhook_url", "link-local or cloud-metadata"),
        ({"webhook_url": "http://metadata.google.internal/x"}, "overnight.webhook_url", "cloud-metadata"),
        ({"webhook_url": "ftp://10.0.0.1/hook"}, "overnight.webhook_url", "http or https"),
        ({"webhook_url": "https://user:pw@hooks.example.com/x"}, "overnight.webhook_url", "credentials"),
        ({"webhook_url": "https://hooks.example.com/x?t=1"}, "overnight.webhook_url", "query"),
        ({"webhook_url": "https://hooks.example.com:99999/"}, "overnight.webhook_url", "Port out of range"),
        ({"webhook_url": 12}, "overnight.webhook_url", "http(s) URL"),
        ({"webhook_url": "https://h.example.com/x", "webhook_secret": "hunter2-hunter2"},
         "overnight.webhook_secret", "whsec_"),
        ({"webhook_url": "https://h.example.com/x",
          "webhook_secret": "whsec_" + base64.b64encode(b"short").decode()}, "overnight.webhook_secret", "bytes"),
        ({"webhook_secret": SECRET}, "overnight.webhook_secret", "needs a overnight.webhook_url"),
    ],
)
async def test_a_bad_batch_webhook_is_a_400_naming_the_field(open_app, ext, param, words) -> None:  # type: ignore[no-untyped-def]
    r = await create(open_app, ext)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert "hunter2" not in r.text


async def test_the_aibrix_key_names_its_own_fields(open_app) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=open_app), base_url="http://test") as c:
        f = await c.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", b"{}\n")})
        r = await c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h",
                                              "aibrix": {"webhook_url": "http://169.254.169.254/"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "aibrix.webhook_url"


@pytest.mark.parametrize(
    ("ext", "param", "code"),
    [
        ({"webhook_url": "https://192.0.2.10/x", "webhook_secret": SECRET}, "overnight.webhook_url",
         "webhook_url_not_allowed"),
        ({"webhook_url": "http://127.0.0.1:8080/x", "webhook_secret": SECRET}, "overnight.webhook_url",
         "webhook_url_not_allowed"),
        # Keyed: the server's secret is not the tenant's to verify with.
        ({"webhook_url": "https://hooks.example.com/t/alice"}, "overnight.webhook_secret", None),
    ],
)
async def test_keyed_mode_allows_only_listed_urls_and_needs_the_batchs_own_secret(
    keyed_app, ext, param, code  # type: ignore[no-untyped-def]
) -> None:
    r = await create(keyed_app, ext)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and (code is None or err["code"] == code), err
    if code:
        assert "OVERNIGHT_ALLOWED_WEBHOOK_URLS" in err["message"]


async def test_an_allowed_url_is_stored_with_its_secret_encrypted(keyed_app) -> None:  # type: ignore[no-untyped-def]
    own = generate_secret()
    r = await create(keyed_app, {"webhook_url": "https://hooks.example.com/t/alice/", "webhook_secret": own})
    assert r.status_code == 200, r.text
    assert own not in r.text
    rec = await keyed_app.state.store.get_batch(r.json()["id"])
    hook = rec.options["webhook"]
    assert hook["url"] == "https://hooks.example.com/t/alice" and set(hook) == {"url", SEALED_SECRET}
    assert own not in repr(rec) and keyed_app.state.secrets.open(hook[SEALED_SECRET]) == own


async def test_open_mode_signs_a_batch_url_with_the_server_secret(open_app) -> None:  # type: ignore[no-untyped-def]
    r = await create(open_app, {"webhook_url": "http://127.0.0.1:8080/hook"})
    assert r.status_code == 200, r.text
    rec = await open_app.state.store.get_batch(r.json()["id"])
    assert rec.options["webhook"] == {"url": "http://127.0.0.1:8080/hook"}


async def test_open_mode_without_any_secret_wants_the_batchs_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = await _app(tmp_path)
    async with app.router.lifespan_context(app):
        r = await create(app, {"webhook_url": "http://127.0.0.1:8080/hook"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "overnight.webhook_secret"
        assert "no OVERNIGHT_WEBHOOK_SECRET" in r.json()["error"]["message"]
        ok = await create(app, {"webhook_url": "http://127.0.0.1:8080/hook", "webhook_secret": SECRET})
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"webhook_url": "https://hooks.example.com/x"}, "OVERNIGHT_WEBHOOK_SECRET is not"),
        ({"webhook_url": "https://hooks.example.com/x", "webhook_secret": "nope"}, "OVERNIGHT_WEBHOOK_SECRET: secret #1"),
        ({"webhook_url": "hooks.example.com/x", "webhook_secret": SECRET}, "OVERNIGHT_WEBHOOK_URL must use http"),
    ],
)
def test_server_settings_are_checked_at_start(settings: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        WebhookConfig.from_settings(Settings(**settings), keyed=False)


def test_a_bad_allowlist_entry_fails_the_settings() -> None:
    with pytest.raises(ValueError, match="OVERNIGHT_ALLOWED_WEBHOOK_URLS entry"):
        Settings(allowed_webhook_urls="http://:99999")


def test_serve_refuses_to_start_with_a_webhook_url_and_no_secret(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    env = {**os.environ, "OVERNIGHT_WEBHOOK_URL": "https://hooks.example.com/overnight"}
    env.pop("OVERNIGHT_WEBHOOK_SECRET", None)
    proc = subprocess.run([sys.executable, "-m", "overnight.cli.main", "serve", "--port", "0", "--data-dir",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "overnight serve cannot start: OVERNIGHT_WEBHOOK_URL is set but OVERNIGHT_WEBHOOK_SECRET is not" \
        in proc.stderr
