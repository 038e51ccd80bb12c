"""``/console``: the web console's files are served from the package, without a key,
with a strict Content-Security-Policy, and nothing outside the shipped set is
reachable through it. The page's own behaviour is tested in a browser
(tests/web_console/test_console_browser.py)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from overnight.api.app import create_app
from overnight.api.routes import console
from overnight.batches.service import SUPPORTED_ENDPOINTS
from overnight.config import Settings

STATIC = Path(console.__file__).resolve().parents[2] / "console_static"


@pytest.fixture
async def keyed(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9", api_keys="key-a:alice"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield c


async def test_page_and_assets_load_without_a_key_in_keyed_mode(keyed):
    r = await keyed.get("/console/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.text.startswith("<!doctype html>")
    assert r.content == (STATIC / "index.html").read_bytes()
    for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = await keyed.get(f"/console/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].startswith(media), name
        assert r.content == (STATIC / name).read_bytes()
    # The page being public opens nothing else: the API still wants the key.
    assert (await keyed.get("/v1/batches")).status_code == 401
    assert (await keyed.get("/v1/batches", headers={"Authorization": "Bearer key-a"})).status_code == 200


async def test_console_redirects_to_the_directory_url(keyed):
    r = await keyed.get("/console")
    assert r.status_code == 308
    assert r.headers["location"] == "console/"  # relative: works under a path prefix too
    r = await keyed.get("/console", follow_redirects=True)
    assert r.status_code == 200 and str(r.url) == "http://t/console/"


async def test_every_answer_carries_the_security_headers(keyed):
    for path in ("/console/", "/console/app.js", "/console/style.css"):
        r = await keyed.get(path)
        csp = r.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'self'"
        assert directives["script-src"] == "'self'" and "unsafe" not in csp
        assert directives["frame-ancestors"] == "'none'"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-cache"


async def test_only_shipped_files_are_served(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9"))  # open mode: past the edge
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            for path in ("/console/nope.js", "/console/..%2Froutes%2Fconsole.py", "/console/%2E%2E%2F__init__.py",
                         "/console/__init__.py", "/console/console.py"):
                r = await c.get(path)
                assert r.status_code == 404, path
                assert "error" in r.json(), path  # an error body, never a file's text
    # Unknown names are not public: in keyed mode they are a 401 like any other path.
    assert "/console/nope.js" not in console.PUBLIC_PATHS


def test_public_paths_are_exactly_the_shipped_files() -> None:
    shipped = {p.name for p in STATIC.iterdir() if p.suffix in {".html", ".js", ".css"}}
    assert {"index.html", "app.js", "style.css"} <= shipped
    assert console.asset_names() == shipped
    assert console.PUBLIC_PATHS == {"/console", "/console/"} | {f"/console/{n}" for n in shipped}


# -- what the files say ------------------------------------------------------------------
def _text(name: str) -> str:
    return (STATIC / name).read_text()


def test_every_module_and_link_the_page_names_is_shipped() -> None:
    """A typo in an import would only show as a blank page in a browser."""
    names = set(console.asset_names())
    html = _text("index.html")
    refs = set(re.findall(r'(?:src|href)="([^"#:]+)"', html))
    assert refs == {"style.css", "app.js"}, refs
    for name in (n for n in names if n.endswith(".js")):
        for target in re.findall(r'^\s*(?:import|export)\b[^;]*?from\s+"([^"]+)"', _text(name), re.M | re.S):
            assert target.startswith("./"), (name, target)
            assert target[2:] in names, f"{name} imports {target}, which is not shipped"


def test_nothing_is_loaded_from_elsewhere_and_nothing_is_inline() -> None:
    """The CSP (default-src 'self', no 'unsafe-inline') would block both."""
    for name in console.asset_names():
        text = _text(name)
        assert not re.search(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}/", text), f"{name} names another origin"
        assert "@import url(" not in text and "fonts.googleapis" not in text
    html = _text("index.html")
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert "<style" not in html and " style=" not in html and not re.search(r"\son\w+=", html)
    for name in (n for n in console.asset_names() if n.endswith(".js")):
        assert not re.search(r"\.innerHTML\s*=(?!=)", _text(name)) and "insertAdjacentHTML" not in _text(name), name


def test_the_create_form_offers_exactly_the_supported_endpoints() -> None:
    m = re.search(r"export const ENDPOINTS = \[([^\]]*)\]", _text("batches.js"))
    assert m, "batches.js: ENDPOINTS"
    assert tuple(re.findall(r'"([^"]+)"', m.group(1))) == SUPPORTED_ENDPOINTS
