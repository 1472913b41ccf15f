"""The explorer page at /explorer/: the served models explaining themselves, in a browser.

Static files (HTML, ES modules, CSS) from the `explorer/` folder beside this module, calling the public
API (/v1/explain, retrieve and complete with `"explain": true`, /v1/complete, fidelity) with relative
URLs, so the page works behind a proxy's root path. Nothing is loaded from elsewhere: no CDN, no build.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

URL = "/explorer"
FILES = Path(__file__).with_name("explorer")
# Stricter than the docs pages' policy: the explorer has no inline script or style at all (its scripts
# set styles through the CSSOM, which the policy does not govern) and calls only its own server.
SELF_ONLY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
             "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

pages = APIRouter(include_in_schema=False)


@pages.get(URL)
async def explorer_root() -> RedirectResponse:
    # Relative, so that it lands under whatever root path the proxy in front of the app strips.
    return RedirectResponse("explorer/", status_code=308)


class ExplorerFiles(StaticFiles):
    """The page's files, each answered with the page's Content-Security-Policy."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = SELF_ONLY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def files() -> StaticFiles:
    return ExplorerFiles(directory=FILES, html=True)
