"""The interactive API docs, Swagger UI at /docs and ReDoc at /redoc, with their scripts, styles and icon
served by amserve itself: FastAPI's own pages load them from a CDN, blank where the service has no internet.

The assets are those of the fastapi-offline package (Swagger UI 5, which renders the OpenAPI 3.1 that
FastAPI writes, and ReDoc's standalone bundle); swagger-ui-bundle ships Swagger UI 4, which cannot.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs/assets"
# The pages may load nothing from elsewhere (ReDoc's sidebar would fetch its maker's logo): the inline
# script that starts Swagger UI, injected styles, data: images and ReDoc's search worker are theirs.
SELF_ONLY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
             "img-src 'self' data:; worker-src 'self' blob:")

pages = APIRouter(include_in_schema=False)


def assets() -> StaticFiles:
    return StaticFiles(packages=[("fastapi_offline", "static")])


def _root(request: Request) -> str:
    """Where the app is mounted (a proxy's root path), as FastAPI's own docs pages do."""
    return request.scope.get("root_path", "").rstrip("/")


@pages.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    # validatorUrl null: Swagger UI would otherwise send the document to an online validator.
    page = get_swagger_ui_html(openapi_url=root + request.app.openapi_url, title=f"{request.app.title} API",
                               swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                               swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                               swagger_ui_parameters={"validatorUrl": None})
    page.headers["Content-Security-Policy"] = SELF_ONLY
    return page


@pages.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    page = get_redoc_html(openapi_url=root + request.app.openapi_url, title=f"{request.app.title} API",
                          redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                          redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)
    page.headers["Content-Security-Policy"] = SELF_ONLY
    return page
