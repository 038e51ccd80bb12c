"""``/console``: the web console, a static page that signs in with an API key and
drives the same ``/v1`` API as the SDK.

The page's files ship inside the package (``overnight/console_static/``: plain ES
modules and CSS, no build step) and are served from a fixed table built from that
directory, so a request can only ever name one of them (no path is joined onto a
directory). Loading them needs no key (``PUBLIC_PATHS``); every API call the page
makes carries the key in ``Authorization``. Each answer carries a strict
Content-Security-Policy: scripts, styles and connections go to this origin only.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from overnight.errors import NotFoundError

__all__ = ["CSP", "PUBLIC_PATHS", "asset_names", "router"]

PREFIX = "/console"

#: Only this origin, no inline script or style, no plugins, no framing. ``img-src
#: data:`` is for the empty favicon (a ``/favicon.ico`` request would be a 401).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


@functools.cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """The shipped files by name: their bytes and media type (read once; the files
    are part of the installed package and change only with it)."""
    root = resources.files("overnight") / "console_static"
    out: dict[str, tuple[bytes, str]] = {}
    if not root.is_dir():
        return out
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _MEDIA_TYPES:
            out[entry.name] = (entry.read_bytes(), _MEDIA_TYPES[suffix])
    return out


def asset_names() -> frozenset[str]:
    """What ``/console/<name>`` serves."""
    return frozenset(_assets())


#: Served without a key even when keys are configured: the page itself holds no data.
PUBLIC_PATHS: frozenset[str] = frozenset({PREFIX, PREFIX + "/"} | {f"{PREFIX}/{n}" for n in asset_names()})

router = APIRouter(tags=["console"], include_in_schema=False)

_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every load, so an upgraded server never pairs a new page with old modules.
    "Cache-Control": "no-cache",
}


def _serve(name: str) -> Response:
    found = _assets().get(name)
    if found is None:
        raise NotFoundError(f"No console file {name!r}.")
    body, media_type = found
    return Response(body, media_type=media_type, headers=_HEADERS)


@router.get(PREFIX)
async def console_redirect() -> RedirectResponse:
    # Relative, so it also works behind a proxy that mounts the service under a prefix;
    # the page's own URLs are relative to /console/.
    return RedirectResponse("console/", status_code=308)


@router.get(PREFIX + "/")
async def console_index() -> Response:
    return _serve("index.html")


@router.get(PREFIX + "/{name}")
async def console_asset(name: str) -> Response:
    return _serve(name)
